"""CP2 — Wang et al., "CP2: Copy-Paste Contrastive Pretraining for Semantic Segmentation", ECCV 2022
(official code: github.com/wangf3014/CP2).

Views: two MoCo-v2 views (q, k) of each image are the foregrounds; each is composited with a different
other image of the batch, MoCo-v2-augmented (q's background: image i−1, k's: image i−2), by
``bench.augment.copy_paste``: a RandomErasing-style rectangle (area 0.5–0.8, ratio 0.8–1.25) of the
background is replaced by the same rectangle of the full-size foreground view; the paste masks are
returned by the transform (never inferred from pixel values).

Model: backbone at output stride 16 + ASPP (the finetune head, ``bench.models.deeplab_head`` with
DeepLabv3's stride-16 rates (6, 12, 18), minus its classifier conv, i.e. modules 0–3, A = 256 channels)
+ projection 1×1 conv A→A, ReLU, 1×1 conv →128 (the official ``contrast_conv``; its 512 is the official
ASPP's width). Key branch: EMA copy of all three, m = 0.999 constant, shuffle-BN. q_x, k_y:
L2-normalised dense embeddings; masks sampled at the cell centres of the feature grid.

Instance loss (MoCo): q̄ = normalise(Σ_x mask_q(x)·q_x), k̄ likewise; InfoNCE(q̄, k̄, queue), τ = 0.2,
queue K = 65536 (capped at the pool size) of mask-pooled foreground keys, keys of the current images
excluded from the negatives (``exclude_self=false`` keeps them, as the official code does).
Dense loss: logits_xy = cos(q_x, k_y) without temperature; for each key location y a log-softmax over
all query locations x (background included in the denominator);

    L_dense = mean_b [ Σ_xy −log softmax_x(logits)_xy · mask_q(x)·mask_k(y) / Σ_xy mask_q(x)·mask_k(y) ].

L = L_ins + 0.2·L_dense. Export: the backbone and the ASPP (DeepLabHead key names, loaded into the
finetune head by ``bench.models.load_aspp``), as CP2's own evaluation does; ``export_head=false``
exports the backbone alone.
Defaults: momentum 0.999, queue 65536, temperature 0.2, dense_weight 0.2, proj_dim 128, export_head
True, shuffle_bn True, exclude_self True (docs/methods.md, "cp2").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import augment, geometry
from bench.augment import Views
from bench.errors import BenchError
from bench.methods import register
from bench.methods.base import Method, PretrainContext, conv_mlp, embedding_std
from bench.methods.queue import KeyQueue, capped_queue_size, gather_across_ranks, info_nce, key_forward
from bench.models import deeplab_head


def aspp_head(in_channels: int, output_stride: int = 16) -> nn.Sequential:
    """The finetune model's DeepLabHead (rates for ``output_stride``) without its classifier (modules 0–3,
    same state-dict keys).

    The ASPP's Dropout(0.5) is made an identity: the official pretraining head applies dropout only
    before the classifier, which its contrastive mode skips. Dropout has no weights, so keys are unchanged.
    """
    head = deeplab_head(in_channels, 1, output_stride)
    aspp = nn.Sequential(*list(head.children())[:4])
    aspp[0].project[3] = nn.Identity()
    return aspp


def aspp_channels(aspp: nn.Sequential) -> int:
    """Output channels of the ASPP (the last conv's out_channels; 256 for torchvision's)."""
    return [m for m in aspp.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def mask_pool(dense: Tensor, mask: Tensor) -> Tensor:
    """normalise(Σ_x mask(x)·dense_x): dense (B, D, N) normalised per location, mask (B, N) → (B, D)."""
    return F.normalize(torch.einsum("bdn,bn->bd", dense, mask.to(dense.dtype)), dim=1)


def cp2_dense_loss(q: Tensor, k: Tensor, mask_q: Tensor, mask_k: Tensor) -> Tensor:
    """CP2's dense loss: −log softmax over query locations x of cos(q_x, k_y), averaged over fg–fg pairs.

    q, k: (B, D, N) dense embeddings (normalised here); mask_q, mask_k: (B, N) foreground masks in
    [0, 1] (``mask_at_cells`` gives a fraction where a cell centre falls on the rectangle's edge).
    No temperature. Per image the mean over pairs (x, y) weighted by mask_q(x)·mask_k(y), then the
    mean over the batch; an image without a foreground pair contributes 0.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    logits = torch.einsum("bdx,bdy->bxy", q, k)
    log_prob = torch.log_softmax(logits, dim=1)  # over x, for each y
    pairs = mask_q.float()[:, :, None] * mask_k.float()[:, None, :]
    per_image = -(log_prob * pairs).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1e-6)
    return per_image.mean()


