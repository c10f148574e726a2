"""The two loops shared by every method (DESIGN.md §2): ``pretrain(job)`` and ``finetune(cell)``.

The protocol owns the loop, the optimiser and its schedule, mixed precision and checkpointing;
a method only turns a batch of views into a loss. Batches are sampled from uint8 tensors held in
memory (on the GPU when there is one) and augmented there as whole batches.

Under ``torchrun`` (``bench.distributed``) ``pretrain`` trains one model on several processes: each
takes its shard of every global batch, draws its own views, and DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench import augment, distributed
from bench.errors import BenchError
from bench.methods import build_method
from bench.methods.base import Method, PretrainContext
from bench.metrics import segmentation_metrics, summarize
from bench.models import build_segmentation_model, create_backbone, dice_bce_loss, feature_channels
from bench.spec import Schedule

Progress = Callable[[int], None]  # called with the number of steps just done
TOTAL_LOSS = "__total_loss__"  # the optimised loss (with modifiers' terms) among the all-reduced logs


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the job fails with this reason, the run goes on."""


# --- device and precision -------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BenchError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: there CPU bf16 autocast measures faster than fp32 (issue #9's figures)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA and on CPUs with native bf16 units, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_module(module: nn.Module, device: torch.device) -> nn.Module:
    module = module.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return module


# --- optimiser ------------------------------------------------------------------------------------

