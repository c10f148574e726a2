"""Dispersive loss — Wang & He 2025, "Diffuse and Disperse: Image Generation with Representation
Regularization"; its medical uses in Med-DisSeg (stage I and Disp-II) and SpectraFlow (stage 1).

``dispersive_loss(h)`` on a batch of representations h (B, D), pairs i ≠ j (docs/methods.md, "dispersive"):

- ``l2``    (Med-DisSeg Eq. 3): log( mean_{i≠j} exp(−‖h_i − h_j‖²/τ) + ε )
- ``cos``   (Eq. 4):            log( mean_{i≠j} exp(−(1 − cos(h_i, h_j))/τ) + ε )
- ``hinge`` (Eq. 5):            mean_{i≠j} max(0, δ − ‖h_i − h_j‖)²
- ``cov``   (Eq. 6):            ‖C − diag(C)‖²_F,  C = H̃ᵀH̃/(B − 1), H̃ the centred batch

``normalize=True`` divides squared distances by D (Wang & He's released code; ``l2`` and ``hinge``;
``cos`` is scale-free). ``cov`` follows Eq. 6 as printed (no 1/D, so Med-DisSeg's λ applies);
``cov_per_dim=True`` divides it by D (VICReg's 1/d convention: on a flattened activation the D²
off-diagonal entries would otherwise dwarf every other term).
``include_self=True`` reproduces Wang & He's released formula instead of the seeds' equations: the
mean runs over all B² pairs including the diagonal (exp(0) = 1 for the log variants, δ² for hinge)
and the log has no ε, so the loss bottoms out at log(1/B). ``cov`` has no pairs: ``include_self``
leaves it alone. Minimising any variant pushes the batch apart; in the InfoNCE-style ``l2`` variant the force
between a pair is ∝ exp(−d²/τ)·d, so closer neighbours repel more (SpectraFlow Eq. 22) once
d² > τ/2. Under DDP (``distributed=True``) the loss is computed on the batch gathered from all
ranks with lightly's ``GatherLayer``, whose backward sums the gradients that every rank's (equal)
loss sends to each slice: after DDP averages the gradients, they are exactly those of the one loss on
the global batch (a detached gather would give only 1/world of them).

Uses here:
- the ``+disp`` modifier on any method (``DispersiveModifier``): the chosen stage(s) of the method's
  online backbone, captured by a forward hook; defaults are Med-DisSeg's (λ = 0.2, τ = 0.8, ``l2``,
  ``early``) with ``normalize=True`` and ``pool=flatten`` (Wang & He: the whole activation);
  SpectraFlow's stage 1 (Eq. 5) is ``meanflow+disp:weight=0.4,layer=penultimate,pool=gap,normalize=false``;
- ``finetune_dispersive`` / ``finetune_regulariser``: Med-DisSeg's Disp-II on the fine-tuning
  encoder (λ₂ = 0.6; a fine-tuning cell runs in one process, so this batch is never gathered);
- the ``dispersive`` registry entry: Med-DisSeg stage I (``MedDisSegStageI``): encoder + a light
  1×1-conv prediction head trained with Dice + BCE on the labelled subset under strong photometric
  perturbation, plus λ₁ = 0.2 · ``l2`` (τ = 0.8) on the first stage. Only the encoder is exported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightly.utils import dist as lightly_dist
from torch import Tensor, nn

from bench.augment import Views
from bench.errors import BenchError
from bench.methods import register
from bench.methods.base import Method, Modifier, PretrainContext, embedding_std, labelled_targets
from bench.methods.queue import ddp_active
from bench.models import dice_bce_loss

VARIANTS = ("l2", "cos", "hinge", "cov")
LAYERS = ("early", "middle", "late", "penultimate", "all")
POOLS = ("flatten", "gap")


# --- the loss --------------------------------------------------------------------------------------

def dispersive_loss(h: Tensor, variant: str = "l2", tau: float = 0.5, margin: float = 1.0,
                    eps: float = 1e-8, normalize: bool = False, include_self: bool = False,
                    distributed: bool = False, cov_per_dim: bool = False) -> Tensor:
    """Dispersive loss of a batch h (B, D) (module docstring); a scalar, lower = more dispersed.
    ``distributed``: under DDP, the loss of all ranks' batches together (``gather_batch``).

    Example:
        >>> dispersive_loss(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "l2", tau=1.0)  # log(e^-1 + 1e-8)
        tensor(-1.0000)
    """
    if variant not in VARIANTS:
        raise BenchError(f"dispersive variant {variant!r} unknown; choose one of {', '.join(VARIANTS)}")
    h = gather_batch(h.flatten(1).float(), distributed)
    b, d = h.shape
    if b < 2:
        raise BenchError("the dispersive loss needs a batch of at least 2 samples; raise the batch size")
    if variant == "cov":
        return offdiagonal_covariance(h) / (d if cov_per_dim else 1)
    if variant == "cos":
        hn = F.normalize(h, dim=1)
        dist = 1.0 - hn @ hn.t()
    else:
        dist = pairwise_sq_dists(h) / (d if normalize else 1)
    eye = torch.eye(b, dtype=torch.bool, device=h.device)
    dist = dist.masked_fill(eye, 0.0)  # exact zeros on the diagonal (the Gram form leaves round-off)
    if variant == "hinge":
        terms = (margin - dist.clamp_min(1e-12).sqrt()).clamp_min(0.0).pow(2)
        return terms.mean() if include_self else terms[~eye].mean()
    terms = torch.exp(-dist / tau)
    if include_self:
        return torch.log(terms.mean())
    return torch.log(terms[~eye].mean() + eps)


def pairwise_sq_dists(h: Tensor) -> Tensor:
    """(B, B) squared Euclidean distances via the Gram matrix (no B×B×D tensor), on the centred
    batch (translation-invariant, and it keeps the round-off of ‖a‖² + ‖b‖² − 2a·b small)."""
    h = h - h.mean(dim=0, keepdim=True)
    sq = h.pow(2).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (h @ h.t())).clamp_min(0.0)


def offdiagonal_covariance(h: Tensor) -> Tensor:
    """‖C − diag(C)‖²_F for C = H̃ᵀH̃/(B − 1), computed through the B×B Gram matrix
    (‖H̃ᵀH̃‖²_F = ‖H̃H̃ᵀ‖²_F) so that flattened activations with large D stay affordable."""
    centred = h - h.mean(dim=0, keepdim=True)
    scale = (h.shape[0] - 1) ** 2
    gram = centred @ centred.t()
    diagonal = centred.pow(2).sum(dim=0)  # (B − 1)·C_dd
    return (gram.pow(2).sum() - diagonal.pow(2).sum()) / scale


def gather_batch(h: Tensor, distributed: bool = False) -> Tensor:
    """With ``distributed`` under DDP: all ranks' batches concatenated in rank order, through lightly's
    ``GatherLayer`` (backward: the gradients of every rank's loss summed into each slice); else ``h``."""
    if not ddp_active(distributed):
        return h
    return torch.cat(lightly_dist.gather(h.contiguous()))


def pool_features(x: Tensor, pool: str) -> Tensor:
    """A stage's representation: ``flatten`` (the whole activation, Wang & He) or ``gap`` (B, C)."""
    if pool == "gap" and x.ndim == 4:
        return x.float().mean(dim=(2, 3))
    return x.float().flatten(1)


def stage_indices(layer: str, num_stages: int) -> list[int]:
    """Indices of the backbone stages that ``layer`` names (``early`` = the first feature map)."""
    table = {"early": [0], "middle": [num_stages // 2], "late": [num_stages - 1],
             "penultimate": [max(0, num_stages - 2)], "all": list(range(num_stages))}
    if layer not in table:
        raise BenchError(f"dispersive layer {layer!r} unknown; choose one of {', '.join(LAYERS)}")
    return table[layer]


def stage_dispersive(features: list[Tensor], layer: str, pool: str, **loss_kwargs: Any) -> Tensor:
    """The dispersive loss on the chosen stage(s) of a list of stage maps, summed over ``all``."""
    return sum(dispersive_loss(pool_features(features[i], pool), **loss_kwargs)
               for i in stage_indices(layer, len(features)))


# --- the +disp modifier ----------------------------------------------------------------------------

def stage_modules(backbone: nn.Module) -> list[nn.Module] | None:
    """The submodule producing each stage map of a timm ``features_only`` backbone (None if unknown)."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        return None
    modules = []
    for name in info.module_name():
        for candidate in (name.replace(".", "_"), name):
            try:
                modules.append(backbone.get_submodule(candidate))
                break
            except AttributeError:
                continue
        else:
            return None
    return modules


@register
class DispersiveModifier(Modifier):
    """``METHOD+disp``: weight · dispersive loss on a stage of the method's online backbone.

    A forward hook on the chosen stage module(s) of ``method.backbone`` keeps the output of the
    FIRST forward after ``begin_step()`` (for every method here: view 1, ``Views.x1``); later
    forwards in the same step (view 2, chunks) are ignored. Target/EMA backbones are deep copies
    made before the modifier is attached and carry no hook.
    """

    name = "disp"
    paper = "Wang & He 2025, Diffuse and Disperse; Med-DisSeg Eqs. 3-6; SpectraFlow"
    defaults = {"variant": "l2", "weight": 0.2, "tau": 0.8, "margin": 1.0, "eps": 1e-8,
                "layer": "early", "pool": "flatten", "normalize": True, "include_self": False, "cov_per_dim": False}
    choices = {"variant": VARIANTS, "layer": LAYERS, "pool": POOLS}
    bounds = {"margin": (0.0, None)}

    def __init__(self, method: Method, cfg: dict[str, Any]):
        super().__init__(method, cfg)
        self.captured: dict[int, Tensor] = {}
        self.distributed = method.ctx.distributed
        self._handles = []
        modules = stage_modules(method.backbone)
        num_stages = len(modules) if modules else len(method.ctx.feature_channels)
        self.indices = stage_indices(self.cfg["layer"], num_stages)
        if modules is not None:
            for i in self.indices:
                self._handles.append(modules[i].register_forward_hook(self._stage_hook(i)))
        else:  # a backbone without feature_info: take the stage from its output list
            self._handles.append(method.backbone.register_forward_hook(self._list_hook))

    def _stage_hook(self, index: int) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if torch.is_grad_enabled() and index not in self.captured:
                self.captured[index] = output
        return hook

    def _list_hook(self, _module: nn.Module, _inputs: Any, output: list[Tensor]) -> None:
        for i in self.indices:
            if torch.is_grad_enabled() and i not in self.captured:
                self.captured[i] = output[i]

    def begin_step(self) -> None:
        self.captured = {}

    def loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [i for i in self.indices if i not in self.captured]
        if missing:
            raise BenchError("+disp saw no forward of the online backbone in this step; the method must "
                             "run method.backbone on its views with gradients enabled")
        cfg = self.cfg
        value = sum(dispersive_loss(pool_features(self.captured[i], cfg["pool"]), cfg["variant"],
                                    cfg["tau"], cfg["margin"], cfg["eps"], cfg["normalize"],
                                    cfg["include_self"], self.distributed, cfg["cov_per_dim"]) for i in self.indices)
        first = pool_features(self.captured[self.indices[0]].detach(), cfg["pool"])
        logs = {"disp": value.detach(), "disp_sqdist": mean_sq_dist(first, cfg["normalize"])}
        self.captured = {}
        return cfg["weight"] * value, logs


@torch.no_grad()
def mean_sq_dist(h: Tensor, normalize: bool) -> Tensor:
    """Health figure: the mean pairwise squared distance the loss sees (≪ τ: exp(−d/τ) ≈ 1, all
    points together; ≫ τ: the exp terms vanish and the log variants sit at log ε)."""
    b = h.shape[0]
    dist = pairwise_sq_dists(h.float()) / (h.shape[1] if normalize else 1)
    return dist.sum() / max(1, b * (b - 1))


# --- Disp-II: the fine-tuning regulariser ----------------------------------------------------------

def finetune_dispersive(features: list[Tensor], weight: float = 0.6, variant: str = "l2", tau: float = 0.8,
                        layer: str = "early", pool: str = "flatten", normalize: bool = True) -> Tensor:
    """Med-DisSeg Disp-II: λ₂ · dispersive loss on the fine-tuning encoder's chosen stage(s).

    ``features``: the backbone's list of stage maps for the training batch (``model.backbone(x)``).
    """
    return weight * stage_dispersive(features, layer, pool, variant=variant, tau=tau, normalize=normalize)


def finetune_regulariser(schedule: Any) -> Callable[[list[Tensor]], Tensor]:
    """The Disp-II term for a fine-tuning ``Schedule`` (its ``reg_weight``, ``reg_variant``, ``reg_layer``)."""
    weight = float(getattr(schedule, "reg_weight", 0.6))
    variant = str(getattr(schedule, "reg_variant", "l2"))
    layer = str(getattr(schedule, "reg_layer", "early"))
    if variant not in VARIANTS or layer not in LAYERS:
        raise BenchError(f"finetune reg_variant={variant}, reg_layer={layer}: choose reg_variant from "
                         f"{'|'.join(VARIANTS)} and reg_layer from {'|'.join(LAYERS)}")

    def regulariser(features: list[Tensor]) -> Tensor:
        return finetune_dispersive(features, weight=weight, variant=variant, layer=layer)

    return regulariser


# --- the `dispersive` registry entry: Med-DisSeg stage I -------------------------------------------

@register
class MedDisSegStageI(Method):
    """Med-DisSeg stage I: supervised Dice + BCE on the labelled subset + λ₁ · dispersive (Eq. 3).

    Trains on the labelled images themselves (``trains_on_labelled``): the protocol passes each
    batch's aligned masks as ``masks=``; ``Views.masks`` holds them cropped like view 1.
    """

    name = "dispersive"
    paper = "Med-DisSeg stage I (dispersive loss: Wang & He 2025, Diffuse and Disperse)"
    defaults = {"weight": 0.2, "variant": "l2", "tau": 0.8, "margin": 1.0, "layer": "early",
                "pool": "flatten", "normalize": True, "include_self": False, "cov_per_dim": False}
    choices = {"variant": VARIANTS, "layer": LAYERS, "pool": POOLS}
    bounds = {"margin": (0.0, None)}
    recipe = "photometric"
    group = "flow/dispersive"
    uses_labels = True
    trains_on_labelled = True

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        self.head = nn.Conv2d(ctx.feature_channels[-1], 1, kernel_size=1)

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        target = labelled_targets(views, "dispersive (Med-DisSeg stage I)")
        features = self.backbone(views.x1)
        logits = F.interpolate(self.head(features[-1]), size=views.x1.shape[-2:], mode="bilinear",
                               align_corners=False)
        seg = dice_bce_loss(logits, target)
        cfg = self.cfg
        disp = stage_dispersive(features, cfg["layer"], cfg["pool"], variant=cfg["variant"], tau=cfg["tau"],
                                margin=cfg["margin"], normalize=cfg["normalize"],
                                include_self=cfg["include_self"], distributed=self.ctx.distributed,
                                cov_per_dim=cfg["cov_per_dim"])
        loss = seg + cfg["weight"] * disp
        return loss, {"loss": loss.detach(), "seg": seg.detach(), "disp": disp.detach(),
                      "std": embedding_std(features[-1].mean(dim=(2, 3)))}
