"""``bench speed``: training throughput (images/s) of each method's pretraining step and of the
finetune step on the current device, and — as a yardstick — the same BYOL model fed by a plain
per-sample PIL + DataLoader pipeline (lightly's ``BYOLTransform``).

Throughput is the median over several timed windows after a warm-up; the device is synchronised
only at window boundaries. This is how the project measures speed; no test asserts a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench import augment
from bench.methods import parse_method
from bench.protocol import (
    build_pretrain_method,
    finetune_step,
    make_optimizer,
    prepare_module,
    pretrain_step,
    sync_device,
)
from bench.spec import Schedule


@dataclass
class SpeedRecord:
    method: str
    phase: str  # pretrain | finetune | reference
    device: str
    backbone: str
    size: int
    batch_size: int
    precision: str
    images_per_s: float
    windows: list[float]
    pipeline: str


def timed(step: Callable[[], None], device: torch.device, warmup: int, windows: int,
          steps_per_window: int) -> list[float]:
    """Seconds per step of each timed window, after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    sync_device(device)
    out = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps_per_window):
            step()
        sync_device(device)
        out.append((time.perf_counter() - start) / steps_per_window)
    return out


def _record(method: str, phase: str, device: torch.device, backbone: str, size: int, batch: int,
            precision: str, seconds: list[float], pipeline: str) -> SpeedRecord:
    rates = [batch / s for s in seconds]
    return SpeedRecord(method, phase, str(device), backbone, size, batch, precision,
                       float(statistics.median(rates)), rates, pipeline)


def pretrain_speed(method_text: str, images: torch.Tensor, backbone: str, size: int, batch: int,
                   device: torch.device, precision: str, warmup: int = 3, windows: int = 5,
                   steps_per_window: int = 3) -> SpeedRecord:
    """The project's path: uint8 images in device memory, batched tensor views, autocast."""
    spec = parse_method(method_text)
    total = warmup + windows * steps_per_window
    method = build_pretrain_method(spec, backbone, "scratch", size, len(images), batch, total, device)
    optimizer = make_optimizer([p for p in method.parameters() if p.requires_grad], Schedule(optimizer="sgd"))
    pool = images.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    masks = torch.zeros(len(images), 1, images.shape[-2], images.shape[-1], dtype=torch.uint8, device=device)
    counter = iter(range(10**9))

    def step() -> None:
        k = next(counter)
        idx = torch.randint(len(pool), (batch,), device=device, generator=gen)
        views = method.make_views(pool[idx], idx, gen, masks=masks[idx] if spec.cls.uses_labels else None)
        pretrain_step(method, optimizer, views, k, device, precision)

    seconds = timed(step, device, warmup, windows, steps_per_window)
    return _record(spec.label, "pretrain", device, backbone, size, batch, precision, seconds, "batched-tensor")


def finetune_speed(images: torch.Tensor, masks: torch.Tensor, backbone: str, size: int, batch: int,
                   device: torch.device, precision: str, warmup: int = 3, windows: int = 5,
                   steps_per_window: int = 3) -> SpeedRecord:
    from bench.models import build_segmentation_model

    model = prepare_module(build_segmentation_model(backbone, "scratch"), device)
    model.train()
    optimizer = make_optimizer(list(model.parameters()), Schedule())
    pool, labels = images.to(device), masks.to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        idx = torch.randint(len(pool), (batch,), device=device, generator=gen)
        x, y = augment.finetune_batch(pool[idx], labels[idx], size, gen)
        finetune_step(model, optimizer, x, y, device, precision)

    seconds = timed(step, device, warmup, windows, steps_per_window)
    return _record("segmentation", "finetune", device, backbone, size, batch, precision, seconds, "batched-tensor")


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform):
        from PIL import Image

        self.images = [Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))) for img in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i])


def _endless(loader) -> Iterator:
    while True:
        yield from loader


def reference_speed(images: torch.Tensor, backbone: str, size: int, batch: int, device: torch.device,
                    precision: str = "fp32", workers: int = 2, warmup: int = 3, windows: int = 5,
                    steps_per_window: int = 3) -> SpeedRecord:
    """The same BYOL model and step, fed by PIL images → lightly ``BYOLTransform`` → DataLoader."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=size),
                              view_2_transform=BYOLView2Transform(input_size=size))
    loader = torch.utils.data.DataLoader(_PILDataset(images.numpy(), transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    batches = _endless(loader)
    spec = parse_method("byol")
    total = warmup + windows * steps_per_window
    method = build_pretrain_method(spec, backbone, "scratch", size, len(images), batch, total, device)
    optimizer = make_optimizer([p for p in method.parameters() if p.requires_grad], Schedule(optimizer="sgd"))
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).repeat(batch, 1)
    flips = torch.zeros(batch, dtype=torch.bool, device=device)
    counter = iter(range(10**9))

    def step() -> None:
        x1, x2 = next(batches)
        views = augment.Views(x1.to(device, non_blocking=True), x2.to(device, non_blocking=True), box, box,
                              flips, flips, torch.arange(batch, device=device))
        pretrain_step(method, optimizer, views, next(counter), device, precision)

    seconds = timed(step, device, warmup, windows, steps_per_window)
    return _record("byol", "reference", device, backbone, size, batch, precision, seconds,
                   f"PIL+DataLoader(workers={workers})")


def records_to_json(records: list[SpeedRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def write_speed(out: Path, records: list[SpeedRecord]) -> Path:
    from bench.store import write_json

    path = Path(out) / "speed.json"
    write_json(path, records_to_json(records))
    return path
