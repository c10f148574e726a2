"""MeanFlow (SpectraFlow stage 1): the JVP target, its reduction to flow matching, the adaptive
weight, the time sampler, the EMA target, mask inputs that never become targets, shapes, a short run."""

from __future__ import annotations

import math

import pytest
import torch

from bench import augment
from bench.augment import Views
from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.dispersive import stage_modules
from bench.methods.meanflow import (
    MeanFlowHead,
    interpolate,
    meanflow_loss,
    meanflow_target,
    mix_mask_inputs,
    sample_times,
    u_and_dudt,
)
from bench.models import create_backbone
from bench.spec import PRESET_DIR, load_spec
from tests.conftest import random_images, tiny_backbone, tiny_context

SMALL = "head_dim=16,head_blocks=1,freq_dim=16"


def _method(spec: str = "meanflow", size: int = 32, batch: int = 4):
    name, _, rest = spec.partition("+")
    name = f"{name}{',' if ':' in name else ':'}{SMALL}"
    backbone = tiny_backbone()
    ctx = tiny_context(backbone, batch_size=batch, image_size=size)
    return build_method(parse_method(name + ("+" + rest if rest else "")), backbone, ctx)


def _views(x: torch.Tensor, masks: torch.Tensor | None = None) -> Views:
    b = x.shape[0]
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(b, 4)
    flip = torch.zeros(b, dtype=torch.bool)
    return Views(x1=x, x2=x, box1=box, box2=box, flip1=flip, flip2=flip, image_ids=torch.arange(b), masks=masks)


def _masks(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) > 0.5).to(torch.uint8)


# --- the objective -------------------------------------------------------------------------------

def test_jvp_target_matches_finite_differences():
    torch.manual_seed(0)
    head = MeanFlowHead(4, hidden=8, blocks=2, freq_dim=16).double()
    z = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    v = torch.randn_like(z)
    t = torch.tensor([0.9, 0.6, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.1], dtype=torch.float64)
    u, dudt = u_and_dudt(head, z, v, r, t)
    delta = 1e-6
    with torch.no_grad():
        plus = head(z + delta * v, r, t + delta)
        minus = head(z - delta * v, r, t - delta)
        fd = (plus - minus) / (2 * delta)
        assert torch.allclose(u, head(z, r, t))
    assert torch.allclose(dudt, fd, rtol=1e-5, atol=1e-8)
    target = meanflow_target(v, dudt, r, t)
    expected = v - (t - r).view(-1, 1, 1, 1) * fd
    assert torch.allclose(target, expected, rtol=1e-5, atol=1e-8)
    assert torch.equal(target[1], v[1])  # r = t on sample 1