class CP2Encoder(nn.Module):
    """Backbone (stride 16) → ASPP → projection: dense embeddings (B, proj_dim, h, w)."""

    def __init__(self, backbone: nn.Module, aspp: nn.Module, projection: nn.Module):
        super().__init__()
        self.backbone, self.aspp, self.projection = backbone, aspp, projection

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.aspp(self.backbone(x)[-1]))


@register
class CP2(Method):
    name = "cp2"
    paper = "Wang et al., CP2: Copy-Paste Contrastive Pretraining for Semantic Segmentation, ECCV 2022"
    defaults = {"momentum": 0.999, "queue": 65536, "temperature": 0.2, "dense_weight": 0.2, "proj_dim": 128,
                "export_head": True, "shuffle_bn": True, "exclude_self": True}
    recipe = "mocov2"
    group = "dense contrastive"
    output_stride = 16
    momentum_schedule = "constant"  # MoCo

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        self.aspp = aspp_head(ctx.feature_channels[-1], self.output_stride)
        width = aspp_channels(self.aspp)
        self.projection = conv_mlp(width, width, cfg["proj_dim"])
        self.encoder = CP2Encoder(self.backbone, self.aspp, self.projection)
        self.add_targets("encoder")
        size = capped_queue_size(cfg["queue"], ctx.pool_size, ctx.batch_size)
        self.queue = KeyQueue(size, cfg["proj_dim"])

    # --- views ----------------------------------------------------------------------------------
    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        """Foregrounds: two MoCo-v2 views of each image; backgrounds: MoCo-v2 views of image i−1 (q)
        and image i−2 (k) of the batch (both i−1 when B = 2); composited by ``augment.copy_paste``."""
        if images.shape[0] < 2:
            raise BenchError("cp2 needs a batch of at least 2 images (backgrounds are other images of "
                             "the batch); raise the batch size")
        size = self.ctx.image_size
        fg = augment.make_views(images, self.recipe, size, generator, image_ids=image_ids, masks=masks)
        bg = augment.make_views(images.roll(1, dims=0), self.recipe, size, generator)
        bg2 = bg.x2.roll(1, dims=0) if images.shape[0] > 2 else bg.x2
        return augment.copy_paste(fg, bg.x1, bg2, generator)

    # --- model ------------------------------------------------------------------------------------
    def _dense(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Online dense embeddings (B, D, h·w), normalised per location, and the grid (h, w)."""
        out = self.encoder(x)
        return F.normalize(out.flatten(2), dim=1), tuple(out.shape[-2:])

    @torch.no_grad()
    def _keys(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Key dense embeddings (B, D, N) and mask-pooled keys (B, D), with shuffle-BN if enabled."""
        (out,) = key_forward(lambda t: (self.target_encoder(t),), x, self.cfg["shuffle_bn"], self.ctx.distributed)
        k = F.normalize(out.flatten(2), dim=1)
        return k, mask_pool(k, mask)

    def cell_masks(self, paste: Tensor, h: int, w: int) -> Tensor:
        """A paste mask (B, 1, S, S) sampled at the cell centres of the h×w feature grid: (B, h·w)."""
        return geometry.mask_at_cells(paste, h, w)

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        if views.paste1 is None or views.paste2 is None:
            raise BenchError("cp2 needs copy-paste views with paste masks; build them with method.make_views")
        q, (h, w) = self._dense(views.x1)
        mask_q, mask_k = self.cell_masks(views.paste1, h, w), self.cell_masks(views.paste2, h, w)
        k, k_pooled = self._keys(views.x2, mask_k)
        q_pooled = mask_pool(q, mask_q)
        exclude = self.queue.exclusion_mask(views.image_ids, self.cfg["exclude_self"])
        ins = info_nce(q_pooled, k_pooled, self.queue.keys.clone(), self.cfg["temperature"], exclude)
        dense = cp2_dense_loss(q, k, mask_q, mask_k)
        loss = ins + self.cfg["dense_weight"] * dense
        self._enqueue(k_pooled, views.image_ids)
        return loss, {"loss": loss.detach(), "loss_ins": ins.detach(), "loss_dense": dense.detach(),
                      "std": embedding_std(q_pooled)}

    @torch.no_grad()
    def _enqueue(self, keys: Tensor, ids: Tensor) -> None:
        ids = ids.to(keys.device)
        keys, ids = gather_across_ranks(keys, ids, distributed=self.ctx.distributed)
        self.queue.push(keys, ids)

    def export(self) -> dict[str, dict[str, Tensor]]:
        """The online backbone and, unless ``export_head=false``, the ASPP (DeepLabHead key names)."""
        out = super().export()
        if self.cfg["export_head"]:
            out["head"] = {k: v.detach().cpu() for k, v in self.aspp.state_dict().items()}
        return out

