"""MoCo v2 — He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297, 2020.

Query encoder f_q: backbone → global average pool of C5 → projector (C5 → 2048 ReLU → 128, no BN:
MoCo v2's MLP head). Key encoder f_k: an EMA copy of backbone + projector.

- Momentum update (MoCo Eq. 2): θ_k ← m·θ_k + (1 − m)·θ_q with a constant m = 0.999. The official
  code updates the key encoder at the start of each forward; updating it after each optimiser step
  (``after_optimizer_step``) gives the same key encoder for every forward (at step 0 the update of
  an identical copy is a no-op).
- Contrastive loss (MoCo Eq. 1, InfoNCE): q = f_q(view 1), k₊ = f_k(view 2), both L2-normalised,
  L = −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_{k₋ ∈ queue} exp(q·k₋/τ)), τ = 0.2, positive at
  index 0, one direction (as the official code). Queue keys of the current images are excluded from
  the negatives (by image id; ``exclude_self=false`` keeps them, as the official code does), and the
  batch's keys are enqueued (FIFO) after the loss.
- Shuffle-BN: the key encoder runs on a randomly permuted batch; under DDP the permutation spans the
  ranks (lightly's ``batch_shuffle_distributed``), on one device the permuted batch is split into
  ``queue.SHUFFLE_SPLITS`` sub-batches, each normalised by its own BN statistics, so the key BN
  statistics never match those of the query batch (lightly's ``SplitBatchNorm`` idea). Keys are
  unpermuted after.

Defaults (the papers): momentum 0.999, queue 65536 (capped at the pool size, see
``capped_queue_size``), temperature 0.2, proj_dim 128, hidden_dim 2048, shuffle_bn on, exclude_self on
(docs/methods.md, "mocov2"). Views: recipe
"mocov2" (RRC 0.2–1, jitter 0.4/0.4/0.4/0.1 p 0.8, grey 0.2, blur p 0.5, flip). The papers' optimiser
(for reference; the preset's optimiser is used): SGD lr 0.03 for batch 256, momentum 0.9, wd 1e-4,
cosine schedule, 200 epochs.

lightly parts: ``MoCoProjectionHead``, ``batch_shuffle_distributed``/``batch_unshuffle_distributed``;
keys and ids are all-gathered across DDP ranks before enqueueing (``torch.distributed.all_gather``);
the queue and InfoNCE are the project's (``bench.methods.queue``).
"""

from __future__ import annotations

import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from torch import Tensor, nn

from bench.augment import Views
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std, last_feature
from bench.methods.queue import (
    KeyQueue,
    capped_queue_size,
    gather_across_ranks,
    info_nce,
    key_forward,
    shuffled_forward,
)


@register
class MoCoV2(Method):
    name = "mocov2"
    paper = "He et al., MoCo, CVPR 2020; Chen et al., MoCo v2, arXiv 2003.04297, 2020"
    defaults = {"momentum": 0.999, "queue": 65536, "temperature": 0.2, "proj_dim": 128,
                "hidden_dim": 2048, "shuffle_bn": True, "exclude_self": True}
    recipe = "mocov2"
    group = "global contrastive"
    momentum_schedule = "constant"  # MoCo keeps m constant

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        c5 = ctx.feature_channels[-1]
        self.projector = MoCoProjectionHead(c5, cfg["hidden_dim"], cfg["proj_dim"])
        self.add_targets("backbone", "projector")
        size = capped_queue_size(cfg["queue"], ctx.pool_size, ctx.batch_size)
        self.queue = KeyQueue(size, cfg["proj_dim"])

    def _keys(self, x: Tensor) -> tuple[Tensor, ...]:
        """Key-encoder outputs of a (sub-)batch: (k,) with k (B, D) normalised."""
        return (F.normalize(self.target_projector(last_feature(self.target_backbone, x).mean(dim=(2, 3))),
                            dim=1),)

    def key_forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """The key encoder on a batch, with shuffle-BN when ``shuffle_bn`` is on."""
        return key_forward(self._keys, x, self.cfg["shuffle_bn"], self.ctx.distributed)

    def exclusion(self, queue: KeyQueue, ids: Tensor) -> Tensor | None:
        """(B, K) same-image keys of ``queue`` to drop from the negatives, or None (``exclude_self=false``)."""
        return queue.exclusion_mask(ids, self.cfg["exclude_self"])

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        q = F.normalize(self.projector(last_feature(self.backbone, views.x1).mean(dim=(2, 3))), dim=1)
        (k,) = self.key_forward(views.x2)
        ids = views.image_ids.to(q.device)
        loss = info_nce(q, k, self.queue.keys.clone(), self.cfg["temperature"], self.exclusion(self.queue, ids))
        self.queue.push(*gather_across_ranks(k, ids, distributed=self.ctx.distributed))  # after the loss
        return loss, {"loss": loss.detach(), "std": embedding_std(q)}


__all__ = ["MoCoV2", "gather_across_ranks", "shuffled_forward"]
