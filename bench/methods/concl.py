"""ConCL — Yang et al., "ConCL: Concept Contrastive Learning for Dense Prediction Pre-training in Pathology
Images", ECCV 2022. Followed: the authors' released code, TencentAILabHealthcare/ConCL,
``openselfsup/models/concl.py`` (model, k-means, view matching), ``openselfsup/datasets/contrastive_trans.py``
(the reference view), ``openselfsup/hooks/concl_hook.py`` (warm-up) and
``configs/NCT_pretraining/concl/r18_bs256_ep200.py`` / ``ablation/r50_bs256_ep200.py`` (defaults).

Model: MoCo v2 — query encoder (backbone → pool C5 → neck C5 → hidden ReLU → 128) and an EMA key encoder
(m = 0.999, constant), queue of image keys, τ = 0.2, shuffle-BN on the key forward.

Concepts (what makes ConCL): a third, **reference view** is the union box of the two crops, cut from the
source image with no photometric augmentation and resized to the view size. The key encoder's C4 map
of the reference (stride 16; the released ``cluster_indice=3``) is clustered per image with cosine
k-means (``num_concepts`` = 8 clusters, 10 iterations, random initial centres; an empty cluster gets a
random point). Each view's **concept map** on its C5 grid is the reference's one-hot assignment map
cropped to where that view lies inside the reference, averaged per C5 cell (area vote), arg-maxed, and
mirrored if the view was flipped (``match_views_avg_pool``). The **positives** are concept prototypes:
for every image and every concept present in *both* views' maps, the mean of the query view's online C5
features over that concept's cells and the mean of the key view's key-encoder C5 features over its cells;
both go through the (query / key) neck and are L2-normalised. Concept loss: InfoNCE of each query
prototype against its key prototype, negatives from a second queue of key prototypes (``num_concepts``·B
of them enqueued per step: the step's prototypes, padded by random repeats as the released code).

Loss: instance InfoNCE only for the first ``warmup`` fraction of the steps (released: 20 of 200 epochs),
then L = w·L_concept + (1 − w)·L_instance with w = ``concept_weight`` = 1.0 (the released default, so
after the warm-up only the concept loss trains the network; both queues keep being filled).

Defaults: momentum 0.999, queue 16384 (both queues; capped at the pool size, the concept queue at
``num_concepts`` × pool size), temperature 0.2, proj_dim 128, hidden_dim 2048 (the ResNet-50 config; the
ResNet-18 config uses 512 = its C5 width), num_concepts 8, cluster_stage 4 (C4), concept_weight 1.0,
warmup 0.1, kmeans_iters 10, shuffle_bn true, exclude_self true. Views: MoCo v2's augmentation (recipe "mocov2").

Departures (and why): (1) the released code pairs query features with key-encoder C5 maps that are still
in the shuffled (shuffle-BN) batch order, i.e. with other images' features; here the key maps are
unshuffled first (the evident intent). (2) Queued keys and prototypes of the current images are excluded
from the negatives (the project's queue rule; ``exclude_self=false`` keeps them, as the released code).
(3) The view's concept map is computed with ``roi_align`` area averaging of the one-hot map (sub-cell
box edges) instead of integer-rounded crops + adaptive average pooling; the reference view is resized
with ``roi_align`` instead of bicubic PIL. (4) The released optimiser (SGD lr 0.03, wd 1e-4, batch 256,
200 epochs) is kept for reference only; the preset's optimiser is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from torch import Tensor, nn

from bench import augment
from bench.augment import Views
from bench.errors import BenchError
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.queue import KeyQueue, capped_queue_size, gather_across_ranks, info_nce, shuffled_forward
from bench.methods.simclr import full_precision
from bench.methods.simmim import with_fields

SHUFFLE_SPLITS = 2


@dataclass
class ReferenceViews(Views):
    """MoCo v2 views plus ConCL's reference view (B, 3, S, S): the union of both crops, unaugmented."""

    reference: Tensor | None = None


def union_boxes(box1: Tensor, box2: Tensor) -> Tensor:
    """The smallest box containing both crops (the reference view's box), (B, 4) normalised."""
    return torch.cat([torch.minimum(box1[:, :2], box2[:, :2]), torch.maximum(box1[:, 2:], box2[:, 2:])], dim=1)


def relative_box(box: Tensor, outer: Tensor) -> Tensor:
    """``box`` in the normalised coordinates of ``outer`` (both (B, 4) in source coordinates)."""
    size = (outer[:, 2:] - outer[:, :2]).repeat(1, 2)
    return (box - outer[:, :2].repeat(1, 2)) / size


