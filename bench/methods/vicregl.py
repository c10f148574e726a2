"""VICRegL — Bardes, Ponce & LeCun, "VICRegL: Self-Supervised Learning of Local Visual Features",
NeurIPS 2022 (released code: facebookresearch/VICRegL, ``main_vicregl.py``).

Global branch: backbone → average pool of C5 → expander 8192-8192-8192 (BN, ReLU; lightly's
``VICRegProjectionHead``) → the VICReg criterion (λ = μ = 25, ν = 1) between the views.
Local branch: the C5 map (B, h, w, C) → a per-location projector 512-512-512 with LayerNorm (lightly's
``VicRegLLocalProjectionHead``) → local feature vectors with their **locations** in the source image.
Locations are the cell centres of each view's C5 grid in source coordinates, flips included
(``bench.geometry.cell_centers``: the project's view geometry).

Local criterion (paper §3.2): for each pair of views, VICReg between feature vectors matched two ways,
(1) location-based: each vector of view a with the spatially nearest vector of view b, keeping the
``num_matches_1`` best pairs (``num_matches_2`` in the other direction); (2) feature-based: the same with
the nearest neighbour in L2 feature distance; symmetrised. L = α·L_global + (1 − α)·L_local, α = 0.75
(the ResNet-50 release with the better segmentation, 55.9 mIoU). lightly's ``VICRegLLoss``, with the
global covariance term computed through the N×N Gram matrix (``bench.methods.vicreg.covariance_term``: the
same number without the 8192×8192 matrix).

Views: two global crops (BYOL's augmentation, random resized crop 0.08–1: the released ResNet-50 command
``--num-crops 2 --min_scale_crops 0.08``). Logs the collapse indicator ``std`` of the global embeddings.

Departures: lightly's matching (which this uses) keeps ``num_matches`` pairs in the feature-based
matching too, where the released code keeps all (``--l2_all_matches 1``), and sums the local loss over
view pairs where the released code keeps the last pair's value (lightly documents both). The paper's
LARS optimiser (base lr 0.3, batch 512, wd 1e-6) is kept for reference only.
"""

from __future__ import annotations

import torch
from lightly.loss import VICRegLLoss
from lightly.loss.vicreg_loss import variance_loss
from lightly.models.modules.heads import VicRegLLocalProjectionHead, VICRegProjectionHead
from lightly.utils.dist import gather
from torch import Tensor, nn

from bench.augment import Views
from bench.geometry import cell_centers
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool
from bench.methods.queue import ddp_active
from bench.methods.simclr import full_precision
from bench.methods.vicreg import covariance_term


class GramVICRegLLoss(VICRegLLoss):
    """lightly's ``VICRegLLoss`` whose global variance/covariance terms use ``covariance_term`` (same value)."""

    def _global_variance_and_covariance_loss(self, global_view_features, local_view_features=None):
        var, cov = [], []
        for features, _ in [*global_view_features, *(local_view_features or [])]:
            if ddp_active(self.gather_distributed):
                features = torch.cat(gather(features), dim=0)
            var.append(variance_loss(features, eps=self.eps))
            cov.append(covariance_term(features))
        return torch.stack(var).mean(), torch.stack(cov).mean()


@register
class VICRegL(Method):
    name = "vicregl"
    paper = "Bardes, Ponce & LeCun, VICRegL: Self-Supervised Learning of Local Visual Features, NeurIPS 2022"
    group = "dense contrastive"
    defaults = {"alpha": 0.75, "inv": 25.0, "var": 25.0, "cov": 1.0, "proj_dim": 8192, "maps_dim": 512,
                "num_matches_1": 20, "num_matches_2": 4}
    bounds = {"alpha": (0.0, 1.0), "inv": (0.0, None), "var": (0.0, None), "cov": (0.0, None),
              "num_matches_1": (1, None), "num_matches_2": (1, None)}
    recipe = "byol"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        c5 = ctx.feature_channels[-1]
        self.projector = VICRegProjectionHead(c5, cfg["proj_dim"], cfg["proj_dim"], num_layers=3)
        self.maps_projector = VicRegLLocalProjectionHead(c5, cfg["maps_dim"], cfg["maps_dim"])
        self.criterion = GramVICRegLLoss(lambda_param=cfg["inv"], mu_param=cfg["var"], nu_param=cfg["cov"],
                                     alpha=cfg["alpha"], gather_distributed=ctx.distributed,
                                     num_matches=(cfg["num_matches_1"], cfg["num_matches_2"]))

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(global embedding (B, D), local embeddings (B, h, w, D_maps)) of a batch."""
        c5 = self.backbone(x)[-1]
        return self.projector(pool(c5)).float(), self.maps_projector(c5.permute(0, 2, 3, 1)).float()

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        g1, l1 = self.embed(views.x1)
        g2, l2 = self.embed(views.x2)
        grids = [location_grid(box, flip, l1.shape[1], l1.shape[2])
                 for box, flip in ((views.box1, views.flip1), (views.box2, views.flip2))]
        with full_precision(g1):
            loss = self.criterion(global_view_features=[(g1, l1), (g2, l2)], global_view_grids=grids).squeeze()
        return loss, {"loss": loss.detach(), "std": embedding_std(g1), "local_std": embedding_std(l1.flatten(0, 2))}


def location_grid(box: Tensor, flip: Tensor, h: int, w: int) -> Tensor:
    """(B, h, w, 2): source-image (x, y) of each C5 cell centre of a view (flips included)."""
    return cell_centers(box, flip, h, w).reshape(box.shape[0], h, w, 2)
