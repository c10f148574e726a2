"""MeanFlow latent-transport pretraining — SpectraFlow stage 1 (Chen et al. 2026, "SpectraFlow: Unifying
Structural Pretraining and Frequency Adaptation for Medical Image Segmentation"), with the MeanFlow
objective of Geng et al. 2025 ("Mean Flows for One-step Generative Modeling"; official JAX code
Gsunshine/meanflow); docs/methods.md, "meanflow".

Convention: t = 0 data, t = 1 noise. The latent is the online encoder's C5 map, z₀ = E(x) (the
gradient reaches the encoder through z₀), ε ~ N(0, I):
    z_t = (1 − t)·z₀ + t·ε,   v = ε − z₀
A small head u_θ(z, r, t) (residual conv blocks with GroupNorm — BatchNorm breaks ``torch.func.jvp`` —
conditioned on sinusoidal embeddings of t and h = t − r → MLP → per-block scale/shift, plus a
zero-initialised time-conditioned per-channel skip s ⊙ z around its width bottleneck, ``head_skip``)
predicts the average velocity. One JVP gives the prediction and its total time derivative along the flow:
    (u, du/dt) = jvp(u_θ, (z_t, r, t), (v, 0, 1))            (fp32, outside autocast)
    u_tgt = sg(v − clip(t − r, 0, 1)·du/dt)                  (MeanFlow identity)
    Δ² = ‖u − u_tgt‖² summed per sample,  w = sg(1/(Δ² + c)^p),  L = mean(w·Δ²),  p = 1, c = 0.01
Times: t, r ~ sigmoid(N(−0.4, 1)) independently, (t, r) ← (max, min), and r = t for the first 75% of
the batch (``ratio_r_neq_t = 0.25``; there the objective is plain flow matching, u_tgt = v).

Options: ``target=ema`` takes u_tgt from an EMA copy (m = 0.999) of the head (SpectraFlow's
stop-gradient target network, Eq. 3): u_tgt = sg(v − clip(t − r)·d/dt u_θ⁻(z_t, r, t)), both sides at the
online latent's z_t; ``ema_latent=ema`` instead evaluates the target at the EMA encoder's own latent
z_t′ = (1 − t)·E_ema(x) + t·ε (same ε, t, r). ``export=ema`` exports the EMA encoder. Mixed domain
(``domain=mixed``, the default, SpectraFlow's Mixed-Domain MeanFlow): a share (``mask_share = 0.5``) of
each batch's images is replaced by binary masks of the labelled subset repeated to 3 channels — inputs
only, never targets — before the (light) augmentation, so masks are cropped, flipped and normalised like
images; ``domain=image`` trains on images alone and reads no labels (``reads_labels``). One view
(``Views.x1``) is used. The protocol's uniform optimiser applies (SpectraFlow's: AdamW, lr 1e-5 → 1e-6).
``meanflow+disp:weight=0.4,layer=penultimate,pool=gap,normalize=false`` is SpectraFlow's full stage 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.augment import Views
from bench.errors import BenchError
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std

# --- the head u_θ(z, r, t) -------------------------------------------------------------------------

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) → (B, dim) of t ∈ [0, 1], unscaled as in the official MeanFlow code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedder(nn.Module):
    """Sinusoidal frequencies → Linear → SiLU → Linear (DiT's / MeanFlow's ``TimestepEmbedder``)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


def group_count(channels: int, most: int = 32) -> int:
    """The largest number of GroupNorm groups ≤ ``most`` that divides ``channels``."""
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


class ResBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN·(1 + scale) + shift → SiLU → conv3×3, plus the identity."""

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(group_count(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.modulation = nn.Linear(emb_dim, 2 * channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.modulation(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class MeanFlowHead(nn.Module):
    """u_θ(z, r, t): 1×1 conv C → hidden, ``blocks`` residual blocks conditioned on emb(t) + emb(t − r),
    GN → SiLU → 1×1 conv hidden → C. Shapes: z (B, C, H, W), r and t (B,) → u (B, C, H, W).

    C5 has more channels (512–2048) than the head is wide, so the 1×1 in/out convs alone map through a
    rank-``hidden`` bottleneck and cannot represent even the linear part of E[v | z_t] (≈ a(t)·z_t).
    ``skip=True`` (default) adds a time-conditioned per-channel path s(t, t − r) ⊙ z, zero-initialised.
    """

    def __init__(self, channels: int, hidden: int = 256, blocks: int = 3, freq_dim: int = 256,
                 skip: bool = True):
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 1)
        self.t_embed = TimeEmbedder(hidden, freq_dim)
        self.h_embed = TimeEmbedder(hidden, freq_dim)
        self.blocks = nn.ModuleList(ResBlock(hidden, hidden) for _ in range(blocks))
        self.out_norm = nn.GroupNorm(group_count(hidden), hidden)
        self.out = nn.Conv2d(hidden, channels, 1)
        self.skip = None
        if skip:  # full-rank path around the hidden bottleneck; zero-initialised (starts as the plain head)
            self.skip = nn.Linear(hidden, channels)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        emb = F.silu(self.t_embed(t) + self.h_embed(t - r))
        x = self.inp(z)
        for block in self.blocks:
            x = block(x, emb)
        u = self.out(F.silu(self.out_norm(x)))
        if self.skip is not None:
            u = u + self.skip(emb)[:, :, None, None] * z
        return u


# --- the objective (pure functions) ----------------------------------------------------------------

def sample_times(batch: int, p_mean: float = -0.4, p_std: float = 1.0, ratio_r_neq_t: float = 0.25,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(t, r) of shape (B,): logit-normal draws, t = max, r = min; r = t on the first
    ⌊(1 − ratio)·B⌋ samples (official ``sample_tr`` with ``data_proportion = 1 − ratio``)."""
    t = torch.sigmoid(torch.randn(batch, device=device) * p_std + p_mean)
    r = torch.sigmoid(torch.randn(batch, device=device) * p_std + p_mean)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    flow_matching = torch.arange(batch, device=device) < int(batch * (1.0 - ratio_r_neq_t))
    return t, torch.where(flow_matching, t, r)


