"""SimCLR's defining properties: NT-Xent over the 2B views of a batch (the other view is the positive, the
other 2B − 2 views the negatives), both views in one encoder batch, its augmentation and defaults."""

from __future__ import annotations

import math

import pytest
import torch

from bench.augment import Views
from bench.methods import build_method, parse_method
from tests.conftest import random_images, tiny_backbone, tiny_context


def make(text: str = "simclr", image_size: int = 64):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone, image_size=image_size)).train()


def nt_xent_by_hand(z1: list[list[float]], z2: list[list[float]], tau: float) -> float:
    """Eq. 1 of the paper written out: mean over the 2B anchors of −log e^{s⁺/τ} / Σ_{k≠anchor} e^{s_k/τ}."""
    def unit(v):
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    views = [unit(v) for v in z1] + [unit(v) for v in z2]
    b = len(z1)
    total = 0.0
    for i, anchor in enumerate(views):
        positive = (i + b) % (2 * b)
        sims = {k: sum(a * c for a, c in zip(anchor, other, strict=True)) / tau
                for k, other in enumerate(views) if k != i}
        total += -(sims[positive] - math.log(sum(math.exp(s) for s in sims.values())))
    return total / (2 * b)


def test_defaults_group_and_recipe():
    spec = parse_method("simclr")
    assert spec.cfg == {"temperature": 0.1, "hidden_dim": 2048, "proj_dim": 128}
    recipe = spec.cls.recipe
    assert recipe.view1 == recipe.view2  # symmetric augmentation
    view = recipe.view1
    assert (view.brightness, view.contrast, view.saturation, view.hue, view.jitter_p) == (0.8, 0.8, 0.8, 0.2, 0.8)
    assert (view.scale, view.gray_p, view.blur_p) == ((0.08, 1.0), 0.2, 0.5)
    assert spec.cls.group == "global contrastive"


def test_nt_xent_matches_the_hand_computation():
    z1 = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    z2 = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]
    method = make("simclr:temperature=0.5")
    expected = nt_xent_by_hand(z1, z2, 0.5)
    assert method.criterion(torch.tensor(z1), torch.tensor(z2)).item() == pytest.approx(expected, rel=1e-5)


def test_training_step_is_nt_xent_of_both_views_in_one_batch():
    torch.manual_seed(0)
    method = make()
    g = torch.Generator().manual_seed(0)
    views = method.make_views(random_images(4, 64), torch.arange(4), g)
    loss, logs = method.training_step(views, 0)
    with torch.no_grad():  # one forward of 2B images: BN statistics over both views
        z = method.projector(method.backbone(torch.cat([views.x1, views.x2]))[-1].mean((2, 3)))
    expected = nt_xent_by_hand(z[:4].tolist(), z[4:].tolist(), 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert 0 < logs["std"] < 1 and loss.requires_grad


def test_identical_views_give_lower_loss_than_unrelated_ones():
    method = make()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    box, flip = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1), torch.zeros(4, dtype=torch.bool)
    same = Views(x, x.clone(), box, box, flip, flip, torch.arange(4))
    other = Views(x, torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)), box, box, flip, flip,
                  torch.arange(4))
    assert method.training_step(same, 0)[0].item() < method.training_step(other, 0)[0].item()
