"""The two loops shared by every method (docs/architecture.md): ``pretrain(job, data, runtime, progress)``
and ``finetune(cell, data, runtime, progress)``.

The protocol owns the loop, the optimiser and its schedule, the number format and evaluation; a
method only turns a batch of views into a loss. ``job``/``cell`` (``bench.grid``) say what to train,
``data`` holds the tensors the runner prepared, ``runtime`` (``bench.runtime``) where and how to
compute. Batches are sampled from uint8 tensors held in memory (on the GPU when there is one) and
augmented there as whole batches. Files are the store's business: results come back as values.

Under ``torchrun`` (``bench.distributed``) ``pretrain`` trains one model on several processes: each
takes its shard of every global batch, draws its own views, and DDP averages the gradients.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import augment, distributed
from bench.methods import build_method
from bench.methods.base import Method, PretrainContext
from bench.metrics import segmentation_metrics, summarize
from bench.models import build_segmentation_model, create_backbone, dice_bce_loss, feature_channels, load_aspp
from bench.runtime import SCREEN_IMAGES, Runtime, sync
from bench.spec import Schedule

if TYPE_CHECKING:
    from bench.datasets import NativeMasks
    from bench.grid import FinetuneCell, PretrainJob

# What the protocol computes, as a version in every job's and cell's identity and record: a change that
# moves the numbers (here: DeepLabv3's ASPP rates matching the output stride, evaluation at the masks'
# own resolution) bumps it, so no cell of an older protocol is reused. 1: up to medssl-bench 0.1.0.
PROTOCOL_VERSION = 2

Progress = Callable[[int], None]  # called with the number of steps just done
TOTAL_LOSS = "__total_loss__"  # the optimised loss (with modifiers' terms) among the all-reduced logs


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the job fails with this reason, the run goes on."""


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


def choose_numerics(runtime: Runtime, phase: str, backbone: str, size: int, batch: int,
                    trial: Callable[[str], None], collective: bool = False) -> str:
    """The number format (fp32 | bf16) of a training loop: ``runtime.precision_for`` keyed by phase,
    backbone, size and batch. ``trial(p)`` must run on a copy (the runtime restores the RNG state),
    so the results do not depend on whether the choice was measured now or read from the cache.

    ``collective``: every rank trains this loop together (pretraining under torchrun). Then nothing
    is measured (a method's step may wait on collectives of the other ranks) and every rank takes
    rank 0's choice."""
    key = {"phase": phase, "backbone": backbone, "size": size, "batch": batch}
    if not (collective and distributed.active()):
        return runtime.precision_for(key, trial)
    return distributed.broadcast_object(runtime.precision_for(key, None))


def _autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """``Runtime.autocast`` for the step functions, which take a device (``bench speed`` calls them too)."""
    return Runtime(device).autocast(precision)


# --- pretraining ----------------------------------------------------------------------------------

@dataclass
class LabelledBatchSource:
    """The labelled images handed to label-reading methods (MeanFlow's masks, Med-DisSeg stage I,
    the supervised control)."""

    images: Tensor  # (L, 3, S, S) uint8
    masks: Tensor  # (L, 1, S, S) uint8


@dataclass
class PretrainData:
    """What a pretrain job trains on: the unlabelled pool and, for label-reading jobs, the labelled images."""

    pool: Tensor  # (N, 3, S, S) uint8
    labelled: LabelledBatchSource | None = None


@dataclass
class PretrainResult:
    state: dict[str, dict[str, Tensor]]
    log: list[dict[str, float]]
    seconds: float
    images_per_s: float
    steps: int
    numerics: str = "fp32"  # the number format it trained in


