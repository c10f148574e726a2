"""SimSiam's defining properties: the symmetric −cos loss with a stop-gradient on the targets (no momentum
encoder, no negatives), its projector/predictor shapes, MoCo v2 views and its defaults."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.augment import Views
from bench.methods import build_method, parse_method
from bench.methods.simsiam import simsiam_loss
from tests.conftest import tiny_backbone, tiny_context


def make(text: str = "simsiam:proj_dim=64,pred_hidden_dim=16"):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone)).train()


def hand_views(b: int = 4, size: int = 64) -> Views:
    g = torch.Generator().manual_seed(0)
    box, flip = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1), torch.zeros(b, dtype=torch.bool)
    return Views(torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g), box, box,
                 flip, flip, torch.arange(b))


def test_defaults_and_heads():
    spec = parse_method("simsiam")
    assert spec.cfg == {"proj_dim": 2048, "pred_hidden_dim": 512} and spec.cls.recipe == "mocov2"
    assert spec.cls.group == "global non-contrastive"
    method = make("simsiam")
    linears = [(m.in_features, m.out_features) for m in method.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(512, 2048), (2048, 2048), (2048, 2048)]
    bns = [m for m in method.projector.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 3 and not bns[-1].affine  # BN on every layer, the output BN without affine
    linears = [(m.in_features, m.out_features) for m in method.predictor.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(2048, 512), (512, 2048)]  # bottleneck predictor
    assert not method.momentum_pairs()


def test_loss_by_hand_and_stop_gradient():
    p1, p2 = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 3.0]], requires_grad=True)
    z1, z2 = torch.tensor([[1.0, 1.0]], requires_grad=True), torch.tensor([[0.0, -2.0]], requires_grad=True)
    # D(p1, z2) = −cos(90°) = 0; D(p2, z1) = −cos(45°) = −1/√2 → L = ½·0 + ½·(−1/√2)
    loss = simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(-0.5 / math.sqrt(2), rel=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p2.grad is not None  # stop-gradient on the targets only


def test_training_step_matches_recomputation():
    torch.manual_seed(0)
    method = make()
    views = hand_views()
    loss, logs = method.training_step(views, 0)
    with torch.no_grad():
        z1 = method.projector(method.backbone(views.x1)[-1].mean((2, 3)))
        z2 = method.projector(method.backbone(views.x2)[-1].mean((2, 3)))
        p1, p2 = method.predictor(z1), method.predictor(z2)
    expected = -0.5 * F.cosine_similarity(p1, z2).mean() - 0.5 * F.cosine_similarity(p2, z1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert -1.0 <= loss.item() <= 1.0 and "std" in logs
