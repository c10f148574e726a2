"""DenseCL's defining properties: the correspondence is the argmax of backbone-feature cosines, the dense
loss is a per-location InfoNCE against a second queue of image-level (average-pooled) keys, the total
is (1 − λ)·L_global + λ·L_dense with λ = 0 during warm-up, and the key encoder (backbone and both
projectors) moves only by EMA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bench.augment import Views, make_views
from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.densecl import correspondence, dense_info_nce, match
from bench.methods.queue import info_nce
from bench.models import SegmentationModel, create_backbone
from tests.conftest import random_images, tiny_backbone, tiny_context, train_steps


def hand_views(b: int = 4, size: int = 64, seed: int = 0, ids: torch.Tensor | None = None) -> Views:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, 3, size, size, generator=g)
    x2 = torch.randn(b, 3, size, size, generator=g)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1)
    flips = torch.zeros(b, dtype=torch.bool)
    return Views(x1, x2, box, box.clone(), flips, flips.clone(), torch.arange(b) if ids is None else ids)


def make_densecl(batch_size: int = 4, pool_size: int = 64, image_size: int = 64, **overrides):
    text = "densecl" + ("" if not overrides else ":" + ",".join(f"{k}={v}" for k, v in overrides.items()))
    backbone = tiny_backbone()
    ctx = tiny_context(backbone, batch_size=batch_size, pool_size=pool_size, image_size=image_size)
    return build_method(parse_method(text), backbone, ctx).train()


def flat(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, HW, C), locations in row-major order."""
    return features.flatten(2).transpose(1, 2)


def test_defaults_and_overrides():
    spec = parse_method("densecl")
    assert spec.cfg == {"momentum": 0.999, "queue": 65536, "temperature": 0.2, "proj_dim": 128,
                        "hidden_dim": 2048, "shuffle_bn": True, "exclude_self": True, "loss_lambda": 0.5,
                        "warmup_steps": 0}
    assert spec.cls.group == "dense contrastive"
    with pytest.raises(BenchError, match="loss_lambda=1.5 is out of range"):
        parse_method("densecl:loss_lambda=1.5")
    assert spec.cls.recipe == "mocov2"
    assert parse_method("densecl:warmup_steps=1000").cfg["warmup_steps"] == 1000
    with pytest.raises(BenchError, match="valid: momentum.*loss_lambda.*warmup_steps"):
        parse_method("densecl:bogus=1")


def test_heads_queues_and_momentum_pairs():
    method = make_densecl(batch_size=8, pool_size=100)
    assert method.queue.keys.shape == method.dense_queue.keys.shape == (96, 128)
    assert {"dense_queue.keys", "dense_queue.ids", "dense_queue.ptr"} <= set(method.state_dict())
    for head in (method.projector, method.dense_projector):
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 128)]
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules())
    first = method.projector.layers[0]  # official init_linear='kaiming': N(0, 2/fan_in), zero bias
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    assert torch.count_nonzero(first.bias) == 0
    pairs = method.momentum_pairs()
    assert (method.dense_projector, method.target_dense_projector) in pairs and len(pairs) == 3
    for online, target in pairs:
        for a, b in zip(online.parameters(), target.parameters(), strict=True):
            assert torch.equal(a, b) and not b.requires_grad
    assert method.momentum_at(0) == method.momentum_at(10) == 0.999


@pytest.mark.parametrize("flip", [False, True])
def test_correspondence_finds_the_known_crop(flip):
    """View 2 is the crop rows 2..9, cols 1..8 of a 10×10 map whose view 1 is rows 0..7, cols 0..7
    (scaled, and optionally mirrored): every location of view 1 inside the overlap is matched with
    its own copy."""
    g = torch.Generator().manual_seed(0)
    source = torch.randn(2, 32, 10, 10, generator=g)
    view1 = source[:, :, 0:8, 0:8]
    view2 = 3.0 * source[:, :, 2:10, 1:9]
    if flip:
        view2 = view2.flip(-1)
    index = correspondence(flat(view1), flat(view2))
    assert index.shape == (2, 64)
    for r in range(2, 8):
        for c in range(1, 8):
            col = 7 - (c - 1) if flip else c - 1
            assert (index[:, r * 8 + c] == (r - 2) * 8 + col).all()


def test_match_gathers_the_key_at_the_matched_location():
    k_grid = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)  # (B, M=3, D=2)
    index = torch.tensor([[2, 0], [1, 1]])  # (B, N=2)
    expected = torch.stack([k_grid[0, [2, 0]], k_grid[1, [1, 1]]])
    assert torch.equal(match(k_grid, index), expected)


