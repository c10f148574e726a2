"""DINO — Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(released code: facebookresearch/dino, ``main_dino.py``; its ResNet-50 recipe in the README).

Student: backbone → average pool of C5 → DINO head (3-layer MLP 2048-2048 with GELU, no BN as the
released default ``use_bn_in_head=False`` → 256-d bottleneck → L2 normalisation → weight-normalised linear
layer to K = 65536 prototypes, the last layer's norm fixed: ``norm_last_layer``), lightly's
``DINOProjectionHead``. Teacher: an EMA copy of backbone + head, m₀ = 0.996 cosine to 1.

Multi-crop: two global crops (BYOL-style augmentation, random resized crop scale 0.14–1, blur p 1.0 /
0.1, solarise p 0 / 0.2; the ResNet-50 command ``--global_crops_scale 0.14 1``) and ``local_crops`` = 8
local crops (scale 0.05–0.14, ``--local_crops_scale 0.05 0.14``; blur p 0.5) at 96/224 of the image size.
The teacher sees the global crops only; the student sees all. Crops of one resolution run as one batch
(the released ``MultiCropWrapper``), so batch-norm statistics span them.

Loss (Eq. 1 + centring): H(P_t(x), P_s(x′)) = −Σ softmax((t − c)/τ_t) · log softmax(s/τ_s) averaged over
every (teacher global crop, student crop) pair of different crops, τ_s = 0.1, τ_t = 0.04 (the released
default: ``warmup_teacher_temp = teacher_temp = 0.04``, no warm-up); the centre c is an EMA (0.9) of the
teacher's batch mean, updated after the loss (lightly's ``DINOLoss``). The last layer is frozen for the
first ``freeze_last_layer`` fraction of the steps (released: 1 of 100 epochs), by using its weights
detached in the student's forward.

Collapse indicators: ``std`` of the student's normalised bottleneck features and ``teacher_entropy``
(mean entropy of the teacher's output distribution; collapse to one prototype drives it to 0, uniform
collapse to log K).

Departures: the teacher head is built fresh and loaded from the student's state instead of deep-copied
(``weight_norm`` modules cannot be deep-copied); the centre is not all-reduced across ranks under DDP
(each rank centres with its own batch mean). The released ResNet-50 optimiser (SGD lr 0.03, wd 1e-4,
100 epochs) is kept for reference only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from bench import augment
from bench.augment import RECIPES, ViewRecipe, Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std, make_target
from bench.methods.byol import pool
from bench.methods.simclr import full_precision
from bench.methods.simmim import with_fields

_BYOL = RECIPES["byol"]
DINO_GLOBAL = ViewRecipe("dino", replace(_BYOL.view1, scale=(0.14, 1.0)), replace(_BYOL.view2, scale=(0.14, 1.0)),
                         "Caron et al. 2021, DINO (ResNet-50 command)")
DINO_LOCAL = replace(_BYOL.view1, scale=(0.05, 0.14), blur_p=0.5)
LOCAL_SIZE_RATIO = 96 / 224


@dataclass
class MultiCropViews(Views):
    """The two global crops (``x1``, ``x2``) and the local crops (n·B, 3, s, s), crop-major (None: none)."""

    local: Tensor | None = None


@register
class DINO(Method):
    name = "dino"
    paper = "Caron et al., Emerging Properties in Self-Supervised Vision Transformers (DINO), ICCV 2021"
    group = "global non-contrastive"
    defaults = {"momentum": 0.996, "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256,
                "teacher_temperature": 0.04, "student_temperature": 0.1, "center_momentum": 0.9, "local_crops": 8,
                "freeze_last_layer": 0.01, "norm_last_layer": True}
    bounds = {"local_crops": (0, None), "freeze_last_layer": (0.0, 1.0)}
    recipe = DINO_GLOBAL

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        self.head = self._make_head()
        self.teacher_backbone = make_target(backbone)
        self.teacher_head = self._make_head()
        self.teacher_head.load_state_dict(self.head.state_dict())
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        tt = cfg["teacher_temperature"]
        self.criterion = DINOLoss(output_dim=cfg["out_dim"], warmup_teacher_temp=tt, teacher_temp=tt,
                                  warmup_teacher_temp_epochs=0, student_temp=cfg["student_temperature"],
                                  center_momentum=cfg["center_momentum"])
        self.freeze_steps = round(cfg["freeze_last_layer"] * ctx.total_steps)

    def _make_head(self) -> DINOProjectionHead:
        cfg = self.cfg
        with warnings.catch_warnings():  # lightly's head uses torch's deprecated (but equivalent) weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            return DINOProjectionHead(self.ctx.feature_channels[-1], cfg["hidden_dim"], cfg["bottleneck_dim"],
                                      cfg["out_dim"], batch_norm=False, norm_last_layer=cfg["norm_last_layer"])

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        """The two global crops and ``local_crops`` local crops at 96/224 of the image size."""
        views = super().make_views(images, image_ids, generator, masks)
        n, local = self.cfg["local_crops"], None
        if n > 0:
            size = max(8, round(self.ctx.image_size * LOCAL_SIZE_RATIO))
            local = augment.augment_view(images.repeat(n, 1, 1, 1), DINO_LOCAL, size, generator)[0]
        return with_fields(views, MultiCropViews, local=local)

    def student(self, x: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(logits (N, K), normalised bottleneck (N, d)); the last layer is detached while frozen."""
        head = self.head
        z = F.normalize(head.layers(pool(self.backbone(x)[-1])), dim=-1)
        last = head.last_layer
        weight = torch._weight_norm(last.weight_v, last.weight_g, 0)
        if step < self.freeze_steps:
            weight = weight.detach()
        return F.linear(z, weight), z

    @torch.no_grad()
    def teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(pool(self.teacher_backbone(x)[-1]))

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        b = views.x1.shape[0]
        globals_ = torch.cat([views.x1, views.x2])
        t1, t2 = self.teacher(globals_).float().chunk(2)
        s_global, z = self.student(globals_, step)
        students = list(s_global.float().chunk(2))
        local = getattr(views, "local", None)
        if local is not None:
            students += list(self.student(local, step)[0].float().split(b))
        tt = self.cfg["teacher_temperature"]
        with full_precision(t1):
            entropy = teacher_entropy(t1, self.criterion.center, tt)  # before the centre moves
            loss = self.criterion([t1, t2], students, teacher_temp=tt)
        return loss, {"loss": loss.detach(), "std": embedding_std(z[:b]), "teacher_entropy": entropy}


def teacher_entropy(t: Tensor, center: Tensor, temperature: float) -> Tensor:
    """Mean entropy of softmax((t − c)/τ_t) over the batch (logged collapse indicator)."""
    with torch.no_grad():
        p = F.softmax((t - center.reshape(1, -1)) / temperature, dim=-1)
        return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
