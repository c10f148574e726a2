"""CA²CL — Li et al., "CA²CL: Cluster-Aware Adversarial Contrastive Learning for Pathological Image
Analysis", 2025. Followed: the authors' released code, junjianli106/CA2CL: ``pretrain.py`` (training step),
``modules/network.py`` (heads), ``modules/contrastive_loss.py`` (instance loss), ``utils/utils.py``
(``KMeans``, ``CAM``, ``AdvModule``), ``modules/Transform.py`` (views) and ``config/config.yaml`` (defaults).

Network: backbone → global average pool of C5 (h) → two heads: the instance projector C5 → C5 ReLU → 128
(L2-normalised), and the cluster head: a normalised linear layer (x/‖x‖ times column-normalised W) to
128, L2-normalised (``groupDis``).

Losses per step, for a strong view x₀ and a weak view x₁:
- Instance: NT-Xent between the two views' projections, τ = 0.2 (2B anchors, 2B − 2 negatives each;
  lightly's ``NTXentLoss``, equal to the released ``InstanceLoss``).
- Cluster-aware (``CAM``): the cluster features of each view are clustered **over the batch** by
  Euclidean k-means (``clusters`` = 10, 10 iterations, initial centres = the first ``clusters`` samples,
  an empty cluster's centre becomes 0; gradients flow through the centres as released). Each sample's
  cluster features in view a are scored against view b's centres, logits = f_a·c_bᵀ / 0.2, and trained
  with cross-entropy to the cluster **its other view** was assigned to; the two directions are averaged.
- Adversarial positive pair (``AdvModule``): the gradient g of (instance + λ·cluster) with respect to the
  stem convolution's weight W gives the perturbation r = ε·g/‖g‖ (ε = 1; none if g is 0 or not finite);
  the strong view is re-encoded with W + r, and its projection is the positive of the clean weak view's
  projection in a second NT-Xent term. The gradients of both passes are summed, as the released
  ``backward(retain_graph=True)`` + ``backward()``, by returning instance + λ·cluster + adversarial.

Defaults: temperature 0.2, cluster_temperature 0.2, lambda 0.1, clusters 10, kmeans_iters 10, epsilon 1.0,
proj_dim 128 (``config.yaml``; the released optimiser, Adam lr 6e-4 wd 1e-4 at batch 1792 for 100 epochs,
is kept for reference only).

Departures (and why): (1) the views approximate the released albumentations pipelines with the
project's augmentation: strong view = random resized crop (area 0.83–1, square: ShiftScaleRotate's ±10 %
zoom), flip, brightness/contrast ±0.2 (p 0.75), hue ±0.056 turn / saturation ±0.08 (here at the same p),
blur p 0.525 and Gaussian noise p 0.175 (the released OneOf split); weak view = the same without blur and
noise. Not reproduced: transpose, vertical flip, rotation, optical/grid/elastic distortion, CLAHE and
cutout (the project's batched augmentation has no such operations). (2) Under DDP each rank perturbs with
its own gradient (the released code uses DataParallel, one gradient for the whole batch). (3) The
perturbation is applied functionally (``torch.func.functional_call``) rather than by editing the weight
in place and restoring it; the perturbed forward and its gradient are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from torch import Tensor, nn
from torch.func import functional_call

from bench.augment import ViewAug, ViewRecipe, Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool
from bench.methods.simclr import full_precision

_WEAK = ViewAug(scale=(0.83, 1.0), ratio=(1.0, 1.0), flip_p=0.5, brightness=0.2, contrast=0.2, saturation=0.08,
                hue=0.056, jitter_p=0.75)
_STRONG = ViewAug(scale=(0.83, 1.0), ratio=(1.0, 1.0), flip_p=0.5, brightness=0.2, contrast=0.2, saturation=0.08,
                  hue=0.056, jitter_p=0.75, blur_p=0.525, noise_p=0.175, noise_std=0.016)
CA2CL_RECIPE = ViewRecipe("ca2cl", _STRONG, _WEAK, "Li et al. 2025, CA2CL modules/Transform.py (approximation)")


class NormedLinear(nn.Module):
    """x/‖x‖ · W/‖W‖_col: the released cluster head's linear layer (W initialised as released)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