def pretrain(job: PretrainJob, data: PretrainData, runtime: Runtime, progress: Progress | None = None,
             log_every: int = 10) -> PretrainResult:
    """Pretrain a backbone with ``job.method`` on ``data``; return the exported weights.

    Under torchrun every rank calls this with the same arguments: the global batch
    (``schedule.batch_size``) is split over the ranks, gradients are averaged (DDP), and the loss and
    logs are the global ones (all-reduced on log steps). Every rank returns the same weights.
    """
    schedule, device, seed = method_schedule(job), runtime.device, job.seed
    torch.manual_seed(seed)
    aligned = job.labels is not None and job.labels.aligned and data.labelled is not None
    source = data.labelled.images if aligned else data.pool
    batch_size = min(schedule.batch_size, max(2, len(source)))  # global: summed over the ranks
    distributed.per_rank_batch(batch_size)  # under torchrun: fail before building if it does not split
    steps = schedule.num_steps(len(source))

    def build() -> Method:
        return build_pretrain_method(job.method, job.backbone, job.init, schedule.size, len(source), batch_size,
                                     steps, device)

    method = build()
    optimizer = make_optimizer([p for p in method.parameters() if p.requires_grad], schedule)
    label_masks = None if data.labelled is None else data.labelled.masks.to(device)
    source = source.to(device)
    numerics = choose_numerics(runtime, "pretrain", job.backbone, schedule.size,
                               distributed.per_rank_batch(batch_size),
                               _pretrain_trial(build, schedule, source, label_masks, batch_size, seed),
                               collective=True)
    if runtime.compile:  # in place: state-dict keys (and so the exported checkpoint) stay the same
        method.backbone.compile()
    forward = distributed.wrap_step(method, device) if distributed.active() else None
    if distributed.rank() > 0:  # the methods' own draws (noise, shuffles) differ per rank; rank 0 as alone
        torch.manual_seed(distributed.rank_seed(seed))
    cpu_gen = torch.Generator().manual_seed(seed)  # the same global batches on every rank
    view_gen = torch.Generator(device=device).manual_seed(distributed.rank_seed(seed))
    mask_gen = torch.Generator().manual_seed(seed + 1)
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    for step, batch in enumerate(batches(len(source), batch_size, steps, cpu_gen)):
        idx = distributed.shard(batch).to(device)
        masks = None
        if aligned:  # the method trains on the labelled subset itself (Med-DisSeg stage I, supervised)
            masks = label_masks[idx]
        elif label_masks is not None:  # pool images plus a batch of labelled masks as extra inputs
            drawn = torch.randint(len(label_masks), (batch_size,), generator=mask_gen)
            masks = label_masks[distributed.shard(drawn).to(device)]
        set_lr(optimizer, schedule, step, steps)
        views = method.make_views(source[idx], idx, view_gen, masks=masks)
        loss, logs = pretrain_step(method, optimizer, views, step, device, numerics, forward)
        if step % log_every == 0 or step == steps - 1:
            values = distributed.mean_across_ranks({**logs, TOTAL_LOSS: loss})
            total = values.pop(TOTAL_LOSS)
            if not math.isfinite(total):  # the global loss: every rank stops here alike
                raise NonFiniteLoss(f"{job.method.label}: loss became {total} at pretraining step {step}")
            log.append({"step": step, **values})
        if progress:
            progress(1)
    sync(device)
    seconds = time.perf_counter() - start
    return PretrainResult(method.export(), log, seconds, steps * batch_size / max(seconds, 1e-9), steps, numerics)


def method_schedule(job: PretrainJob) -> Schedule:
    """The job's pretraining schedule with the fields its method sets itself (``Method.schedule_keys``)."""
    keys = job.method.cls.schedule_keys
    return replace(job.schedule, **{k: job.method.cfg[k] for k in keys}) if keys else job.schedule


def _pretrain_trial(build: Callable[[], Method], schedule: Schedule, source: Tensor, label_masks: Tensor | None,
                    batch_size: int, seed: int) -> Callable[[str], None]:
    """One pretraining step at a given precision on a freshly built copy of the method (built on first
    call, inside the runtime's RNG fork), on a fixed batch drawn with its own generator; its
    ``screen`` is the same on ``SCREEN_IMAGES`` images (``bench.runtime.measure_trial``)."""
    def on(images: int) -> Callable[[str], None]:
        box: dict[str, Any] = {}

        def trial(precision: str) -> None:
            if not box:
                copy_ = build()
                device = source.device
                idx = torch.arange(images, device=device)
                masks = None if label_masks is None else label_masks[idx % len(label_masks)]
                gen = torch.Generator(device=device).manual_seed(seed)
                box.update(method=copy_, views=copy_.make_views(source[idx], idx, gen, masks=masks),
                           optimizer=make_optimizer([p for p in copy_.parameters() if p.requires_grad], schedule))
            pretrain_step(box["method"], box["optimizer"], box["views"], 0, source.device, precision)

        return trial

    full = min(distributed.per_rank_batch(batch_size), len(source))
    return _with_screen(on(full), on, full)


