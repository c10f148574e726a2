"""PixPro (bench/methods/pixpro.py): EMA rule, no target gradient, positives from crop geometry, PPM
against a brute-force loop, loss by hand, shapes, and a short run that lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_images, tiny_backbone, tiny_context

from bench.augment import Views, make_views
from bench.errors import BenchError
from bench.geometry import positive_pairs
from bench.methods import build_method, parse_method
from bench.methods.pixpro import pixpro_loss, propagate


def build(spec: str = "pixpro", batch_size: int = 4, image_size: int = 64, total_steps: int = 10):
    backbone = tiny_backbone()
    ctx = tiny_context(backbone, batch_size=batch_size, total_steps=total_steps, image_size=image_size)
    return build_method(parse_method(spec), backbone, ctx)


def hand_views(b: int = 4, size: int = 64, seed: int = 0, same: bool = False) -> Views:
    """Views built by hand: view 1 = the full image, view 2 = its left half (both unflipped)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, 3, size, size, generator=g)
    x2 = x1.clone() if same else torch.randn(b, 3, size, size, generator=g)
    box1 = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1)
    box2 = box1.clone() if same else torch.tensor([[0.0, 0.0, 0.5, 1.0]]).repeat(b, 1)
    no_flip = torch.zeros(b, dtype=torch.bool)
    return Views(x1=x1, x2=x2, box1=box1, box2=box2, flip1=no_flip, flip2=no_flip.clone(),
                 image_ids=torch.arange(b), source_size=(size, size))


# --- registry -----------------------------------------------------------------------------------

def test_parse_defaults_and_bogus_key():
    spec = parse_method("pixpro")
    assert spec.cfg == {"momentum": 0.99, "gamma": 2.0, "threshold": 0.7, "proj_dim": 256,
                        "hidden_dim": 4096, "instance": False, "instance_weight": 1.0}
    with pytest.raises(BenchError, match="valid: momentum=.*threshold=.*instance_weight"):
        parse_method("pixpro:bogus=1")


# --- geometry -----------------------------------------------------------------------------------

