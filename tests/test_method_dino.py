"""DINO's defining properties: a momentum teacher that sees only the two global crops, a student that sees
global and local crops, the centred and sharpened cross-entropy over pairs of *different* crops, the centre's
EMA, and the frozen last layer at the start."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.methods import build_method, parse_method
from bench.methods.base import cosine_momentum
from tests.conftest import random_images, tiny_backbone, tiny_context

SMALL = "dino:out_dim=32,hidden_dim=64,bottleneck_dim=16,local_crops=2"


def make(text: str = SMALL, total_steps: int = 10):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone, total_steps=total_steps)).train()


def views_for(method, b: int = 4):
    return method.make_views(random_images(b, 64), torch.arange(b), torch.Generator().manual_seed(0))


def dino_by_hand(teacher: list[torch.Tensor], student: list[torch.Tensor], center: torch.Tensor, tt: float,
                 ts: float) -> torch.Tensor:
    """Mean over (teacher crop i, student crop j ≠ i) of −Σ softmax((t − c)/τ_t)·log softmax(s/τ_s), batch-averaged."""
    terms = []
    for i, t in enumerate(teacher):
        p = F.softmax((t - center) / tt, dim=-1)
        for j, s in enumerate(student):
            if i != j:
                terms.append(-(p * F.log_softmax(s / ts, dim=-1)).sum(-1).mean())
    return torch.stack(terms).mean()


def test_defaults():
    spec = parse_method("dino")
    assert spec.cfg == {"momentum": 0.996, "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256,
                        "teacher_temperature": 0.04, "student_temperature": 0.1, "center_momentum": 0.9,
                        "local_crops": 8,
                        "freeze_last_layer": 0.01, "norm_last_layer": True}
    assert spec.cls.recipe.view1.scale == (0.14, 1.0) and spec.cls.recipe.view2.solarize_p == 0.2


def test_loss_by_hand_two_prototypes():
    """K = 2, one image, two global crops and one local crop: four (teacher, student) pairs."""
    method = make("dino:out_dim=2,hidden_dim=8,bottleneck_dim=4,local_crops=1")
    t1, t2 = torch.tensor([[0.02, 0.0]]), torch.tensor([[0.0, 0.04]])
    s1, s2, s3 = torch.tensor([[0.1, 0.0]]), torch.tensor([[0.0, 0.2]]), torch.tensor([[0.3, 0.0]])

    def softmax2(a, b):
        return math.exp(a) / (math.exp(a) + math.exp(b))

    def ce(t, s):  # teacher probabilities at τ 0.04, student log-probabilities at τ 0.1
        p0 = softmax2(t[0] / 0.04, t[1] / 0.04)
        q0 = softmax2(s[0] / 0.1, s[1] / 0.1)
        return -(p0 * math.log(q0) + (1 - p0) * math.log(1 - q0))

    t, s = [[0.02, 0.0], [0.0, 0.04]], [[0.1, 0.0], [0.0, 0.2], [0.3, 0.0]]
    expected = (ce(t[0], s[1]) + ce(t[0], s[2]) + ce(t[1], s[0]) + ce(t[1], s[2])) / 4
    loss = method.criterion([t1, t2], [s1, s2, s3], teacher_temp=0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the centre moves by EMA towards the teacher's batch mean, after the loss
    torch.testing.assert_close(method.criterion.center.flatten(), 0.1 * torch.tensor([0.01, 0.02]))


def test_teacher_sees_global_crops_only_and_student_all():
    method = make()
    views = views_for(method)
    assert views.local.shape == (2 * 4, 3, round(64 * 96 / 224), round(64 * 96 / 224))
    seen = {"teacher": [], "student": []}
    method.teacher_backbone.register_forward_pre_hook(lambda m, a: seen["teacher"].append(tuple(a[0].shape)))
    method.backbone.register_forward_pre_hook(lambda m, a: seen["student"].append(tuple(a[0].shape)))
    method.training_step(views, 0)
    assert seen["teacher"] == [(8, 3, 64, 64)]  # both global crops, one batch
    assert seen["student"] == [(8, 3, 64, 64), (8, 3, 27, 27)]  # globals, then all local crops


def test_training_step_matches_the_formula_on_recomputed_outputs():
    torch.manual_seed(0)
    method = make()
    views = views_for(method)
    method.criterion.center.fill_(0.05)
    center = method.criterion.center.clone().flatten()
    loss, logs = method.training_step(views, 5)
    with torch.no_grad():
        glob = torch.cat([views.x1, views.x2])
        t = method.teacher_head(method.teacher_backbone(glob)[-1].mean((2, 3))).chunk(2)
        s = list(method.head(method.backbone(glob)[-1].mean((2, 3))).chunk(2))
        s += list(method.head(method.backbone(views.local)[-1].mean((2, 3))).chunk(2))
    expected = dino_by_hand(list(t), s, center, 0.04, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert 0 <= logs["teacher_entropy"] <= math.log(32) + 1e-4


def test_last_layer_frozen_at_first_and_teacher_moves_by_ema():
    method = make(SMALL + ",freeze_last_layer=0.2", total_steps=10)  # frozen for steps 0 and 1
    views = views_for(method)
    loss, _ = method.step(views, 0)
    loss.backward()
    assert method.head.last_layer.weight_v.grad is None
    assert method.head.layers[0].weight.grad is not None
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    assert all(p.grad is None for p in method.teacher_head.parameters())
    method.zero_grad()
    loss, _ = method.step(views, 2)
    loss.backward()
    assert method.head.last_layer.weight_v.grad is not None
    before = [p.detach().clone() for p in method.teacher_head.parameters()]
    with torch.no_grad():
        for p in method.head.parameters():
            p.add_(0.01)
    method.after_optimizer_step(2)
    m = cosine_momentum(0.996, 2, 10)
    for old, online, target in zip(before, method.head.parameters(), method.teacher_head.parameters(), strict=True):
        torch.testing.assert_close(target, m * old + (1 - m) * online)


def test_loss_is_computed_in_full_precision_under_autocast():
    method = make()
    views = views_for(method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = method.training_step(views, 5)
    assert loss.dtype == torch.float32 and logs["teacher_entropy"].dtype == torch.float32
