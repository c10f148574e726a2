"""DiCoH's defining properties (docs/methods.md, "dicoh"): image-level queue keys as pixel-to-image
negatives with a percentile cut, spatial (R) and similarity (M) positives, λ-mix of local and global
InfoNCE, a target that moves only by EMA, and every ablation override changing the computation it names.

Hand recomputations loop over images and pixels, independently of the vectorised implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.augment import Views, to_input
from bench.errors import BenchError
from bench.geometry import nearest_cells
from bench.methods import build_method, parse_method
from bench.methods.base import cosine_momentum
from bench.methods.dicoh import (
    hard_negative_count,
    hard_negatives,
    pixel_info_nce,
    pooled_embedding,
    similarity_map,
)
from tests.conftest import random_images, tiny_backbone, tiny_context

FULL = (0.0, 0.0, 1.0, 1.0)


def make_dicoh(batch_size: int = 2, pool_size: int = 64, image_size: int = 64, total_steps: int = 10,
               **overrides):
    overrides.setdefault("shuffle_bn", "false")  # exact recomputation; shuffle-BN is tested on its own
    text = "dicoh:" + ",".join(f"{k}={v}" for k, v in overrides.items())
    backbone = tiny_backbone()
    ctx = tiny_context(backbone, batch_size=batch_size, total_steps=total_steps, pool_size=pool_size,
                       image_size=image_size)
    torch.manual_seed(1)
    return build_method(parse_method(text), backbone, ctx)


def hand_views(b: int = 2, size: int = 64, seed: int = 0, box1=FULL, box2=FULL, flip2: bool = False) -> Views:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, 3, size, size, generator=g)
    x2 = torch.randn(b, 3, size, size, generator=g)
    return Views(x1, x2, torch.tensor([box1]).repeat(b, 1), torch.tensor([box2]).repeat(b, 1),
                 torch.zeros(b, dtype=torch.bool), torch.full((b,), flip2), torch.arange(b))


def set_queue(method, seed: int = 0, ids=None) -> None:
    """Fill the queue with known unit keys (and ids, −1 = no image by default)."""
    g = torch.Generator().manual_seed(seed)
    k, d = method.queue.keys.shape
    method.queue.keys.copy_(F.normalize(torch.randn(k, d, generator=g), dim=1))
    method.queue.ids.copy_(torch.full((k,), -1) if ids is None else ids)


def same_weights(dst, src) -> None:
    """Copy every shared parameter/buffer (backbones, projectors, queue) from src to dst."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert all(k.startswith(("predictor", "global_head", "target_global_head")) for k in missing + unexpected)


@torch.no_grad()
def embeddings(method, views: Views):
    """(online, target) of both views recomputed from the modules (train-mode BN, same batches)."""
    def online(x):
        h = method.backbone(x)[-1]
        e = method.projector(h)
        if method.predictor is not None:
            e = method.predictor(e)
        z = F.normalize(e, dim=1)
        return h, z, pooled_embedding(z)

    def target(x):
        h = method.target_backbone(x)[-1]
        z = F.normalize(method.target_projector(h), dim=1)
        return h, z, pooled_embedding(z)

    return (online(views.x1), online(views.x2)), (target(views.x1), target(views.x2))


def hand_global(q, k, keys, key_ids, ids, tau):
    losses = []
    for b in range(q.shape[0]):
        negatives = keys[key_ids != ids[b]] @ q[b]
        positive = q[b] @ k[b]
        losses.append(torch.logsumexp(torch.cat([positive[None], negatives]) / tau, 0) - positive / tau)
    return torch.stack(losses).mean()


