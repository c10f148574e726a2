"""SimMIM's defining properties: ceil(g²·r) random patches masked and replaced by a learned token at the
input (the encoder never sees their content), a one-layer pixel-shuffle head from the last stage, and L1 on
the masked pixels only."""

from __future__ import annotations

import pytest
import torch

from bench.methods import build_method, parse_method
from bench.methods.simmim import MaskedViews, masked_l1, random_patch_mask
from tests.conftest import random_images, tiny_backbone, tiny_context


def make(text: str = "simmim", image_size: int = 64):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone, image_size=image_size)).train()


def test_defaults_grid_and_head():
    spec = parse_method("simmim")
    assert spec.cfg == {"mask_ratio": 0.6, "mask_patch": 32} and spec.cls.group == "masked modelling"
    method = make()
    assert method.grid == 7 and method.stride == 32  # 32 px patches at 224 px: a 7×7 grid at any size
    x = torch.randn(2, 3, 64, 64)
    assert method.decoder(method.backbone(x)[-1]).shape == x.shape  # 1×1 conv + pixel shuffle to full size


def test_mask_has_exactly_ceil_of_the_ratio():
    mask = random_patch_mask(5, 7, 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 7, 7) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [30] * 5  # ceil(49 · 0.6) = 30
    assert not torch.equal(mask[0], mask[1])


def test_masked_l1_by_hand():
    x = torch.zeros(1, 3, 2, 2)
    rec = torch.zeros(1, 3, 2, 2)
    rec[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # masked pixel: |error| 1, 2, 3
    rec[0, :, 1, 1] = 100.0  # unmasked pixel: ignored
    m = torch.zeros(1, 1, 2, 2)
    m[0, 0, 0, 0] = 1.0
    assert masked_l1(x, rec, m).item() == pytest.approx((1 + 2 + 3) / 3, rel=1e-5)


def test_encoder_sees_the_token_not_the_masked_content_and_loss_is_on_masked_pixels():
    torch.manual_seed(0)
    method = make()
    views = method.make_views(random_images(2, 64), torch.arange(2), torch.Generator().manual_seed(0))
    assert isinstance(views, MaskedViews) and views.mask.shape == (2, 7, 7)
    seen = []
    method.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    loss, logs = method.training_step(views, 0)
    m = method.pixel_mask(views.mask, (64, 64))
    token = method.mask_token.detach().expand(2, 3, 64, 64)
    torch.testing.assert_close(seen[0], torch.where(m.bool(), token, views.x1))
    assert 0.55 < logs["masked"].item() < 0.68
    changed = views.x1.clone()
    changed[m.expand_as(changed).bool()] = 5.0  # different content under the mask only
    views.x1 = changed
    views.x2 = changed
    method.training_step(views, 1)
    torch.testing.assert_close(seen[1], seen[0])  # the encoder's input is unchanged
    with torch.no_grad():
        rec = method.decoder(method.backbone(seen[0])[-1])
        expected = masked_l1(views.x1, rec, m)
    assert method.training_step(views, 2)[0].item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