def test_r_equal_t_reduces_to_flow_matching():
    torch.manual_seed(0)
    head = MeanFlowHead(4, hidden=8, blocks=1, freq_dim=16)
    z0, noise = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.rand(4)
    z_t, v = interpolate(z0, noise, t)
    assert torch.allclose(z_t, (1 - t.view(-1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1) * noise)
    assert torch.equal(v, noise - z0)
    _, dudt = u_and_dudt(head, z_t, v, t, t)
    assert dudt.abs().sum() > 0
    assert torch.equal(meanflow_target(v, dudt, t, t), v)  # u_tgt = v: plain flow matching


def test_target_carries_no_gradient():
    torch.manual_seed(0)
    head = MeanFlowHead(4, hidden=8, blocks=1, freq_dim=16)
    z0 = torch.randn(4, 4, 2, 2, requires_grad=True)
    t, r = torch.tensor([0.9, 0.8, 0.7, 0.5]), torch.tensor([0.1, 0.8, 0.3, 0.2])
    z_t, v = interpolate(z0, torch.randn_like(z0), t)
    u, dudt = u_and_dudt(head, z_t, v, r, t)
    target = meanflow_target(v, dudt, r, t)
    assert u.requires_grad and not target.requires_grad and target.grad_fn is None
    # the loss's gradient flows through u only: identical when the target is a constant copy
    loss, _ = meanflow_loss(u, target)
    (g_head,) = torch.autograd.grad(loss, [head.out.weight], retain_graph=True)
    loss_const, _ = meanflow_loss(u, target.clone())
    (g_const,) = torch.autograd.grad(loss_const, [head.out.weight])
    assert torch.equal(g_head, g_const)


def test_adaptive_weight_by_hand():
    u = torch.zeros(2, 1, 1, 3, requires_grad=True)
    target = torch.tensor([[[[1.0, 0.0, 0.0]]], [[[1.0, 1.0, 1.0]]]])  # Δ² = 1 and 3
    loss, delta2 = meanflow_loss(u, target, norm_p=1.0, norm_eps=0.01)
    assert torch.allclose(delta2, torch.tensor([1.0, 3.0]))
    assert math.isclose(float(loss.detach()), (1 / 1.01 + 3 / 3.01) / 2, rel_tol=1e-6)
    loss.backward()  # w is stop-gradient: ∂L/∂u = 2(u − u_tgt)·w / B
    expected = 2 * (u.detach() - target) / torch.tensor([1.01, 3.01]).view(2, 1, 1, 1) / 2
    assert torch.allclose(u.grad, expected)


def test_time_sampler():
    torch.manual_seed(0)
    t, r = sample_times(40000, -0.4, 1.0, 0.25)
    assert bool((t >= r).all()) and bool(((t > 0) & (t < 1)).all())
    assert torch.equal(t[:30000], r[:30000])  # r = t on the first 75%
    assert bool((t[30000:] > r[30000:]).all())
    logit = lambda x: torch.log(x / (1 - x))  # noqa: E731
    # (t, r) = (max, min) of two logit-normal draws: their logits average to the mean −0.4, spread 1
    pair_mean = (logit(t[30000:]) + logit(r[30000:])) / 2
    assert abs(float(pair_mean.mean()) + 0.4) < 0.03
    draws = torch.cat([logit(t[30000:]), logit(r[30000:])])
    assert abs(float(draws.std()) - 1.0) < 0.03
    t_all, r_all = sample_times(8, ratio_r_neq_t=0.0)
    assert torch.equal(t_all, r_all)


# --- the method ----------------------------------------------------------------------------------

def test_registry_entry_and_labels():
    spec = parse_method("meanflow")
    assert spec.cfg["domain"] == "mixed" and spec.cfg["mask_share"] == 0.5 and spec.cfg["ratio_r_neq_t"] == 0.25
    assert spec.cls.uses_labels
    assert spec.cls.reads_labels(spec.cfg) and not spec.cls.reads_labels(parse_method("meanflow:domain=image").cfg)
    assert not spec.cls.trains_on_labelled
    with pytest.raises(BenchError, match="valid: .*domain=mixed\\|image"):
        parse_method("meanflow:bogus=1")
    with pytest.raises(BenchError, match="target=online\\|ema"):
        parse_method("meanflow:target=both")
    assert spec.cfg["target"] == "online" and spec.cfg["ema_latent"] == "online" and spec.cls.group == "flow/dispersive"
    with pytest.raises(BenchError, match="add target=ema"):
        _method("meanflow:ema_latent=ema")


def test_meanflow_plus_disp_hooks_penultimate_stage():
    method = _method("meanflow+disp:weight=0.4,layer=penultimate")
    assert [len(m._forward_hooks) for m in stage_modules(method.backbone)] == [0, 0, 0, 1, 0]
    torch.manual_seed(0)
    loss, logs = method.step(_views(torch.randn(4, 3, 32, 32)), 0)
    assert {"loss", "delta2", "std", "feat_var", "disp"} <= set(logs)
    assert torch.allclose(loss, logs["loss"] + 0.4 * logs["disp"], atol=1e-6)


@pytest.mark.parametrize("size", [64, 96])
def test_shapes_at_two_resolutions(size):
    method = _method("meanflow:domain=image", size=size)
    x = torch.randn(4, 3, size, size)
    z0 = method.backbone(x)[-1]
    assert z0.shape == (4, 512, size // 32, size // 32)
    u = method.head(z0, torch.full((4,), 0.2), torch.full((4,), 0.7))
    assert u.shape == z0.shape
    loss, logs = method.step(_views(x), 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 < float(loss.detach()) <= 1


@pytest.mark.parametrize("latent,n_pairs", [("online", 1), ("ema", 2)])
def test_one_sgd_step_with_ema_target(latent, n_pairs):
    torch.manual_seed(0)
    method = _method(f"meanflow:target=ema,ema_latent={latent},domain=image")
    pairs = method.momentum_pairs()  # the EMA head; the EMA encoder too when the target uses its latent
    assert len(pairs) == n_pairs and method.momentum_at(0) == method.momentum_at(999) == 0.999
    online_before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    target_before = [[p.clone() for p in target.parameters()] for _, target in pairs]
    loss, _ = method.step(_views(torch.randn(4, 3, 32, 32)), 0)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    for _, target in pairs:
        assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    optimizer.step()
    method.after_optimizer_step(0)
    after = method.backbone.state_dict()
    assert any(not torch.equal(online_before[k], after[k]) for k in after if after[k].is_floating_point())
    m = 0.999
    for (online, target), before in zip(pairs, target_before, strict=True):
        for p_online, p_target, p_before in zip(online.parameters(), target.parameters(), before, strict=True):
            assert torch.allclose(p_target, m * p_before + (1 - m) * p_online, rtol=0, atol=1e-7)


@pytest.mark.parametrize("latent", ["online", "ema"])
def test_ema_target_by_hand(latent):
    """``target=ema``: u_tgt = v − (t − r)·du/dt of the EMA head. SpectraFlow's Eq. 3 (``ema_latent=online``,
    the default) evaluates it at the online z_t, so the EMA encoder plays no part; ``ema_latent=ema`` uses
    the EMA encoder's own latent z_t′ (same ε, t, r)."""
    method = _method(f"meanflow:target=ema,ema_latent={latent},domain=image")
    with torch.no_grad():  # EMA head (and encoder) ≠ online, as after some steps
        for p in method.target_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if latent == "ema":
            for p in method.target_backbone.parameters():
                p.mul_(1.1)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(3)
    loss, logs = method.step(_views(x), 0)
    torch.manual_seed(3)  # replay the step's draws: t, r, then ε
    z0 = method.backbone(x)[-1].float()
    t, r = sample_times(4, -0.4, 1.0, 0.25)
    noise = torch.randn_like(z0)
    z_t, v = interpolate(z0, noise, t)
    u = method.head(z_t, r, t)
    if latent == "ema":
        z_t, v = interpolate(method.target_backbone(x)[-1].float(), noise, t)
    _, dudt = u_and_dudt(method.target_head, z_t.detach(), v.detach(), r, t)
    expected, delta2 = meanflow_loss(u, meanflow_target(v, dudt, r, t))
    # L ≈ 1 while Δ² ≫ c, so the per-sample Δ² is the sensitive comparison
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(logs["delta2"], delta2.mean(), rtol=1e-5)
    _, online = meanflow_loss(u, meanflow_target(v, u_and_dudt(method.head, z_t, v, r, t)[1], r, t))
    assert not torch.allclose(delta2, online, rtol=1e-3)  # the EMA head's target is not the online one


def test_online_target_has_no_ema_and_exports():
    method = _method("meanflow:domain=image")
    assert method.momentum_pairs() == [] and not hasattr(method, "target_backbone")
    state = method.export()
    assert set(state) == {"backbone"}
    create_backbone("resnet18", output_stride=16).load_state_dict(state["backbone"], strict=True)
    ema = _method("meanflow:domain=image,export=ema")
    with torch.no_grad():
        for p in ema.backbone.parameters():
            p.add_(1.0)  # online and EMA weights now differ: export must take the EMA copy
    exported = ema.export()["backbone"]
    ema_state = ema.target_backbone.state_dict()
    assert all(torch.equal(exported[k], ema_state[k]) for k in ema_state)


# --- masks: inputs only, never targets -----------------------------------------------------------

def test_mix_mask_inputs_replaces_a_share_of_the_batch():
    images = random_images(8, 32, seed=0)
    masks = _masks(8, 32, seed=1)
    mixed, is_mask = mix_mask_inputs(images, masks, 0.5, torch.Generator().manual_seed(0))
    assert int(is_mask.sum()) == 4
    assert torch.equal(mixed[~is_mask], images[~is_mask])
    expected = (masks[:4] * 255).expand(-1, 3, -1, -1)
    assert torch.equal(mixed[is_mask], expected)  # the first four masks, in position order
    again, is_mask_again = mix_mask_inputs(images, masks, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, mixed) and torch.equal(is_mask, is_mask_again)
    none, flags = mix_mask_inputs(images, masks, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none, images) and not bool(flags.any())


def test_mixed_views_put_masks_in_inputs_only():
    method = _method("meanflow")
    images, masks = random_images(4, 32, seed=0), _masks(4, 32, seed=1)
    views = method.make_views(images, torch.arange(4), torch.Generator().manual_seed(3), masks=masks)
    generator = torch.Generator().manual_seed(3)
    mixed, is_mask = mix_mask_inputs(images, masks, 0.5, generator)
    reference = augment.make_views(mixed, "light", 32, generator, image_ids=torch.arange(4))
    assert torch.equal(views.x1, reference.x1) and int(is_mask.sum()) == 2
    assert views.masks is None  # consumed as inputs; nothing is left to be used as a target
    other = method.make_views(images, torch.arange(4), torch.Generator().manual_seed(3),
                              masks=_masks(4, 32, seed=2))
    assert not torch.equal(other.x1[is_mask], views.x1[is_mask])  # the mask content reaches the input
    assert torch.equal(other.x1[~is_mask], views.x1[~is_mask])
    with pytest.raises(BenchError, match="domain=image"):
        method.make_views(images, torch.arange(4), torch.Generator().manual_seed(3))


def test_image_domain_ignores_masks():
    method = _method("meanflow:domain=image")
    images = random_images(4, 32, seed=0)
    a = method.make_views(images, torch.arange(4), torch.Generator().manual_seed(3), masks=_masks(4, 32, 1))
    b = method.make_views(images, torch.arange(4), torch.Generator().manual_seed(3), masks=_masks(4, 32, 2))
    c = method.make_views(images, torch.arange(4), torch.Generator().manual_seed(3))
    assert torch.equal(a.x1, b.x1) and torch.equal(a.x1, c.x1)


@pytest.mark.parametrize("domain", ["image", "mixed"])
def test_loss_does_not_read_views_masks(domain):
    method = _method(f"meanflow:domain={domain}")
    x = torch.randn(4, 3, 32, 32)
    losses = []
    for masks in (None, torch.zeros(4, 1, 32, 32), torch.ones(4, 1, 32, 32)):
        torch.manual_seed(0)
        loss, _ = method.step(_views(x, masks), 0)
        losses.append(float(loss.detach()))
    assert losses[0] == losses[1] == losses[2]


# --- training ------------------------------------------------------------------------------------

def test_short_run_lowers_the_loss():
    torch.manual_seed(0)
    method = _method("meanflow", batch=4)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    images, masks = random_images(16, 32, seed=0), _masks(16, 32, seed=1)
    generator = torch.Generator().manual_seed(0)
    delta2 = []
    for step in range(25):
        idx = torch.randperm(16, generator=generator)[:4]
        views = method.make_views(images[idx], idx, generator, masks=masks[idx])
        loss, logs = method.step(views, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        delta2.append(float(logs["delta2"]))
    # L = mean(Δ²/(Δ² + c)) stays ≈ 1 while Δ² ≫ c (its gradient is that of log(Δ² + c)), so the raw
    # Δ² is the quantity that falls visibly; most of it is the irreducible Var[v | z_t] (measured:
    # 771 → 711 here, a drop of 8%; per-batch noise of the 5-step means is about 1%)
    assert sum(delta2[-5:]) / 5 < 0.95 * sum(delta2[:5]) / 5


def test_head_skip_starts_at_zero():
    torch.manual_seed(0)
    with_skip = MeanFlowHead(8, hidden=4, blocks=1, freq_dim=8, skip=True)
    torch.manual_seed(0)
    without = MeanFlowHead(8, hidden=4, blocks=1, freq_dim=8, skip=False)
    z, r, t = torch.randn(2, 8, 2, 2), torch.tensor([0.1, 0.5]), torch.tensor([0.5, 0.5])
    assert torch.equal(with_skip(z, r, t), without(z, r, t))
    with torch.no_grad():
        with_skip.skip.bias.fill_(1.0)  # s = 1: the skip adds z itself
    assert torch.allclose(with_skip(z, r, t), without(z, r, t) + z)


def test_spectraflow_preset():
    spec = load_spec(PRESET_DIR / "spectraflow.yaml")
    assert spec.fractions == (0.1, 0.2, 0.5, 1.0)
    assert {"scratch", "meanflow:domain=image", "meanflow", "meanflow:head_skip=false",
            "meanflow+disp:weight=0.4,layer=penultimate,pool=gap,normalize=false"} <= set(spec.methods)
    full = parse_method("meanflow+disp:weight=0.4,layer=penultimate,pool=gap,normalize=false")
    (_, disp_cfg, _), = full.modifiers  # SpectraFlow Eq. 5: GAP'd penultimate stage, no division by D
    assert (disp_cfg["layer"], disp_cfg["pool"], disp_cfg["normalize"], disp_cfg["weight"]) == \
        ("penultimate", "gap", False, 0.4)
    assert parse_method("meanflow:head_skip=false").cfg["head_skip"] is False
    assert spec.pretrain.optimizer == "adamw" and spec.pretrain.lr == 1e-5
