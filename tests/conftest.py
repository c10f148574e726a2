"""Shared test fixtures: small backbones and batches, and the path of the real-data excerpts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.methods.base import PretrainContext
from bench.models import create_backbone, feature_channels

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(2)
# `bench run` in tests runs in-process, sequentially (one worker: progress, errors and timings are
# those of the sequential path); `--workers auto` and the pool are tested on their own.
os.environ.setdefault("BENCH_WORKERS", "1")


def requires_shared_data():
    """Skip marker for tests on ../shared/data (CI has it beside the checkout; a clone may not)."""
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real-data excerpts not found at {SHARED_DATA}")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data excerpts not found at {SHARED_DATA}")
    return SHARED_DATA


def tiny_backbone(output_stride: int | None = None):
    torch.manual_seed(0)
    return create_backbone("resnet18", pretrained=False, output_stride=output_stride)


def tiny_context(backbone, batch_size: int = 4, total_steps: int = 10, pool_size: int = 64,
                 image_size: int = 64) -> PretrainContext:
    return PretrainContext(feature_channels=feature_channels(backbone), total_steps=total_steps,
                           batch_size=batch_size, pool_size=pool_size, image_size=image_size)


def random_images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A uint8 batch (n, 3, size, size) with some structure (smooth blobs), not pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).astype(np.float32)
        base = rng.uniform(0.2, 0.8, size=3)[:, None, None] + 0.1 * rng.standard_normal((3, size, size))
        img = np.clip(base + 0.4 * blob[None], 0, 1)
        images.append((img * 255).astype(np.uint8))
    return torch.from_numpy(np.stack(images))


def train_steps(method, batches: list, steps: int, lr: float = 0.1, momentum: float = 0.9) -> list[float]:
    """``steps`` SGD steps of a pretraining method cycling over prepared view batches; the losses."""
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    losses = []
    for step in range(steps):
        loss, _ = method.step(batches[step % len(batches)], step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        losses.append(loss.item())
    return losses


# The smallest grid that runs every layer (one pretraining, two cells): shared by the CLI-level tests.
TINY_SPEC = """
name: tiny
methods: [scratch, byol]
datasets:
  - {ref: synthetic-polyp, n: 20}
fractions: [0.5]
seeds: [0]
backbone: resnet18
init: scratch
pretrain: {size: 32, steps: 2, batch_size: 4, optimizer: sgd, lr: 0.01}
finetune: {size: 32, steps: 2, batch_size: 2, optimizer: adamw, lr: 0.001}
precision: fp32
"""
