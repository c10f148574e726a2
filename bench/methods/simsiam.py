"""SimSiam — Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.

Encoder f: backbone → global average pool of C5 → projection MLP (3 layers, BN on every layer,
C5 → 2048 → 2048 → 2048, the output BN without affine; lightly's ``SimSiamProjectionHead``).
Predictor h: 2048 → 512 BN ReLU → 2048 (bottleneck, lightly's ``SimSiamPredictionHead``). No momentum
encoder: both branches share weights and the stop-gradient is the whole mechanism.

Loss (Eq. 3–4): L = ½·D(p₁, sg(z₂)) + ½·D(p₂, sg(z₁)), D(p, z) = −cos(p, z) (lightly's
``NegativeCosineSimilarity``; the targets are detached here). Minimum −1. Each view runs through the
encoder separately, as the released code. Views: MoCo v2's augmentation (recipe "mocov2", as the paper).

Collapse indicator ``std``: the per-dimension std of the L2-normalised projections z (the paper's Fig. 2
diagnostic: ≈ 1/√d when healthy, 0 when collapsed).

Departures: the paper keeps the predictor's learning rate fixed (not decayed) and uses SGD lr 0.05·B/256;
the preset's optimiser and schedule are used for all parameters (uniform protocol).
"""

from __future__ import annotations

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from torch import Tensor, nn

from bench.augment import Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool
from bench.methods.simclr import full_precision


@register
class SimSiam(Method):
    name = "simsiam"
    paper = "Chen & He, Exploring Simple Siamese Representation Learning, CVPR 2021"
    group = "global non-contrastive"
    defaults = {"proj_dim": 2048, "pred_hidden_dim": 512}
    recipe = "mocov2"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        dim = cfg["proj_dim"]
        self.projector = SimSiamProjectionHead(ctx.feature_channels[-1], dim, dim)
        self.predictor = SimSiamPredictionHead(dim, cfg["pred_hidden_dim"], dim)
        self.criterion = NegativeCosineSimilarity()

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, p): projection and prediction of a batch."""
        z = self.projector(pool(self.backbone(x)[-1]))
        return z, self.predictor(z)

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        z1, p1 = self.embed(views.x1)
        z2, p2 = self.embed(views.x2)
        with full_precision(p1):
            loss = simsiam_loss(p1, p2, z1, z2, self.criterion)
        return loss, {"loss": loss.detach(), "std": embedding_std(z1)}


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, criterion: nn.Module | None = None) -> Tensor:
    """½·D(p₁, sg(z₂)) + ½·D(p₂, sg(z₁)) with D = −cos (batch mean)."""
    criterion = criterion or NegativeCosineSimilarity()
    return 0.5 * criterion(p1.float(), z2.detach().float()) + 0.5 * criterion(p2.float(), z1.detach().float())