def test_dense_info_nce_by_hand():
    s = 1 / math.sqrt(2)
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two locations
    k = torch.tensor([[[s, s], [0.0, 1.0]]])
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    tau = 0.5
    # location 0: pos s, negatives 1, −1; location 1: pos 1, negatives 0, 0
    l0 = -math.log(math.exp(s / tau) / (math.exp(s / tau) + math.exp(1 / tau) + math.exp(-1 / tau)))
    l1 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2.0))
    assert dense_info_nce(q, k, queue, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    exclude = torch.tensor([[True, False]])  # queue row 0 is this image's own key: dropped at every location
    l0x = -math.log(math.exp(s / tau) / (math.exp(s / tau) + math.exp(-1 / tau)))
    l1x = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    assert dense_info_nce(q, k, queue, tau, exclude).item() == pytest.approx((l0x + l1x) / 2, rel=1e-6)


def test_dense_info_nce_is_info_nce_over_all_locations():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)
    k = F.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)
    queue = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    exclude = torch.rand(3, 6, generator=g) < 0.3
    expected = info_nce(q.flatten(0, 1), k.flatten(0, 1), queue, 0.2, exclude.repeat_interleave(5, dim=0))
    torch.testing.assert_close(dense_info_nce(q, k, queue, 0.2, exclude), expected)
    shuffled = dense_info_nce(q, q[:, [1, 2, 3, 4, 0]], queue, 0.2)
    assert dense_info_nce(q, q, queue, 0.2) < shuffled  # identical positives: a lower loss


@pytest.mark.parametrize("exclude_self", [True, False])
def test_training_step_by_hand(exclude_self):
    """Global and dense losses recomputed from the modules with plain torch; a queue row holding a
    current image's key under its id is excluded for that image only (kept with ``exclude_self=false``,
    the official code)."""
    method = make_densecl(shuffle_bn=False, pool_size=8, exclude_self=exclude_self)  # K = 8
    views = hand_views(ids=torch.tensor([10, 11, 12, 13]))
    tau = 0.2
    with torch.no_grad():
        fq, fk = method.backbone(views.x1)[-1], method.target_backbone(views.x2)[-1]
        q = F.normalize(method.projector(fq.mean((2, 3))), dim=1)
        k = F.normalize(method.target_projector(fk.mean((2, 3))), dim=1)
        q_grid = F.normalize(method.dense_projector(flat(fq)), dim=-1)
        k_dense = method.target_dense_projector(flat(fk))
        k_grid = F.normalize(k_dense, dim=-1)
        pooled = F.normalize(k_dense.mean(1), dim=-1)
        cos = torch.einsum("bnc,bmc->bnm", F.normalize(flat(fq), dim=-1), F.normalize(flat(fk), dim=-1))
        best = cos.argmax(2)  # key location most similar to each query location (backbone C5)
        for queue, key in ((method.queue, k), (method.dense_queue, pooled)):
            queue.keys[0] = F.normalize(key[1] + 0.1 * torch.randn(128), dim=0)  # a stale key of image 11
            queue.ids[0] = 11
        global_queue, dense_queue = method.queue.keys.clone(), method.dense_queue.keys.clone()
    loss, logs = method.step(views, 0)

    def nce(query, positive, negatives):
        logits = torch.cat([(query @ positive)[None], query @ negatives.t()]) / tau
        return -torch.log_softmax(logits, dim=0)[0]

    def negatives(queue, i):
        return queue[1:] if i == 1 and exclude_self else queue

    expected_global = sum(nce(q[i], k[i], negatives(global_queue, i)) for i in range(4)) / 4
    expected_dense = sum(nce(q_grid[i, s], k_grid[i, best[i, s]], negatives(dense_queue, i))
                         for i in range(4) for s in range(4)) / 16
    assert logs["loss_global"].item() == pytest.approx(expected_global.item(), rel=1e-4)
    assert logs["loss_dense"].item() == pytest.approx(expected_dense.item(), rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * expected_global.item() + 0.5 * expected_dense.item(), rel=1e-4)
    assert set(logs) >= {"loss", "std", "loss_global", "loss_dense"}


