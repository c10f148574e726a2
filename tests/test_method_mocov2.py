"""MoCo v2's defining properties: a key encoder that moves only by EMA with a constant m, a FIFO queue
of the batch's normalised keys with their image ids, InfoNCE with the positive at index 0 and the
current images' queued keys excluded, shuffle-BN that returns keys in the original order, and
the paper's defaults."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bench.augment import Views, make_views
from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.mocov2 import gather_across_ranks, shuffled_forward
from bench.models import SegmentationModel, create_backbone
from tests.conftest import random_images, tiny_backbone, tiny_context, train_steps


def hand_views(b: int = 4, size: int = 64, seed: int = 0, ids: torch.Tensor | None = None) -> Views:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, 3, size, size, generator=g)
    x2 = torch.randn(b, 3, size, size, generator=g)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1)
    flips = torch.zeros(b, dtype=torch.bool)
    return Views(x1, x2, box, box.clone(), flips, flips.clone(), torch.arange(b) if ids is None else ids)


def make_moco(batch_size: int = 4, pool_size: int = 64, image_size: int = 64, **overrides):
    text = "mocov2" + ("" if not overrides else ":" + ",".join(f"{k}={v}" for k, v in overrides.items()))
    backbone = tiny_backbone()
    ctx = tiny_context(backbone, batch_size=batch_size, pool_size=pool_size, image_size=image_size)
    method = build_method(parse_method(text), backbone, ctx)
    return method.train()


def online_query(method, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(method.projector(method.backbone(x)[-1].mean((2, 3))), dim=1)


def target_key(method, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(method.target_projector(method.target_backbone(x)[-1].mean((2, 3))), dim=1)


def test_defaults_and_overrides():
    spec = parse_method("mocov2")
    assert spec.cfg == {"momentum": 0.999, "queue": 65536, "temperature": 0.2, "proj_dim": 128,
                        "hidden_dim": 2048, "shuffle_bn": True, "exclude_self": True}
    assert spec.cls.group == "global contrastive" and spec.cls.momentum_schedule == "constant"
    assert spec.cls.recipe == "mocov2"
    assert parse_method("mocov2:shuffle_bn=false,queue=4096").cfg["shuffle_bn"] is False
    with pytest.raises(BenchError, match="valid: momentum.*queue.*temperature.*shuffle_bn"):
        parse_method("mocov2:bogus=1")


def test_heads_queue_capping_and_constant_momentum():
    method = make_moco(batch_size=8, pool_size=100)
    assert method.queue.keys.shape == (96, 128)  # 65536 capped at the pool, rounded down to 8·12
    assert {"queue.keys", "queue.ids", "queue.ptr"} <= set(method.state_dict())  # persistent
    torch.testing.assert_close(method.queue.keys.norm(dim=1), torch.ones(96))
    linears = [m for m in method.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 128)]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.projector.modules())
    assert method.momentum_at(0) == method.momentum_at(5) == method.momentum_at(10) == 0.999
    assert make_moco(momentum=0.99).momentum_at(7) == 0.99


@pytest.mark.parametrize("exclude_self", [True, False])
def test_training_step_is_info_nce_with_current_images_excluded(exclude_self):
    """The loss by hand: queue rows holding the batch's own keys are dropped for their own query; with
    ``exclude_self=false`` (the official code) they stay among the negatives."""
    method = make_moco(shuffle_bn=False, pool_size=8, exclude_self=exclude_self)  # K = 8
    views = hand_views(ids=torch.tensor([10, 11, 12, 13]))
    with torch.no_grad():
        q, k = online_query(method, views.x1), target_key(method, views.x2)
        stale = F.normalize(k + 0.1 * torch.randn_like(k), dim=1)  # old keys of images 10..13
        method.queue.keys[:4] = stale
        method.queue.ids[:4] = views.image_ids
        method.queue.ids[4:] = torch.tensor([20, 21, 22, 23])
        queue = method.queue.keys.clone()
    loss, logs = method.step(views, 0)
    expected = 0.0
    for i in range(4):
        keep = [j for j in range(8) if j != i or not exclude_self]  # row i is image i's own stale key
        logits = torch.cat([(q[i] @ k[i])[None], q[i] @ queue[keep].t()]) / 0.2
        expected += -torch.log_softmax(logits, dim=0)[0] / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert set(logs) >= {"loss", "std"}
    assert 0 < logs["std"] < 1


def test_exclude_self_false_keeps_same_image_keys_and_raises_the_loss():
    """A stale key of the query's own image is a near-copy of its positive: as a negative (official) it
    raises the loss, by exactly the log-sum-exp term it adds."""
    views = hand_views(ids=torch.tensor([10, 11, 12, 13]))
    losses = {}
    for exclude_self in (True, False):
        method = make_moco(shuffle_bn=False, pool_size=8, exclude_self=exclude_self)
        with torch.no_grad():
            k = target_key(method, views.x2)
            method.queue.keys[:4] = k
            method.queue.ids[:4] = views.image_ids
        losses[exclude_self] = method.step(views, 0)[0].item()
    assert losses[False] > losses[True] + 0.1


def test_queue_is_fifo_of_normalised_keys_and_ids():
    method = make_moco(shuffle_bn=False, pool_size=12)  # K = 12, B = 4
    initial = method.queue.keys.clone()
    target = copy.deepcopy(method.target_backbone), copy.deepcopy(method.target_projector)
    first = hand_views(seed=1, ids=torch.tensor([3, 1, 4, 7]))
    second = hand_views(seed=2, ids=torch.tensor([0, 5, 9, 2]))
    with torch.no_grad():  # the key encoder before the steps (train-mode BN: batch statistics)
        k1 = F.normalize(target[1](target[0](first.x2)[-1].mean((2, 3))), dim=1)
        k2 = F.normalize(target[1](target[0](second.x2)[-1].mean((2, 3))), dim=1)
    method.step(first, 0)
    assert int(method.queue.ptr) == 4
    torch.testing.assert_close(method.queue.keys[:4], k1, rtol=1e-4, atol=1e-5)
    assert method.queue.ids[:4].tolist() == [3, 1, 4, 7]
    torch.testing.assert_close(method.queue.keys[4:], initial[4:], rtol=0, atol=0)
    assert (method.queue.ids[4:] == -1).all()
    method.step(second, 1)  # no optimiser step in between: the key encoder is unchanged
    assert int(method.queue.ptr) == 8
    torch.testing.assert_close(method.queue.keys[:4], k1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.queue.keys[4:8], k2, rtol=1e-4, atol=1e-5)
    assert method.queue.ids[:8].tolist() == [3, 1, 4, 7, 0, 5, 9, 2]


def test_target_gets_no_gradient_and_moves_only_by_ema():
    method = make_moco()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    online = [*method.backbone.parameters(), *method.projector.parameters()]
    target = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    online_before = [p.detach().clone() for p in online]
    target_before = [p.detach().clone() for p in target]
    assert all(torch.equal(a, b) for a, b in zip(online_before, target_before, strict=True))  # deep copy
    loss, _ = method.step(hand_views(), 0)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in target)
    assert all(not p.requires_grad for p in target)
    optimizer.step()
    method.after_optimizer_step(0)
    assert any(not torch.equal(a, p) for a, p in zip(online_before, online, strict=True))
    m = 0.999
    for before, p_online, p_target in zip(target_before, online, target, strict=True):
        # m·target + (1 − m)·online, in the operation order of lightly's update_momentum (bit-exact)
        assert torch.equal(p_target, torch.add(before * m, p_online, alpha=1.0 - m))
        torch.testing.assert_close(p_target, before * m + p_online * (1.0 - m))


def test_identical_positives_give_lower_loss_than_shuffled():
    views = hand_views(b=6)
    same = Views(views.x1, views.x1.clone(), views.box1, views.box2, views.flip1, views.flip2,
                 views.image_ids)
    shuffled = Views(views.x1, views.x1[[1, 2, 3, 4, 5, 0]], views.box1, views.box2, views.flip1, views.flip2,
                     views.image_ids)
    loss_same, _ = make_moco(batch_size=6, shuffle_bn=False).step(same, 0)
    loss_shuffled, _ = make_moco(batch_size=6, shuffle_bn=False).step(shuffled, 0)
    assert loss_same.item() < loss_shuffled.item()


def test_shuffled_forward_unpermutes_and_splits_the_batch():
    x = torch.randn(8, 5)
    (same,) = shuffled_forward(lambda t: (2 * t,), x, splits=2)
    torch.testing.assert_close(same, 2 * x)  # a per-sample function: original order restored
    (centred,) = shuffled_forward(lambda t: (t - t.mean(0, keepdim=True),), x, splits=2)
    chunk_means = x - centred  # each row minus the mean of the sub-batch it was normalised with
    groups = torch.unique(chunk_means.round(decimals=5), dim=0)
    assert groups.shape[0] == 2  # two sub-batches ...
    for mean in groups:
        members = (chunk_means.round(decimals=5) == mean).all(dim=1)
        assert members.sum() == 4  # ... of 4 samples each ...
        # ... each normalised by its own mean
        torch.testing.assert_close(x[members].mean(0), mean, atol=1e-4, rtol=0)
    assert not torch.allclose(chunk_means, x.mean(0).expand_as(x), atol=1e-4)  # not the full-batch mean


def _ddp_worker(rank: int, world: int, store: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # rank 0's permutation is broadcast; seeded so the test is deterministic
    try:
        x = torch.arange(12, dtype=torch.float).reshape(4, 3) + 100 * rank
        doubled, sums = shuffled_forward(lambda t: (2 * t, t.sum(1)), x, distributed=True)
        torch.testing.assert_close(doubled, 2 * x)  # this rank's samples, in this rank's order
        torch.testing.assert_close(sums, x.sum(1))
        (centred,) = shuffled_forward(lambda t: (t - t.mean(0, keepdim=True),), x, distributed=True)
        assert not torch.allclose(x - centred, x.mean(0).expand_as(x))  # statistics of a mixed batch
        keys, ids = gather_across_ranks(x, torch.arange(4) + 10 * rank, distributed=True)
        torch.testing.assert_close(keys, torch.cat([x - 100 * rank + 100 * r for r in range(world)]))
        assert ids.tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    finally:
        torch.distributed.destroy_process_group()


def test_shuffle_and_gather_across_two_ranks(tmp_path):
    """DDP path (gloo, 2 CPU processes): the batch is shuffled across ranks and each rank gets its
    own outputs back in order; keys and ids are gathered from both ranks for the queue."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
    assert gather_across_ranks(torch.ones(2), distributed=True)[0].shape == (2,)  # no group: identity


