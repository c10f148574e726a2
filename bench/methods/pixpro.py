"""PixPro — Xie et al., "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual
Representation Learning", CVPR 2021 (official code: github.com/zdaxie/PixPro).

Online: backbone → projector (1×1 conv C5→4096, BN, ReLU, 1×1 conv →256: the official ``MLP2d``,
``base.conv_mlp(..., batch_norm=True)``) →
pixel propagation module (PPM, the paper's §3.2 and the official ``featprop``):

    y_i = Σ_j s(x_i, x_j) · ĝ(x_j),   s(x_i, x_j) = max(cos(x_i, x_j), 0)^γ,   γ = 2,

with g one 1×1 conv 256→256 (``transform_layer=1``) and ĝ = g(x) L2-normalised per location before
propagation; y is L2-normalised again. Target: EMA copy of backbone + projector, m₀ = 0.99 cosine to 1.

Positive pairs: cell i of view 1 and cell j of view 2 whose centres, in the official source coordinates
(x/(W − 1), y/(H − 1) of the crop's first and last pixel, ``geometry.pixel_index_box``), are closer than
T = 0.7 times the larger bin diagonal of the two views (``geometry.positive_pairs``; flips mirror the
coordinates). Loss per direction (official
``regression_loss``): −2 · mean over images of Σ_ij M_ij cos(y_i, x′_j) / (Σ_ij M_ij + 1e-6), so an
image without positives contributes 0; symmetrised over the two views.

PixPro+ (optional, ``instance=True``): an instance branch with its own projector (EMA'd) and a
predictor, average-pooled after projection/prediction, loss −2·cos(p, sg(z′)) per direction (BYOL),
added with weight ``instance_weight``.

Views: BYOL's asymmetric augmentation (recipe "byol", as the official ``--aug BYOL``).
Defaults: momentum 0.99, gamma 2, threshold 0.7, proj_dim 256, hidden_dim 4096, instance False,
instance_weight 1.0 (docs/methods.md, "pixpro").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import geometry
from bench.augment import Views
from bench.errors import BenchError
from bench.methods import register
from bench.methods.base import Method, PretrainContext, conv_mlp, embedding_std


def propagate(x: Tensor, value: Tensor, gamma: float) -> Tensor:
    """Pixel propagation: y_i = Σ_j max(cos(x_i, x_j), 0)^γ · v̂_j with v̂ = value normalised per location.

    x, value: (B, C, H, W) (the projector output and g of it). Returns y (B, C, H, W), not normalised.
    """
    b, c, h, w = value.shape
    v = F.normalize(value, dim=1).flatten(2)  # (B, C, N)
    xn = F.normalize(x, dim=1).flatten(2)
    sim = torch.bmm(xn.transpose(1, 2), xn).clamp(min=0)  # (B, N, N): s(x_i, x_j)
    if gamma < 1:  # as the official code: avoid the infinite gradient of 0^γ
        sim = sim + 1e-6
    sim = sim**gamma
    return torch.bmm(v, sim.transpose(1, 2)).view(b, c, h, w)


class PixelPropagation(nn.Module):
    """PPM: g = one 1×1 conv, ĝ normalised, propagated with similarity exponent γ, y normalised."""

    def __init__(self, dim: int, gamma: float):
        super().__init__()
        self.transform = nn.Conv2d(dim, dim, 1)
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(propagate(x, self.transform(x), self.gamma), dim=1)


def pixpro_loss(y: Tensor, target: Tensor, positives: Tensor) -> Tensor:
    """One direction of PixPro's loss: −2 · mean_b Σ_ij M_ij cos(y_i, x′_j) / (Σ_ij M_ij + 1e-6).

    y: (B, C, N) online PPM outputs of one view; target: (B, C, N) target projections of the other
    view (detached here); positives: (B, N, N) bool, M_ij for i in y's view and j in target's view.
    """
    y = F.normalize(y.float(), dim=1)
    target = F.normalize(target.detach().float(), dim=1)
    mask = positives.float()
    cos = torch.bmm(y.transpose(1, 2), target)  # (B, N, N)
    per_image = (cos * mask).sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) + 1e-6)
    return -2.0 * per_image.mean()


def instance_loss(p: Tensor, z_target: Tensor) -> Tensor:
    """PixPro+'s instance term (official ``regression_loss``): −2·cos(p, sg(z′)), averaged over the batch."""
    return -2.0 * F.cosine_similarity(p.float(), z_target.detach().float(), dim=1).mean()


