"""The dispersive-loss family: hand-computed values of every variant, the repulsion property of
SpectraFlow Eq. 22, the ``+disp`` modifier's hook, Disp-II and the ``dispersive`` entry (Med-DisSeg
stage I)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.augment import Views
from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.dispersive import (
    dispersive_loss,
    finetune_dispersive,
    finetune_regulariser,
    offdiagonal_covariance,
    pairwise_sq_dists,
    stage_modules,
)
from bench.models import create_backbone
from bench.spec import Schedule
from tests.conftest import random_images, tiny_backbone, tiny_context

EPS = 1e-8
# three points in 2-D: squared distances d01 = 1, d02 = 4, d12 = 5
POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])


def close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return abs(float(value) - expected) < tol


# --- variants against hand-computed values ---------------------------------------------------------

def test_l2_by_hand():
    expected = math.log((math.exp(-1 / 0.5) + math.exp(-4 / 0.5) + math.exp(-5 / 0.5)) / 3 + EPS)
    assert close(dispersive_loss(POINTS, "l2", tau=0.5), expected)


def test_l2_normalize_divides_squared_distances_by_d():
    expected = math.log((math.exp(-0.5 / 0.5) + math.exp(-2 / 0.5) + math.exp(-2.5 / 0.5)) / 3 + EPS)
    assert close(dispersive_loss(POINTS, "l2", tau=0.5, normalize=True), expected)


def test_l2_include_self_is_wang_he_formula():
    # all 9 pairs: three diagonal exp(0) = 1 and each off-diagonal pair twice; no ε
    off = math.exp(-1.0) + math.exp(-4.0) + math.exp(-5.0)
    expected = math.log((3 + 2 * off) / 9)
    assert close(dispersive_loss(POINTS, "l2", tau=1.0, include_self=True), expected)
    # Wang & He's released code: pdist² / D, the B² matrix with its zero diagonal, tau = 1
    z = POINTS
    diff = torch.nn.functional.pdist(z).pow(2) / z.shape[1]
    diff = torch.cat((diff, diff, torch.zeros(z.shape[0])))
    reference = torch.log(torch.exp(-diff).mean())
    assert close(dispersive_loss(z, "l2", tau=1.0, normalize=True, include_self=True), float(reference))


def test_identical_points_give_zero_and_floor_log_one_over_b():
    same = torch.ones(4, 3)
    assert close(dispersive_loss(same, "l2"), math.log(1 + EPS))
    far = torch.eye(4) * 100
    assert close(dispersive_loss(far, "l2", tau=1.0, include_self=True), math.log(1 / 4))


def test_cos_by_hand():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cos01 = 0, cos02 = cos12 = 1/√2
    c = 1 - 1 / math.sqrt(2)
    expected = math.log((math.exp(-1 / 0.8) + 2 * math.exp(-c / 0.8)) / 3 + EPS)
    assert close(dispersive_loss(h, "cos", tau=0.8), expected)
    expected_self = math.log((3 + 2 * (math.exp(-1 / 0.8) + 2 * math.exp(-c / 0.8))) / 9)
    assert close(dispersive_loss(h, "cos", tau=0.8, include_self=True), expected_self)
    # cosine ignores the scale of each vector
    assert close(dispersive_loss(h * torch.tensor([[3.0], [0.5], [7.0]]), "cos", tau=0.8), expected)


def test_hinge_by_hand():
    h = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 2.0]])  # distances 0.5, 2, √4.25
    assert close(dispersive_loss(h, "hinge", margin=1.0), (1 - 0.5) ** 2 / 3)
    normalised = 0.5 / math.sqrt(2)  # √(0.25 / D); the other two stay beyond the margin
    assert close(dispersive_loss(h, "hinge", margin=1.0, normalize=True), (1 - normalised) ** 2 / 3)
    assert close(dispersive_loss(h, "hinge", margin=1.0, include_self=True), (3 * 1.0 + 2 * 0.25) / 9)


def test_cov_by_hand():
    # centred: [[-1/3, -2/3], [2/3, -2/3], [-1/3, 4/3]]; C01 = (2/9 - 4/9 - 4/9) / 2 = -1/3
    assert close(dispersive_loss(POINTS, "cov"), 2 * (1 / 3) ** 2)
    # Med-DisSeg's Eq. 6 as printed whatever `normalize` says (it scales distances, and cov has none) ...
    assert close(dispersive_loss(POINTS, "cov", normalize=True), 2 * (1 / 3) ** 2)
    assert close(dispersive_loss(POINTS, "cov", cov_per_dim=True), 2 * (1 / 3) ** 2 / 2)  # ... the /D form on ask
    assert close(dispersive_loss(POINTS, "cov", include_self=True), 2 * (1 / 3) ** 2)  # no pairs


def test_cov_default_is_eq_6_in_the_modifier_and_stage_one():
    for spec in ("byol+disp", "dispersive"):
        parsed = parse_method(spec)
        cfg = parsed.modifiers[0][1] if parsed.modifiers else parsed.cfg
        assert cfg["cov_per_dim"] is False and cfg["normalize"] is True
    torch.manual_seed(0)
    method = _method("byol+disp:variant=cov,layer=late,pool=gap,weight=1.0")
    modifier = method.modifiers[0]
    modifier.begin_step()
    late = method.backbone(torch.randn(4, 3, 32, 32))[-1].mean(dim=(2, 3))
    extra, _ = modifier.loss()
    assert torch.allclose(extra, offdiagonal_covariance(late))  # not divided by D = 512


def test_cov_gram_form_matches_the_d_by_d_matrix():
    torch.manual_seed(0)
    h = torch.randn(6, 5)
    centred = h - h.mean(0)
    c = centred.t() @ centred / 5
    direct = (c - torch.diag(torch.diag(c))).pow(2).sum()
    assert torch.allclose(offdiagonal_covariance(h), direct, rtol=1e-5)


def test_pairwise_sq_dists_match_cdist():
    torch.manual_seed(0)
    h = torch.randn(5, 7) * 3 + 10
    assert torch.allclose(pairwise_sq_dists(h), torch.cdist(h, h).pow(2), atol=1e-3)


def test_unknown_variant_and_tiny_batch_raise():
    with pytest.raises(BenchError, match="l2, cos, hinge, cov"):
        dispersive_loss(POINTS, "l3")
    with pytest.raises(BenchError, match="at least 2"):
        dispersive_loss(POINTS[:1], "l2")


# --- SpectraFlow Eq. 22: closer neighbours repel more ---------------------------------------------

def test_closer_pairs_get_larger_repulsive_gradient():
    # 0 and 1 are close (d² = 1), 2 is far from both (d² = 16, 17); τ = 0.5 < 2 d²
    h = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 4.0]], requires_grad=True)
    dispersive_loss(h, "l2", tau=0.5).backward()
    g = h.grad
    assert g[0].norm() > 100 * g[2].norm()
    assert g[1].norm() > 100 * g[2].norm()
    # gradient descent pushes 0 and 1 apart: −∇ on 0 points away from 1
    assert float(-g[0] @ (h[0] - h[1]).detach()) > 0
    # two separate pairs in one batch (shared normaliser): the closer pair (d² = 1) is pushed harder
    # than the farther one (d² = 2.25): force ∝ exp(−d²/τ)·d, 0.135 vs 0.017
    h4 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.5, 0.0]], requires_grad=True)
    dispersive_loss(h4, "l2", tau=0.5).backward()
    assert h4.grad[0].norm() > 5 * h4.grad[2].norm()


# --- the +disp modifier ------------------------------------------------------------------------

SMALL_BYOL = "byol:hidden_dim=64,proj_dim=32"


def _method(spec: str, size: int = 32):
    spec = spec.replace("byol", SMALL_BYOL, 1) if spec.startswith("byol") else spec
    backbone = tiny_backbone()
    ctx = tiny_context(backbone, batch_size=4, image_size=size)
    return build_method(parse_method(spec), backbone, ctx)


def _views(x: torch.Tensor) -> Views:
    b = x.shape[0]
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 4)
    flip = torch.zeros(b, dtype=torch.bool)
    return Views(x1=x, x2=x.flip(-1), box1=box, box2=box, flip1=flip, flip2=flip, image_ids=torch.arange(b))


def test_modifier_hooks_only_the_chosen_stage():
    method = _method("byol+disp:layer=early")
    modules = stage_modules(method.backbone)
    assert [len(m._forward_hooks) for m in modules] == [1, 0, 0, 0, 0]
    method = _method("byol+disp:layer=penultimate")
    assert [len(m._forward_hooks) for m in stage_modules(method.backbone)] == [0, 0, 0, 1, 0]
    method = _method("byol+disp:layer=middle")
    assert [len(m._forward_hooks) for m in stage_modules(method.backbone)] == [0, 0, 1, 0, 0]
    # target (EMA) backbones are copies made before the modifier: no hooks there
    assert all(len(m._forward_hooks) == 0 for m in method.target_backbone.modules())


def test_modifier_term_is_weight_times_loss_on_view_one_stage():
    torch.manual_seed(0)
    method = _method("byol+disp:layer=early,weight=0.3,tau=0.7")
    x = torch.randn(4, 3, 32, 32)
    modifier = method.modifiers[0]
    modifier.begin_step()
    stage0 = method.backbone(x)[0]
    method.backbone(torch.randn(4, 3, 32, 32))  # a second forward (view 2) is ignored
    extra, logs = modifier.loss()
    expected = 0.3 * dispersive_loss(stage0.flatten(1), "l2", tau=0.7, normalize=True)
    assert torch.allclose(extra, expected)
    assert {"disp", "disp_sqdist"} <= set(logs)


def test_modifier_ignores_other_stages():
    """Changing the last stage's activation leaves an early-stage term unchanged, and vice versa."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)

    def term(spec: str, tamper: str | None) -> float:
        method = _method(spec)
        handle = None
        if tamper:
            handle = method.backbone.get_submodule(tamper).register_forward_hook(lambda m, i, o: o * 3.0 + 1.0,
                                                                                  prepend=True)
        modifier = method.modifiers[0]
        modifier.begin_step()
        method.backbone(x)
        value = float(modifier.loss()[0].detach())
        if handle:
            handle.remove()
        return value

    early = term("byol+disp:layer=early", None)
    assert early == pytest.approx(term("byol+disp:layer=early", "layer4"), abs=0)
    assert early != pytest.approx(term("byol+disp:layer=early", "act1"), rel=1e-3)
    late = term("byol+disp:layer=late,pool=gap", None)
    assert late != pytest.approx(term("byol+disp:layer=late,pool=gap", "layer4"), rel=1e-3)