def hand_local(zq, zk, index, valid, tau, percentile, keys=None, key_ids=None, ids=None):
    """One direction of L_spatial / L_similar by loops: image negatives (keys given) or pixel negatives."""
    zq, zk = zq.flatten(2), zk.flatten(2)  # (B, D, N)
    n = zq.shape[-1]
    total, count = 0.0, 0
    for b in range(zq.shape[0]):
        for i in range(n):
            if not valid[b, i]:
                continue
            j = int(index[b, i])
            if keys is not None:
                kept = math.ceil((100 - percentile) * keys.shape[0] / 100)
                sims = keys[key_ids != ids[b]] @ zq[b, :, i]
            else:
                kept = math.ceil((100 - percentile) * (n - 1) / 100)
                sims = torch.stack([zk[b, :, jj] @ zq[b, :, i] for jj in range(n) if jj != j])
            negatives = torch.sort(sims, descending=True).values[:kept]
            positive = zq[b, :, i] @ zk[b, :, j]
            total = total + torch.logsumexp(torch.cat([positive[None], negatives]) / tau, 0) - positive / tau
            count += 1
    return total / max(count, 1)


def brute_argmax(hq, hk):
    hq, hk = hq.flatten(2), hk.flatten(2)
    out = torch.zeros(hq.shape[0], hq.shape[-1], dtype=torch.long)
    for b in range(hq.shape[0]):
        for i in range(hq.shape[-1]):
            cos = [F.cosine_similarity(hq[b, :, i], hk[b, :, j], dim=0) for j in range(hk.shape[-1])]
            out[b, i] = int(torch.stack(cos).argmax())
    return out


# --- registry ---------------------------------------------------------------------------------------

def test_parse_defaults_and_errors():
    spec = parse_method("dicoh")
    assert spec.cfg["queue"] == 65536 and spec.cfg["temperature"] == 0.2 and spec.cfg["lambda"] == 0.5
    assert spec.cfg["percentile"] == 75 and spec.cfg["momentum"] == 0.99
    assert (spec.cfg["predictor"], spec.cfg["negatives"], spec.cfg["positives"],
            spec.cfg["global_projector"]) == ("sym", "image", "both", "shared")
    assert spec.cfg["direction"] == "symmetric" and spec.cls.group == "dense contrastive"
    with pytest.raises(BenchError, match="lambda=2 is out of range"):
        parse_method("dicoh:lambda=2")
    assert parse_method("dicoh:percentile=50,lambda=1").cfg["lambda"] == 1.0
    with pytest.raises(BenchError, match=r"valid: momentum.*percentile=0\|50\|75.*predictor=sym\|asym"):
        parse_method("dicoh:bogus=1")
    with pytest.raises(BenchError, match=r"choose percentile=0\|50\|75"):
        parse_method("dicoh:percentile=60")
    with pytest.raises(BenchError, match=r"choose negatives=image\|pixel"):
        parse_method("dicoh:negatives=patch")


# --- pure functions ---------------------------------------------------------------------------------

def test_hard_negative_count():
    assert hard_negative_count(100, 75) == 25
    assert hard_negative_count(100, 50) == 50
    assert hard_negative_count(100, 0) == 100
    assert hard_negative_count(65536, 75) == 16384
    assert hard_negative_count(7, 75) == 2  # ceil(1.75)
    assert hard_negative_count(1, 75) == 1


def test_percentile_cut_keeps_the_top_quarter():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(3, 100, generator=g) * 2 - 1
    values, index = hard_negatives(sim, 75)
    assert values.shape == (3, 25)
    for row in range(3):
        expected = set(torch.argsort(sim[row], descending=True)[:25].tolist())
        assert set(index[row].tolist()) == expected
        threshold = torch.quantile(sim[row], 0.75)  # every kept one is at or above the 75th percentile
        assert (values[row] >= threshold).all() and (sim[row][sim[row] >= threshold].numel() == 25)
    assert hard_negatives(sim, 50)[0].shape == (3, 50)
    assert torch.equal(torch.sort(hard_negatives(sim, 0)[0], dim=1).values, torch.sort(sim, dim=1).values)
    exclude = torch.zeros_like(sim, dtype=torch.bool)
    exclude[:, torch.argsort(sim[0], descending=True)[:5]] = True  # drop row 0's five most similar
    _, index = hard_negatives(sim, 75, exclude)
    assert set(index[0].tolist()) == set(torch.argsort(sim[0], descending=True)[5:30].tolist())


