"""SimCLR — Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.

Encoder f: backbone → global average pool of C5 (h). Projection head g (paper §2.1, Appendix B.9 for
ImageNet): C5 → 2048 BN ReLU → 128 BN (lightly's ``SimCLRProjectionHead``, as the released TF code with
``use_bn``). Both views run through the encoder as one batch of 2B images, as the released code
concatenates them (batch-norm statistics over both views).

Loss: NT-Xent (Eq. 1) over the 2B views: for each view, the other view of the same image is the
positive and the remaining 2B − 2 views are negatives, logits are cosine similarities / τ, averaged over
all 2B anchors (lightly's ``NTXentLoss``; negatives gathered across ranks under DDP). τ = 0.1: the
paper's ImageNet setting (Table 5; the released ImageNet command). Views: SimCLR's augmentation
(random resized crop 0.08–1, flip, colour jitter with strength s = 1, i.e. 0.8/0.8/0.8/0.2 at p 0.8,
greyscale p 0.2, Gaussian blur p 0.5, σ ∈ [0.1, 2]), the same for both views.

Departures: the paper's optimiser (LARS, lr 4.8 at batch 4096, 100 epochs) is kept for reference only;
the preset's optimiser is used (uniform protocol).
"""

from __future__ import annotations

import contextlib

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from bench.augment import ViewAug, ViewRecipe, Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool

_SIMCLR_VIEW = ViewAug(scale=(0.08, 1.0), flip_p=0.5, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                       jitter_p=0.8, gray_p=0.2, blur_p=0.5)
SIMCLR_RECIPE = ViewRecipe("simclr", _SIMCLR_VIEW, _SIMCLR_VIEW, "Chen et al. 2020, SimCLR, Appendix A")


def full_precision(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``x``'s device: a loss (its similarity logits included) computed in fp32 from fp32
    inputs, so bf16 training does not round the logits (shared by the methods of this family)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


@register
class SimCLR(Method):
    name = "simclr"
    paper = "Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020"
    group = "global contrastive"
    defaults = {"temperature": 0.1, "hidden_dim": 2048, "proj_dim": 128}
    recipe = SIMCLR_RECIPE

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        self.projector = SimCLRProjectionHead(ctx.feature_channels[-1], cfg["hidden_dim"], cfg["proj_dim"])
        self.criterion = NTXentLoss(temperature=cfg["temperature"], gather_distributed=ctx.distributed)

    def embed(self, x: Tensor) -> Tensor:
        """Projections z = g(f(x)) of a batch (not normalised; the loss normalises)."""
        return self.projector(pool(self.backbone(x)[-1]))

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        z1, z2 = self.embed(torch.cat([views.x1, views.x2])).chunk(2)
        with full_precision(z1):
            loss = self.criterion(z1.float(), z2.float())
        return loss, {"loss": loss.detach(), "std": embedding_std(z1)}