def test_positive_mask_matches_hand_computed_boxes():
    # Source 64×64, view 1 = full image, view 2 = its left 32 columns, 2×2 grid. Official coordinates
    # x/(W−1): view 1 spans x 0..63/63 = 1, view 2 x 0..31/63 = .4921. Centres (x, y): view 1 (.25|.75,
    # .25|.75), view 2 (.1230|.3690, .25|.75). Bin diagonals: view 1 √(.5²+.5²) = .7071, view 2
    # √(.2460²+.5²) = .5573; the larger is .7071, so T = 0.7 means distance < .495. Same row: .25 vs
    # .1230/.3690 → positive, .75 vs .3690 (.381) positive, .75 vs .1230 (.627) negative; across rows
    # ≥ .5 → negative.
    method = build()
    views = hand_views()
    expected = torch.tensor([[1, 1, 0, 0],
                             [0, 1, 0, 0],
                             [0, 0, 1, 1],
                             [0, 0, 0, 1]], dtype=torch.bool)
    mask = method.positive_mask(views, 2, 2)
    assert mask.shape == (4, 4, 4)
    assert torch.equal(mask[0], expected)
    assert torch.equal(method.positive_mask(views, 2, 2, reverse=True)[0], expected.t())
    # Flipping view 2 mirrors its columns: column 0 now sits at x = .3690, column 1 at x = .1230.
    views.flip2[:] = True
    flipped = torch.tensor([[1, 1, 0, 0],
                            [1, 0, 0, 0],
                            [0, 0, 1, 1],
                            [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(method.positive_mask(views, 2, 2)[0], flipped)
    # The method's threshold is used: at T = 0.8 (distance < .566) the cross-row pairs at .516 join.
    loose = build("pixpro:threshold=0.8").positive_mask(hand_views(), 2, 2)[0]
    assert torch.equal(loose, torch.tensor([[1, 1, 1, 1],
                                            [0, 1, 0, 0],
                                            [1, 1, 1, 1],
                                            [0, 0, 0, 1]], dtype=torch.bool))



def official_positive_mask(box1, flip1, box2, flip2, height, width, h, w, threshold):
    """PixPro's official code transcribed: ``RandomResizedCropCoord`` (coord of the crop's first and last
    pixel over W − 1, H − 1; a flip swaps x0 and x1) and ``regression_loss``'s centres and bin diagonals."""
    def coord(box, flip):
        j, i = box[:, 0] * width, box[:, 1] * height
        cw, ch = (box[:, 2] - box[:, 0]) * width, (box[:, 3] - box[:, 1]) * height
        c = torch.stack([j / (width - 1), i / (height - 1), (j + cw - 1) / (width - 1),
                         (i + ch - 1) / (height - 1)], dim=1).double()
        return torch.where(flip[:, None], c[:, [2, 1, 0, 3]], c)

    q, k = coord(box1, flip1), coord(box2, flip2)
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, -1).repeat(1, h, 1)
    ys = torch.arange(h, dtype=torch.float64).view(1, -1, 1).repeat(1, 1, w)
    qw, qh = ((q[:, 2] - q[:, 0]) / w).view(-1, 1, 1), ((q[:, 3] - q[:, 1]) / h).view(-1, 1, 1)
    kw, kh = ((k[:, 2] - k[:, 0]) / w).view(-1, 1, 1), ((k[:, 3] - k[:, 1]) / h).view(-1, 1, 1)
    diag = torch.max(torch.sqrt(qw**2 + qh**2), torch.sqrt(kw**2 + kh**2))
    qx, qy = (xs + 0.5) * qw + q[:, 0].view(-1, 1, 1), (ys + 0.5) * qh + q[:, 1].view(-1, 1, 1)
    kx, ky = (xs + 0.5) * kw + k[:, 0].view(-1, 1, 1), (ys + 0.5) * kh + k[:, 1].view(-1, 1, 1)
    dist = torch.sqrt((qx.view(-1, h * w, 1) - kx.view(-1, 1, h * w)) ** 2
                      + (qy.view(-1, h * w, 1) - ky.view(-1, 1, h * w)) ** 2) / diag
    return dist < threshold


def test_positive_mask_follows_the_official_coordinates():
    """On real crops of a small source the mask is the official code's, which differs from x/W edges."""
    method = build()
    images = random_images(64, 12, seed=5)  # a 12×12 source: the W − 1 convention matters most
    views = make_views(images, "byol", 64, torch.Generator().manual_seed(0))
    assert views.source_size == (12, 12)
    for reverse in (False, True):
        first = (views.box1, views.flip1, views.box2, views.flip2)
        if reverse:
            first = (views.box2, views.flip2, views.box1, views.flip1)
        expected = official_positive_mask(*first, 12, 12, 3, 3, 0.7)
        assert torch.equal(method.positive_mask(views, 3, 3, reverse=reverse), expected)
    edges = positive_pairs(views.box1, views.flip1, views.box2, views.flip2, 3, 3, threshold=0.7)
    assert not torch.equal(edges, method.positive_mask(views, 3, 3))  # x/W would differ on some pairs


def test_positive_mask_needs_the_source_size():
    views = hand_views()
    views.source_size = None
    with pytest.raises(BenchError, match="source_size"):
        build().positive_mask(views, 2, 2)


# --- pixel propagation and loss ----------------------------------------------------------------

def brute_force_ppm(x: torch.Tensor, value: torch.Tensor, gamma: float) -> torch.Tensor:
    b, c, h, w = x.shape
    xs, vs = x.flatten(2), value.flatten(2)
    out = torch.zeros(b, c, h * w, dtype=torch.float64)
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                cos = torch.dot(xs[n, :, i], xs[n, :, j]) / (xs[n, :, i].norm() * xs[n, :, j].norm())
                out[n, :, i] += max(cos.item(), 0.0) ** gamma * vs[n, :, j] / vs[n, :, j].norm()
    return out.view(b, c, h, w)


def test_ppm_equals_brute_force_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    value = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(propagate(x, value, 2.0), brute_force_ppm(x, value, 2.0))
    method = build()
    ppm = method.ppm.double()
    proj = torch.randn(2, 256, 2, 3, dtype=torch.float64)
    expected = F.normalize(brute_force_ppm(proj, ppm.transform(proj), 2.0), dim=1)
    torch.testing.assert_close(ppm(proj), expected)


def test_pixpro_loss_by_hand():
    # Image 0: y = (e1, e2), target = (e1, (e1+e2)/√2); positives (0,0) and (1,1) → cos 1 and 1/√2,
    # mean (1 + .7071)/2. Image 1: no positives → 0 (counted in the batch mean).
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (B, C, N)
    r = 1 / math.sqrt(2)
    target = torch.tensor([[[1.0, r], [0.0, r]], [[1.0, r], [0.0, r]]])
    pos = torch.zeros(2, 2, 2, dtype=torch.bool)
    pos[0, 0, 0] = pos[0, 1, 1] = True
    expected = -2.0 * ((1.0 + r) / 2 * 2 / (2 + 1e-6) + 0.0) / 2
    torch.testing.assert_close(pixpro_loss(y, target, pos), torch.tensor(expected))


# --- training step ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["pixpro", "pixpro:instance=true"])
def test_step_updates_online_and_target_follows_ema(spec):
    method = build(spec)
    pairs = method.momentum_pairs()
    before = [[p.detach().clone() for p in t.parameters()] for _, t in pairs]
    online_before = [p.detach().clone() for p in method.backbone.parameters()]
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    loss, logs = method.step(hand_views(), 0)
    assert set(logs) >= {"loss", "std"} and torch.isfinite(loss)
    loss.backward()
    for _, target in pairs:
        assert all(p.grad is None for p in target.parameters())
    opt.step()
    method.after_optimizer_step(0)
    m = method.momentum_at(0)
    assert m == pytest.approx(0.99)
    online_after = method.backbone.parameters()
    assert any(not torch.equal(a, p) for a, p in zip(online_before, online_after, strict=True))
    moved = 0.0
    for (online, target), old in zip(pairs, before, strict=True):
        for p_old, p_on, p_tg in zip(old, online.parameters(), target.parameters(), strict=True):
            # exact up to float32 rounding (lightly fuses the multiply-add): 2 ulp
            torch.testing.assert_close(p_tg, p_old * m + p_on.detach() * (1 - m), rtol=2.5e-7, atol=1e-9)
            moved = max(moved, (p_tg - p_old).abs().max().item())
    assert moved > 1e-5  # the target did move (the check above is not vacuous)
    if "instance" in spec:
        assert len(pairs) == 3 and "loss_instance" in logs


def test_identical_positives_give_lower_loss_than_shuffled():
    # g is a random conv at init, so the PPM output is not aligned with the projection; with g = I
    # (the official transform_layer=0 variant) identical views must match better than other images'.
    method = build()
    with torch.no_grad():
        method.ppm.transform.weight.copy_(torch.eye(256)[:, :, None, None])
        method.ppm.transform.bias.zero_()
    images = random_images(4, 64, seed=1).float() / 255
    x = (images - 0.45) / 0.25
    same = hand_views(same=True)
    same.x1, same.x2 = x, x.clone()
    shuffled = hand_views(same=True)
    shuffled.x1, shuffled.x2 = x, x[torch.tensor([1, 2, 3, 0])]
    with torch.no_grad():
        loss_same, _ = method.step(same, 0)
        loss_shuffled, _ = method.step(shuffled, 0)
    assert loss_same < loss_shuffled - 0.05


@pytest.mark.parametrize("size,grid", [(64, 2), (96, 3)])
def test_shapes_at_two_resolutions(size, grid):
    method = build(image_size=size)
    views = hand_views(size=size)
    out = method._online(views.x1)
    assert out["proj"].shape == (4, 256, grid, grid)
    assert out["y"].shape == (4, 256, grid, grid)
    torch.testing.assert_close(out["y"].norm(dim=1), torch.ones(4, grid, grid))
    assert method._target(views.x2)["proj"].shape == (4, 256, grid, grid)
    assert method.positive_mask(views, grid, grid).shape == (4, grid * grid, grid * grid)
    loss, _ = method.step(views, 0)
    assert loss.shape == ()


def test_export_is_the_online_backbone_and_loads_strictly():
    from bench.models import create_backbone

    method = build()
    state = method.export()
    assert set(state) == {"backbone"}
    create_backbone("resnet18", output_stride=16).load_state_dict(state["backbone"], strict=True)
    assert torch.equal(state["backbone"]["conv1.weight"], method.backbone.conv1.weight.detach())


def test_short_run_lowers_the_loss():
    torch.manual_seed(0)
    method = build(batch_size=4, total_steps=12)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    images, ids = random_images(4, 64, seed=3), torch.arange(4)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(12):
        views = method.make_views(images, ids, g)
        loss, _ = method.step(views, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(step)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