def test_pixel_info_nce_by_hand():
    pos = torch.tensor([[0.5, 0.1]])
    neg = torch.tensor([[[0.2, -0.1], [0.3, 0.0]]])
    valid = torch.tensor([[True, False]])
    # only pixel 0 counts: −log(e^{2.5} / (e^{2.5} + e^{1} + e^{−0.5}))
    expected = -math.log(math.exp(2.5) / (math.exp(2.5) + math.exp(1.0) + math.exp(-0.5)))
    assert pixel_info_nce(pos, neg, valid, 0.2).item() == pytest.approx(expected, rel=1e-6)
    assert pixel_info_nce(pos, neg, torch.zeros_like(valid), 0.2).item() == 0.0


def test_similarity_positives_match_brute_force_argmax():
    g = torch.Generator().manual_seed(0)
    hq, hk = torch.randn(2, 16, 3, 3, generator=g), torch.randn(2, 16, 3, 3, generator=g)
    assert torch.equal(similarity_map(hq, hk), brute_argmax(hq, hk))
    shifted = torch.roll(hq, shifts=1, dims=3) * 3.0  # a scaled shifted copy: cos picks the shift
    expected = torch.tensor([r * 3 + (c + 1) % 3 for r in range(3) for c in range(3)])
    assert torch.equal(similarity_map(hq, shifted)[0], expected)


# --- positives ----------------------------------------------------------------------------------------

def test_spatial_positives_match_hand_computed_map():
    method = make_dicoh()
    h = torch.zeros(1, 8, 2, 2)
    one = torch.zeros(1, dtype=torch.bool)
    full = torch.tensor([FULL])
    # view 2 = top-left quarter: its centres (1/16, 1/16), (3/16, 1/16), (1/16, 3/16), (3/16, 3/16); every
    # view-1 centre (1/4 or 3/4 per axis) is nearest to cell 3; distance / larger bin diagonal (√2/2):
    # √2/16 / (√2/2) = 0.125 < 0.7, then 0.80, 0.80, 1.125 → only cell 0 is valid
    quarter, strip = torch.tensor([[0.0, 0.0, 0.25, 0.25]]), torch.tensor([[0.25, 0.0, 0.75, 1.0]])
    index, valid = method.positive_map("spatial", (full, one, quarter, one), h, h)
    assert index.tolist() == [[3, 3, 3, 3]] and valid.tolist() == [[True, False, False, False]]
    # view 2 = middle vertical strip, flipped: its column 0 lies at x = 0.625, column 1 at 0.375
    index, valid = method.positive_map("spatial", (full, one, strip, ~one), h, h)
    assert index.tolist() == [[1, 0, 3, 2]] and valid.all()
    index, valid = method.positive_map("similar", (full, one, full, one), h, torch.randn(1, 8, 2, 2))
    assert valid.all() and index.shape == (1, 4)


def test_identical_positives_give_lower_loss_than_shuffled():
    method = make_dicoh()
    views = hand_views()
    same = Views(views.x1, views.x1.clone(), views.box1, views.box1.clone(), views.flip1, views.flip1.clone(),
                 views.image_ids)
    shuffled = Views(views.x1, views.x1[[1, 0]], views.box1, views.box1.clone(), views.flip1,
                     views.flip1.clone(), views.image_ids)
    state = {k: v.clone() for k, v in method.queue.state_dict().items()}
    loss_same, _ = method.training_step(same, 0)
    method.queue.load_state_dict(state)
    loss_shuffled, _ = method.training_step(shuffled, 0)
    assert loss_same.item() < loss_shuffled.item() - 0.1


# --- queue and negatives ------------------------------------------------------------------------------