def test_modifier_all_sums_the_stages():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    method = _method("byol+disp:layer=all,pool=gap,weight=1.0")
    modifier = method.modifiers[0]
    modifier.begin_step()
    feats = method.backbone(x)
    extra, _ = modifier.loss()
    expected = sum(dispersive_loss(f.mean(dim=(2, 3)), "l2", tau=0.8, normalize=True) for f in feats)
    assert torch.allclose(extra, expected)


def test_modifier_in_a_training_step_adds_its_term():
    torch.manual_seed(0)
    plain, with_disp = _method("byol"), _method("byol+disp:weight=0.5")
    with_disp.load_state_dict(plain.state_dict(), strict=False)
    views = _views(torch.randn(4, 3, 32, 32))
    torch.manual_seed(1)
    base_loss, _ = plain.step(views, 0)
    torch.manual_seed(1)
    loss, logs = with_disp.step(views, 0)
    assert torch.allclose(loss, base_loss + 0.5 * logs["disp"], atol=1e-5)


def test_modifier_overrides_parse_and_bogus_keys_list_valid_ones():
    spec = parse_method("byol+disp:variant=cos,weight=0.2,tau=0.8,layer=early,pool=gap,normalize=true,"
                        "include_self=false")
    assert spec.modifiers[0][1]["variant"] == "cos" and spec.modifiers[0][1]["pool"] == "gap"
    with pytest.raises(BenchError, match="valid: .*variant=l2\\|cos\\|hinge\\|cov"):
        parse_method("byol+disp:bogus=1")
    with pytest.raises(BenchError, match="layer=early\\|middle\\|late\\|penultimate\\|all"):
        parse_method("byol+disp:layer=top")