def kmeans(x: Tensor, k: int, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Euclidean k-means over the rows of x (N, D) as released: (labels (N,), centres (k, D)).

    Centres start at the first k rows; each iteration assigns rows to the nearest centre (squared
    distance) and sets each centre to its rows' mean, 0 for an empty cluster. Differentiable in the
    centres (they are means of x); the labels are the last assignment.
    """
    x = x.float()
    centres = x[:k]
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(iters):
        labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(dim=1)
        counts = torch.bincount(labels, minlength=k).clamp(min=1).to(x.dtype)
        centres = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, labels, x) / counts[:, None]
    return labels, centres


def cluster_aware_loss(f1: Tensor, f2: Tensor, k: int, temperature: float, iters: int = 10) -> Tensor:
    """½·[CE(f₁·c₂ᵀ/T, y₂) + CE(f₂·c₁ᵀ/T, y₁)] with (y_v, c_v) = kmeans(f_v) (the released ``CAM``)."""
    y1, c1 = kmeans(f1, k, iters)
    y2, c2 = kmeans(f2, k, iters)
    return 0.5 * (F.cross_entropy(f1.float() @ c2.t() / temperature, y2)
                  + F.cross_entropy(f2.float() @ c1.t() / temperature, y1))


def first_conv(module: nn.Module) -> str:
    """Name of the first convolution's weight (the stem, ``conv1.weight`` in a ResNet)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return f"{name}.weight" if name else "weight"
    raise ValueError("the backbone has no convolution to perturb")


def adversarial_direction(grad: Tensor, epsilon: float) -> Tensor:
    """r = ε·g/‖g‖, or 0 when ‖g‖ is 0 or not finite (the released ``AdvModule.attack``)."""
    norm = grad.norm()
    if norm == 0 or not torch.isfinite(norm):
        return torch.zeros_like(grad)
    return epsilon * grad / norm


@register
class CA2CL(Method):
    name = "ca2cl"
    paper = "Li et al., CA2CL: Cluster-Aware Adversarial Contrastive Learning for Pathological Image Analysis, 2025"
    group = "global contrastive"
    defaults = {"temperature": 0.2, "cluster_temperature": 0.2, "lambda": 0.1, "clusters": 10, "kmeans_iters": 10,
                "epsilon": 1.0, "proj_dim": 128}
    bounds = {"lambda": (0.0, None), "clusters": (1, None), "kmeans_iters": (1, None), "epsilon": (0.0, None)}
    recipe = CA2CL_RECIPE

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        c5 = ctx.feature_channels[-1]
        self.projector = MoCoProjectionHead(c5, c5, cfg["proj_dim"])
        self.cluster_head = NormedLinear(c5, cfg["proj_dim"])
        self.criterion = NTXentLoss(temperature=cfg["temperature"], gather_distributed=ctx.distributed)
        self.stem_weight = first_conv(backbone)

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(instance projection z, cluster feature f), both L2-normalised, from pooled features h."""
        return F.normalize(self.projector(h), dim=1), F.normalize(self.cluster_head(h), dim=1)

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        zi, fi = self.heads(pool(self.backbone(views.x1)[-1]))
        zj, fj = self.heads(pool(self.backbone(views.x2)[-1]))
        with full_precision(zi):
            instance = self.criterion(zi.float(), zj.float())
            cluster = cluster_aware_loss(fi, fj, cfg["clusters"], cfg["cluster_temperature"], cfg["kmeans_iters"])
        clean = instance + cfg["lambda"] * cluster
        weight = dict(self.backbone.named_parameters())[self.stem_weight]
        (grad,) = torch.autograd.grad(clean, weight, retain_graph=True)
        perturbed = weight + adversarial_direction(grad.detach(), cfg["epsilon"])
        features = functional_call(self.backbone, {self.stem_weight: perturbed}, (views.x1,))
        zi_adv = F.normalize(self.projector(pool(features[-1])), dim=1)
        with full_precision(zi):
            adversarial = self.criterion(zj.float(), zi_adv.float())
        loss = clean + adversarial
        return loss, {"loss": loss.detach(), "loss_instance": instance.detach(), "loss_cluster": cluster.detach(),
                      "loss_adversarial": adversarial.detach(), "std": embedding_std(zi)}
