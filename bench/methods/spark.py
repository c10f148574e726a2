"""SparK — Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling",
ICLR 2023 (released code: keyu-tian/SparK, ``pretrain/spark.py``, ``pretrain/encoder.py``,
``pretrain/decoder.py``, ``pretrain/utils/arg_util.py``).

Masking: the image is split into cells of the backbone's stride (32 px: one cell per C5 location) and
``round(L·(1 − mask_ratio))`` of the L cells are kept ("active"), mask_ratio = 0.6 (``SparK.mask``).
The masked pixels are zeroed.

Sparse encoder: masked positions must stay empty through every stage. SparK's released code does this
**by dense emulation**, and so does this module, in the same way (``encoder.py``): the output of every
convolution and pooling layer is multiplied by the active map at its resolution (the cell mask repeated
to that resolution), and every BatchNorm normalises only the active positions (statistics over active
positions, masked positions left at 0: ``SparseBatchNorm2d``). Here that is done with forward hooks and a
temporary BN forward on the unchanged timm backbone, so the exported state dict is the plain backbone's.
Difference from true sparse convolution (submanifold sparse conv, e.g. MinkowskiEngine): the dense
emulation computes every position and then discards the masked ones, so it costs as much as a dense
forward; a masked position next to an active one is computed from zero-filled neighbours and then
zeroed, whereas a sparse convolution would never compute it. The active outputs are identical.

Densify and decode (``SparK.forward``, ``LightDecoder``): for each of the four stages (C5 first), a
sparse BN, masked positions filled with a per-stage learned [mask] token, and a projection (1×1 conv for
C5, 3×3 for the others) to the decoder width at that scale (768, 384, 192, 96). The light UNet decoder
adds each stage's densified map and upsamples 2× per block (transposed conv 4×4 stride 2, then
conv3×3-BN-ReLU6-conv3×3-BN), five blocks for stride 32, then a 1×1 conv to RGB.

Target and loss: per-patch normalised pixels (each 32×32 patch of the input standardised by its own mean
and std, ε = 1e-6), mean squared error per patch, averaged over the **masked** patches only.
Views: one view, random resized crop 0.67–1 and flip (``utils/imagenet.py``), the same as SimMIM's.

Departures: no SyncBatchNorm under DDP (the released ``sbn``); below 64 px the stride-32 grid would
have a single cell, so the cell size becomes size/2 (2×2 cells) and a stage coarser than the cell grid
is active where any of its cells is (max-pool of the active map); the released optimiser (LAMB, base lr
2e-4, wd 0.04→0.2, 1600 epochs) is kept for reference only. Supports BatchNorm CNNs (ResNet family).
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.augment import Views
from bench.errors import BenchError
from bench.methods import register
from bench.methods.base import Method, PretrainContext, embedding_std
from bench.methods.byol import pool
from bench.methods.simmim import MIM_VIEW, single_view

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def keep_count(cells: int, mask_ratio: float) -> int:
    """Active (kept) cells: round(L·(1 − r)), at least one and leaving at least one masked."""
    return min(max(round(cells * (1.0 - mask_ratio)), 1), cells - 1)


def random_active(batch: int, grid: int, mask_ratio: float, generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> Tensor:
    """(B, 1, g, g) bool, True = kept: ``keep_count`` random cells per image (SparK's ``mask``)."""
    cells = grid * grid
    gen_device = generator.device if generator is not None else device
    order = torch.rand(batch, cells, generator=generator, device=gen_device).argsort(dim=1)
    active = torch.zeros(batch, cells, dtype=torch.bool, device=gen_device)
    active.scatter_(1, order[:, :keep_count(cells, mask_ratio)], True)
    return active.reshape(batch, 1, grid, grid).to(device or gen_device)


def active_at(active: Tensor, h: int, w: int) -> Tensor:
    """The (B, 1, g, g) active map at an h×w resolution: repeated (nearest) when finer, max-pooled when coarser."""
    if active.shape[-2:] == (h, w):
        return active
    if h >= active.shape[-2]:
        return F.interpolate(active.float(), size=(h, w), mode="nearest").bool()
    return F.adaptive_max_pool2d(active.float(), (h, w)).bool()


def batch_norm_rows(bn: nn.modules.batchnorm._BatchNorm, rows: Tensor) -> Tensor:
    """``bn`` applied to (N, C) rows (BatchNorm1d semantics, running statistics updated as nn.BatchNorm)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch = bn.training or bn.running_mean is None
    keep_running = not bn.training or bn.track_running_stats
    return F.batch_norm(rows, bn.running_mean if keep_running else None, bn.running_var if keep_running else None,
                        bn.weight, bn.bias, use_batch, momentum, bn.eps)


def sparse_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, active: Tensor) -> Tensor:
    """BN over the active positions only; masked positions are 0 in the output (SparK's SparseBatchNorm2d)."""
    bhwc = x.permute(0, 2, 3, 1)
    where = active_at(active, x.shape[2], x.shape[3])[:, 0]
    out = torch.zeros_like(bhwc)
    out[where] = batch_norm_rows(bn, bhwc[where]).to(out.dtype)
    return out.permute(0, 3, 1, 2)


@contextmanager
def sparse_encoding(backbone: nn.Module, active: Tensor) -> Iterator[None]:
    """While inside: every conv/pool output of ``backbone`` is re-masked and every BN is sparse."""
    def remask(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        return output * active_at(active, output.shape[2], output.shape[3]).to(output.dtype)

    handles, patched = [], []
    for module in backbone.modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            handles.append(module.register_forward_hook(remask))
        elif type(module) is nn.BatchNorm2d:
            module.forward = types.MethodType(lambda bn, x: sparse_batch_norm(bn, x, active), module)
            patched.append(module)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, h·p, w·p) → (B, h·w, p·p·C), patches in row-major order."""
    b, c, height, width = x.shape
    h, w = height // p, width // p
    return x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)


def spark_loss(x: Tensor, x_rec: Tensor, active: Tensor, patch: int) -> Tensor:
    """Mean over masked patches of the per-patch MSE to the patch-normalised input (SparK's loss)."""
    target = patchify(x.float(), patch)
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((patchify(x_rec.float(), patch) - (target - mean) / std) ** 2).mean(dim=-1)
    masked = (~active).flatten(1).float()
    return (per_patch * masked).sum() / (masked.sum() + 1e-8)


class UNetBlock(nn.Module):
    """2× upsampling block of SparK's light decoder."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
                                  nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """log2(stride) UNet blocks (widths width/2^i), each fed the densified map of its scale, then 1×1 → RGB."""

    def __init__(self, stride: int, width: int):
        super().__init__()
        n = round(math.log2(stride))
        channels = [width // 2**i for i in range(n + 1)]
        self.dec = nn.ModuleList(UNetBlock(cin, cout) for cin, cout in zip(channels[:-1], channels[1:], strict=True))
        self.proj = nn.Conv2d(channels[-1], 3, kernel_size=1)
        for m in self.modules():  # the released initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, to_dec: list[Tensor]) -> Tensor:
        x: Tensor | float = 0.0
        for i, block in enumerate(self.dec):
            if i < len(to_dec):
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)


@register
class SparK(Method):
    name = "spark"
    paper = "Tian et al., Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling, ICLR 2023"
    group = "masked modelling"
    defaults = {"mask_ratio": 0.6, "decoder_width": 768}
    bounds = {"mask_ratio": (0.0, 1.0), "decoder_width": (32, None)}  # width/2⁵ channels in the last block

    def __init__(self, backbone: nn.Module, ctx: PretrainContext, cfg: dict):
        super().__init__(backbone, ctx, cfg)
        check_supported(backbone, ctx.image_size, cfg["mask_ratio"])
        reductions = backbone.feature_info.reduction()
        self.levels = [i for i, r in enumerate(reductions) if r >= 4]  # C2..C5 (SparK's hierarchy)
        self.stride = reductions[-1]
        self.grid = max(2, ctx.image_size // self.stride)
        self.patch = ctx.image_size // self.grid
        widths = [ctx.feature_channels[i] for i in reversed(self.levels)]  # C5 first
        self.densify_norms = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        self.mask_tokens = nn.ParameterList(_mask_token(c) for c in widths)
        width = cfg["decoder_width"]
        self.densify_projs = nn.ModuleList(
            nn.Identity() if i == 0 and c == width else
            nn.Conv2d(c, width // 2**i, kernel_size=1 if i == 0 else 3, padding=0 if i == 0 else 1)
            for i, c in enumerate(widths))
        self.decoder = LightDecoder(self.stride, width)

    def make_views(self, images: Tensor, image_ids: Tensor, generator: torch.Generator,
                   masks: Tensor | None = None) -> Views:
        views = single_view(images, MIM_VIEW, self.ctx.image_size, generator, image_ids)
        active = random_active(images.shape[0], self.grid, self.cfg["mask_ratio"], generator, views.x1.device)
        views.mask = ~active[:, 0]
        return views

    def encode(self, x: Tensor, active: Tensor) -> list[Tensor]:
        """Sparse (dense-emulated) features of the masked input, C2..C5."""
        with sparse_encoding(self.backbone, active):
            features = self.backbone(x * active_at(active, x.shape[2], x.shape[3]).to(x.dtype))
        return [features[i] for i in self.levels]

    def densify(self, features: list[Tensor], active: Tensor) -> list[Tensor]:
        """C5 first: sparse BN, [mask] tokens at the masked positions, projection to the decoder width."""
        out = []
        for i, feature in enumerate(reversed(features)):
            where = active_at(active, feature.shape[2], feature.shape[3])
            normed = sparse_batch_norm(self.densify_norms[i], feature, active)
            filled = torch.where(where, normed, self.mask_tokens[i].to(normed.dtype).expand_as(normed))
            out.append(self.densify_projs[i](filled))
        return out

    def training_step(self, views: Views, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x = views.x1
        mask = getattr(views, "mask", None)  # (B, g, g) True = masked
        if mask is None:
            active = random_active(x.shape[0], self.grid, self.cfg["mask_ratio"], device=x.device)
        else:
            active = ~mask.to(x.device)[:, None]
        features = self.encode(x, active)
        x_rec = self.decoder(self.densify(features, active))
        loss = spark_loss(x, x_rec, active, self.patch)
        return loss, {"loss": loss.detach(), "std": embedding_std(pool(features[-1])),
                      "active": active.float().mean()}


def _mask_token(channels: int) -> nn.Parameter:
    token = nn.Parameter(torch.zeros(1, channels, 1, 1))
    nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
    return token


def check_supported(backbone: nn.Module, size: int, mask_ratio: float) -> None:
    """SparK's emulation needs plain BatchNorm2d, a stride-32 grid that tiles the image, and 0 < r < 1."""
    others = {type(m).__name__ for m in backbone.modules() if isinstance(m, _NORMS) and type(m) is not nn.BatchNorm2d}
    if others:
        raise BenchError(f"spark supports BatchNorm CNN backbones (ResNet family); this one has {sorted(others)}")
    stride = backbone.feature_info.reduction()[-1]
    if size % stride:
        raise BenchError(f"spark needs an image size that is a multiple of {stride} (got {size})")
    if not 0.0 < mask_ratio < 1.0:
        raise BenchError(f"spark:mask_ratio={mask_ratio} must lie strictly between 0 and 1")