# --- Disp-II -------------------------------------------------------------------------------------

def test_finetune_dispersive_and_regulariser():
    torch.manual_seed(0)
    feats = [torch.randn(4, 8, 6, 6), torch.randn(4, 16, 3, 3)]
    value = finetune_dispersive(feats)
    assert torch.allclose(value, 0.6 * dispersive_loss(feats[0].flatten(1), "l2", tau=0.8, normalize=True))
    reg = finetune_regulariser(Schedule(reg="disp", reg_weight=0.25, reg_variant="cos", reg_layer="late"))
    assert torch.allclose(reg(feats), 0.25 * dispersive_loss(feats[1].flatten(1), "cos", tau=0.8))
    with pytest.raises(BenchError, match="reg_variant"):
        finetune_regulariser(Schedule(reg="disp", reg_variant="l3"))


# --- the `dispersive` entry: Med-DisSeg stage I --------------------------------------------------

def _labelled_views(method, n: int = 4, size: int = 32, seed: int = 0) -> Views:
    images = random_images(n, size, seed=seed)
    # the blob of random_images is brighter than its background: threshold it into a mask
    masks = (images.float().mean(1, keepdim=True) > images.float().mean()).to(torch.uint8)
    return method.make_views(images, torch.arange(n), torch.Generator().manual_seed(seed), masks=masks)


