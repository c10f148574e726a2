"""CP2 (bench/methods/cp2.py): copy-paste views, dense loss by hand, queue FIFO, EMA rule, shuffle-BN
order, ASPP export into the finetune head, shapes, and a short run that lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_images, tiny_backbone, tiny_context

from bench import augment
from bench.augment import Views
from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.cp2 import CP2, cp2_dense_loss, mask_pool
from bench.methods.queue import key_forward
from bench.models import SegmentationModel, create_backbone, load_aspp


def build(spec: str = "cp2", batch_size: int = 4, image_size: int = 64, total_steps: int = 10,
          pool_size: int = 64):
    backbone = tiny_backbone(output_stride=CP2.output_stride)
    ctx = tiny_context(backbone, batch_size=batch_size, total_steps=total_steps, pool_size=pool_size,
                       image_size=image_size)
    return build_method(parse_method(spec), backbone, ctx)


def hand_views(b: int = 4, size: int = 64, seed: int = 0, ids: torch.Tensor | None = None) -> Views:
    """Random inputs with hand-made paste rectangles (q: left 3/4 of the image, k: top 3/4)."""
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g)
    paste1, paste2 = torch.zeros(b, 1, size, size), torch.zeros(b, 1, size, size)
    paste1[..., :, : 3 * size // 4] = 1
    paste2[..., : 3 * size // 4, :] = 1
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1)
    flip = torch.zeros(b, dtype=torch.bool)
    ids = torch.arange(b) if ids is None else ids
    return Views(x1=x1, x2=x2, box1=box, box2=box.clone(), flip1=flip, flip2=flip.clone(), image_ids=ids,
                 paste1=paste1, paste2=paste2)


# --- registry, model --------------------------------------------------------------------------

def test_parse_defaults_and_bogus_key():
    spec = parse_method("cp2")
    assert spec.cfg == {"momentum": 0.999, "queue": 65536, "temperature": 0.2, "dense_weight": 0.2,
                        "proj_dim": 128, "export_head": True, "shuffle_bn": True, "exclude_self": True}
    assert CP2.output_stride == 16 and CP2.recipe == "mocov2" and CP2.group == "dense contrastive"
    with pytest.raises(BenchError, match="valid: momentum=.*dense_weight=.*export_head"):
        parse_method("cp2:bogus=1")


@pytest.mark.parametrize("size,grid", [(64, 4), (96, 6)])
def test_shapes_at_two_resolutions(size, grid):
    method = build(image_size=size)
    views = hand_views(size=size)
    assert method.queue.keys.shape == (64, 128)  # 65536 capped at the pool of 64 images
    assert method.encoder.aspp(method.backbone(views.x1)[-1]).shape == (4, 256, grid, grid)
    q, hw = method._dense(views.x1)
    assert hw == (grid, grid) and q.shape == (4, 128, grid * grid)
    mask = method.cell_masks(views.paste2, grid, grid)
    k, k_pooled = method._keys(views.x2, mask)
    assert k.shape == (4, 128, grid * grid) and k_pooled.shape == (4, 128)
    torch.testing.assert_close(k_pooled.norm(dim=1), torch.ones(4))
    loss, logs = method.step(views, 0)
    assert loss.shape == () and set(logs) >= {"loss", "loss_ins", "loss_dense", "std"}


# --- views --------------------------------------------------------------------------------------

def test_make_views_composites_foreground_onto_other_images():
    method = build()
    images, ids = random_images(4, 64, seed=2), torch.arange(10, 14)
    views = method.make_views(images, ids, torch.Generator().manual_seed(0))
    # Replay the same draws: foreground views, then backgrounds from the batch rolled by one.
    g = torch.Generator().manual_seed(0)
    fg = augment.make_views(images, "mocov2", 64, g, image_ids=ids)
    bg = augment.make_views(images.roll(1, dims=0), "mocov2", 64, g)
    bg_q, bg_k = bg.x1, bg.x2.roll(1, dims=0)  # q over image i−1, k over image i−2
    cases = ((views.x1, views.paste1, fg.x1, bg_q), (views.x2, views.paste2, fg.x2, bg_k))
    for x, paste, fore, back in cases:
        assert paste.shape == (4, 1, 64, 64) and set(paste.unique().tolist()) <= {0.0, 1.0}
        assert 0.5 <= paste.mean().item() <= 0.8
        inside = paste.bool().expand_as(x)
        assert torch.equal(x[inside], fore[inside])  # pasted pixels are the foreground view
        assert torch.equal(x[~inside], back[~inside])  # the rest is the background
    assert not torch.equal(views.paste1, views.paste2)  # q and k rectangles are drawn independently
    assert torch.equal(views.image_ids, ids) and torch.equal(views.box1, fg.box1)


def test_make_views_small_batches():
    method = build(batch_size=2)
    images = random_images(2, 64, seed=4)
    views = method.make_views(images, torch.arange(2), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    augment.make_views(images, "mocov2", 64, g)
    bg = augment.make_views(images.roll(1, dims=0), "mocov2", 64, g)
    outside = ~views.paste2.bool().expand_as(views.x2)
    assert torch.equal(views.x2[outside], bg.x2[outside])  # with B = 2, k's background is the other image
    with pytest.raises(BenchError, match="at least 2 images"):
        method.make_views(images[:1], torch.arange(1), torch.Generator().manual_seed(1))


def test_step_requires_paste_masks():
    views = hand_views()
    views.paste1 = None
    with pytest.raises(BenchError, match="paste masks"):
        build().step(views, 0)


# --- losses -------------------------------------------------------------------------------------

def test_dense_loss_by_hand_on_a_2x2_grid():
    # Locations of a 2×2 grid (D = 2): q = k = (e1, e2, −e1, −e2). For a key y the logits over x are a
    # permutation of (1, 0, −1, 0), so log Σ_x e^{logit} = L = log(e + 2 + 1/e) (background x included).
    # Image 0: mask_q = (1,1,0,0), mask_k = (1,0,0,0): pairs (0,0) and (1,0) → ((L−1) + (L−0))/2 = L − 0.5.
    # Image 1: all foreground: Σ_x (L − logit) = 4L per key, 16 pairs → L. Batch mean: L − 0.25.
    vectors = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])  # (D, N)
    q = vectors.expand(2, 2, 4).clone()
    mask_q = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask_k = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    big_l = math.log(math.e + 2 + 1 / math.e)
    loss = cp2_dense_loss(q, q.clone(), mask_q, mask_k)
    torch.testing.assert_close(loss, torch.tensor(big_l - 0.25))
    # Without the background locations in the denominator image 0 would give log(e + 1) − 0.5 instead.
    assert abs(loss.item() - (math.log(math.e + 1) - 0.5 + big_l) / 2) > 0.1


def test_mask_pool_is_the_normalised_foreground_sum():
    dense = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, D=3, N=3)
    pooled = mask_pool(dense, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2))


def test_identical_positives_give_lower_loss_than_shuffled():
    method = build()
    images = (random_images(4, 64, seed=1).float() / 255 - 0.45) / 0.25
    same = hand_views()
    same.x1, same.x2, same.paste2 = images, images.clone(), same.paste1.clone()
    perm = torch.tensor([1, 2, 3, 0])
    shuffled = hand_views()
    shuffled.x1, shuffled.x2, shuffled.paste2 = images, images[perm], shuffled.paste1.clone()
    torch.manual_seed(0)
    with torch.no_grad():
        _, logs_same = method.step(same, 0)
        _, logs_shuffled = method.step(shuffled, 0)
    assert logs_same["loss_ins"] < logs_shuffled["loss_ins"] - 0.1
    assert logs_same["loss_dense"] < logs_shuffled["loss_dense"]


# --- training step, EMA, queue ------------------------------------------------------------------

def test_step_updates_online_and_target_follows_constant_ema():
    method = build()
    (online, target), = method.momentum_pairs()
    assert {n.split(".")[0] for n, _ in target.named_parameters()} == {"backbone", "aspp", "projection"}
    before = [p.detach().clone() for p in target.parameters()]
    online_before = [p.detach().clone() for p in online.parameters()]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    loss, _ = method.step(hand_views(), 5)
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert method.aspp[0].project[0].weight.grad is not None  # the ASPP is trained
    opt.step()
    method.after_optimizer_step(5)
    m = method.momentum_at(5)
    assert m == method.momentum_at(0) == 0.999
    assert any(not torch.equal(a, p) for a, p in zip(online_before, online.parameters(), strict=True))
    moved = 0.0
    for p_old, p_on, p_tg in zip(before, online.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(p_tg, p_old * m + p_on.detach() * (1 - m), rtol=2.5e-7, atol=1e-9)
        moved = max(moved, (p_tg - p_old).abs().max().item())
    assert moved > 1e-6


def test_queue_is_fifo_with_the_mask_pooled_keys_and_ids():
    method = build()
    queue = method.queue
    initial = queue.keys.clone()
    for start, ids in ((0, torch.arange(100, 104)), (62, torch.arange(200, 204))):
        queue.ptr.fill_(start)
        views = hand_views(ids=ids, seed=start)
        mask_k = method.cell_masks(views.paste2, 4, 4)
        torch.manual_seed(7)  # the shuffle-BN permutation
        _, expected = method._keys(views.x2, mask_k)
        untouched = queue.keys.clone()
        torch.manual_seed(7)
        with torch.no_grad():
            method.step(views, 0)
        positions = (start + torch.arange(4)) % 64
        assert queue.ptr.item() == (start + 4) % 64
        torch.testing.assert_close(queue.keys[positions], expected)
        assert torch.equal(queue.ids[positions], ids)
        rest = torch.ones(64, dtype=torch.bool)
        rest[positions] = False
        assert torch.equal(queue.keys[rest], untouched[rest])
    assert torch.equal(queue.keys[8:60], initial[8:60]) and (queue.ids[8:60] == -1).all()


def test_shuffled_key_forward_restores_the_batch_order():
    method = build(batch_size=8)
    encoder = method.target_encoder.eval()  # eval BN: the result must not depend on the sub-batches
    x = hand_views(b=8).x2
    torch.manual_seed(3)
    (out,) = key_forward(lambda t: (encoder(t),), x, shuffle_bn=True)
    torch.testing.assert_close(out, encoder(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_instance_loss_by_hand_with_and_without_same_image_keys(exclude_self):
    """L_ins = InfoNCE of the mask-pooled query against its key and the queue; a queued key of the query's
    own image is dropped by default and kept with ``exclude_self=false`` (the official code)."""
    method = build(f"cp2:shuffle_bn=false,exclude_self={str(exclude_self).lower()}", pool_size=8)
    views = hand_views(ids=torch.tensor([10, 11, 12, 13]))
    with torch.no_grad():
        q, (h, w) = method._dense(views.x1)
        mask_q, mask_k = method.cell_masks(views.paste1, h, w), method.cell_masks(views.paste2, h, w)
        q_pooled = mask_pool(q, mask_q)
        _, k_pooled = method._keys(views.x2, mask_k)
        method.queue.keys[:4] = k_pooled  # stale copies of the current images' keys
        method.queue.ids[:4] = views.image_ids
        queue = method.queue.keys.clone()
        _, logs = method.step(views, 0)
    expected = 0.0
    for i in range(4):
        keep = [j for j in range(8) if j != i or not exclude_self]
        logits = torch.cat([(q_pooled[i] @ k_pooled[i])[None], q_pooled[i] @ queue[keep].t()]) / 0.2
        expected += -torch.log_softmax(logits, dim=0)[0].item() / 4
    assert logs["loss_ins"].item() == pytest.approx(expected, rel=1e-4)
    if not exclude_self:  # the own key is a copy of the positive: the loss is at least log 2
        assert logs["loss_ins"].item() > math.log(2)


def test_pretraining_aspp_has_the_stride_16_rates():
    method = build()
    dilations = [m.dilation for m in method.aspp.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation != (1, 1)]
    assert dilations == [(6, 6), (12, 12), (18, 18)]


# --- export -------------------------------------------------------------------------------------

def test_export_backbone_and_aspp_load_into_the_finetune_model():
    method = build()
    with torch.no_grad():  # make the ASPP weights distinguishable from a fresh head's
        for p in method.aspp.parameters():
            p.add_(0.5)
    state = method.export()
    assert set(state) == {"backbone", "head"}
    model = SegmentationModel(create_backbone("resnet18", output_stride=16))
    model.backbone.load_state_dict(state["backbone"], strict=True)
    load_aspp(model.head, state["head"])
    head_state = model.head.state_dict()
    for key, value in state["head"].items():
        assert torch.equal(head_state[key], value), key
    expected = {k for k in head_state if not k.startswith("4.")}
    assert set(state["head"]) == expected
    torch.testing.assert_close(model.head[0].project[0].weight, method.aspp[0].project[0].weight.detach())


def test_export_head_false_exports_the_backbone_alone():
    state = build("cp2:export_head=false").export()
    assert set(state) == {"backbone"}
    create_backbone("resnet18", output_stride=16).load_state_dict(state["backbone"], strict=True)


# --- short run ----------------------------------------------------------------------------------

def test_short_run_lowers_the_loss():
    """A short run on a fixed pool of two batches of copy-paste views (pool 8, queue primed with their
    keys). With fresh MoCo-v2 views every step the InfoNCE stays at chance for far more than a few
    dozen steps on these near-identical synthetic images (measured), so the views are drawn once: the
    run checks that the whole step (online, EMA key branch, queue) can lower the loss."""
    torch.manual_seed(0)
    method = build(batch_size=4, total_steps=12, pool_size=8, image_size=48)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    images, g = random_images(8, 48, seed=3), torch.Generator().manual_seed(0)
    batches = [method.make_views(images[ids], ids, g) for ids in torch.arange(8).split(4)]
    with torch.no_grad():
        for views in batches:
            method._enqueue(method._keys(views.x2, method.cell_masks(views.paste2, 3, 3))[1], views.image_ids)
    losses = []
    for step in range(12):
        loss, _ = method.step(batches[step % 2], step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(step)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