def _with_screen(trial: Callable[[str], None], on: Callable[[int], Callable[[str], None]],
                 full: int) -> Callable[[str], None]:
    """``trial`` with a ``screen``: the same step on ``SCREEN_IMAGES`` images (if fewer than ``full``)."""
    if full > SCREEN_IMAGES:
        trial.screen, trial.screen_batch = on(SCREEN_IMAGES), SCREEN_IMAGES  # type: ignore[attr-defined]
    return trial


def build_pretrain_method(method_spec, backbone_name: str, init: str, size: int, pool_size: int,
                          batch_size: int, steps: int, device: torch.device, compile_model: bool = False) -> Method:
    """The method around a fresh backbone (stride and init as the method and spec ask), on ``device``.

    ``batch_size`` is the global batch (all ranks together): the keys a queue receives per step.
    """
    cls = method_spec.cls
    backbone = create_backbone(backbone_name, pretrained=(init == "imagenet"), output_stride=cls.output_stride)
    if init not in ("scratch", "imagenet"):
        from bench.checkpoints import load_into  # any encoder checkpoint, keys mapped (docs/encoders.md)

        load_into(backbone, Path(init))
    ctx = PretrainContext(feature_channels=feature_channels(backbone), total_steps=steps, batch_size=batch_size,
                          pool_size=pool_size, image_size=size, distributed=distributed.active())
    method = Runtime(device).prepare(build_method(method_spec, backbone, ctx))
    method.train()
    if compile_model:  # in place: state-dict keys (and so the exported checkpoint) stay the same
        method.backbone.compile()
    return method


