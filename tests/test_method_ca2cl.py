"""CA²CL's defining properties: how clusters are formed (Euclidean k-means over the batch's cluster features,
first-k initialisation, empty clusters at 0), the cross-view cluster loss (each view scored against the other
view's centres, trained towards the other view's assignment), and the adversarial positive pair (the strong
view re-encoded with the stem weights moved by ε·g/‖g‖), checked against the released two-backward step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from bench.augment import Views
from bench.methods import build_method, parse_method
from bench.methods.ca2cl import NormedLinear, adversarial_direction, cluster_aware_loss, kmeans
from tests.conftest import tiny_backbone, tiny_context


def make(text: str = "ca2cl", image_size: int = 32):
    backbone = tiny_backbone()
    return build_method(parse_method(text), backbone, tiny_context(backbone, image_size=image_size)).train()


def hand_views(b: int = 4, size: int = 32) -> Views:
    g = torch.Generator().manual_seed(0)
    box, flip = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1), torch.zeros(b, dtype=torch.bool)
    return Views(torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g), box, box,
                 flip, flip, torch.arange(b))


def test_defaults_and_heads():
    spec = parse_method("ca2cl")
    assert spec.cfg == {"temperature": 0.2, "cluster_temperature": 0.2, "lambda": 0.1, "clusters": 10,
                        "kmeans_iters": 10, "epsilon": 1.0, "proj_dim": 128}
    assert spec.cls.group == "global contrastive"
    method = make()
    assert method.stem_weight == "conv1.weight"
    head = NormedLinear(3, 2)
    x = torch.tensor([[3.0, 0.0, 4.0]])
    expected = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=0)
    torch.testing.assert_close(head(x), expected)
    assert head(x).abs().max() <= 1.0 + 1e-6  # cosines


def test_kmeans_by_hand():
    """x = 0, 1, 10, 11 with k = 2: start at (0, 1); → {0}, {1, 10, 11} (centres 0, 22/3); → {0, 1}, {10, 11}."""
    labels, centres = kmeans(torch.tensor([[0.0], [1.0], [10.0], [11.0]]), 2, iters=10)
    assert labels.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(centres, torch.tensor([[0.5], [10.5]]))
    labels, centres = kmeans(torch.tensor([[0.0], [1.0], [10.0], [11.0]]), 2, iters=1)
    assert labels.tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(centres, torch.tensor([[0.0], [22.0 / 3.0]]))
    labels, centres = kmeans(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), 3, iters=3)  # k > N: empty clusters at 0
    assert centres.shape == (3, 2) and torch.count_nonzero(centres[2]) == 0


def test_cluster_loss_by_hand():
    """Two clusters per view. kmeans(f₁) starts at (e₁, e₂) → labels 0, 1, 0, 1, centres (e₁, e₂); kmeans(f₂)
    starts at (e₂, e₁) → labels 0, 1, 0, 1, centres (e₂, e₁). Each sample's second view lies in the other
    cluster, so every row scores (0, 5) or (5, 0) = cos/T against the other view's centres with the target on
    the 0: −log σ(0 − 5). With identical views every target is on the 5."""
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    f1 = torch.tensor([e1, e2, e1, e2])
    f2 = torch.tensor([e2, e1, e2, e1])
    disagree = -math.log(math.exp(0) / (math.exp(0) + math.exp(5)))
    assert cluster_aware_loss(f1, f2, 2, 0.2).item() == pytest.approx(disagree, rel=1e-5)
    agree = -math.log(math.exp(5) / (math.exp(0) + math.exp(5)))
    assert cluster_aware_loss(f1, f1.clone(), 2, 0.2).item() == pytest.approx(agree, rel=1e-5)
    # the released first-k initialisation: duplicated first rows leave the second cluster empty (centre 0)
    labels, centres = kmeans(torch.tensor([e1, e1, e2, e2]), 2, iters=2)
    assert labels.tolist() == [0, 0, 0, 0] and torch.count_nonzero(centres[1]) == 0


def test_adversarial_direction():
    g = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(adversarial_direction(g, 1.0), torch.tensor([0.6, 0.8]))
    assert torch.count_nonzero(adversarial_direction(torch.zeros(2), 1.0)) == 0
    assert torch.count_nonzero(adversarial_direction(torch.tensor([float("nan"), 1.0]), 1.0)) == 0


def test_step_gradients_equal_the_released_two_backward_procedure():
    torch.manual_seed(0)
    method = make()
    released = copy.deepcopy(method)
    views = hand_views()
    loss, logs = method.training_step(views, 0)
    loss.backward()
    # the released step: clean loss backward (retain graph), perturb conv1 in place by ε·g/‖g‖,
    # re-encode the strong view, NT-Xent(z_j, z_i_adv) backward, restore the weight
    crit = NTXentLoss(temperature=0.2)
    zi, fi = released.heads(released.backbone(views.x1)[-1].mean((2, 3)))
    zj, fj = released.heads(released.backbone(views.x2)[-1].mean((2, 3)))
    clean = crit(zi, zj) + 0.1 * cluster_aware_loss(fi, fj, 10, 0.2)
    clean.backward(retain_graph=True)
    w = released.backbone.conv1.weight
    backup = w.data.clone()
    w.data.add_(1.0 * w.grad / w.grad.norm())
    zi_adv = F.normalize(released.projector(released.backbone(views.x1)[-1].mean((2, 3))), dim=1)
    adversarial = crit(zj, zi_adv)
    adversarial.backward()
    w.data = backup
    assert loss.item() == pytest.approx((clean + adversarial).item(), rel=1e-5)
    assert logs["loss_adversarial"].item() == pytest.approx(adversarial.item(), rel=1e-5)
    for (name, ours), theirs in zip(method.named_parameters(), released.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(method.backbone.conv1.weight, released.backbone.conv1.weight)  # restored