def test_warmup_sets_lambda_to_zero():
    method = make_densecl(warmup_steps=2, loss_lambda=0.3)
    views = hand_views()
    loss, logs = method.step(views, 1)
    assert loss.item() == pytest.approx(logs["loss_global"].item(), rel=1e-6)
    loss, logs = method.step(views, 2)
    expected = 0.7 * logs["loss_global"].item() + 0.3 * logs["loss_dense"].item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dense_queue_holds_image_level_pooled_keys():
    method = make_densecl(shuffle_bn=False, pool_size=12)  # K = 12, B = 4
    initial = method.dense_queue.keys.clone()
    backbone, dense = copy.deepcopy(method.target_backbone), copy.deepcopy(method.target_dense_projector)
    views = hand_views(seed=3, ids=torch.tensor([5, 0, 8, 2]))
    with torch.no_grad():  # the key encoder before the step (train-mode BN: batch statistics)
        pixels = dense(flat(backbone(views.x2)[-1]))  # (B, S², 128), unnormalised
        pooled = F.normalize(pixels.mean(1), dim=-1)
    method.step(views, 0)
    queue = method.dense_queue
    assert queue.keys.shape == (12, 128) and queue.ids.shape == (12,)
    assert int(queue.ptr) == 4 and queue.ids[:4].tolist() == [5, 0, 8, 2] and (queue.ids[4:] == -1).all()
    torch.testing.assert_close(queue.keys[:4], pooled, rtol=1e-4, atol=1e-5)  # one pooled key per image
    torch.testing.assert_close(queue.keys[4:], initial[4:], rtol=0, atol=0)
    pixel_keys = F.normalize(pixels, dim=-1)
    assert ((queue.keys[:4, None] - pixel_keys).norm(dim=-1) > 1e-3).all()  # not a pixel's key
    assert int(method.queue.ptr) == 4 and method.queue.ids[:4].tolist() == [5, 0, 8, 2]


def test_target_gets_no_gradient_and_moves_only_by_ema():
    method = make_densecl()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    pairs = method.momentum_pairs()
    online = [p for o, _ in pairs for p in o.parameters()]
    target = [p for _, t in pairs for p in t.parameters()]
    target_before = [p.detach().clone() for p in target]
    online_before = [p.detach().clone() for p in online]
    loss, _ = method.step(hand_views(), 0)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in target)
    assert method.dense_projector.layers[0].weight.grad.abs().sum() > 0  # the dense branch trains
    optimizer.step()
    method.after_optimizer_step(0)
    assert any(not torch.equal(a, p) for a, p in zip(online_before, online, strict=True))
    m = 0.999
    for before, p_online, p_target in zip(target_before, online, target, strict=True):
        # m·target + (1 − m)·online, in the operation order of lightly's update_momentum (bit-exact)
        assert torch.equal(p_target, torch.add(before * m, p_online, alpha=1.0 - m))


def test_identical_positives_give_lower_loss_than_shuffled():
    views = hand_views(b=6)
    same = Views(views.x1, views.x1.clone(), views.box1, views.box2, views.flip1, views.flip2,
                 views.image_ids)
    shuffled = Views(views.x1, views.x1[[1, 2, 3, 4, 5, 0]], views.box1, views.box2, views.flip1,
                     views.flip2, views.image_ids)
    loss_same, logs_same = make_densecl(batch_size=6, shuffle_bn=False).step(same, 0)
    loss_shuffled, logs_shuffled = make_densecl(batch_size=6, shuffle_bn=False).step(shuffled, 0)
    assert logs_same["loss_dense"] < logs_shuffled["loss_dense"]
    assert loss_same.item() < loss_shuffled.item()


@pytest.mark.parametrize(("size", "cells"), [(64, 2), (96, 3)])
def test_shapes_at_two_resolutions(size, cells):
    method = make_densecl()
    views = hand_views(size=size)
    loss, logs = method.step(views, 0)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    k, k_grid, k_pooled, k_backbone = method.key_forward(views.x2)  # shuffle-BN on
    assert k.shape == k_pooled.shape == (4, 128)
    assert k_grid.shape == (4, cells * cells, 128) and k_backbone.shape == (4, cells * cells, 512)
    for t in (k, k_grid, k_pooled, k_backbone):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))
    q_features = flat(method.backbone(views.x1)[-1])
    assert correspondence(q_features, k_backbone).shape == (4, cells * cells)


def test_shuffle_bn_returns_every_key_output_in_order():
    method = make_densecl().eval()  # eval-mode BN: the sub-batches cannot change the outputs
    x = hand_views().x2
    with torch.no_grad():
        shuffled = method.key_forward(x)
        plain = method._keys(x)
    for a, b in zip(shuffled, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_export_is_the_online_backbone_and_loads_strictly():
    method = make_densecl()
    state = method.export()
    assert set(state) == {"backbone"}
    SegmentationModel(create_backbone("resnet18", output_stride=16)).backbone.load_state_dict(
        state["backbone"], strict=True)


def test_short_run_lowers_the_loss():
    """32 SGD steps on 16 synthetic images at 64 px (C5 2×2; batch 8, K = 16, paper defaults otherwise).
    The first K/B steps are skipped (random queue); the "light" recipe keeps the blobs' colour, which
    is what tells these synthetic images apart (see the MoCo-v2 test)."""
    torch.manual_seed(0)
    method = make_densecl(batch_size=8, pool_size=16)
    pool = random_images(16, 64, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [make_views(pool[8 * (i % 2):8 * (i % 2) + 8], "light", 64, g,
                          image_ids=torch.arange(8) + 8 * (i % 2)) for i in range(6)]
    losses = train_steps(method, batches, 32)[2:]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
