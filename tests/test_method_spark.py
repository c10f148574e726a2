"""SparK's defining properties: masked 32-px cells stay empty through every stage of the (dense-emulated)
sparse encoder, BatchNorm statistics come from the active positions only, the hierarchical decoder is fed
every stage, and the loss is the per-patch-normalised MSE on the masked patches."""

from __future__ import annotations

import pytest
import torch

from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.spark import active_at, keep_count, random_active, spark_loss
from tests.conftest import random_images, tiny_backbone, tiny_context


def make(text: str = "spark:decoder_width=64", image_size: int = 64):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone, image_size=image_size)).train()


def test_defaults_grid_and_keep_count():
    spec = parse_method("spark")
    assert spec.cfg == {"mask_ratio": 0.6, "decoder_width": 768} and spec.cls.group == "masked modelling"
    assert keep_count(49, 0.6) == 20 and keep_count(4, 0.6) == 2 and keep_count(4, 0.99) == 1
    method = make(image_size=96)
    assert (method.grid, method.patch, method.levels) == (3, 32, [1, 2, 3, 4])  # 32 px cells, C2..C5
    assert len(method.decoder.dec) == 5  # stride 32 = 2⁵
    assert make(image_size=32).patch == 16  # below 64 px: 2×2 cells of size/2
    active = random_active(6, 7, 0.6, torch.Generator().manual_seed(0))
    assert active.shape == (6, 1, 7, 7) and active.flatten(1).sum(1).tolist() == [20] * 6
    with pytest.raises(BenchError, match="multiple of 32"):
        make(image_size=48)


def test_loss_by_hand():
    x = torch.zeros(1, 1, 2, 4)
    x[0, 0, :, :2] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # patch A (masked): mean 1.5, unbiased var 5/3
    x[0, 0, :, 2:] = torch.tensor([[7.0, 7.0], [9.0, 1.0]])  # patch B (active): ignored
    rec = torch.zeros_like(x)
    rec[0, 0, :, 2:] = 50.0
    active = torch.tensor([[[[False, True]]]])
    var = 5.0 / 3.0
    expected = sum((v - 1.5) ** 2 for v in (0.0, 1.0, 2.0, 3.0)) / (var + 1e-6) / 4  # ≈ 3/4
    assert spark_loss(x, rec, active, 2).item() == pytest.approx(expected, rel=1e-6)


def test_masked_cells_stay_empty_and_their_content_never_matters():
    torch.manual_seed(0)
    method = make()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    active = torch.tensor([[[[True, False], [False, True]]], [[[False, True], [True, False]]],
                           [[[True, True], [False, False]]]])
    features = method.encode(x, active)
    for f in features:  # C2..C5: exactly zero at every masked position
        keep = active_at(active, f.shape[2], f.shape[3]).float()
        assert torch.count_nonzero(f * (1 - keep)) == 0
        assert torch.count_nonzero(f * keep) > 0
    other = torch.where(active_at(active, 64, 64), x, torch.randn_like(x) * 10)
    for f, g in zip(features, method.encode(other, active), strict=True):
        torch.testing.assert_close(f, g)  # the masked pixels' content changes nothing


def test_batch_norm_statistics_come_from_active_positions_only():
    method = make()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    active = torch.tensor([[[[True, False], [False, False]]], [[[False, False], [True, True]]]])
    captured = []
    handle = method.backbone.conv1.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    method.encode(x, active)
    handle.remove()
    conv = captured[0] * active_at(active, 32, 32)  # the (re-masked) stem output that bn1 normalises
    where = active_at(active, 32, 32)[:, 0]
    rows = conv.permute(0, 2, 3, 1)[where]
    torch.testing.assert_close(method.backbone.bn1.running_mean, 0.1 * rows.mean(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(method.backbone.bn1.running_mean, 0.1 * conv.mean((0, 2, 3)), atol=1e-4)
    assert "forward" not in vars(method.backbone.bn1)  # the plain BN forward is back after encoding
    assert not method.backbone.conv1._forward_hooks


def test_training_step_and_export():
    torch.manual_seed(0)
    method = make()
    views = method.make_views(random_images(2, 64), torch.arange(2), torch.Generator().manual_seed(0))
    assert views.mask.shape == (2, 2, 2) and views.mask.flatten(1).sum(1).tolist() == [2, 2]
    loss, logs = method.training_step(views, 0)
    active = ~views.mask[:, None]
    with torch.no_grad():
        rec = method.decoder(method.densify(method.encode(views.x1, active), active))
    assert rec.shape == views.x1.shape
    assert loss.item() == pytest.approx(spark_loss(views.x1, rec, active, 32).item(), rel=1e-4)
    loss.backward()
    assert all(t.grad is not None for t in method.mask_tokens)
    from bench.models import create_backbone

    create_backbone("resnet18").load_state_dict(method.export()["backbone"], strict=True)
