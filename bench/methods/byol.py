"""BYOL — Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020.

Online: backbone → projector (C5 pooled → 4096 BN ReLU → 256) → predictor (256 → 4096 BN ReLU → 256).
Target: EMA copy of backbone + projector, m₀ = 0.99 cosine to 1 (0.996 in the paper's 1000-epoch
runs; 0.99 is the paper's choice for short runs). Loss per direction 2 − 2·cos(p, sg(z′)) (Eq. 2),
symmetrised over the two views (Eq. 3). Views: BYOL's asymmetric augmentation (recipe "byol").

Heads and loss from lightly: ``BYOLProjectionHead``, ``BYOLPredictionHead``,
``NegativeCosineSimilarity`` (the target is detached here), ``update_momentum`` via the base class.
Specification: docs/methods.md, "byol".
"""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor, nn

from bench.augment import Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std


@register
class BYOL(Method):
    name = "byol"
    paper = "Grill et al., Bootstrap Your Own Latent, NeurIPS 2020"
    defaults = {"momentum": 0.99, "hidden_dim": 4096, "proj_dim": 256}
    recipe = "byol"
    group = "global non-contrastive"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        c5 = ctx.feature_channels[-1]
        self.projector = BYOLProjectionHead(c5, cfg["hidden_dim"], cfg["proj_dim"])
        self.predictor = BYOLPredictionHead(cfg["proj_dim"], cfg["hidden_dim"], cfg["proj_dim"])
        self.add_targets("backbone", "projector")
        self.criterion = NegativeCosineSimilarity()

    def _online(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projector(pool(self.backbone(x)[-1]))
        return z, self.predictor(z)

    @torch.no_grad()
    def _target(self, x: Tensor) -> Tensor:
        return self.target_projector(pool(self.target_backbone(x)[-1]))

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        z1, p1 = self._online(views.x1)
        z2, p2 = self._online(views.x2)
        t1, t2 = self._target(views.x1), self._target(views.x2)
        loss = byol_loss(p1, t2, self.criterion) + byol_loss(p2, t1, self.criterion)
        return loss, {"loss": loss.detach(), "std": embedding_std(z1)}


def pool(features: Tensor) -> Tensor:
    """Global average pool of a (B, C, H, W) map to (B, C)."""
    return features.mean(dim=(2, 3))


def byol_loss(p: Tensor, z_target: Tensor, criterion: nn.Module | None = None) -> Tensor:
    """One direction of BYOL's loss: 2 − 2·cos(p, sg(z′)), averaged over the batch."""
    criterion = criterion or NegativeCosineSimilarity()
    return 2.0 + 2.0 * criterion(p.float(), z_target.detach().float())
