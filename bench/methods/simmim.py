"""SimMIM — Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022 (released code:
microsoft/SimMIM, ``models/simmim.py`` and ``data/data_simmim.py``), on a CNN backbone.

Masking (§3.1, ``MaskGenerator``): the image is split into a g×g grid of square mask patches, g = 224 / 32
= 7 (``mask_patch`` = 32 px at 224 px, so the patches scale with the image size: size/7 px each), and
``ceil(g²·mask_ratio)`` of them are masked uniformly at random, mask_ratio = 0.6. The masked pixels are
replaced by a **learned mask token** at the input (a learnable 3-vector, trunc-normal init σ = 0.02, as
the released ``mask_token``), the unmasked pixels are kept.

Prediction head (§3.3): one linear layer on the last stage, a 1×1 convolution C5 → stride²·3 followed by
a pixel shuffle of the backbone's stride (32), giving a full-resolution RGB prediction.
Target and loss (§3.4): the raw (ImageNet-normalised) input pixels; L1 averaged over the masked pixels
and the 3 channels only: Σ |x − x̂|·M / (Σ M · 3).

Views: one view (``x2`` is ``x1``): random resized crop scale 0.67–1, ratio 3/4–4/3, horizontal flip,
no colour augmentation (``data_simmim.py``). The mask is drawn in ``make_views`` from the view generator
(``MaskedViews.mask``: (B, g, g) bool, True = masked) and redrawn from the global generator if absent.

Departures: SimMIM's released models are Swin/ViT, where the mask token replaces a masked patch's
embedding; a CNN has no patch embedding, so the token replaces the masked pixels themselves (a learned
fill value, one per colour channel). The mask patch scales with the image
size relative to 224 px (the paper's 32 px at 192 px is 6×6 patches; 7×7 here). The released optimiser
(AdamW, tuned for Swin) is not used; the preset's optimiser is (uniform protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import augment
from bench.augment import ViewAug, Views
from bench.errors import BenchError
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool

MIM_VIEW = ViewAug(scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)  # SimMIM's and SparK's pretraining crop
REFERENCE_SIZE = 224


def random_patch_mask(batch: int, grid: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | None = None) -> Tensor:
    """(B, g, g) bool: exactly ``ceil(g²·ratio)`` masked cells per image, uniformly at random (SimMIM)."""
    cells = grid * grid
    count = math.ceil(cells * ratio)
    gen_device = generator.device if generator is not None else device
    order = torch.rand(batch, cells, generator=generator, device=gen_device).argsort(dim=1)
    mask = torch.zeros(batch, cells, dtype=torch.bool, device=gen_device)
    mask.scatter_(1, order[:, :count], True)
    return mask.reshape(batch, grid, grid).to(device or gen_device)


@dataclass
class MaskedViews(Views):
    """Views of a masked-modelling method: one view (``x2`` is ``x1``) and its patch mask (True = masked)."""

    mask: Tensor | None = None


def with_fields(views: Views, cls: type, **extra) -> Views:
    """``views`` as an instance of the Views subclass ``cls`` with its extra fields set."""
    return cls(**{f.name: getattr(views, f.name) for f in fields(views)}, **extra)


def single_view(images: Tensor, aug: ViewAug, size: int, generator: torch.Generator, image_ids: Tensor,
                mask: Tensor | None = None) -> MaskedViews:
    """One augmented view whose second view is the first (masked modelling)."""
    x, box, flip, _ = augment.augment_view(images, aug, size, generator)
    return MaskedViews(x1=x, x2=x, box1=box, box2=box, flip1=flip, flip2=flip, image_ids=image_ids, mask=mask)


def masked_l1(x: Tensor, x_rec: Tensor, pixel_mask: Tensor) -> Tensor:
    """Σ |x − x̂|·M / (Σ M · C): L1 over masked pixels and channels (SimMIM's loss); M (B, 1, H, W)."""
    per_pixel = (x.float() - x_rec.float()).abs() * pixel_mask
    return per_pixel.sum() / (pixel_mask.sum() * x.shape[1] + 1e-5)


@register
class SimMIM(Method):
    name = "simmim"
    paper = "Xie et al., SimMIM: A Simple Framework for Masked Image Modeling, CVPR 2022"
    group = "masked modelling"
    defaults = {"mask_ratio": 0.6, "mask_patch": 32}
    bounds = {"mask_ratio": (0.0, 1.0), "mask_patch": (1, REFERENCE_SIZE)}

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        if not 0.0 < cfg["mask_ratio"] < 1.0:
            raise BenchError(f"simmim:mask_ratio={cfg['mask_ratio']} must lie strictly between 0 and 1")
        self.grid = max(1, round(REFERENCE_SIZE / cfg["mask_patch"]))
        self.stride = backbone.feature_info.reduction()[-1]
        self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(nn.Conv2d(ctx.feature_channels[-1], self.stride**2 * 3, 1),
                                     nn.PixelShuffle(self.stride))

    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        views = single_view(images, MIM_VIEW, self.ctx.image_size, generator, image_ids)
        views.mask = random_patch_mask(images.shape[0], self.grid, self.cfg["mask_ratio"], generator, views.x1.device)
        return views

    def pixel_mask(self, mask: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, g, g) patch mask → (B, 1, H, W) float pixel mask (nearest: each patch covers H/g pixels)."""
        return F.interpolate(mask[:, None].float(), size=size, mode="nearest")

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = views.x1
        mask = getattr(views, "mask", None)
        if mask is None:
            mask = random_patch_mask(x.shape[0], self.grid, self.cfg["mask_ratio"], device=x.device)
        m = self.pixel_mask(mask.to(x.device), x.shape[-2:])
        c5 = self.backbone(x * (1 - m) + self.mask_token.to(x.dtype) * m)[-1]
        x_rec = self.decoder(c5)
        if x_rec.shape[-2:] != x.shape[-2:]:  # sizes that are not a multiple of the stride
            x_rec = F.interpolate(x_rec, size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = masked_l1(x, x_rec, m)
        return loss, {"loss": loss.detach(), "std": embedding_std(pool(c5)), "masked": m.mean().detach()}
