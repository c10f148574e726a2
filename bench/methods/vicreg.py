"""VICReg — Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022.

Encoder: backbone → global average pool of C5 → expander of three linear layers with 8192 units, the
first two followed by BN and ReLU (lightly's ``VICRegProjectionHead``). Each view runs separately, as the
released code.

Loss (Eq. 6): ℓ = λ·s(Z, Z′) + μ·[v(Z) + v(Z′)] / 2 + ν·[c(Z) + c(Z′)], with
s = mean squared error (invariance), v(Z) = mean_j max(0, 1 − √(Var(z_j) + 10⁻⁴)) (variance, γ = 1),
c(Z) = Σ_{i≠j} Cov(Z)²ᵢⱼ / d (covariance), λ = μ = 25, ν = 1 — lightly's ``VICRegLoss``, which follows
the released code: its ``invariance_loss`` and ``variance_loss``, and its ``covariance_loss`` computed
without the d×d matrix (``covariance_term``: Σ_{i≠j} C²ᵢⱼ = ‖Z̃Z̃ᵀ‖²_F/(N−1)² − Σⱼ C²ⱼⱼ with the N×N Gram
matrix of the centred batch; the same number, tested against lightly's, at O(N²d) instead of O(Nd²):
on a CPU the 8192×8192 covariance takes tens of seconds per step). Embeddings are gathered across ranks
for v and c under DDP, as lightly's. Views: BYOL's augmentation (recipe "byol"), as the paper. The three
terms are logged (``loss_invariance``, ``loss_variance``, ``loss_covariance``, unweighted) with the
collapse indicator ``std``.

Departures: the paper's LARS optimiser (base lr 0.2, batch 2048) is kept for reference only.
"""

from __future__ import annotations

import torch
from lightly.loss.vicreg_loss import invariance_loss, variance_loss
from lightly.models.modules.heads import VICRegProjectionHead
from lightly.utils.dist import gather
from torch import Tensor, nn

from bench.augment import Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool
from bench.methods.queue import ddp_active
from bench.methods.simclr import full_precision


@register
class VICReg(Method):
    name = "vicreg"
    paper = "Bardes, Ponce & LeCun, VICReg: Variance-Invariance-Covariance Regularization, ICLR 2022"
    group = "global non-contrastive"
    defaults = {"inv": 25.0, "var": 25.0, "cov": 1.0, "proj_dim": 8192}
    bounds = {"inv": (0.0, None), "var": (0.0, None), "cov": (0.0, None)}
    recipe = "byol"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        dim = cfg["proj_dim"]
        self.projector = VICRegProjectionHead(ctx.feature_channels[-1], dim, dim, num_layers=3)

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(pool(self.backbone(x)[-1]))

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = self.embed(views.x1).float(), self.embed(views.x2).float()
        with full_precision(z1):
            terms = vicreg_terms(z1, z2, distributed=self.ctx.distributed)
        loss = (self.cfg["inv"] * terms["loss_invariance"] + self.cfg["var"] * terms["loss_variance"]
                + self.cfg["cov"] * terms["loss_covariance"])
        logs = {name: value.detach() for name, value in terms.items()}
        logs.update(loss=loss.detach(), std=embedding_std(z1))
        return loss, logs


def covariance_term(x: Tensor) -> Tensor:
    """Σ_{i≠j} Cov(X)²ᵢⱼ / d of a batch (N, d) — lightly's ``covariance_loss`` for 2-D input — through the
    N×N Gram matrix of the centred batch: ‖Cov‖²_F = ‖X̃X̃ᵀ‖²_F / (N − 1)²."""
    x = x - x.mean(dim=0)
    n, d = x.shape
    gram = x @ x.t()
    diagonal = (x * x).sum(dim=0) / (n - 1)
    return ((gram * gram).sum() / (n - 1) ** 2 - (diagonal * diagonal).sum()) / d


def vicreg_terms(z1: Tensor, z2: Tensor, distributed: bool = False) -> dict[str, Tensor]:
    """The unweighted terms s(Z, Z′), [v(Z) + v(Z′)]/2 and c(Z) + c(Z′), v and c over all ranks under DDP."""
    invariance = invariance_loss(z1, z2)
    if ddp_active(distributed):
        z1, z2 = torch.cat(gather(z1)), torch.cat(gather(z2))
    return {"loss_invariance": invariance,
            "loss_variance": 0.5 * (variance_loss(z1) + variance_loss(z2)),
            "loss_covariance": covariance_term(z1) + covariance_term(z2)}
