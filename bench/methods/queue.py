"""The negative-key queue shared by the queue-based methods (MoCo-v2, DenseCL, CP2, DiCoH).

lightly 1.6's ``MemoryBankModule`` keeps a non-persistent buffer and truncates batches when K is
not a multiple of B, so the queue is written here (DESIGN.md §12, common rules): a persistent
buffer of random unit vectors, FIFO, with the image id of each key so that keys of the current
images can be excluded, and K capped at the pool size rounded down to a multiple of B.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


def capped_queue_size(requested: int, pool_size: int, batch_size: int) -> int:
    """K capped at the number of pretraining images, rounded down to a multiple of B (≥ B)."""
    cap = max(batch_size, (pool_size // batch_size) * batch_size)
    if requested > cap:
        log.info("queue size %d capped at %d (pool of %d images, batch %d): a longer queue would "
                 "hold stale copies of the positives", requested, cap, pool_size, batch_size)
        return cap
    return requested


class KeyQueue(nn.Module):
    """FIFO queue of L2-normalised keys (K, D) and their image ids (K,); −1 marks the initial keys."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: Tensor, ids: Tensor) -> None:
        """Enqueue a batch of keys (oldest out first); wraps around when K is not a multiple of B."""
        keys = F.normalize(keys.detach().float(), dim=1)
        n = keys.shape[0]
        positions = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.keys[positions] = keys.to(self.keys.dtype)
        self.ids[positions] = ids.to(self.ids.device)
        self.ptr.copy_((self.ptr + n) % self.size)

    def exclusion_mask(self, ids: Tensor) -> Tensor:
        """(B, K) bool: True where the queued key comes from the same image as the query."""
        return ids[:, None] == self.ids[None, :]


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float,
             exclude: Tensor | None = None) -> Tensor:
    """InfoNCE with the positive key at index 0 (MoCo): −log e^{q·k/τ} / (e^{q·k/τ} + Σ e^{q·n/τ}).

    q, k: (B, D) normalised; queue: (K, D) normalised negatives; exclude: (B, K) bool of negatives
    to drop (same-image keys).
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.t()
    if exclude is not None:
        negatives = negatives.masked_fill(exclude, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits.float(), torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
