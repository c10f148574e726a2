"""BYOL's defining properties: target gets no gradients and moves only by EMA with the cosine
schedule, the loss is the symmetric 2 − 2·cos, and it is registered with its paper's defaults."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.augment import Views
from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.base import cosine_momentum
from bench.methods.byol import byol_loss
from tests.conftest import tiny_backbone, tiny_context


def hand_views(b: int = 4, size: int = 64, seed: int = 0) -> Views:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(b, 3, size, size, generator=g)
    x2 = torch.randn(b, 3, size, size, generator=g)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1)
    flips = torch.zeros(b, dtype=torch.bool)
    return Views(x1, x2, box, box.clone(), flips, flips.clone(), torch.arange(b))


def make_byol(**overrides):
    text = "byol" + ("" if not overrides else ":" + ",".join(f"{k}={v}" for k, v in overrides.items()))
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone, total_steps=10))


def test_loss_is_symmetric_negative_cosine_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # cosines: 1/sqrt(2) and -1 → mean of 2 − 2·cos = ((2 − sqrt(2)) + 4) / 2
    expected = ((2 - math.sqrt(2)) + 4) / 2
    assert byol_loss(p, z).item() == pytest.approx(expected, rel=1e-6)
    z.requires_grad_(True)
    byol_loss(p.requires_grad_(True), z).backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0  # the target is detached


def test_training_step_is_sum_of_both_directions():
    torch.manual_seed(0)
    method = make_byol()
    views = hand_views()
    loss, logs = method.training_step(views, 0)
    with torch.no_grad():
        z1 = method.projector(method.backbone(views.x1)[-1].mean((2, 3)))
        z2 = method.projector(method.backbone(views.x2)[-1].mean((2, 3)))
        p1, p2 = method.predictor(z1), method.predictor(z2)
        t1 = method.target_projector(method.target_backbone(views.x1)[-1].mean((2, 3)))
        t2 = method.target_projector(method.target_backbone(views.x2)[-1].mean((2, 3)))
    expected = (2 - 2 * F.cosine_similarity(p1, t2).mean()) + (2 - 2 * F.cosine_similarity(p2, t1).mean())
    # BN in train mode uses batch statistics both times, so the recomputation matches
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert "std" in logs


def test_target_gets_no_gradient_and_moves_only_by_ema():
    method = make_byol()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    online_before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    target_before = [p.clone() for p in method.target_backbone.parameters()]
    loss, _ = method.step(hand_views(), 0)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(p.grad is None for p in method.target_projector.parameters())
    optimizer.step()
    method.after_optimizer_step(0)
    m = cosine_momentum(0.99, 0, 10)
    assert m == pytest.approx(0.99)
    changed = any(not torch.equal(online_before[k], v) for k, v in method.backbone.state_dict().items())
    assert changed, "one SGD step must change the online weights"
    for before, online, target in zip(target_before, method.backbone.parameters(),
                                      method.target_backbone.parameters(), strict=True):
        torch.testing.assert_close(target, m * before + (1 - m) * online)


def test_cosine_momentum_schedule_goes_from_base_to_one():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)


def test_defaults_and_overrides():
    spec = parse_method("byol:momentum=0.996")
    assert spec.cfg["momentum"] == 0.996 and spec.label == "byol[momentum=0.996]"
    assert parse_method("byol").cfg["proj_dim"] == 256
    with pytest.raises(BenchError, match="valid: momentum"):
        parse_method("byol:bogus=1")
    with pytest.raises(BenchError, match="did you mean byol"):
        parse_method("byoll")
    method = make_byol(momentum=0.996)
    assert method.momentum_at(0) == pytest.approx(0.996)


def test_export_is_the_online_backbone_and_loads_strictly():
    from bench.models import SegmentationModel, create_backbone

    method = make_byol()
    state = method.export()
    assert set(state) == {"backbone"}
    model = SegmentationModel(create_backbone("resnet18", output_stride=16))
    model.backbone.load_state_dict(state["backbone"], strict=True)
    key = next(iter(state["backbone"]))
    torch.testing.assert_close(state["backbone"][key], method.backbone.state_dict()[key])
