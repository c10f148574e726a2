"""The method interface (docs/methods.md, "Common rules"): a method owns its heads, momentum encoders
and queues and implements one training step on a batch of views; the protocol owns the loop,
optimiser, AMP and checkpointing.

A method declares:
- ``name``, ``paper`` and ``defaults`` (its paper's hyperparameters; every override must name a key
  of ``defaults``), optionally ``choices`` (allowed values of enumerated keys) and ``bounds``
  (inclusive (low, high) ranges of numeric keys, None for an open end);
- ``recipe``: the view augmentation it trains on (see ``bench.augment.RECIPES``);
- its momentum (target) modules with ``add_targets(...)`` in ``__init__``: each is updated by EMA
  after each optimiser step with ``momentum_at(step)`` (``momentum_schedule``: BYOL's cosine or
  constant);
- ``training_step(views, step) -> (loss, logs)``; logs should contain a collapse indicator
  (``std``: the std of L2-normalised embeddings, ~1/sqrt(d) when healthy, 0 when collapsed).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightly.models.utils import update_momentum
from torch import Tensor, nn

from bench.augment import Views
from bench.errors import BenchError


@dataclass(frozen=True)
class PretrainContext:
    """What a method may know about the run it is built for."""

    feature_channels: tuple[int, ...]  # channels of each backbone stage, first to last
    total_steps: int  # optimiser steps of the whole pretraining
    batch_size: int
    pool_size: int  # number of pretraining images (queues are capped at this)
    image_size: int
    distributed: bool = False


class Method(nn.Module):
    """Base class of every pretraining method. Subclasses are registered with ``@register``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    recipe: ClassVar[str] = "byol"
    uses_labels: ClassVar[bool] = False
    # with labels: True = trains on the labelled images with their aligned masks (Med-DisSeg stage I);
    # False = trains on the pool and receives a batch of labelled masks as extra inputs (MeanFlow)
    trains_on_labelled: ClassVar[bool] = False
    pretrains: ClassVar[bool] = True
    output_stride: ClassVar[int | None] = None  # backbone stride during pretraining (None: native 32)
    group: ClassVar[str] = ""  # family shown by `bench methods` (see bench.methods.GROUPS)
    bounds: ClassVar[dict[str, tuple[float | None, float | None]]] = {}  # inclusive ranges of numeric keys
    # label-reading methods: None = pretrain on the cell's labelled subset (fraction, seed); 1.0 = on ALL
    # labelled training images of the dataset (the `supervised` positive control: one job per dataset)
    label_fraction: ClassVar[float | None] = None
    reference: ClassVar[str | None] = None  # "upper": a reference kept out of the ranks (positive control)
    momentum_schedule: ClassVar[str] = "cosine"  # "cosine" (BYOL, from cfg["momentum"] to 1) or "constant"
    # cfg keys that replace the pretraining schedule's fields of the same name (the supervised control
    # trains with a fine-tuning optimiser, not the SSL schedule's SGD); they enter the config hash as cfg
    schedule_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.ctx = ctx
        self.cfg = dict(cfg)
        self.modifiers = nn.ModuleList()
        self._momentum_names: list[str] = []

    # --- to implement -------------------------------------------------------------------------
    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    # --- momentum encoders ------------------------------------------------------------------------
    def add_targets(self, *names: str) -> None:
        """Make ``target_<name>``, a frozen deep copy of each online module ``name``, and pair them for the
        EMA; calling it again for a name replaces that target (e.g. after re-initialising the online one)."""
        for name in names:
            setattr(self, f"target_{name}", make_target(getattr(self, name)))
            if name not in self._momentum_names:
                self._momentum_names.append(name)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) pairs, in the order ``add_targets`` registered them."""
        return [(getattr(self, n), getattr(self, f"target_{n}")) for n in self._momentum_names]

    def momentum_at(self, step: int) -> float:
        """``cfg['momentum']``: constant, or BYOL's cosine schedule to 1 (``momentum_schedule``)."""
        if self.momentum_schedule == "constant":
            return self.cfg["momentum"]
        return cosine_momentum(self.cfg["momentum"], step, self.ctx.total_steps)

    # --- views ----------------------------------------------------------------------------------
    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        """Two views of a uint8 batch (B, 3, H, W) with this method's recipe; CP2 overrides this."""
        from bench.augment import make_views

        return make_views(images, self.recipe, self.ctx.image_size, generator, image_ids=image_ids,
                          masks=masks)

    # --- driven by the protocol ----------------------------------------------------------------
    def step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One training step's loss: the method's own plus each modifier's term (e.g. ``+disp``)."""
        for modifier in self.modifiers:
            modifier.begin_step()
        loss, logs = self.training_step(views, step)
        for modifier in self.modifiers:
            extra, extra_logs = modifier.loss()
            loss = loss + extra
            logs.update(extra_logs)
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """EMA update of every (online, target) pair, after the optimiser step."""
        pairs = self.momentum_pairs()
        if not pairs:
            return
        m = self.momentum_at(step)
        for online, target in pairs:
            ema_update(online, target, m)

    def export(self) -> dict[str, dict[str, Tensor]]:
        """Weights to keep after pretraining: the online backbone (and, for CP2, its head)."""
        return {"backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}}

    @classmethod
    def reads_labels(cls, cfg: dict[str, Any]) -> bool:
        """Whether pretraining with this config sees labels (then its job is per dataset, fraction, seed)."""
        return cls.uses_labels

    @classmethod
    def describe(cls) -> str:
        return ", ".join(f"{k}={v}" for k, v in cls.defaults.items())


class Modifier(nn.Module):
    """A term added to any method's loss (``METHOD+NAME``); attached after the method is built."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    bounds: ClassVar[dict[str, tuple[float | None, float | None]]] = {}

    def __init__(self, method: Method, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = dict(cfg)

    def begin_step(self) -> None:
        """Called before the method's training step (e.g. to clear captured activations)."""

    def loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


# --- shared building blocks ---------------------------------------------------------------------

def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """m_k = 1 − (1 − m₀)·(cos(πk/N) + 1)/2 (BYOL), k clamped to [0, N]."""
    if total_steps <= 0:
        return base
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def conv_mlp(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False) -> nn.Sequential:
    """1×1 conv in → hidden, [BN,] ReLU, 1×1 conv → out: the dense projection heads (PixPro's ``MLP2d``
    with BN; DiCoH's projector/predictor and CP2's projection without)."""
    norm = [nn.BatchNorm2d(hidden_dim)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), *norm, nn.ReLU(inplace=True),
                         nn.Conv2d(hidden_dim, out_dim, 1))


def make_target(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with gradients off: the momentum (target) branch."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target ← m·target + (1 − m)·online on parameters (lightly's ``update_momentum``).

    Buffers (BN running statistics) are left alone, as in the official MoCo/BYOL code: the target
    runs in train mode and keeps its own statistics.
    """
    update_momentum(online, target, m)


def embedding_std(z: Tensor) -> Tensor:
    """Collapse indicator: mean per-dimension std of L2-normalised embeddings (solo-learn)."""
    z = nn.functional.normalize(z.detach().float().flatten(1), dim=1)
    return z.std(dim=0).mean()


def labelled_targets(views: Views, who: str) -> Tensor:
    """The binary targets (B, 1, S, S) float of views built from labelled images (``Views.masks``, cropped
    like view 1) for a method that trains on them (``trains_on_labelled``); a one-line error without."""
    if views.masks is None:
        raise BenchError(f"{who} trains on labelled images: pass their masks to make_views(..., masks=...)")
    return (views.masks > 0.5).float()


def last_feature(backbone: nn.Module, x: Tensor) -> Tensor:
    """The last stage's feature map (C5) of a ``features_only`` backbone."""
    return backbone(x)[-1]