def test_dispersive_entry_declares_labels_and_parses():
    cls = parse_method("dispersive").cls
    assert cls.uses_labels and cls.trains_on_labelled and cls.reads_labels(parse_method("dispersive").cfg)
    assert cls.recipe == "photometric" and cls.group == "flow/dispersive"
    with pytest.raises(BenchError, match="valid: .*weight="):
        parse_method("dispersive:bogus=1")


@pytest.mark.parametrize("size", [32, 64])
def test_dispersive_entry_shapes_and_one_sgd_step(size):
    method = _method("dispersive", size)
    views = _labelled_views(method, size=size)
    assert views.masks is not None and views.masks.shape == (4, 1, size, size)
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    loss, logs = method.step(views, 0)
    assert loss.ndim == 0 and {"loss", "seg", "disp", "std"} <= set(logs)
    assert torch.allclose(loss, logs["seg"] + 0.2 * logs["disp"])
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    loss.backward()
    optimizer.step()
    method.after_optimizer_step(0)
    after = method.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


def test_dispersive_entry_needs_masks():
    method = _method("dispersive")
    views = _views(torch.randn(4, 3, 32, 32))
    with pytest.raises(BenchError, match="trains on labelled images"):
        method.step(views, 0)


def test_dispersive_entry_trains_and_exports_encoder():
    torch.manual_seed(0)
    method = _method("dispersive")
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    images = random_images(8, 32, seed=1)
    masks = (images.float().mean(1, keepdim=True) > images.float().mean()).to(torch.uint8)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(15):
        idx = torch.randperm(8, generator=generator)[:4]
        views = method.make_views(images[idx], idx, generator, masks=masks[idx])
        loss, _ = method.step(views, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    state = method.export()
    assert set(state) == {"backbone"}
    create_backbone("resnet18", output_stride=16).load_state_dict(state["backbone"], strict=True)


def test_method_sees_stage_list():
    # stage_modules resolves every feature stage of the timm backbone
    backbone = tiny_backbone()
    modules = stage_modules(backbone)
    x = torch.randn(2, 3, 32, 32)
    outs = []
    handles = [m.register_forward_hook(lambda m, i, o: outs.append(o)) for m in modules]
    feats = backbone(x)
    for h in handles:
        h.remove()
    assert len(outs) == len(feats) and all(torch.equal(a, b) for a, b in zip(outs, feats, strict=True))
    assert isinstance(modules[0], nn.Module)