def interpolate(z0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """z_t = (1 − t)·z₀ + t·ε and the conditional velocity v = ε − z₀."""
    tb = t.view(-1, *([1] * (z0.ndim - 1)))
    return (1 - tb) * z0 + tb * noise, noise - z0


def u_and_dudt(head: nn.Module, z_t: Tensor, v: Tensor, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du/dt) = jvp(u_θ, (z_t, r, t), (v, 0, 1)) in fp32 with autocast off; u keeps its graph."""
    with torch.autocast(device_type=z_t.device.type, enabled=False):
        primals = (_at_least_fp32(z_t), _at_least_fp32(r), _at_least_fp32(t))
        tangents = (_at_least_fp32(v.detach()), torch.zeros_like(primals[1]), torch.ones_like(primals[2]))
        return torch.func.jvp(head, primals, tangents)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def meanflow_target(v: Tensor, dudt: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """u_tgt = sg(v − clip(t − r, 0, 1)·du/dt) (MeanFlow identity; = v where r = t)."""
    h = (t - r).clamp(0.0, 1.0).view(-1, *([1] * (v.ndim - 1)))
    return (v - h * dudt).detach()


def meanflow_loss(u: Tensor, u_tgt: Tensor, norm_p: float = 1.0, norm_eps: float = 0.01) -> tuple[Tensor, Tensor]:
    """L = mean(sg(1/(Δ² + c)^p)·Δ²) with Δ² = ‖u − u_tgt‖² summed per sample; returns (L, Δ² per sample)."""
    delta2 = (u.float() - u_tgt.float()).pow(2).flatten(1).sum(dim=1)
    weight = 1.0 / (delta2.detach() + norm_eps).pow(norm_p)
    return (weight * delta2).mean(), delta2


def mix_mask_inputs(images: Tensor, masks: Tensor, share: float,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Replace round(share·B) randomly placed images of a batch by binary masks repeated to 3 channels.

    images: (B, 3, H, W) uint8 (or float in [0, 1]); masks: (M, 1, h, w) (uint8 or float; > 0 resp.
    > 0.5 is foreground), the first ones used. Returns the mixed batch (same dtype) and a (B,) bool
    marking the mask inputs.
    """
    b = images.shape[0]
    n = min(int(share * b + 0.5), masks.shape[0])
    is_mask = torch.zeros(b, dtype=torch.bool, device=images.device)
    if n == 0:
        return images, is_mask
    positions = torch.randperm(b, generator=generator, device=generator.device)[:n].sort().values
    positions = positions.to(images.device)
    chosen = masks[:n].to(images.device)
    binary = (chosen > 0) if chosen.dtype == torch.uint8 else (chosen > 0.5)
    if binary.shape[-2:] != images.shape[-2:]:
        binary = F.interpolate(binary.float(), size=images.shape[-2:], mode="nearest") > 0.5
    white = 255 if images.dtype == torch.uint8 else 1.0
    mixed = images.clone()
    mixed[positions] = (binary.to(images.dtype) * white).expand(-1, 3, -1, -1)
    is_mask[positions] = True
    return mixed, is_mask


# --- the method ------------------------------------------------------------------------------------

@register
class MeanFlow(Method):
    name = "meanflow"
    paper = "SpectraFlow stage 1 (Chen et al. 2026) with MeanFlow (Geng et al. 2025)"
    defaults = {"domain": "mixed", "mask_share": 0.5, "target": "online", "ema_latent": "online", "export": "online",
                "ema": 0.999, "head_dim": 256, "head_blocks": 3, "freq_dim": 256, "head_skip": True, "p_mean": -0.4,
                "p_std": 1.0, "ratio_r_neq_t": 0.25, "norm_p": 1.0, "norm_eps": 0.01}
    choices = {"domain": ("mixed", "image"), "target": ("online", "ema"), "ema_latent": ("online", "ema"),
               "export": ("online", "ema")}
    bounds = {"ratio_r_neq_t": (0.0, 1.0), "p_std": (0.0, None), "norm_p": (0.0, None)}
    recipe = "light"
    group = "flow/dispersive"
    uses_labels = True  # per config: reads_labels (domain=image reads none)

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        if not 0.0 <= cfg["mask_share"] <= 1.0 or not 0.0 <= cfg["ratio_r_neq_t"] <= 1.0:
            raise BenchError("meanflow: mask_share and ratio_r_neq_t must lie in [0, 1]")
        if cfg["ema_latent"] != "online" and cfg["target"] != "ema":
            raise BenchError("meanflow: ema_latent=ema applies to the EMA target only; add target=ema")
        self.head = MeanFlowHead(ctx.feature_channels[-1], cfg["head_dim"], cfg["head_blocks"], cfg["freq_dim"],
                                 cfg["head_skip"])
        ema_target = cfg["target"] == "ema"
        if cfg["export"] == "ema" or (ema_target and cfg["ema_latent"] == "ema"):
            self.add_targets("backbone")  # EMA encoder: exported, or the target's own latent
        if ema_target:
            self.add_targets("head")

    @classmethod
    def reads_labels(cls, cfg: dict[str, Any]) -> bool:
        """Mixed-domain MeanFlow reads the labelled subset's masks; ``domain=image`` reads no labels."""
        return cfg.get("domain", cls.defaults["domain"]) == "mixed"

    def momentum_at(self, step: int) -> float:
        return self.cfg["ema"]  # constant EMA (SpectraFlow: 0.999)

    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        """One light-augmented view (x1) of the batch; with ``domain=mixed`` a share of the images is first
        replaced by the given labelled masks as 3-channel images (``mix_mask_inputs``)."""
        from bench.augment import make_views

        if self.cfg["domain"] == "mixed":
            if masks is None:
                raise BenchError("meanflow (domain=mixed) needs a batch of labelled masks: pass masks= to "
                                 "make_views, or use meanflow:domain=image")
            images, _ = mix_mask_inputs(images, masks, self.cfg["mask_share"], generator)
        views = make_views(images, self.recipe, self.ctx.image_size, generator, image_ids=image_ids)
        views.masks = None  # masks were inputs only; nothing downstream may use them as targets
        return views

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = views.x1
        z0 = self.backbone(x)[-1].float()
        cfg = self.cfg
        t, r = sample_times(z0.shape[0], cfg["p_mean"], cfg["p_std"], cfg["ratio_r_neq_t"], z0.device)
        noise = torch.randn_like(z0)
        z_t, v = interpolate(z0, noise, t)
        if cfg["target"] == "online":
            u, dudt = u_and_dudt(self.head, z_t, v, r, t)
            u_tgt = meanflow_target(v, dudt, r, t)
        else:
            with torch.autocast(device_type=z_t.device.type, enabled=False):
                u = self.head(z_t, r.float(), t.float())
            u_tgt = self._ema_target(x, z_t, v, noise, r, t)
        loss, delta2 = meanflow_loss(u, u_tgt, cfg["norm_p"], cfg["norm_eps"])
        pooled = z0.detach().mean(dim=(2, 3))
        return loss, {"loss": loss.detach(), "delta2": delta2.detach().mean(),
                      "fm": (u.detach() - v.detach()).pow(2).flatten(1).sum(1).mean(),
                      "std": embedding_std(pooled), "feat_var": pooled.var(dim=0).mean()}

    @torch.no_grad()
    def _ema_target(self, x: Tensor, z_t: Tensor, v: Tensor, noise: Tensor, r: Tensor, t: Tensor) -> Tensor:
        """u_tgt from the EMA head: at the online z_t and v (SpectraFlow Eq. 3, ``ema_latent=online``) or at
        the EMA encoder's own latent with the same ε, t, r (``ema_latent=ema``)."""
        if self.cfg["ema_latent"] == "ema":
            z_t, v = interpolate(self.target_backbone(x)[-1].float(), noise, t)
        _, dudt = u_and_dudt(self.target_head, z_t.detach(), v.detach(), r, t)
        return meanflow_target(v, dudt, r, t)

    def export(self) -> dict[str, dict[str, Tensor]]:
        """The online encoder (default) or its EMA copy (``export=ema``); the head is not exported."""
        source = self.target_backbone if self.cfg["export"] == "ema" else self.backbone
        return {"backbone": {k: v.detach().cpu() for k, v in source.state_dict().items()}}