def make_optimizer(params: list[nn.Parameter], schedule: Schedule) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), Adam or AdamW; fused kernels (one pass over all tensors, not one per tensor)."""
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(params, lr=schedule.lr, momentum=0.9, weight_decay=schedule.weight_decay,
                               foreach=True)
    adam = torch.optim.Adam if schedule.optimizer == "adam" else torch.optim.AdamW
    return adam(params, lr=schedule.lr, weight_decay=schedule.weight_decay, fused=True)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero (the same for every method)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int, total: int) -> None:
    factor = lr_factor(step, total, schedule.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr * factor


def batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` index batches of exactly ``batch_size``: epochs of seeded permutations, concatenated
    (a set smaller than a batch repeats, each copy augmented differently)."""
    buffer = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while buffer.numel() < batch_size:
            buffer = torch.cat([buffer, torch.randperm(num_items, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


# --- pretraining ----------------------------------------------------------------------------------

@dataclass
class PretrainResult:
    state: dict[str, dict[str, Tensor]]
    log: list[dict[str, float]]
    seconds: float
    images_per_s: float
    steps: int


@dataclass
class LabelledBatchSource:
    """The labelled subset handed to label-reading methods (MeanFlow's masks, Med-DisSeg stage I)."""

    images: Tensor  # (L, 3, S, S) uint8
    masks: Tensor  # (L, 1, S, S) uint8


def pretrain(method_spec, pool: Tensor, schedule: Schedule, backbone_name: str, init: str, seed: int,
             device: torch.device, precision: str, labelled: LabelledBatchSource | None = None,
             progress: Progress | None = None, log_every: int = 10, compile_model: bool = False) -> PretrainResult:
    """Pretrain a backbone with one method on ``pool`` (N, 3, S, S) uint8; return the exported weights.

    Under torchrun every rank calls this with the same arguments: the global batch
    (``schedule.batch_size``) is split over the ranks, gradients are averaged (DDP), and the loss and
    logs are the global ones (all-reduced on log steps). Every rank returns the same weights.
    """
    torch.manual_seed(seed)
    aligned = labelled is not None and method_spec.cls.trains_on_labelled
    source = labelled.images if aligned else pool
    batch_size = min(schedule.batch_size, max(2, len(source)))  # global: summed over the ranks
    distributed.per_rank_batch(batch_size)  # under torchrun: fail before building if it does not split
    steps = schedule.num_steps(len(source))
    method = build_pretrain_method(method_spec, backbone_name, init, schedule.size, len(source), batch_size,
                                   steps, device, compile_model)
    optimizer = make_optimizer([p for p in method.parameters() if p.requires_grad], schedule)
    forward = distributed.wrap_step(method, device) if distributed.active() else None
    if distributed.rank() > 0:  # the methods' own draws (noise, shuffles) differ per rank; rank 0 as alone
        torch.manual_seed(distributed.rank_seed(seed))
    source = source.to(device)
    cpu_gen = torch.Generator().manual_seed(seed)  # the same global batches on every rank
    view_gen = torch.Generator(device=device).manual_seed(distributed.rank_seed(seed))
    label_masks = None if labelled is None else labelled.masks.to(device)
    mask_gen = torch.Generator().manual_seed(seed + 1)
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    for step, batch in enumerate(batches(len(source), batch_size, steps, cpu_gen)):
        idx = distributed.shard(batch).to(device)
        masks = None
        if aligned:  # the method trains on the labelled subset itself (Med-DisSeg stage I)
            masks = label_masks[idx]
        elif label_masks is not None:  # pool images plus a batch of labelled masks as extra inputs
            drawn = torch.randint(len(label_masks), (batch_size,), generator=mask_gen)
            masks = label_masks[distributed.shard(drawn).to(device)]
        set_lr(optimizer, schedule, step, steps)
        views = method.make_views(source[idx], idx, view_gen, masks=masks)
        loss, logs = pretrain_step(method, optimizer, views, step, device, precision, forward)
        if step % log_every == 0 or step == steps - 1:
            values = distributed.mean_across_ranks({**logs, TOTAL_LOSS: loss})
            total = values.pop(TOTAL_LOSS)
            if not math.isfinite(total):  # the global loss: every rank stops here alike
                raise NonFiniteLoss(f"{method_spec.label}: loss became {total} at pretraining step {step}")
            log.append({"step": step, **values})
        if progress:
            progress(1)
    sync_device(device)
    seconds = time.perf_counter() - start
    return PretrainResult(method.export(), log, seconds, steps * batch_size / max(seconds, 1e-9), steps)


def build_pretrain_method(method_spec, backbone_name: str, init: str, size: int, pool_size: int,
                          batch_size: int, steps: int, device: torch.device, compile_model: bool = False) -> Method:
    """The method around a fresh backbone (stride and init as the method and spec ask), on ``device``.

    ``batch_size`` is the global batch (all ranks together): the keys a queue receives per step.
    """
    cls = method_spec.cls
    backbone = create_backbone(backbone_name, pretrained=(init == "imagenet"), output_stride=cls.output_stride)
    if init not in ("scratch", "imagenet"):
        load_backbone_file(backbone, Path(init))
    ctx = PretrainContext(feature_channels=feature_channels(backbone), total_steps=steps, batch_size=batch_size,
                          pool_size=pool_size, image_size=size, distributed=distributed.active())
    method = prepare_module(build_method(method_spec, backbone, ctx), device)
    method.train()
    if compile_model:  # in place: state-dict keys (and so the exported checkpoint) stay the same
        method.backbone.compile()
    return method


def pretrain_step(method: Method, optimizer: torch.optim.Optimizer, views: augment.Views, step: int,
                  device: torch.device, precision: str,
                  forward: Callable[..., tuple[Tensor, dict[str, Tensor]]] | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward under autocast, backward, optimiser step, EMA update. No host synchronisation.

    ``forward``: the DDP-wrapped step under torchrun (its backward averages the gradients across
    ranks); ``method.step`` otherwise.
    """
    with autocast(device, precision):
        loss, logs = (forward or method.step)(views, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.after_optimizer_step(step)
    return loss, logs


def load_backbone_file(backbone: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BenchError(f"init checkpoint {path} does not exist; pass scratch, imagenet or a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone.load_state_dict(state.get("backbone", state), strict=True)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- fine-tuning ----------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    metrics: dict[str, float]
    per_image: dict[str, list[float]]
    test_ids: list[str]
    seconds: float
    images_per_s: float
    steps: int
    final_loss: float
    peak_memory_mb: float | None = None
    log: list[dict[str, float]] = field(default_factory=list)


def finetune(init: str, backbone_name: str, images: Tensor, masks: Tensor, train_idx: np.ndarray,
             test_idx: np.ndarray, ids: list[str], schedule: Schedule, seed: int, device: torch.device,
             precision: str, progress: Progress | None = None,
             regulariser: Callable[[list[Tensor]], Tensor] | None = None,
             compile_model: bool = False) -> FinetuneResult:
    """Train backbone + DeepLabv3 head on ``train_idx`` (the labelled subset), evaluate on ``test_idx``.

    ``images`` (N, 3, S, S) uint8 and ``masks`` (N, S, S) uint8 at the evaluation resolution S.
    ``init``: scratch | imagenet | a checkpoint file.
    """
    torch.manual_seed(seed)
    model = prepare_module(build_segmentation_model(backbone_name, init), device)
    if compile_model:
        model.compile()
    optimizer = make_optimizer(list(model.parameters()), schedule)
    train_images = torch.as_tensor(images[train_idx]).to(device)
    train_masks = torch.as_tensor(masks[train_idx]).unsqueeze(1).to(device)
    batch_size = max(2, schedule.batch_size)  # BN in the ASPP pooling branch needs two samples
    steps = schedule.num_steps(len(train_idx))
    cpu_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    features: list[Tensor] = []
    hook = model.backbone.register_forward_hook(lambda _m, _i, out: features.append(out)) \
        if regulariser else None
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log: list[dict[str, float]] = []
    loss = torch.zeros(())
    start = time.perf_counter()
    for step, idx in enumerate(batches(len(train_idx), batch_size, steps, cpu_gen)):
        idx = idx.to(device)
        x, y = augment.finetune_batch(train_images[idx], train_masks[idx], schedule.size, aug_gen)
        set_lr(optimizer, schedule, step, steps)
        features.clear()
        loss = finetune_step(model, optimizer, x, y, device, precision,
                             None if regulariser is None else lambda: regulariser(features[0]))
        if step % 10 == 0 or step == steps - 1:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"fine-tuning loss became {value} at step {step}")
            log.append({"step": step, "loss": value})
        if progress:
            progress(1)
    if hook is not None:
        hook.remove()
    sync_device(device)
    seconds = time.perf_counter() - start
    per_image = evaluate(model, images[test_idx], masks[test_idx], device, precision)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return FinetuneResult(summarize(per_image), {k: v.tolist() for k, v in per_image.items()},
                          [ids[i] for i in test_idx], seconds, steps * batch_size / max(seconds, 1e-9),
                          steps, log[-1]["loss"] if log else float("nan"), peak, log)


def finetune_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                  device: torch.device, precision: str, extra_loss: Callable[[], Tensor] | None = None) -> Tensor:
    """One fine-tuning step: Dice + BCE (+ the regulariser's term), backward, optimiser step."""
    with autocast(device, precision):
        loss = dice_bce_loss(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray | Tensor, device: torch.device, precision: str,
            batch_size: int = 32) -> np.ndarray:
    """Binary predictions (N, S, S) bool at the images' resolution."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = augment.to_input(torch.as_tensor(images[start:start + batch_size]).to(device))
        with autocast(device, precision):
            logits = model(x)
        out.append((logits[:, 0].float() > 0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(images.shape[-2:]), dtype=bool)


def evaluate(model: nn.Module, images: np.ndarray, masks: np.ndarray, device: torch.device,
             precision: str) -> dict[str, np.ndarray]:
    """Per-image IoU, Dice, precision, recall, HD95 on the test split."""
    prediction = predict(model, images, device, precision)
    return segmentation_metrics(prediction, np.asarray(masks) > 0)


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded in every record."""
    import lightly
    import timm
    import torchvision

    import bench

    return {
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "timm": timm.__version__, "lightly": lightly.__version__, "bench": bench.__version__,
                     "python": platform.python_version(), "git_commit": git_commit()},
        "hardware": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                     "cpus": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }


def git_commit() -> str | None:
    import subprocess

    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