@torch.no_grad()
def cosine_kmeans(x: Tensor, k: int, iters: int = 10) -> Tensor:
    """Per-image cosine k-means of (B, N, C) features → assignments (B, N) (the released ``batch_cosine_KMeans``).

    Centres start at k random points of each image; each iteration normalises the centres, assigns every
    point to the most similar centre and moves each centre to its points' mean (an empty cluster gets a
    random point, one index for the whole batch, as released). Returns the last assignment.
    """
    x = F.normalize(x.float(), dim=2)
    b, n, _ = x.shape
    centres = torch.stack([x[i, torch.randint(n, (k,), device=x.device)] for i in range(b)])  # (B, k, C)
    assign = torch.zeros(b, n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        centres = F.normalize(centres, dim=2)
        assign = torch.bmm(x, centres.transpose(1, 2)).argmax(dim=2)
        onehot = F.one_hot(assign, k).float()  # (B, N, k)
        counts = onehot.sum(dim=1)  # (B, k)
        means = torch.bmm(onehot.transpose(1, 2), x) / counts.clamp(min=1)[..., None]
        spare = x[:, torch.randint(n, (1,), device=x.device)].expand_as(means)
        centres = torch.where(counts[..., None] > 0, means, spare)
    return assign


def concept_map(assign: Tensor, k: int, ref_box: Tensor, flip: Tensor, grid: int) -> Tensor:
    """A view's concept map on its grid×grid cells from the reference's assignment map (B, h, w).

    Per cell: the concept covering most of the cell's area inside the view's box (in the reference's
    coordinates), mirrored when the view was flipped. Returns (B, grid·grid) long.
    """
    onehot = F.one_hot(assign, k).permute(0, 3, 1, 2).float()  # (B, k, h, w)
    votes = augment.crop_resize(onehot, ref_box.float(), grid)  # (B, k, grid, grid) area fractions
    labels = votes.argmax(dim=1)
    labels = torch.where(flip[:, None, None].to(labels.device), labels.flip(-1), labels)
    return labels.flatten(1)


def paired_prototypes(fq: Tensor, fk: Tensor, map_q: Tensor, map_k: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean features per (image, concept) for the concepts present in both views' maps.

    fq, fk: (B, C, N) feature maps flattened; map_q, map_k: (B, N) concept ids. Returns (q (M, C), k (M, C),
    image index (M,)) in image-major, concept-minor order (the released ``get_paired_prototypes``).
    """
    oq, ok = F.one_hot(map_q, k).float(), F.one_hot(map_k, k).float()  # (B, N, k)
    cq, ck = oq.sum(dim=1), ok.sum(dim=1)  # (B, k)
    shared = (cq > 0) & (ck > 0)
    pq = torch.bmm(fq, oq.to(fq.dtype)).transpose(1, 2) / cq.clamp(min=1)[..., None].to(fq.dtype)  # (B, k, C)
    pk = torch.bmm(fk, ok.to(fk.dtype)).transpose(1, 2) / ck.clamp(min=1)[..., None].to(fk.dtype)
    image = torch.arange(fq.shape[0], device=fq.device)[:, None].expand_as(shared)
    return pq[shared], pk[shared], image[shared]


@register
class ConCL(Method):
    name = "concl"
    paper = "Yang et al., ConCL: Concept Contrastive Learning for Dense Prediction Pre-training in Pathology, ECCV 2022"
    group = "dense contrastive"
    defaults = {"momentum": 0.999, "queue": 16384, "temperature": 0.2, "proj_dim": 128, "hidden_dim": 2048,
                "num_concepts": 8, "cluster_stage": 4, "concept_weight": 1.0, "warmup": 0.1, "kmeans_iters": 10,
                "shuffle_bn": True, "exclude_self": True}
    bounds = {"num_concepts": (2, None), "concept_weight": (0.0, 1.0), "warmup": (0.0, 1.0), "kmeans_iters": (1, None)}
    momentum_schedule = "constant"  # MoCo's m
    choices = {"cluster_stage": (2, 3, 4, 5)}
    recipe = "mocov2"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        c5, dim, k = ctx.feature_channels[-1], cfg["proj_dim"], cfg["num_concepts"]
        self.cluster_index = cfg["cluster_stage"] - 6  # C_s is the (6 − s)-th map from the end: C4 → −2
        self.projector = MoCoProjectionHead(c5, cfg["hidden_dim"], dim)
        self.add_targets("backbone", "projector")
        self.queue = KeyQueue(capped_queue_size(cfg["queue"], ctx.pool_size, ctx.batch_size), dim)
        per_step = self.concepts_per_step(ctx.batch_size)
        self.concept_queue = KeyQueue(capped_queue_size(cfg["queue"], ctx.pool_size * k, per_step), dim)
        self.warmup_steps = round(cfg["warmup"] * ctx.total_steps)

    def concepts_per_step(self, batch: int) -> int:
        """Prototypes enqueued per step: num_concepts·B (4·B above 8 concepts), as released."""
        k = self.cfg["num_concepts"]
        return (4 if k > 8 else k) * batch

    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        """MoCo v2 views plus the reference view: the union of both crops, no photometric augmentation."""
        views = super().make_views(images, image_ids, generator, masks)
        source = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        union = union_boxes(views.box1, views.box2)
        reference = augment.normalize(augment.crop_resize(source, union, views.x1.shape[-1]))
        return with_fields(views, ReferenceViews, reference=reference)

    def _keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c5 = self.target_backbone(x)[-1]
        return F.normalize(self.target_projector(c5.mean(dim=(2, 3))), dim=1), c5

    @torch.no_grad()
    def key_forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """(k (B, D), key C5 maps (B, C, h, w)) in the batch's order, with shuffle-BN when asked."""
        if not self.cfg["shuffle_bn"]:
            return self._keys(x)
        return shuffled_forward(self._keys, x, SHUFFLE_SPLITS, self.ctx.distributed)

    @torch.no_grad()
    def concept_maps(self, views: Views, grid: int) -> tuple[Tensor, Tensor]:
        """Concept maps (B, grid²) of the query and key views from k-means on the reference view."""
        reference = getattr(views, "reference", None)
        if reference is None:
            raise BenchError("concl needs the reference view; build the views with ConCL.make_views")
        r = self.target_backbone(reference)[self.cluster_index]
        b, c, h, w = r.shape
        k = self.cfg["num_concepts"]
        assign = cosine_kmeans(r.flatten(2).transpose(1, 2), k, self.cfg["kmeans_iters"]).reshape(b, h, w)
        union = union_boxes(views.box1, views.box2)
        return (concept_map(assign, k, relative_box(views.box1, union), views.flip1, grid),
                concept_map(assign, k, relative_box(views.box2, union), views.flip2, grid))

    def concept_loss(self, views: Views, fq: Tensor, fk: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(InfoNCE over concept prototypes, number of prototype pairs)."""
        map_q, map_k = self.concept_maps(views, fq.shape[-1])
        k = self.cfg["num_concepts"]
        pq, pk, image = paired_prototypes(fq.flatten(2), fk.flatten(2), map_q, map_k, k)
        if pq.shape[0] == 0:  # no concept shared by the two views of any image: nothing to contrast
            return fq.sum() * 0.0, torch.tensor(0.0)
        q = F.normalize(self.projector(pq), dim=1)
        with torch.no_grad():
            kp = F.normalize(self.target_projector(pk), dim=1)
        proto_ids = ids[image]
        with full_precision(q):
            loss = info_nce(q.float(), kp.float(), self.concept_queue.keys.clone(), self.cfg["temperature"],
                            self.concept_queue.exclusion_mask(proto_ids, self.cfg["exclude_self"]))
        self.enqueue(self.concept_queue, *sample_rows(kp, proto_ids, self.concepts_per_step(fq.shape[0])))
        return loss, torch.tensor(float(q.shape[0]))

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        ids = views.image_ids.to(views.x1.device)
        fq = self.backbone(views.x1)[-1]
        q = F.normalize(self.projector(fq.mean(dim=(2, 3))), dim=1)
        k, fk = self.key_forward(views.x2)
        with full_precision(q):
            instance = info_nce(q.float(), k.float(), self.queue.keys.clone(), self.cfg["temperature"],
                                self.queue.exclusion_mask(ids, self.cfg["exclude_self"]))
        self.enqueue(self.queue, k, ids)
        logs = {"loss_instance": instance.detach(), "std": embedding_std(q)}
        if step < self.warmup_steps:
            loss = instance
        else:
            concept, pairs = self.concept_loss(views, fq, fk, ids)
            w = self.cfg["concept_weight"]
            loss = w * concept + (1 - w) * instance
            logs.update(loss_concept=concept.detach(), concept_pairs=pairs)
        logs["loss"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def enqueue(self, queue: KeyQueue, keys: Tensor, ids: Tensor) -> None:
        queue.push(*gather_across_ranks(keys, ids, distributed=self.ctx.distributed))


def sample_rows(keys: Tensor, ids: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``count`` rows: a random subset when there are enough, else all plus random repeats (released padding)."""
    n = keys.shape[0]
    if n >= count:
        pick = torch.randperm(n, device=keys.device)[:count].sort().values
    else:
        pick = torch.cat([torch.arange(n, device=keys.device), torch.randint(n, (count - n,), device=keys.device)])
    return keys[pick], ids[pick]