def test_queue_holds_pooled_normalised_target_embeddings_fifo():
    method = make_dicoh()
    assert method.queue.keys.shape == (64, 128)  # 65536 capped at the 64-image pool
    method.queue.ptr.fill_(62)  # wrap around: 2 views × 2 keys go to positions 62, 63, 0, 1
    before = method.queue.keys.clone()
    views = hand_views()
    views.image_ids = torch.tensor([10, 11])
    _, (t1, t2) = embeddings(method, views)
    method.training_step(views, 0)
    positions = [62, 63, 0, 1]
    expected = torch.cat([t1[2], t2[2]])  # normalise(avgpool(normalise(P_k(F_k(x))))) of view 1 then view 2
    torch.testing.assert_close(method.queue.keys[positions], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected.norm(dim=1), torch.ones(4))
    assert method.queue.ids[positions].tolist() == [10, 11] * 2
    assert int(method.queue.ptr) == 2
    torch.testing.assert_close(method.queue.keys[2:62], before[2:62], rtol=0, atol=0)


def test_local_and_global_terms_use_image_level_queue_keys_and_lambda_temperature_mix_them():
    method = make_dicoh()
    ids = torch.full((64,), -1)
    ids[:6] = torch.tensor([0, 1, 0, 1, 0, 1])  # keys of the current images must be excluded
    set_queue(method, seed=3, ids=ids)
    variants = {"lambda=0": make_dicoh(**{"lambda": 0.0}), "lambda=1": make_dicoh(**{"lambda": 1.0}),
                "temperature=0.5": make_dicoh(temperature=0.5)}
    for other in variants.values():
        same_weights(other, method)
    keys, key_ids = method.queue.keys.clone(), method.queue.ids.clone()
    views = hand_views()
    (o1, o2), (t1, t2) = embeddings(method, views)
    _, logs = method.training_step(views, 0)

    def hand_terms(tau):
        ident, ones = torch.arange(4).repeat(2, 1), torch.ones(2, 4, dtype=torch.bool)
        spatial = similar = glob = 0.0
        for oq, tk in ((o1, t2), (o2, t1)):  # both directions, averaged
            # both views are the full image without flips: R is the identity, valid everywhere
            bank = (keys, key_ids, views.image_ids)
            spatial = spatial + hand_local(oq[1], tk[1], ident, ones, tau, 75, *bank) / 2
            similar = similar + hand_local(oq[1], tk[1], brute_argmax(oq[0], tk[0]), ones, tau, 75, *bank) / 2
            glob = glob + hand_global(oq[2], tk[2], keys, key_ids, views.image_ids, tau) / 2
        return spatial.item(), similar.item(), glob.item()

    spatial, similar, glob = hand_terms(0.2)
    assert logs["loss_spatial"].item() == pytest.approx(spatial, rel=1e-4)
    assert logs["loss_similar"].item() == pytest.approx(similar, rel=1e-4)
    assert logs["loss_global"].item() == pytest.approx(glob, rel=1e-4)
    assert logs["loss"].item() == pytest.approx(0.5 * (spatial + similar) + 0.5 * glob, rel=1e-4)
    zq = o1[1].flatten(2).transpose(1, 2)
    negatives = method.image_negatives(zq, keys, method.queue.exclusion_mask(views.image_ids))
    assert negatives.shape == (2, 4, 16)  # (B, N, K/4) of the (K, D) = (64, 128) queue
    # lambda=0: the pure global loss; lambda=1: the pure local loss; temperature enters every term
    assert variants["lambda=0"].training_step(views, 0)[0].item() == pytest.approx(glob, rel=1e-4)
    local = spatial + similar
    assert variants["lambda=1"].training_step(views, 0)[0].item() == pytest.approx(local, rel=1e-4)
    spatial5, similar5, glob5 = hand_terms(0.5)
    assert variants["temperature=0.5"].training_step(views, 0)[0].item() == pytest.approx(
        0.5 * (spatial5 + similar5) + 0.5 * glob5, rel=1e-4)
    assert abs(glob5 - glob) > 1e-2 and abs(spatial5 - spatial) > 1e-2


