"""``supervised`` — the positive control: in-domain supervised pretraining (docs/methods.md, "supervised").

The backbone (at the fine-tuning model's output stride 16) and the fine-tuning model's DeepLabv3 head
(``bench.models.deeplab_head``, ASPP rates (6, 12, 18)) are trained with the fine-tuning loss (BCE + soft
Dice, ``bench.models.dice_bce_loss``) on ALL labelled training images of the dataset
(``label_fraction = 1.0``: the job does not depend on the cell's label fraction), one view per image under
the fine-tuning augmentation (recipe "light", as ``augment.finetune_batch``). The protocol hands the
labelled images and their aligned masks (``trains_on_labelled``), as for Med-DisSeg stage I. It trains with
its own optimiser settings (``optimizer=adamw, lr=0.003, weight_decay=1e-4``: a segmentation network trained
like a fine-tuning, not with the SSL schedule's SGD, under which a few steps left it barely trained), and
with the pretraining schedule's steps, batch and size.

Export: the backbone and, by default, the ASPP (the head's modules 0–3, DeepLabHead key names, loaded into
the fine-tuning head by ``bench.models.load_aspp`` as CP2's is); the 1×1 classifier is re-initialised by
fine-tuning. ``export_head=false`` exports the backbone alone. Loading the head too makes the control as
strong as the harness allows: fine-tuning starts from a whole segmentation network trained in-domain on
every label, so a pretraining method that cannot approach it on the same fraction is the harness's gap
to close, and a harness that cannot show it ahead of ``scratch`` cannot rank methods.

It is an upper reference (``reference = "upper"``): kept out of the ranks and statistics unless asked,
and marked in tables and diagrams.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import augment
from bench.augment import Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std, labelled_targets
from bench.models import deeplab_head, dice_bce_loss


@register
class Supervised(Method):
    name = "supervised"
    paper = "positive control: supervised in-domain pretraining of backbone + DeepLabv3 head on all labels"
    defaults = {"export_head": True, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0001}
    choices = {"optimizer": ("sgd", "adam", "adamw")}
    bounds = {"lr": (0.0, None), "weight_decay": (0.0, None)}
    schedule_keys = ("optimizer", "lr", "weight_decay")  # a supervised network trains as fine-tuning does
    recipe = "light"
    group = "references"
    uses_labels = True
    trains_on_labelled = True
    label_fraction = 1.0
    reference = "upper"
    output_stride = 16

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        self.head = deeplab_head(ctx.feature_channels[-1], 1, self.output_stride)

    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        """One fine-tuning view of each labelled image (``x2`` is the same view) with its mask cropped alike."""
        aug = augment.get_recipe(self.recipe).view1
        x, box, flip, view_masks = augment.augment_view(images, aug, self.ctx.image_size, generator, masks=masks)
        return Views(x1=x, x2=x, box1=box, box2=box, flip1=flip, flip2=flip, image_ids=image_ids,
                     masks=view_masks, source_size=tuple(images.shape[-2:]))

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(segmentation logits (B, 1, S, S) at the input size, the backbone's last feature map)."""
        features = self.backbone(x)[-1]
        out = F.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out, features

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        target = labelled_targets(views, "supervised")
        logits, features = self.logits(views.x1)
        loss = dice_bce_loss(logits, target)
        return loss, {"loss": loss.detach(), "std": embedding_std(features.mean(dim=(2, 3)))}

    def export(self) -> dict[str, dict[str, Tensor]]:
        """The backbone and, unless ``export_head=false``, the ASPP (DeepLabHead keys without the classifier)."""
        out = super().export()
        if self.cfg["export_head"]:
            out["head"] = {k: v.detach().cpu() for k, v in self.head.state_dict().items() if not k.startswith("4.")}
        return out