def pretrain_step(method: Method, optimizer: torch.optim.Optimizer, views: augment.Views, step: int,
                  device: torch.device, precision: str,
                  forward: Callable[..., tuple[Tensor, dict[str, Tensor]]] | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward under autocast at ``precision`` (fp32 | bf16), backward, optimiser step, EMA update.
    No host synchronisation.

    ``forward``: the DDP-wrapped step under torchrun (its backward averages the gradients across
    ranks); ``method.step`` otherwise.
    """
    with _autocast(device, precision):
        loss, logs = (forward or method.step)(views, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.after_optimizer_step(step)
    return loss, logs


# --- fine-tuning ----------------------------------------------------------------------------------

@dataclass
class FinetuneData:
    """What a finetune cell trains and is scored on, at the working size S (built by the runner)."""

    images: np.ndarray  # (N, 3, S, S) uint8
    masks: np.ndarray  # (N, S, S) uint8
    ids: list[str]
    train: np.ndarray  # indices of the labelled subset
    test: np.ndarray  # indices of the test images
    native: NativeMasks | None = None  # every image's mask at its original H×W (native evaluation)
    init_state: dict[str, Any] | None = None  # pretrained weights from the store ("backbone"[, "head"])
    test_sets: dict[str, FinetuneData] = field(default_factory=dict)  # scored separately (generalisation)


@dataclass
class Scores:
    """One test set's scores: per-image metrics, their means, the test ids, the kept predictions."""

    metrics: dict[str, float]
    per_image: dict[str, list[float]]
    test_ids: list[str]
    predictions: list[np.ndarray] | None = None


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
    eval_seconds: float = 0.0
    numerics: str = "fp32"
    predictions: list[np.ndarray] | None = None  # the first test images' binary predictions, as scored
    state: dict[str, Tensor] | None = None  # the fine-tuned weights (only when the cell keeps them)
    test_sets: dict[str, Scores] = field(default_factory=dict)  # data.test_sets' scores, by name


def finetune(cell: FinetuneCell, data: FinetuneData, runtime: Runtime, progress: Progress | None = None
             ) -> FinetuneResult:
    """Train backbone + DeepLabv3 head on ``data.train`` (the labelled subset), evaluate on ``data.test``.

    Initialisation: ``data.init_state`` (a pretrain job's weights) or ``cell.init`` (scratch | imagenet
    | an external encoder). ``cell.schedule.freeze == "backbone"``: the backbone stays as initialised
    (no gradients, BatchNorm in eval mode) and only the head trains.
    """
    schedule, device, seed = cell.schedule, runtime.device, cell.seed
    torch.manual_seed(seed)
    model = runtime.prepare(_segmentation_model(cell, data))
    frozen = schedule.freeze == "backbone"
    if frozen:
        model.backbone.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, schedule)
    train_images = torch.as_tensor(data.images[data.train]).to(device)
    train_masks = torch.as_tensor(data.masks[data.train]).unsqueeze(1).to(device)
    batch_size = max(2, schedule.batch_size)  # BN in the ASPP pooling branch needs two samples
    steps = schedule.num_steps(len(data.train))
    numerics = choose_numerics(runtime, "finetune", cell.backbone, schedule.size, batch_size,
                               _finetune_trial(model, schedule, train_images, train_masks, batch_size, seed, frozen))
    if runtime.compile:
        model.compile()
    regulariser = finetune_regulariser(schedule)
    cpu_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    features: list[Tensor] = []
    hook = model.backbone.register_forward_hook(lambda _m, _i, out: features.append(out)) \
        if regulariser else None
    _train_mode(model, frozen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    for step, idx in enumerate(batches(len(data.train), batch_size, steps, cpu_gen)):
        idx = idx.to(device)
        x, y = augment.finetune_batch(train_images[idx], train_masks[idx], schedule.size, aug_gen)
        set_lr(optimizer, schedule, step, steps)
        features.clear()
        loss = finetune_step(model, optimizer, x, y, device, numerics,
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
    sync(device)
    seconds = time.perf_counter() - start
    evaluated = time.perf_counter()
    own = _scores(model, data, runtime, numerics, cell)
    test_sets = {name: _scores(model, part, runtime, numerics, cell) for name, part in data.test_sets.items()}
    eval_seconds = time.perf_counter() - evaluated
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if cell.keep_model else None
    return FinetuneResult(own.metrics, own.per_image, own.test_ids, seconds, steps * batch_size / max(seconds, 1e-9),
                          steps, log[-1]["loss"] if log else float("nan"), peak, log, eval_seconds, numerics,
                          own.predictions, state, test_sets)


def _scores(model: nn.Module, data: FinetuneData, runtime: Runtime, numerics: str, cell: FinetuneCell) -> Scores:
    per_image, kept = evaluate(model, data, runtime, numerics, native=cell.eval == "native",
                               keep=cell.keep_predictions)
    return Scores(summarize(per_image), {k: v.tolist() for k, v in per_image.items()},
                  [data.ids[i] for i in data.test], kept)


def _segmentation_model(cell: FinetuneCell, data: FinetuneData) -> nn.Module:
    """Backbone + head as the cell starts: the pretrain job's weights (loaded strictly) or ``cell.init``."""
    if data.init_state is None:
        return build_segmentation_model(cell.backbone, cell.init or "scratch")
    model = build_segmentation_model(cell.backbone, "scratch")
    model.backbone.load_state_dict(data.init_state["backbone"], strict=True)
    if "head" in data.init_state:  # CP2 pretrains the ASPP too
        load_aspp(model.head, data.init_state["head"])
    return model


def _train_mode(model: nn.Module, frozen: bool) -> None:
    model.train()
    if frozen:  # a frozen backbone keeps its BatchNorm statistics
        model.backbone.eval()


def _finetune_trial(model: nn.Module, schedule: Schedule, images: Tensor, masks: Tensor, batch_size: int,
                    seed: int, frozen: bool) -> Callable[[str], None]:
    """One fine-tuning step at a given precision on a deep copy of the model (made on first call,
    inside the runtime's RNG fork), on a fixed augmented batch drawn with its own generator; its
    ``screen`` is the same on ``SCREEN_IMAGES`` images (``bench.runtime.measure_trial``)."""
    def on(count: int) -> Callable[[str], None]:
        box: dict[str, Any] = {}

        def trial(precision: str) -> None:
            if not box:
                copy_ = copy.deepcopy(model)
                _train_mode(copy_, frozen)
                gen = torch.Generator(device=images.device).manual_seed(seed)
                idx = torch.arange(count, device=images.device) % len(images)
                box.update(model=copy_, batch=augment.finetune_batch(images[idx], masks[idx], schedule.size, gen),
                           optimizer=make_optimizer([p for p in copy_.parameters() if p.requires_grad], schedule))
            finetune_step(box["model"], box["optimizer"], *box["batch"], images.device, precision)

        return trial

    return _with_screen(on(batch_size), on, batch_size)


def finetune_regulariser(schedule: Schedule) -> Callable[[list[Tensor]], Tensor] | None:
    """The fine-tuning regulariser the schedule asks for (``reg: disp``: Med-DisSeg's Disp-II), or None."""
    if schedule.reg != "disp":
        return None
    from bench.methods.dispersive import finetune_regulariser as disp

    return disp(schedule)


def finetune_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                  device: torch.device, precision: str, extra_loss: Callable[[], Tensor] | None = None) -> Tensor:
    """One fine-tuning step at ``precision``: Dice + BCE (+ the regulariser's term), backward, optimiser step."""
    with _autocast(device, precision):
        loss = dice_bce_loss(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


# --- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray | Tensor, runtime: Runtime, precision: str,
                   batch_size: int = 32) -> Iterator[Tensor]:
    """Foreground logits (B, S, S) float32 on the device, batch by batch, at the images' resolution."""
    model.eval()
    for start in range(0, len(images), batch_size):
        x = augment.to_input(torch.as_tensor(images[start:start + batch_size]).to(runtime.device))
        with runtime.autocast(precision):
            logits = model(x)
        yield logits[:, 0].float()


def evaluate(model: nn.Module, data: FinetuneData, runtime: Runtime, precision: str, native: bool = True,
             keep: int = 0) -> tuple[dict[str, np.ndarray], list[np.ndarray] | None]:
    """Per-image IoU, Dice, precision, recall, HD95 on the test images, and the first ``keep`` predictions
    (-1: all) as scored.

    ``native`` (and masks of another resolution than S×S): each image's logits are upsampled bilinearly
    to its original H×W, thresholded at sigmoid > 0.5, and scored against its original mask (HD95 in
    original pixels). Otherwise, and for data of one resolution: at S×S against the resized masks.
    """
    test = np.asarray(data.test)
    limit = len(test) if keep < 0 else min(keep, len(test))
    if not native or data.native is None or data.native.resized:
        prediction = [logits.cpu().numpy() > 0 for logits in predict_logits(model, data.images[test], runtime,
                                                                            precision)]
        stacked = np.concatenate(prediction) if prediction else np.zeros((0, *data.masks.shape[-2:]), bool)
        per_image = segmentation_metrics(stacked, np.asarray(data.masks[test]) > 0)
        return per_image, [stacked[i] for i in range(limit)] if limit else None
    rows: list[dict[str, np.ndarray]] = []
    kept: list[np.ndarray] = []
    position = 0
    for logits in predict_logits(model, data.images[test], runtime, precision):
        for one in logits:
            index = int(test[position])
            upsampled = F.interpolate(one[None, None], size=data.native.size(index), mode="bilinear",
                                      align_corners=False)[0, 0]
            prediction = (upsampled > 0).cpu().numpy()  # sigmoid(logit) > 0.5
            rows.append(segmentation_metrics(prediction[None], data.native.mask(index)[None]))
            if position < limit:
                kept.append(prediction)
            position += 1
    per_image = {key: np.concatenate([row[key] for row in rows]) for key in rows[0]} if rows else \
        segmentation_metrics(np.zeros((0, 1, 1), bool), np.zeros((0, 1, 1), bool))
    return per_image, kept or None