def test_one_way_direction_is_the_literal_equations():
    """``direction=one-way``: query view 1 against key view 2 only (Eqs. 1-5 as printed), only view 2's
    keys enqueued; the default averages that with the reverse direction and enqueues both views."""
    method = make_dicoh()
    one_way = make_dicoh(direction="one-way")
    set_queue(method, seed=4)
    same_weights(one_way, method)
    keys, key_ids = method.queue.keys.clone(), method.queue.ids.clone()
    views = hand_views(seed=2, box2=(0.0, 0.0, 0.75, 1.0))  # R differs from the identity
    (o1, o2), (t1, t2) = embeddings(method, views)
    bank = (keys, key_ids, views.image_ids)

    def terms(oq, tk, boxes):
        index, valid = nearest_cells(*boxes, 2, 2)
        spatial = hand_local(oq[1], tk[1], index, valid, 0.2, 75, *bank)
        similar = hand_local(oq[1], tk[1], brute_argmax(oq[0], tk[0]), torch.ones_like(valid), 0.2, 75, *bank)
        glob = hand_global(oq[2], tk[2], keys, key_ids, views.image_ids, 0.2)
        return 0.5 * (spatial + similar) + 0.5 * glob

    geo1, geo2 = (views.box1, views.flip1), (views.box2, views.flip2)
    forward = terms(o1, t2, (*geo1, *geo2)).item()
    backward = terms(o2, t1, (*geo2, *geo1)).item()
    loss_one_way, _ = one_way.training_step(views, 0)
    loss_symmetric, _ = method.training_step(views, 0)
    assert loss_one_way.item() == pytest.approx(forward, rel=1e-4)
    assert loss_symmetric.item() == pytest.approx((forward + backward) / 2, rel=1e-4)
    assert abs(forward - backward) > 1e-3  # the two forms differ on this input
    assert int(one_way.queue.ptr) == 2 and int(method.queue.ptr) == 4
    torch.testing.assert_close(one_way.queue.keys[:2], t2[2], rtol=1e-5, atol=1e-6)  # view 2's keys only


def test_pixel_negatives_are_the_key_views_other_pixels():
    image = make_dicoh(image_size=96)
    pixel = make_dicoh(image_size=96, negatives="pixel")
    same_weights(pixel, image)
    views = hand_views(size=96)
    (o1, o2), (t1, t2) = embeddings(pixel, views)
    _, logs = pixel.training_step(views, 0)
    _, image_logs = image.training_step(views, 0)
    ones = torch.ones(2, 9, dtype=torch.bool)
    similar = (hand_local(o1[1], t2[1], brute_argmax(o1[0], t2[0]), ones, 0.2, 75)
               + hand_local(o2[1], t1[1], brute_argmax(o2[0], t1[0]), ones, 0.2, 75)) / 2
    assert logs["loss_similar"].item() == pytest.approx(similar.item(), rel=1e-4)
    assert logs["loss_similar"].item() != pytest.approx(image_logs["loss_similar"].item(), rel=1e-3)
    zq, zk = o1[1].flatten(2).transpose(1, 2), t2[1].flatten(2).transpose(1, 2)
    index = torch.zeros(2, 9, dtype=torch.long)
    negatives = pixel.pixel_negatives(zq, zk, index)
    assert negatives.shape == (2, 9, 2)  # ceil(0.25 · 8 other pixels)
    positive_sim = torch.einsum("bnd,bd->bn", zq, zk[:, 0])
    assert not torch.isclose(negatives, positive_sim[..., None]).any()  # the positive pixel is never picked


def test_percentile_override_changes_the_selected_negatives():
    methods = {p: make_dicoh(percentile=p) for p in (0, 50, 75)}
    views = hand_views()
    zq = embeddings(methods[0], views)[0][0][1].flatten(2).transpose(1, 2)
    local = {}
    for p, method in methods.items():
        same_weights(method, methods[0])
        set_queue(method, seed=5)
        exclude = method.queue.exclusion_mask(views.image_ids)
        kept = {0: 64, 50: 32, 75: 16}[p]
        assert method.image_negatives(zq, method.queue.keys, exclude).shape == (2, 4, kept)
        local[p] = method.training_step(views, 0)[1]["loss_local"].item()
    # fewer (harder) negatives in the denominator → a smaller loss; all keys → the largest
    assert local[0] > local[50] > local[75]