def test_shuffle_bn_keys_are_in_order_and_use_sub_batch_statistics():
    method = make_moco()
    x = hand_views().x2
    with torch.no_grad():
        full = target_key(method, x)
        (shuffled,) = method.key_forward(x)
    assert not torch.allclose(shuffled, full, atol=1e-4)  # train-mode BN saw other statistics
    method.eval()
    with torch.no_grad():
        (shuffled,) = method.key_forward(x)
    torch.testing.assert_close(shuffled, target_key(method, x), rtol=1e-4, atol=1e-5)  # order restored


@pytest.mark.parametrize("size", [64, 96])
def test_shapes_at_two_resolutions(size):
    method = make_moco()
    views = hand_views(size=size)
    loss, logs = method.step(views, 0)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    (k,) = method.key_forward(views.x2)
    assert k.shape == (4, 128)
    torch.testing.assert_close(k.norm(dim=1), torch.ones(4))
    assert logs["loss"].dim() == 0 and logs["std"].dim() == 0


def test_export_is_the_online_backbone_and_loads_strictly():
    method = make_moco()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    loss, _ = method.step(hand_views(), 0)
    loss.backward()
    optimizer.step()
    method.after_optimizer_step(0)
    state = method.export()
    assert set(state) == {"backbone"}
    SegmentationModel(create_backbone("resnet18", output_stride=16)).backbone.load_state_dict(
        state["backbone"], strict=True)
    name = "conv1.weight"
    torch.testing.assert_close(state["backbone"][name], method.backbone.state_dict()[name])
    assert not torch.equal(state["backbone"][name], method.target_backbone.state_dict()[name])


def test_short_run_lowers_the_loss():
    """32 SGD steps on a pool of 16 synthetic images (batch 8, K = 16, paper defaults otherwise).

    The first K/B steps are skipped: until the queue holds real keys its negatives are random unit
    vectors (an easy loss). The "light" recipe is used because the synthetic blobs differ mostly
    in colour, which MoCo-v2's jitter and greyscale remove; with it the task is learnable in 32 steps.
    """
    torch.manual_seed(0)
    method = make_moco(batch_size=8, pool_size=16, image_size=32)
    assert method.queue.size == 16
    pool = random_images(16, 64, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [make_views(pool[8 * (i % 2):8 * (i % 2) + 8], "light", 32, g,
                          image_ids=torch.arange(8) + 8 * (i % 2)) for i in range(6)]
    losses = train_steps(method, batches, 32)[2:]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
