"""The negative-key queue shared by the queue-based methods (MoCo-v2, DenseCL, CP2, DiCoH).

lightly 1.6's ``MemoryBankModule`` keeps a non-persistent buffer and truncates batches when K is
not a multiple of B, so the queue is written here (docs/methods.md, "Common rules"): a persistent
buffer of random unit vectors, FIFO, with the image id of each key so that keys of the current
images can be excluded (``exclude_self``), and K capped at the pool size rounded down to a multiple
of B. Also the shuffle-BN key forward and the cross-rank gather that every queue method shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.utils import batch_shuffle_distributed, batch_unshuffle_distributed
from torch import Tensor, nn

from bench import distributed as bench_distributed

log = logging.getLogger(__name__)

SHUFFLE_SPLITS = 2  # sub-batches of a key forward on one device (shuffle-BN emulation)


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

    def exclusion_mask(self, ids: Tensor, exclude_self: bool = True) -> Tensor | None:
        """(B, K) bool: True where the queued key comes from the same image as the query; None when
        ``exclude_self`` is off (the official codes keep same-image keys among the negatives)."""
        if not exclude_self:
            return None
        return ids.to(self.ids.device)[:, None] == self.ids[None, :]


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


# --- shuffle-BN and cross-rank gathering, shared by the key encoders ---------------------------------

def ddp_active(distributed: bool) -> bool:
    """Whether a method built for DDP (``ctx.distributed``) runs in a process group of more than one rank."""
    return distributed and bench_distributed.active()


@torch.no_grad()
def shuffled_forward(fn: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor, splits: int = SHUFFLE_SPLITS,
                     distributed: bool = False) -> tuple[Tensor, ...]:
    """Shuffle-BN (MoCo §3.3): ``fn`` on a permuted batch, outputs returned in the original order.

    Under DDP the permutation spans all ranks (lightly's ``batch_shuffle_distributed``); on one device
    the permuted batch runs in ``splits`` sub-batches (lightly's ``SplitBatchNorm`` idea), each with its
    own BN statistics — one sub-batch when that would leave fewer than 2 samples in a chunk. Every
    output of ``fn`` must be batch-first.
    """
    if ddp_active(distributed):
        shuffled, order = batch_shuffle_distributed(x)
        return tuple(batch_unshuffle_distributed(out, order) for out in fn(shuffled))
    splits = splits if x.shape[0] >= 2 * splits else 1
    perm = torch.randperm(x.shape[0], device=x.device)
    parts = [fn(chunk) for chunk in x[perm].chunk(splits)]
    inverse = torch.argsort(perm)
    return tuple(torch.cat(outs)[inverse] for outs in zip(*parts, strict=True))


@torch.no_grad()
def key_forward(fn: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor, shuffle_bn: bool = True,
                distributed: bool = False) -> tuple[Tensor, ...]:
    """A key encoder ``fn`` on a batch, without gradient: with shuffle-BN (``shuffled_forward``) when
    ``shuffle_bn``, else a plain forward."""
    if not shuffle_bn:
        return fn(x)
    return shuffled_forward(fn, x, SHUFFLE_SPLITS, distributed)


@torch.no_grad()
def gather_across_ranks(*tensors: Tensor, distributed: bool = False) -> tuple[Tensor, ...]:
    """All-gather batch-first tensors across DDP ranks (for enqueueing); identity on one device."""
    if not ddp_active(distributed):
        return tensors
    gathered = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        gathered.append(torch.cat(parts))
    return tuple(gathered)