def test_positives_override_selects_the_terms():
    base = make_dicoh()
    views = hand_views()
    logs = {}
    for kind in ("spatial", "similar", "both"):
        method = make_dicoh(positives=kind)
        same_weights(method, base)
        logs[kind] = method.training_step(views, 0)[1]
    assert "loss_similar" not in logs["spatial"] and "loss_spatial" not in logs["similar"]
    assert logs["spatial"]["loss_local"] == logs["spatial"]["loss_spatial"]
    assert logs["similar"]["loss_local"] == logs["similar"]["loss_similar"]
    torch.testing.assert_close(logs["both"]["loss_local"], logs["spatial"]["loss_spatial"]
                               + logs["similar"]["loss_similar"])
    assert logs["spatial"]["loss_spatial"] != logs["similar"]["loss_similar"]


def test_queue_override_sets_the_buffer_size():
    assert make_dicoh(queue=16).queue.keys.shape == (16, 128)
    assert make_dicoh(queue=16).queue.ids.shape == (16,)
    assert make_dicoh(queue=4096).queue.keys.shape == (64, 128)  # capped at the pool of 64 images
    assert "queue.keys" in make_dicoh(queue=16).state_dict()  # persistent buffer


# --- architecture ablations ---------------------------------------------------------------------------

def test_symmetric_has_no_predictor_and_asymmetric_has_one():
    sym, asym = make_dicoh(), make_dicoh(predictor="asym")
    assert sym.predictor is None and not any(n.startswith("predictor") for n, _ in sym.named_parameters())
    convs = [m for m in asym.predictor.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(128, 2048, (1, 1)),
                                                                               (2048, 128, (1, 1))]
    same_weights(asym, sym)
    views = hand_views()
    loss_sym, _ = sym.training_step(views, 0)
    loss_asym, _ = asym.training_step(views, 0)
    assert loss_sym.item() != pytest.approx(loss_asym.item(), rel=1e-3)
    loss_asym.backward()
    assert all(p.grad is not None for p in asym.predictor.parameters())
    assert all(online is not asym.predictor for online, _ in asym.momentum_pairs())  # no target predictor
    (o1, _), _ = embeddings(asym, views)  # the global q is the pool of the predicted pixel embeddings
    torch.testing.assert_close(asym.embed_online(views.x1)[2], pooled_embedding(o1[1]), rtol=1e-5, atol=1e-6)


def test_separate_global_projector_changes_q_k_and_the_global_term_only():
    shared, separate = make_dicoh(), make_dicoh(global_projector="separate")
    same_weights(separate, shared)
    assert shared.global_head is None and separate.global_head is not None
    assert (separate.global_head, separate.target_global_head) in separate.momentum_pairs()
    views = hand_views()
    h, z, q = separate.embed_online(views.x1)
    with torch.no_grad():
        expected_q = F.normalize(separate.global_head(h.mean(dim=(2, 3))), dim=1)
        pooled = separate.target_backbone(views.x2)[-1].mean((2, 3))
        expected_k = F.normalize(separate.target_global_head(pooled), dim=1)
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(q, pooled_embedding(z))
    _, logs_shared = shared.training_step(views, 0)
    _, logs_sep = separate.training_step(views, 0)
    assert logs_sep["loss_global"].item() != pytest.approx(logs_shared["loss_global"].item(), rel=1e-3)
    assert logs_sep["loss_spatial"].item() == pytest.approx(logs_shared["loss_spatial"].item(), rel=1e-5)
    torch.testing.assert_close(separate.queue.keys[2:4], expected_k, rtol=1e-5, atol=1e-6)  # holds its k


