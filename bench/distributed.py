"""Several GPUs (or CPU processes) for one benchmark: ``torchrun`` + DistributedDataParallel
(docs/architecture.md).

``torchrun --nproc_per_node N -m bench run ...`` starts N copies of ``bench run``; ``init_from_env``
reads torchrun's WORLD_SIZE / RANK / LOCAL_RANK and joins them into one process group (NCCL on
CUDA, with each process on the GPU of its local rank; gloo on CPU). Without torchrun (or with one
process) nothing is initialised and every helper here is the identity, so ``bench run`` behaves
exactly as before.

What runs where (``bench.protocol.pretrain``, ``bench.executors.run_benchmark``):

- Pretraining: every rank builds the same model (same seed; DDP also broadcasts rank 0's weights
  and buffers at wrapping), walks the same seeded permutation of the pool, and takes its slice
  (``shard``) of each GLOBAL batch (``schedule.batch_size``; ``batch_size // world`` per rank).
  Views and the methods' own randomness are drawn per rank (``rank_seed``). Gradients are averaged
  across ranks at every step, so the optimiser steps and the EMA targets stay identical on all
  ranks. BatchNorm statistics are per rank, as in the official MoCo / BYOL / DenseCL code; the
  methods gather what is batch-wide themselves when ``PretrainContext.distributed`` is set: queue
  keys (all ranks' keys are enqueued on every rank), shuffle-BN across ranks, the dispersive
  loss's batch. Loss and logs are all-reduced on log steps only (the NaN check uses that global
  value, so every rank stops at the same step). Only rank 0 writes checkpoints, logs and DONE.
- Fine-tuning cells are independent: cell i runs on rank i % world; rank 0 then writes
  results.csv, run.json and the report.

Gradient averaging — why DDP (with an adapter): DDP's reducer is driven by the wrapped module's
``forward()``, while a method is driven by ``step(views, step)``. ``StepForward`` makes ``step``
the ``forward`` of a thin module around the method, so DDP sees the whole step — several encoder
passes (two views, shuffle-BN sub-batches), a JVP (MeanFlow), hooks (``+disp``) — as one forward
and all-reduces the gradients in buckets *while* backward runs (communication overlapped with
compute; the explicit alternative only starts after backward). Checked on every registered method
and on ``byol+disp`` (gloo, 2 processes): the step runs and the weights stay identical across
ranks, and a 2-process BYOL run equals one process that averages the gradients of the two
half-batches (tests/test_distributed.py). Two settings make it fit: ``find_unused_parameters=True``
(no default config leaves a parameter unused, but an override may, and DDP would then fail on the
next step; the price is one graph traversal per step and a one-time DDP warning that it found
none) and no buffer sync in forward (``forward_sync_buffers=False``, ``broadcast_buffers=False``
before torch 2.14: the buffers are queues, kept identical by the methods' gathers, and BN
statistics, per rank). ``active()`` is the one test of "is DDP on" (methods ask it through
``PretrainContext.distributed`` and ``bench.methods.queue.ddp_active``).

Coordination (barriers, object broadcasts) runs on a separate gloo group with a long timeout:
ranks wait there for each other's share of fine-tuning cells, which can take far longer than the
default collective timeout (10–30 min) that keeps guarding the training collectives.
"""

from __future__ import annotations

import datetime
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bench.errors import BenchError

CONTROL_TIMEOUT = datetime.timedelta(days=7)  # waiting for other ranks' cells, not a hang guard
RANK_SEED_STRIDE = 1_000_003  # rank r draws from seed + r·stride (rank 0: the seed itself)

_control_group: Any = None


# --- set-up -----------------------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device | None = None) -> bool:
    """Join torchrun's process group (NCCL for a CUDA ``device``, else gloo); True when distributed.

    On CUDA each process uses the GPU of its local rank. A no-op (False) without torchrun or with
    a single process; idempotent.
    """
    global _control_group
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise BenchError("torchrun started several processes but this torch build has no torch.distributed; "
                         "run bench without torchrun")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise BenchError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes "
                             "with torchrun --nproc_per_node N -m bench run ...")
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo")
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return True


def shutdown() -> None:
    """Leave the process group (at the end of ``bench run``)."""
    global _control_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``); anything else is unchanged."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


# --- who am I ---------------------------------------------------------------------------------------

def active() -> bool:
    """A process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def rank_seed(seed: int) -> int:
    """This rank's seed for its own random draws (views, noise): ``seed`` on rank 0, far apart elsewhere."""
    return seed + RANK_SEED_STRIDE * rank()


# --- coordination (control group, long timeout) -------------------------------------------------------

def _group() -> Any:
    return _control_group


def barrier() -> None:
    """Wait until every rank gets here (no-op on one process)."""
    if active():
        dist.barrier(group=_group())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_group())
    return out


# --- training collectives (default group) -------------------------------------------------------------

def per_rank_batch(global_batch: int) -> int:
    """Images per rank of a global batch; it must split evenly, with at least 2 per rank (BatchNorm)."""
    world = world_size()
    if world == 1:
        return global_batch
    if global_batch % world or global_batch // world < 2:
        raise BenchError(f"a pretrain batch_size of {global_batch} cannot be split over {world} processes; "
                         f"use a multiple of {world} of at least {2 * world}")
    return global_batch // world


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous slice of a global batch (the whole batch on one process)."""
    if world_size() == 1:
        return batch
    size = per_rank_batch(len(batch))
    return batch[rank() * size:(rank() + 1) * size]


def mean_across_ranks(values: dict[str, Tensor | float]) -> dict[str, float]:
    """The mean over ranks of each scalar (one all-reduce for all of them); plain floats on one process."""
    if not active():
        return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}
    keys = sorted(values)  # the same order on every rank
    stacked = torch.stack([torch.as_tensor(values[k]).detach().double().reshape(()).cpu() for k in keys])
    if dist.get_backend() == "nccl":
        stacked = stacked.cuda()
    dist.all_reduce(stacked)
    return dict(zip(keys, (stacked / world_size()).cpu().tolist(), strict=True))


class StepForward(nn.Module):
    """A method's ``step(views, step)`` as ``forward``, so that DDP can drive the whole step."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, views: Any, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.method.step(views, step)


def wrap_step(method: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``StepForward(method)`` (module docstring: why these settings)."""
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False}  # torch ≥ 2.14's name; buffers still synced at init
                      if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                      else {"broadcast_buffers": False})
    device_ids = None
    if device.type == "cuda":
        device_ids = [torch.cuda.current_device() if device.index is None else device.index]
    return ddp(StepForward(method), device_ids=device_ids, find_unused_parameters=True,
               gradient_as_bucket_view=True, **no_buffer_sync)
