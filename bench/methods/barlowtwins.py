"""Barlow Twins — Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
ICML 2021.

Encoder: backbone → global average pool of C5 → projector of three linear layers with 8192 units, the
first two followed by BN and ReLU (lightly's ``BarlowTwinsProjectionHead``). Each view runs through the
network separately, as the released code.

Loss (Eq. 1–2, Algorithm 1): each embedding dimension is standardised over the batch (BN without
affine), C = z̃ᴬᵀz̃ᴮ / N is the cross-correlation matrix, and
L = Σᵢ (1 − Cᵢᵢ)² + λ·Σᵢ Σ_{j≠i} Cᵢⱼ², λ = 0.0051 (the released code's default; the paper rounds it to
5·10⁻³). Under DDP this is lightly's ``BarlowTwinsLoss`` (C averaged over the ranks); on one device the
same number is computed without the d×d matrix (``barlow_twins_loss``: Σᵢⱼ Cᵢⱼ² = Σ (GᴬGᴮ elementwise) / N²
with the N×N Gram matrices Gᴬ = z̃ᴬz̃ᴬᵀ, Gᴮ = z̃ᴮz̃ᴮᵀ; tested against lightly's), because the 8192×8192
product takes seconds per step on a CPU. Views: BYOL's augmentation (recipe "byol"), as the paper.

Collapse indicator ``std`` (L2-normalised projections) plus the two loss terms' values.
Departures: the paper's LARS optimiser (lr 0.2 weights / 0.0048 biases, batch 2048) is kept for reference
only; the preset's optimiser is used.
"""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import Tensor, nn

from bench.augment import Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool
from bench.methods.queue import ddp_active
from bench.methods.simclr import full_precision


@register
class BarlowTwins(Method):
    name = "barlowtwins"
    paper = "Zbontar et al., Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021"
    group = "global non-contrastive"
    defaults = {"lambda": 0.0051, "proj_dim": 8192}
    bounds = {"lambda": (0.0, None)}
    recipe = "byol"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        dim = cfg["proj_dim"]
        self.projector = BarlowTwinsProjectionHead(ctx.feature_channels[-1], dim, dim)
        self.criterion = BarlowTwinsLoss(lambda_param=cfg["lambda"], gather_distributed=True)  # DDP only

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(pool(self.backbone(x)[-1]))

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = self.embed(views.x1).float(), self.embed(views.x2).float()
        with full_precision(z1):
            if ddp_active(self.ctx.distributed):
                loss = self.criterion(z1, z2)
            else:
                loss = barlow_twins_loss(z1, z2, self.cfg["lambda"])
        with torch.no_grad(), full_precision(z1):
            on_diag = (1 - (standardise(z1) * standardise(z2)).sum(0) / z1.shape[0]).pow(2).sum()
        return loss, {"loss": loss.detach(), "loss_invariance": on_diag, "std": embedding_std(z1)}


def standardise(z: Tensor) -> Tensor:
    """Each dimension to zero mean and unit (biased) variance over the batch, eps 1e-5: BN without affine."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)


def cross_correlation(z1: Tensor, z2: Tensor) -> Tensor:
    """C = z̃₁ᵀz̃₂ / N (d × d)."""
    return standardise(z1).t() @ standardise(z2) / z1.shape[0]


def barlow_twins_loss(z1: Tensor, z2: Tensor, lam: float) -> Tensor:
    """Σᵢ (1 − Cᵢᵢ)² + λ·Σ_{i≠j} Cᵢⱼ² with Σᵢⱼ Cᵢⱼ² from the N×N Gram matrices (no d×d matrix)."""
    a, b = standardise(z1), standardise(z2)
    n = a.shape[0]
    diagonal = (a * b).sum(0) / n
    total = ((a @ a.t()) * (b @ b.t())).sum() / n**2
    return (1 - diagonal).pow(2).sum() + lam * (total - diagonal.pow(2).sum())