@register
class PixPro(Method):
    name = "pixpro"
    paper = "Xie et al., Propagate Yourself (PixPro), CVPR 2021"
    defaults = {"momentum": 0.99, "gamma": 2.0, "threshold": 0.7, "proj_dim": 256, "hidden_dim": 4096,
                "instance": False, "instance_weight": 1.0}
    bounds = {"gamma": (0.0, None), "threshold": (0.0, None)}
    recipe = "byol"
    group = "dense contrastive"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        c5 = ctx.feature_channels[-1]
        self.projector = conv_mlp(c5, cfg["hidden_dim"], cfg["proj_dim"], batch_norm=True)
        self.ppm = PixelPropagation(cfg["proj_dim"], cfg["gamma"])
        self.add_targets("backbone", "projector")
        if cfg["instance"]:
            self.instance_projector = conv_mlp(c5, cfg["hidden_dim"], cfg["proj_dim"], batch_norm=True)
            self.instance_predictor = conv_mlp(cfg["proj_dim"], cfg["hidden_dim"], cfg["proj_dim"], batch_norm=True)
            self.add_targets("instance_projector")

    def positive_mask(self, views: Views, h: int, w: int, reverse: bool = False) -> Tensor:
        """(B, hw, hw) positives M_ij, i in view 1 and j in view 2 (swapped when ``reverse``), on the
        official x/(W − 1), y/(H − 1) coordinates of the crop boxes."""
        if views.source_size is None:
            raise BenchError("pixpro needs the source image size of the views (Views.source_size); build "
                             "them with bench.augment.make_views")
        height, width = views.source_size
        first = (geometry.pixel_index_box(views.box1, height, width), views.flip1)
        second = (geometry.pixel_index_box(views.box2, height, width), views.flip2)
        if reverse:
            first, second = second, first
        return geometry.positive_pairs(*first, *second, h, w, threshold=self.cfg["threshold"])

    def _online(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)[-1]
        proj = self.projector(features)
        out = {"proj": proj, "y": self.ppm(proj)}
        if self.cfg["instance"]:
            pred = self.instance_predictor(self.instance_projector(features))
            out["p"] = pred.mean(dim=(2, 3))
        return out

    @torch.no_grad()
    def _target(self, x: Tensor) -> dict[str, Tensor]:
        features = self.target_backbone(x)[-1]
        out = {"proj": F.normalize(self.target_projector(features), dim=1)}
        if self.cfg["instance"]:
            out["z"] = self.target_instance_projector(features).mean(dim=(2, 3))
        return out

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        on1, on2 = self._online(views.x1), self._online(views.x2)
        tg1, tg2 = self._target(views.x1), self._target(views.x2)
        h, w = on1["y"].shape[-2:]
        pos12 = self.positive_mask(views, h, w)
        pos21 = self.positive_mask(views, h, w, reverse=True)
        dense = (pixpro_loss(on1["y"].flatten(2), tg2["proj"].flatten(2), pos12)
                 + pixpro_loss(on2["y"].flatten(2), tg1["proj"].flatten(2), pos21))
        loss = dense
        proj = on1["proj"].detach()
        logs = {"loss_dense": dense.detach(), "positives": pos12.float().sum(dim=(1, 2)).mean(),
                "std": embedding_std(proj.permute(0, 2, 3, 1).reshape(-1, proj.shape[1]))}
        if self.cfg["instance"]:
            inst = instance_loss(on1["p"], tg2["z"]) + instance_loss(on2["p"], tg1["z"])
            loss = loss + self.cfg["instance_weight"] * inst
            logs["loss_instance"] = inst.detach()
        logs["loss"] = loss.detach()
        return loss, logs
