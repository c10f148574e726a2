"""DiCoH — "Rethinking self-supervised pretraining for semantic segmentation in homogeneous medical
domains" (the seed paper of this benchmark, §3; docs/methods.md, "dicoh").

Architecture (symmetric siamese, no predictor): online encoder F_q + projector P_q, target encoder +
projector (F_k, P_k) = EMA of the online ones (m₀ = 0.99, cosine to 1). ONE projector, a 1×1 conv MLP
C5 → 2048 ReLU → 128 (no BN), gives per-pixel embeddings z, L2-normalised per pixel; the global
embeddings are q = normalise(avgpool(z^q)) and k = normalise(avgpool(z^k)) (no separate global head).
A queue 𝒦 of image-level keys k (K = 65536, capped at the pool size) is shared by both losses; both
views' keys are enqueued (symmetrised), with their image ids so that keys of the current images are
excluded from the negatives.

Losses, for a query view a and a key view b (then symmetrised: the mean of a = 1, b = 2 and a = 2, b = 1;
``direction=one-way`` is the paper's literal Eqs. 1–5: a = 1, b = 2 only, and only view 2's keys are
enqueued):

- L_global = InfoNCE(q, k; negatives 𝒦), τ = 0.2 (``bench.methods.queue.info_nce``).
- Spatial map R (``bench.geometry.nearest_cells`` on the C5 grid): for query cell i the key cell whose
  centre maps to the nearest original-image location, valid where that distance is < 0.7 bin diagonals.
- Similarity map M(i) = argmax_j cos(h^q_i, h^k_j) on the **backbone** features h (online h^q, target h^k).
- Hard pixel-to-image negatives 𝒩(i): the queue keys whose similarity with z^q_i is at or above the
  p-th percentile (p = 75) of that pixel's similarities to the queue: ``topk`` with
  k = ceil((1 − p/100)·K) (``hard_negatives``).
- L_spatial = mean_{i ∈ dom(R)} −log( e^{z_i·z^k_{R(i)}/τ} / (e^{z_i·z^k_{R(i)}/τ} + Σ_{n∈𝒩(i)} e^{z_i·n/τ}) )
  (``pixel_info_nce``); L_similar the same with M. L_local = L_spatial + L_similar.
- L = λ·L_local + (1 − λ)·L_global, λ = 0.5.

Ablations (paper Tables 4, 8, 9) are overrides of this one code path:
``predictor=asym`` (a BYOL-style predictor, 1×1 conv 128 → 2048 ReLU → 128, on the online pixel
embeddings; the global q is pooled from its output), ``global_projector=separate`` (q, k from their own
MLP head C5 → 2048 ReLU → 128 on pooled backbone features, EMA'd; the queue then holds those keys and
both losses still read it), ``negatives=pixel`` (pixel-to-pixel negatives: the key view's other pixels of
the same image, still with the percentile cut), ``percentile=0|50|75`` (0 keeps all),
``positives=spatial|similar|both``, ``lambda``, ``queue``, ``momentum``, ``temperature``,
``direction=symmetric|one-way``.

Shuffle-BN: on one device the target encoder runs on a shuffled batch in ``queue.SHUFFLE_SPLITS``
sub-batches (the SplitBatchNorm idea); under DDP lightly's ``batch_shuffle_distributed``. Keys are
gathered across ranks before they are enqueued. Views: recipe "dicoh" (MoCo-v2 augmentation with crop
geometry + noise).

Defaults: momentum 0.99, queue 65536, temperature 0.2, lambda 0.5, percentile 75, positives both,
negatives image, predictor sym, global_projector shared, hidden_dim 2048, proj_dim 128, threshold 0.7,
shuffle_bn True, direction symmetric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import most_similar_index
from torch import Tensor, nn

from bench import geometry
from bench.augment import Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, conv_mlp, embedding_std
from bench.methods.queue import KeyQueue, capped_queue_size, gather_across_ranks, info_nce, key_forward

POSITIVE_MAPS = {"spatial": ("spatial",), "similar": ("similar",), "both": ("spatial", "similar")}


def pooled_embedding(z: Tensor) -> Tensor:
    """Image-level embedding: normalise(avgpool(z)) of per-pixel normalised embeddings z (B, D, H, W)."""
    return F.normalize(z.mean(dim=(2, 3)), dim=1)


def similarity_map(hq: Tensor, hk: Tensor) -> Tensor:
    """M(i) = argmax_j cos(h^q_i, h^k_j) for backbone features hq, hk (B, C, H, W) → (B, HW) long."""
    with torch.no_grad():
        return most_similar_index(hq.detach().flatten(2).transpose(1, 2).float(),
                                  hk.detach().flatten(2).transpose(1, 2).float())


def hard_negative_count(total: int, percentile: float) -> int:
    """Number of negatives at or above the p-th percentile: ceil((1 − p/100)·total), at least 1."""
    kept = math.ceil(round((100.0 - percentile) * total / 100.0, 6))
    return max(1, min(total, kept))


def hard_negatives(sim: Tensor, percentile: float, exclude: Tensor | None = None,
                   total: int | None = None) -> tuple[Tensor, Tensor]:
    """The hardest negatives: the top ceil((1 − p/100)·K) similarities along the last axis.

    sim: (..., K) similarities of each query to its K candidate negatives; exclude: bool, broadcastable to
    ``sim``, candidates never to select (set to −inf first, so they are picked only when fewer than k
    candidates remain, and then contribute e^{−inf} = 0); total: the K the percentile is taken over
    (default ``sim.shape[-1]``). Returns (values (..., k), indices (..., k)).
    """
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    return sim.topk(hard_negative_count(total or sim.shape[-1], percentile), dim=-1)


def pixel_info_nce(positive: Tensor, negatives: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """mean_{valid i} −log( e^{s⁺_i/τ} / (e^{s⁺_i/τ} + Σ_n e^{s_in/τ}) ).

    positive: (B, N) similarity of each query pixel to its positive; negatives: (B, N, k) similarities to
    its selected negatives; valid: (B, N) bool, the domain of the positive map. 0 when nothing is valid.
    """
    logits = torch.cat([positive.unsqueeze(-1), negatives], dim=-1).float() / temperature
    per_pixel = torch.logsumexp(logits, dim=-1) - logits[..., 0]
    valid = valid.float()
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1.0)


def gather_positives(zq: Tensor, zk: Tensor, index: Tensor) -> Tensor:
    """s⁺_i = z^q_i · z^k_{index(i)} for zq, zk (B, N, D) and index (B, N) → (B, N)."""
    matched = torch.gather(zk, 1, index.unsqueeze(-1).expand(-1, -1, zk.shape[-1]))
    return (zq * matched).sum(dim=-1)


@register
class DiCoH(Method):
    name = "dicoh"
    paper = "DiCoH: Rethinking SSL pretraining for segmentation in homogeneous medical domains (§3)"
    defaults = {"momentum": 0.99, "queue": 65536, "temperature": 0.2, "lambda": 0.5, "percentile": 75,
                "positives": "both", "negatives": "image", "predictor": "sym", "global_projector": "shared",
                "hidden_dim": 2048, "proj_dim": 128, "threshold": 0.7, "shuffle_bn": True,
                "direction": "symmetric"}
    choices = {"percentile": (0, 50, 75), "positives": ("spatial", "similar", "both"),
               "negatives": ("image", "pixel"), "predictor": ("sym", "asym"),
               "global_projector": ("shared", "separate"), "direction": ("symmetric", "one-way")}
    bounds = {"lambda": (0.0, 1.0), "threshold": (0.0, None)}
    recipe = "dicoh"
    group = "dense contrastive"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        c5, hidden, dim = ctx.feature_channels[-1], cfg["hidden_dim"], cfg["proj_dim"]
        self.projector = conv_mlp(c5, hidden, dim)
        self.predictor = conv_mlp(dim, hidden, dim) if cfg["predictor"] == "asym" else None
        separate = cfg["global_projector"] == "separate"
        self.global_head = MoCoProjectionHead(c5, hidden, dim) if separate else None
        self.target_global_head = None
        self.add_targets("backbone", "projector", *(("global_head",) if separate else ()))
        self.queue = KeyQueue(capped_queue_size(cfg["queue"], ctx.pool_size, ctx.batch_size), dim)

    # --- embeddings -------------------------------------------------------------------------------
    def embed_online(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone C5 h (B, C, H, W), pixel embeddings z (B, D, H, W) normalised, global q (B, D)."""
        h = self.backbone(x)[-1]
        e = self.projector(h)
        if self.predictor is not None:
            e = self.predictor(e)
        z = F.normalize(e, dim=1)
        if self.global_head is None:
            return h, z, pooled_embedding(z)
        g = self.global_head(h.mean(dim=(2, 3)))
        if self.predictor is not None:
            g = self.predictor(g[:, :, None, None]).flatten(1)
        return h, z, F.normalize(g, dim=1)

    def _target_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.target_backbone(x)[-1]
        z = F.normalize(self.target_projector(h), dim=1)
        k = pooled_embedding(z) if self.target_global_head is None \
            else F.normalize(self.target_global_head(h.mean(dim=(2, 3))), dim=1)
        return h, z, k

    def embed_target(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Target h, z, k (no gradient), with shuffle-BN when ``shuffle_bn``."""
        return key_forward(self._target_forward, x, self.cfg["shuffle_bn"], self.ctx.distributed)

    # --- positives and negatives ------------------------------------------------------------------
    def positive_map(self, kind: str, boxes: tuple[Tensor, Tensor, Tensor, Tensor], hq: Tensor,
                     hk: Tensor) -> tuple[Tensor, Tensor]:
        """(index (B, HW), valid (B, HW)) of the spatial map R or the similarity map M."""
        if kind == "spatial":
            h, w = hq.shape[-2:]
            return geometry.nearest_cells(*boxes, h, w, threshold=self.cfg["threshold"])
        index = similarity_map(hq, hk)
        return index, torch.ones_like(index, dtype=torch.bool)

    def image_negatives(self, zq: Tensor, keys: Tensor, exclude: Tensor) -> Tensor:
        """(B, N, k) similarities of each query pixel to its hardest queue keys (pixel-to-image).

        keys: (K, D) the queue's image-level keys; exclude: (B, K) keys of the query's own image.
        """
        sim = torch.einsum("bnd,kd->bnk", zq, keys.to(zq.dtype))
        return hard_negatives(sim, self.cfg["percentile"], exclude[:, None, :])[0]

    def pixel_negatives(self, zq: Tensor, zk: Tensor, index: Tensor) -> Tensor:
        """(B, N, k) similarities to the hardest OTHER pixels of the key view (pixel-to-pixel ablation)."""
        sim = torch.bmm(zq, zk.transpose(1, 2))
        own_positive = F.one_hot(index, zk.shape[1]).bool()
        return hard_negatives(sim, self.cfg["percentile"], own_positive, total=max(1, zk.shape[1] - 1))[0]

    # --- loss ---------------------------------------------------------------------------------------
    def direction_terms(self, online: tuple[Tensor, Tensor, Tensor], target: tuple[Tensor, Tensor, Tensor],
                        boxes: tuple[Tensor, Tensor, Tensor, Tensor], keys: Tensor,
                        exclude: Tensor) -> dict[str, Tensor]:
        """L_global, L_spatial, L_similar for one (query view, key view) direction.

        boxes = (box_q, flip_q, box_k, flip_k); keys (K, D): a snapshot of the queue (the queue is
        updated in place before backward); exclude (B, K): queued keys of the current images.
        """
        hq, zq_map, q = online
        hk, zk_map, k = target
        tau = self.cfg["temperature"]
        terms = {"global": info_nce(q.float(), k.float(), keys, tau, exclude)}
        zq = zq_map.flatten(2).transpose(1, 2).float()  # (B, N, D)
        zk = zk_map.flatten(2).transpose(1, 2).float()
        shared = self.image_negatives(zq, keys, exclude) if self.cfg["negatives"] == "image" else None
        for kind in POSITIVE_MAPS[self.cfg["positives"]]:
            index, valid = self.positive_map(kind, boxes, hq, hk)
            negatives = shared if shared is not None else self.pixel_negatives(zq, zk, index)
            terms[kind] = pixel_info_nce(gather_positives(zq, zk, index), negatives, valid, tau)
            terms[f"{kind}_valid"] = valid.float().mean()
        return terms

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        ids = views.image_ids.to(views.x1.device)
        keys, exclude = self.queue.keys.clone(), self.queue.exclusion_mask(ids)
        geo1, geo2 = (views.box1, views.flip1), (views.box2, views.flip2)
        on1 = self.embed_online(views.x1)
        if self.cfg["direction"] == "one-way":  # Eqs. 1-5 as printed: query view 1, key view 2
            tg2 = self.embed_target(views.x2)
            terms = self.direction_terms(on1, tg2, (*geo1, *geo2), keys, exclude)
            new_keys, new_ids = tg2[2], ids
        else:  # symmetrised: the mean of both directions, both views' keys enqueued
            on2 = self.embed_online(views.x2)
            tg1, tg2 = self.embed_target(views.x1), self.embed_target(views.x2)
            t12 = self.direction_terms(on1, tg2, (*geo1, *geo2), keys, exclude)
            t21 = self.direction_terms(on2, tg1, (*geo2, *geo1), keys, exclude)
            terms = {name: (t12[name] + t21[name]) / 2 for name in t12}
            new_keys, new_ids = torch.cat([tg1[2], tg2[2]]), torch.cat([ids, ids])
        local = sum(terms[kind] for kind in POSITIVE_MAPS[self.cfg["positives"]])
        lam = self.cfg["lambda"]
        loss = lam * local + (1.0 - lam) * terms["global"]
        self.enqueue(new_keys, new_ids)
        logs = {name if name.endswith("_valid") else f"loss_{name}": value.detach()
                for name, value in terms.items()}
        logs.update(loss=loss.detach(), loss_local=local.detach(), std=embedding_std(on1[2]),
                    pixel_std=embedding_std(on1[1].detach().flatten(2).transpose(1, 2).flatten(0, 1)))
        return loss, logs

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor) -> None:
        """Push the keys (gathered across ranks under DDP) with their image ids."""
        if self.ctx.distributed:
            keys, ids = gather_across_ranks(keys, ids, distributed=True)
        self.queue.push(keys, ids)
