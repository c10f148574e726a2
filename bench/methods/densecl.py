"""DenseCL — Wang et al., "Dense Contrastive Learning for Self-Supervised Visual Pre-Training",
CVPR 2021 (official code: WXinlong/DenseCL, ``openselfsup/models/densecl.py``).

The MoCo-v2 global branch (see ``bench.methods.mocov2``) plus a dense branch on C5:

- Dense projector: 1×1 conv C5 → 2048, ReLU, 1×1 conv → 128, no BN, applied at every one of the
  S×S locations of C5 (lightly's ``DenseCLProjectionHead`` on the flattened locations: a 1×1 conv
  is a Linear over channels). Query grid r_s and key grid t_s are L2-normalised per location; the
  key encoder (backbone + both projectors) is the EMA copy, m = 0.999 constant.
- Correspondence (paper Eq. 4): on the L2-normalised **backbone** C5 features f (query, online
  backbone) and f′ (key, momentum backbone), location s of view 1 is matched with
  c(s) = argmax_j cos(f_s, f′_j).
- Global loss (Eq. 1): MoCo-v2 InfoNCE of q (view 1) against k₊ (view 2) and the first queue.
- Dense loss (Eq. 2): L_r = mean_s −log exp(r_s·t_{c(s)}/τ) / (exp(r_s·t_{c(s)}/τ) + Σ_{t₋} exp(r_s·t₋/τ)),
  τ = 0.2, with negatives t₋ from a **second** queue that stores one key per image: the
  L2-normalised average pool of the key's dense projection (the official ``avgpool2``/``queue2``).
  Queue keys of the current images are excluded from both losses' negatives (by image id;
  ``exclude_self=false`` keeps them, as the official code does).
- Total (Eq. 3): L = (1 − λ)·L_q + λ·L_r, λ = 0.5; λ = 0 for the first ``warmup_steps`` steps
  (the official ``DenseCLWarmupHook``; off in the released configs, hence 0).

Defaults (the paper / released configs): momentum 0.999, queue 65536 (both queues; capped at the
pool size), temperature 0.2, proj_dim 128, hidden_dim 2048, shuffle_bn on, exclude_self on,
loss_lambda 0.5, warmup_steps 0 (docs/methods.md, "densecl"). Views: recipe "mocov2". Released
optimiser (for reference; the preset's is used): SGD lr 0.03 for batch 256, momentum 0.9, wd 1e-4,
cosine, 200 epochs on ImageNet.
The global projector's Linear layers are initialised as the official ``init_linear='kaiming'``
(Kaiming-normal, fan_in, ReLU gain, zero bias); the dense layers keep PyTorch's default (the
official code leaves its convs at the default too).
Unlike lightly's DenseCL example, the momentum encoder computes the keys and the second queue holds
image-level pooled keys, not pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules import DenseCLProjectionHead
from lightly.models.utils import most_similar_index
from torch import Tensor, nn

from bench.augment import Views
from bench.methods import register
from bench.methods.base import PretrainContext, embedding_std, last_feature
from bench.methods.mocov2 import MoCoV2
from bench.methods.queue import KeyQueue, gather_across_ranks, info_nce


@register
class DenseCL(MoCoV2):
    name = "densecl"
    paper = "Wang et al., Dense Contrastive Learning for Self-Supervised Visual Pre-Training, CVPR 2021"
    defaults = {**MoCoV2.defaults, "loss_lambda": 0.5, "warmup_steps": 0}
    bounds = {"loss_lambda": (0.0, 1.0)}
    recipe = "mocov2"
    group = "dense contrastive"

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        kaiming_init_linear(self.projector)
        self.add_targets("projector")  # the target copies the re-initialised projector
        self.dense_projector = DenseCLProjectionHead(ctx.feature_channels[-1], cfg["hidden_dim"],
                                                     cfg["proj_dim"])
        self.add_targets("dense_projector")
        self.dense_queue = KeyQueue(self.queue.size, cfg["proj_dim"])

    def loss_weight(self, step: int) -> float:
        """λ of Eq. 3: 0 during the warm-up steps, then ``loss_lambda``."""
        return 0.0 if step < self.cfg["warmup_steps"] else self.cfg["loss_lambda"]

    def _keys(self, x: Tensor) -> tuple[Tensor, ...]:
        """Key encoder: (k (B, D), k_grid (B, S², D), k_pooled (B, D), k_backbone (B, S², C)), normalised."""
        features = last_feature(self.target_backbone, x)
        k, k_grid, k_pooled = heads(features, self.target_projector, self.target_dense_projector)
        return k, k_grid, k_pooled, F.normalize(features.flatten(2).transpose(1, 2).float(), dim=-1)

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        features = last_feature(self.backbone, views.x1)
        q, q_grid, _ = heads(features, self.projector, self.dense_projector)
        k, k_grid, k_pooled, k_backbone = self.key_forward(views.x2)
        index = correspondence(features.detach().flatten(2).transpose(1, 2), k_backbone)
        ids = views.image_ids.to(q.device)
        tau = self.cfg["temperature"]
        loss_global = info_nce(q, k, self.queue.keys.clone(), tau, self.exclusion(self.queue, ids))
        loss_dense = dense_info_nce(q_grid, match(k_grid, index), self.dense_queue.keys.clone(), tau,
                                    self.exclusion(self.dense_queue, ids))
        lam = self.loss_weight(step)
        loss = (1.0 - lam) * loss_global + lam * loss_dense
        k, k_pooled, ids = gather_across_ranks(k, k_pooled, ids, distributed=self.ctx.distributed)
        self.queue.push(k, ids)
        self.dense_queue.push(k_pooled, ids)
        return loss, {"loss": loss.detach(), "loss_global": loss_global.detach(),
                      "loss_dense": loss_dense.detach(), "std": embedding_std(q),
                      "std_dense": embedding_std(q_grid.flatten(0, 1))}


def heads(features: Tensor, projector: nn.Module,
          dense_projector: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """DenseCL neck on C5 (B, C, H, W): global q (B, D), dense grid (B, HW, D) and its pooled key (B, D).

    All three L2-normalised; the pooled key is the normalised mean of the *unnormalised* dense
    projections (official ``avgpool2``).
    """
    g = projector(features.mean(dim=(2, 3)))
    dense = dense_projector(features.flatten(2).transpose(1, 2))  # 1×1 convs = Linear per location
    return F.normalize(g, dim=1), F.normalize(dense, dim=-1), F.normalize(dense.mean(dim=1), dim=-1)


def correspondence(f_query: Tensor, f_key: Tensor) -> Tensor:
    """c(s) = argmax_j cos(f_s, f′_j) (Eq. 4): for each query location (B, N, C) the index (B, N) of the
    most similar key location (B, M, C); computed in float32 (lightly's ``most_similar_index``)."""
    return most_similar_index(f_query.detach().float(), f_key.detach().float())


def match(k_grid: Tensor, index: Tensor) -> Tensor:
    """The key vectors at the matched locations: (B, M, D) gathered by index (B, N) → (B, N, D)."""
    return torch.gather(k_grid, 1, index.unsqueeze(-1).expand(-1, -1, k_grid.shape[-1]))


def dense_info_nce(q_grid: Tensor, k_matched: Tensor, queue: Tensor, temperature: float,
                   exclude: Tensor | None = None) -> Tensor:
    """Eq. 2: InfoNCE per location, positive at index 0, averaged over all B·N locations.

    q_grid, k_matched: (B, N, D) normalised; queue: (K, D) normalised image-level negatives;
    exclude: (B, K) bool, negatives dropped for every location of that image.
    """
    positive = (q_grid * k_matched).sum(dim=-1, keepdim=True)
    negatives = q_grid @ queue.t()
    if exclude is not None:
        negatives = negatives.masked_fill(exclude[:, None, :], float("-inf"))
    logits = (torch.cat([positive, negatives], dim=-1) / temperature).flatten(0, 1)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # the positive is at 0
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def kaiming_init_linear(module: nn.Module) -> None:
    """The official neck init (mmcv ``kaiming_init(mode='fan_in', nonlinearity='relu')``) on Linear layers."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
