"""VICRegL's defining properties: local features matched across views by their **location in the source
image** (the project's crop geometry, flips included) and by feature distance, α-weighted with the global
VICReg criterion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import VICRegLLoss

from bench.augment import Views
from bench.methods import build_method, parse_method
from bench.methods.vicregl import GramVICRegLLoss, location_grid
from tests.conftest import tiny_backbone, tiny_context


def make(text: str = "vicregl:proj_dim=32,maps_dim=16"):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone)).train()


def hand_views(b: int = 4, size: int = 64, flip2: bool = False) -> Views:
    g = torch.Generator().manual_seed(0)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1)
    return Views(torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g), box,
                 box.clone(), torch.zeros(b, dtype=torch.bool), torch.full((b,), flip2), torch.arange(b))


def test_defaults():
    spec = parse_method("vicregl")
    assert spec.cfg == {"alpha": 0.75, "inv": 25.0, "var": 25.0, "cov": 1.0, "proj_dim": 8192, "maps_dim": 512,
                        "num_matches_1": 20, "num_matches_2": 4}
    assert spec.cls.group == "dense contrastive"


def test_location_grid_is_source_coordinates_with_flips():
    box = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    grid = location_grid(box, torch.tensor([False]), 2, 2)
    torch.testing.assert_close(grid[0, :, :, 0], torch.tensor([[0.125, 0.375], [0.125, 0.375]]))
    torch.testing.assert_close(grid[0, :, :, 1], torch.tensor([[0.25, 0.25], [0.75, 0.75]]))
    flipped = location_grid(box, torch.tensor([True]), 2, 2)
    torch.testing.assert_close(flipped[0, :, :, 0], torch.tensor([[0.375, 0.125], [0.375, 0.125]]))


def test_location_matching_pairs_the_same_source_point():
    """View 2 = view 1 mirrored: the location match of cell (r, c) is cell (r, w − 1 − c), so mirrored
    features match exactly (zero invariance) while ignoring the flip would pair different features."""
    method = make()
    b, h, w, d = 2, 3, 3, 5
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]]).repeat(b, 1)
    l1 = torch.randn(b, h, w, d, generator=torch.Generator().manual_seed(3))
    l2 = l1.flip(2)
    g1 = location_grid(box, torch.zeros(b, dtype=torch.bool), h, w).flatten(1, 2)
    g2 = location_grid(box, torch.ones(b, dtype=torch.bool), h, w).flatten(1, 2)
    a, matched = method.criterion._nearest_neighbors_on_grid(l1.flatten(1, 2), l2.flatten(1, 2), g1, g2, 9)
    torch.testing.assert_close(a, matched)
    unflipped = location_grid(box, torch.zeros(b, dtype=torch.bool), h, w).flatten(1, 2)
    a, matched = method.criterion._nearest_neighbors_on_grid(l1.flatten(1, 2), l2.flatten(1, 2), g1, unflipped, 9)
    assert not torch.allclose(a, matched)


def test_global_part_by_hand_when_alpha_is_one():
    torch.manual_seed(0)
    method = make("vicregl:proj_dim=32,maps_dim=16,alpha=1.0")
    views = hand_views()
    loss, _ = method.training_step(views, 0)
    with torch.no_grad():
        z1 = method.projector(method.backbone(views.x1)[-1].mean((2, 3)))
        z2 = method.projector(method.backbone(views.x2)[-1].mean((2, 3)))

    def var(z):
        return F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    def cov(z):
        c = torch.cov(z.t())
        return (c - torch.diag(torch.diagonal(c))).pow(2).sum() / z.shape[1]

    # VICRegL's global term averages variance and covariance over the views
    expected = 25 * F.mse_loss(z1, z2) + 25 * (var(z1) + var(z2)) / 2 + (cov(z1) + cov(z2)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_training_step_is_alpha_weighted_global_plus_local():
    torch.manual_seed(0)
    method = make()
    views = hand_views(flip2=True)
    loss, logs = method.training_step(views, 0)
    with torch.no_grad():
        (g1, l1), (g2, l2) = method.embed(views.x1), method.embed(views.x2)
        grids = [location_grid(views.box1, views.flip1, 2, 2), location_grid(views.box2, views.flip2, 2, 2)]
        features = [(g1, l1), (g2, l2)]
        glob = method.criterion._global_loss(features)
        local = method.criterion._local_loss(features, grids)
    assert loss.item() == pytest.approx((0.75 * glob + 0.25 * local).item(), rel=1e-4)
    assert l1.shape == (4, 2, 2, 16) and "local_std" in logs


def test_gram_loss_equals_lightlys():
    g = torch.Generator().manual_seed(0)
    features = [(torch.randn(6, 64, generator=g), torch.randn(6, 3, 3, 16, generator=g)) for _ in range(2)]
    grids = [torch.rand(6, 3, 3, 2, generator=g) for _ in range(2)]
    ours = GramVICRegLLoss()(global_view_features=features, global_view_grids=grids)
    assert ours.item() == pytest.approx(VICRegLLoss()(global_view_features=features, global_view_grids=grids).item(),
                                        rel=1e-5)