def test_momentum_override_and_target_moves_only_by_ema():
    for momentum, overrides in ((0.99, {}), (0.9, {"momentum": 0.9, "global_projector": "separate"})):
        method = make_dicoh(**overrides)
        assert method.momentum_at(0) == pytest.approx(momentum)
        assert method.momentum_at(10) == pytest.approx(1.0)
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
        pairs = method.momentum_pairs()
        target_before = [[p.clone() for p in target.parameters()] for _, target in pairs]
        online_before = [p.clone() for p in method.backbone.parameters()]
        loss, _ = method.step(hand_views(), 0)
        optimizer.zero_grad()
        loss.backward()
        for _, target in pairs:
            assert all(p.grad is None and not p.requires_grad for p in target.parameters())
        optimizer.step()
        method.after_optimizer_step(0)
        m = cosine_momentum(momentum, 0, 10)
        online_after = method.backbone.parameters()
        assert any(not torch.equal(a, b) for a, b in zip(online_before, online_after, strict=True))
        for (online, target), before in zip(pairs, target_before, strict=True):
            for b, o, t in zip(before, online.parameters(), target.parameters(), strict=True):
                torch.testing.assert_close(t, m * b + (1 - m) * o)


def test_shuffle_bn_runs_the_target_in_sub_batches():
    method = make_dicoh(shuffle_bn="true")
    x = hand_views(b=4).x1
    method.eval()  # running statistics: shuffling must be undone exactly
    plain = method._target_forward(x)
    shuffled = method.embed_target(x)
    for a, b in zip(plain, shuffled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    method.train()  # batch statistics of 2 chunks of 2 differ from those of the whole batch
    torch.manual_seed(0)
    perm = torch.randperm(4)
    torch.manual_seed(0)
    _, _, k = method.embed_target(x)
    with torch.no_grad():
        chunks = [method._target_forward(part)[2] for part in x[perm].chunk(2)]
    torch.testing.assert_close(k, torch.cat(chunks)[torch.argsort(perm)], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(k, method._target_forward(x)[2], atol=1e-4)


# --- contracts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,cells", [(64, 2), (96, 3)])
def test_shapes_at_two_resolutions(size, cells):
    method = make_dicoh(image_size=size)
    views = hand_views(size=size)
    h, z, q = method.embed_online(views.x1)
    assert h.shape == (2, 512, cells, cells) and z.shape == (2, 128, cells, cells) and q.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, cells, cells))
    _, zk, k = method.embed_target(views.x2)
    assert zk.shape == z.shape and k.shape == q.shape and not k.requires_grad
    loss, logs = method.training_step(views, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert {"loss", "loss_global", "loss_local", "loss_spatial", "loss_similar", "std"} <= set(logs)
    assert logs["spatial_valid"].item() == 1.0  # identical full boxes: every cell has its twin


def test_export_is_the_online_backbone_and_loads_strictly():
    from bench.models import SegmentationModel, create_backbone

    method = make_dicoh()
    state = method.export()
    assert set(state) == {"backbone"}
    model = SegmentationModel(create_backbone("resnet18", output_stride=16))
    model.backbone.load_state_dict(state["backbone"], strict=True)


def test_short_run_lowers_the_loss():
    """20 steps of the real pipeline (dicoh views, shuffle-BN, queue, SGD) on 16 small images.

    The target is frozen (momentum=1, a valid override) and the queue starts full of real keys: with a
    moving EMA target and a queue refreshed every two steps, a 20-step run on 16 images is dominated by
    stale-key effects (random initial keys are easy negatives), so only a stationary objective shows
    whether the online branch descends the DiCoH loss (global + spatial + similar with hard negatives).
    """
    torch.manual_seed(0)
    images = random_images(n=16, size=48, seed=0)
    method = make_dicoh(batch_size=4, pool_size=16, image_size=48, total_steps=20, shuffle_bn="true",
                        momentum=1.0)
    with torch.no_grad():
        method.enqueue(method.embed_target(to_input(images))[2], torch.arange(16))
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.02)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(20):
        ids = torch.arange(4) + 4 * (step % 4)
        views = method.make_views(images[ids], ids, generator)
        loss, _ = method.step(views, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
