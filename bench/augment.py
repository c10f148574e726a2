"""Batched tensor augmentation: two views of a batch plus the geometry that relates them.

Everything runs on whole batches on the input's device (CPU or CUDA); the only Python loops are
over the four colour-jitter operations, never over samples or pixels. All randomness comes from
the ``torch.Generator`` passed in (same generator state + same input ⇒ same output); parameters are
drawn on the generator's device and moved to the images' device, so pass a generator on the
images' device for speed on a GPU.

Pipeline of one view (torchvision semantics, batched):

1. Random resized crop with torchvision's ``RandomResizedCrop.get_params`` rule (ten attempts of
   area ∈ scale·H·W and log-uniform aspect ratio, integer width/height, uniform offset; centre-crop
   fallback), then crop + resize of the whole batch in one ``torchvision.ops.roi_align`` call
   (``aligned=True``: output pixel (r, c) samples the source at the cell centre
   x0 + (c + 0.5)·(x1 − x0)/S; adaptive sampling averages ceil(crop/S)² bilinear samples per output
   pixel, an area-style antialias when downscaling).
2. Horizontal flip after the crop.
3. Colour jitter (torchvision ``ColorJitter``): brightness, contrast, saturation, hue in a
   random order per sample, applied with probability p. Hue is a per-sample rotation of the hue
   channel through a vectorised RGB → HSV → RGB (the same HSV conversion as torchvision's tensor
   ``adjust_hue``, so results match it to float precision).
4. Grayscale (ITU-R 601 weights 0.2989/0.587/0.114), Gaussian blur (σ ~ U[0.1, 2.0], kernel ≈ 10% of the
   view size, odd; separable, reflect padding, per-sample kernels via a grouped conv), solarise
   (x ≥ 0.5 ↦ 1 − x), additive Gaussian noise (DiCoH); then ImageNet normalisation.

Recipes (``RECIPES``) follow the papers: BYOL (Grill et al. 2020, Table 6), MoCo-v2 (Chen et al.
2020), DiCoH (MoCo-v2 + Gaussian noise), Med-DisSeg's photometric perturbation (no crop) and a
light fine-tuning recipe.

Geometry: boxes are (x0, y0, x1, y1) in normalised source coordinates (0 = left/top edge, 1 =
right/bottom edge); how the cells of two views correspond is ``bench.geometry``. ``copy_paste`` is
CP2's composition with returned paste masks. Which method uses which recipe: docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from bench.errors import BenchError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass
class Views:
    """Two augmented views of one batch and how they relate to the source images.

    Boxes are crop boxes in *normalised source-image coordinates* (x0, y0, x1, y1), each in [0, 1],
    where 0 is the left/top edge and 1 the right/bottom edge of the source image. ``flip`` means the
    view was mirrored horizontally after cropping. A feature-map cell (row r, col c) of an h×w map of
    a view covers, before the flip, the source region x0 + (c + 0.5)·(x1 − x0)/w at its centre.
    """

    x1: Tensor  # (B, 3, S, S) float, normalised with ImageNet mean/std
    x2: Tensor
    box1: Tensor  # (B, 4) float
    box2: Tensor
    flip1: Tensor  # (B,) bool
    flip2: Tensor
    image_ids: Tensor  # (B,) long: index of each source image in the pretraining pool
    paste1: Tensor | None = None  # (B, 1, S, S) float in {0, 1}: CP2 copy-paste foreground masks
    paste2: Tensor | None = None
    masks: Tensor | None = None  # (B, 1, S, S) float labels cropped like view 1 (label-reading methods)
    source_size: tuple[int, int] | None = None  # (H, W) of the source images the boxes refer to


# --- recipes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewAug:
    """Augmentation parameters of one view. ``scale=None``: no crop (the whole image is resized)."""

    scale: tuple[float, float] | None = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (w/h)
    flip_p: float = 0.5
    brightness: float = 0.0  # ColorJitter strengths: factor ~ U[max(0, 1 − s), 1 + s]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # hue shift ~ U[−hue, hue] in turns (≤ 0.5)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    noise_p: float = 0.0
    noise_std: float = 0.0  # std of additive Gaussian noise on [0, 1] pixel values


@dataclass(frozen=True)
class ViewRecipe:
    """A named pair of view augmentations (view 1 → ``Views.x1``, view 2 → ``Views.x2``)."""

    name: str
    view1: ViewAug
    view2: ViewAug
    source: str = ""


_BYOL = ViewAug(scale=(0.08, 1.0), flip_p=0.5, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                jitter_p=0.8, gray_p=0.2)
_MOCOV2 = ViewAug(scale=(0.2, 1.0), flip_p=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                  jitter_p=0.8, gray_p=0.2, blur_p=0.5)
_DICOH = replace(_MOCOV2, noise_p=0.5, noise_std=0.05)
# Med-DisSeg stage I: strong photometric perturbation, no geometric crop. The paper names the
# operations but no strengths; 0.5/0.5/0.5/0.2 is our choice (stronger than MoCo-v2's 0.4/0.4/0.4/0.1).
_PHOTOMETRIC = ViewAug(scale=None, flip_p=0.5, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2,
                       jitter_p=0.8, gray_p=0.2, blur_p=0.5)
_LIGHT = ViewAug(scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, brightness=0.2, contrast=0.2,
                 saturation=0.1, hue=0.0, jitter_p=0.5)

RECIPES: dict[str, ViewRecipe] = {
    "byol": ViewRecipe("byol", replace(_BYOL, blur_p=1.0, solarize_p=0.0),
                       replace(_BYOL, blur_p=0.1, solarize_p=0.2), "Grill et al. 2020, BYOL, Table 6"),
    "mocov2": ViewRecipe("mocov2", _MOCOV2, _MOCOV2, "Chen et al. 2020, MoCo v2 (aug+)"),
    "dicoh": ViewRecipe("dicoh", _DICOH, _DICOH, "DiCoH §3: MoCo-v2 + Gaussian noise"),
    "photometric": ViewRecipe("photometric", _PHOTOMETRIC, _PHOTOMETRIC, "Med-DisSeg stage I"),
    "light": ViewRecipe("light", _LIGHT, _LIGHT, "fine-tuning augmentation"),
}


def get_recipe(recipe: str | ViewRecipe) -> ViewRecipe:
    """A recipe by name (or the recipe itself); unknown names raise a BenchError listing the known ones."""
    if isinstance(recipe, ViewRecipe):
        return recipe
    if recipe not in RECIPES:
        raise BenchError(f"unknown augmentation recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[recipe]


# --- randomness ---------------------------------------------------------------------------------


def _rand(generator: torch.Generator, *shape: int, device: torch.device) -> Tensor:
    """U[0, 1) drawn from ``generator`` (on its own device), moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _uniform(generator: torch.Generator, n: int, low: float, high: float, device: torch.device) -> Tensor:
    return low + (high - low) * _rand(generator, n, device=device)


def _coin(generator: torch.Generator, n: int, p: float, device: torch.device) -> Tensor:
    return _rand(generator, n, device=device) < p


# --- geometry of one view -----------------------------------------------------------------------


def _attempt_sides(generator: torch.Generator, batch: int, attempts: int, total: float,
                   fraction: tuple[float, float], ratio: tuple[float, float],
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, attempts) candidate sides round(√(a·r)), round(√(a/r)) for areas a ~ U(fraction)·total and
    aspect ratios r ~ exp(U(log ratio)) (torchvision's RandomResizedCrop / RandomErasing draws)."""
    u = _rand(generator, batch, attempts, 2, device=device).double()
    target = total * (fraction[0] + (fraction[1] - fraction[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    return torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))


def _place_first_accepted(ok: Tensor, h: Tensor, w: Tensor, fallback_h: float, fallback_w: float,
                          height: int, width: int, generator: torch.Generator,
                          device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample the first accepted attempt (else the fallback size, centred) at a uniform integer
    offset: (top, left, h, w), each (B,)."""
    batch = ok.shape[0]
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first accepted attempt
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    found = ok.any(dim=1)
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    offset = _rand(generator, batch, 2, device=device).double()
    top = torch.minimum(torch.floor(offset[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(offset[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return top, left, h, w


def sample_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float], generator: torch.Generator, device: torch.device,
                      attempts: int = 10) -> Tensor:
    """Batched ``RandomResizedCrop.get_params``: (B, 4) normalised boxes (x0, y0, x1, y1).

    Per sample, ten attempts of target area ~ U(scale)·H·W and aspect ratio ~ exp(U(log ratio)),
    w = round(√(area·ratio)), h = round(√(area/ratio)); the first attempt with 0 < w ≤ W and
    0 < h ≤ H is kept with a uniform integer offset; otherwise torchvision's centre-crop fallback.
    """
    w, h = _attempt_sides(generator, batch, attempts, height * width, scale, ratio, device)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    fw, fh = _fallback_size(height, width, ratio)
    top, left, h, w = _place_first_accepted(ok, h, w, fh, fw, height, width, generator, device)
    box = torch.stack([left / width, top / height, (left + w) / width, (top + h) / height], dim=1)
    return box.float()


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's centre-crop fallback size (w, h)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return float(width), float(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return float(round(height * max(ratio))), float(height)
    return float(width), float(height)


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop normalised boxes (K, 4) of a float batch (B, C, H, W) and resize: (K, C, size, size).

    Box k crops image k mod B (so K = 2B crops two views of every image in one call).

    One ``roi_align`` call (aligned, adaptive sampling): output pixel (r, c) is the average of
    bilinear samples spread over its cell, centred at x0 + (c + 0.5)·(x1 − x0)/size (in source
    units), so its value is the source at ``cell_centers`` for any smooth image.
    """
    b, _, height, width = images.shape
    scale = boxes.new_tensor([width, height, width, height])
    index = torch.arange(boxes.shape[0], device=boxes.device) % b  # box k crops image k mod B
    rois = torch.cat([index.to(boxes.dtype)[:, None], boxes * scale], 1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)


def _flip(x: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# --- colour operations (batched, per-sample factors; x in [0, 1]) ----------------------------------


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """x·f per sample (torchvision ``adjust_brightness``)."""
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean grey level of each image (torchvision ``adjust_contrast``)."""
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grey image (torchvision ``adjust_saturation``)."""
    return _blend(x, _gray(x), factor)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """Vectorised RGB → HSV on (B, 3, H, W) in [0, 1]; hue in turns [0, 1) (torchvision's convention)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    gray = delta == 0
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(gray, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray, torch.zeros_like(h), torch.remainder(h / 6.0, 1.0))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Vectorised HSV → RGB: channel n ∈ (5, 3, 1) (R, G, B) is v − v·s·clamp(min(k, 4 − k), 0, 1)
    with k = (n + 6h) mod 6."""
    h, s, v = hsv.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype)[None, :, None, None]
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return (v.unsqueeze(1) - v.unsqueeze(1) * s.unsqueeze(1) * ramp).clamp(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each image by ``shift`` turns (torchvision ``adjust_hue``, per-sample factor)."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift[:, None, None], 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample σ (B,), reflect padding, as a grouped conv."""
    b, c, height, width = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C, k)
    pad = kernel_size // 2
    y = x.reshape(1, b * c, height, width)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, height, width)


def blur_kernel_size(size: int) -> int:
    """Odd kernel ≈ 10% of the view size (23 at 224 px, as BYOL), at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def _color_jitter(x: Tensor, aug: ViewAug, generator: torch.Generator) -> Tensor:
    """ColorJitter with probability ``jitter_p``: the four operations in a random order per sample."""
    b, dev = x.shape[0], x.device
    apply = _coin(generator, b, aug.jitter_p, dev)
    def factor(strength: float) -> Tensor:  # torchvision: U[max(0, 1 − s), 1 + s]
        return _uniform(generator, b, max(0.0, 1 - strength), 1 + strength, dev)

    ops = [(aug.brightness, adjust_brightness, factor(aug.brightness)),
           (aug.contrast, adjust_contrast, factor(aug.contrast)),
           (aug.saturation, adjust_saturation, factor(aug.saturation)),
           (aug.hue, adjust_hue, _uniform(generator, b, -aug.hue, aug.hue, dev))]
    order = torch.argsort(_rand(generator, b, 4, device=dev), dim=1)  # a random permutation per sample
    x = x.clone()
    for slot in range(4):
        for op_index, (strength, fn, factors) in enumerate(ops):
            if strength <= 0:
                continue  # torchvision skips an operation whose strength is 0
            idx = torch.nonzero(apply & (order[:, slot] == op_index)).squeeze(1)
            if idx.numel():
                x[idx] = fn(x[idx], factors[idx])
    return x


def _photometric(x: Tensor, aug: ViewAug, generator: torch.Generator) -> Tensor:
    """Jitter → grayscale → blur → solarise → noise on a [0, 1] batch (all per-sample coin flips)."""
    b, dev = x.shape[0], x.device
    x = _color_jitter(x, aug, generator)
    gray = _coin(generator, b, aug.gray_p, dev)
    x = torch.where(gray[:, None, None, None], _gray(x).expand_as(x), x)
    blur = _coin(generator, b, aug.blur_p, dev)
    sigma = _uniform(generator, b, aug.blur_sigma[0], aug.blur_sigma[1], dev)
    idx = torch.nonzero(blur).squeeze(1)
    if idx.numel():
        x = x.clone()
        x[idx] = gaussian_blur(x[idx], sigma[idx], blur_kernel_size(x.shape[-1]))
    solar = _coin(generator, b, aug.solarize_p, dev)
    x = torch.where(solar[:, None, None, None] & (x >= 0.5), 1 - x, x)
    if aug.noise_p > 0 and aug.noise_std > 0:
        noisy = _coin(generator, b, aug.noise_p, dev)
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(dev)
        x = torch.where(noisy[:, None, None, None], (x + aug.noise_std * noise).clamp(0, 1), x)
    return x


# --- views --------------------------------------------------------------------------------------


def normalize(x: Tensor) -> Tensor:
    """[0, 1] RGB → ImageNet-normalised."""
    mean = x.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = x.new_tensor(IMAGENET_STD)[None, :, None, None]
    return (x - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """ImageNet-normalised → [0, 1] RGB (for plots and tests)."""
    mean = x.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = x.new_tensor(IMAGENET_STD)[None, :, None, None]
    return x * std + mean


def _as_float(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise BenchError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if images.is_floating_point():
        return images.float()
    raise BenchError(f"expected uint8 (or float in [0, 1]) images, got {images.dtype}")


def _sample_geometry(images: Tensor, aug: ViewAug, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    b, _, height, width = images.shape
    if aug.scale is None:
        box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=images.device).expand(b, 4).clone()
    else:
        box = sample_crop_boxes(b, height, width, aug.scale, aug.ratio, generator, images.device)
    return box, _coin(generator, b, aug.flip_p, images.device)


def _crop_masks(masks: Tensor, box: Tensor, flip: Tensor, size: int) -> Tensor:
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise BenchError(f"expected masks of shape (B, 1, H, W), got {tuple(masks.shape)}")
    fg = (masks > 0).float()
    return _flip((crop_resize(fg, box, size) > 0.5).float(), flip)


def augment_view(images: Tensor, aug: ViewAug, size: int, generator: torch.Generator,
                 masks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One augmented view: (x normalised (B, 3, S, S), box (B, 4), flip (B,), masks or None)."""
    source = _as_float(images)
    box, flip = _sample_geometry(source, aug, generator)
    x = _flip(crop_resize(source, box, size), flip)
    x = normalize(_photometric(x, aug, generator))
    return x, box, flip, None if masks is None else _crop_masks(masks, box, flip, size)


def make_views(images: Tensor, recipe: str | ViewRecipe, size: int, generator: torch.Generator,
               image_ids: Tensor | None = None, masks: Tensor | None = None) -> Views:
    """Two views of a uint8 batch (B, 3, H, W) with a recipe; ``masks`` (B, 1, H, W) follow view 1.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> v = make_views(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), "byol", 32, g)
        >>> v.x1.shape, v.box1.shape
        (torch.Size([4, 3, 32, 32]), torch.Size([4, 4]))
    """
    rec = get_recipe(recipe)
    source = _as_float(images)
    b = source.shape[0]
    box1, flip1 = _sample_geometry(source, rec.view1, generator)
    box2, flip2 = _sample_geometry(source, rec.view2, generator)
    crops = crop_resize(source, torch.cat([box1, box2]), size)  # both views in one roi_align call
    x1 = normalize(_photometric(_flip(crops[:b], flip1), rec.view1, generator))
    x2 = normalize(_photometric(_flip(crops[b:], flip2), rec.view2, generator))
    if image_ids is None:
        image_ids = torch.arange(b, device=source.device)
    view_masks = None if masks is None else _crop_masks(masks, box1, flip1, size)
    return Views(x1=x1, x2=x2, box1=box1, box2=box2, flip1=flip1, flip2=flip2,
                 image_ids=image_ids, masks=view_masks, source_size=tuple(source.shape[-2:]))


def finetune_batch(images: Tensor, masks: Tensor, size: int, generator: torch.Generator,
                   recipe: str | ViewRecipe = "light") -> tuple[Tensor, Tensor]:
    """One augmented view of a labelled batch: (x normalised (B, 3, S, S), y (B, 1, S, S) in {0, 1})."""
    x, _, _, y = augment_view(images, get_recipe(recipe).view1, size, generator, masks=masks)
    return x, y


def to_input(images: Tensor, size: int | None = None) -> Tensor:
    """Model input without augmentation: uint8 (B, 3, H, W) → normalised float, resized to size² if given."""
    x = _as_float(images)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        full = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=x.device).expand(x.shape[0], 4)
        x = crop_resize(x, full, size)
    return normalize(x)


# --- CP2 copy-paste -----------------------------------------------------------------------------


def sample_paste_masks(batch: int, size: int, generator: torch.Generator, device: torch.device,
                       area: tuple[float, float] = (0.5, 0.8), ratio: tuple[float, float] = (0.8, 1.25),
                       attempts: int = 10) -> Tensor:
    """RandomErasing-style rectangles as (B, 1, S, S) float {0, 1} masks.

    torchvision ``RandomErasing.get_params`` (area ~ U(area)·S², aspect ~ exp(U(log ratio)),
    h = round(√(area·aspect)), w = round(√(area/aspect)), uniform offset), with one refinement: an
    attempt is accepted only if h, w < S *and* the rounded area h·w/S² lies in ``area``; if none of
    the attempts is accepted, a centred square of the mid-range area is used (torchvision would
    return the whole image, outside the range).
    """
    h, w = _attempt_sides(generator, batch, attempts, size * size, area, ratio, device)
    frac = h * w / (size * size)
    ok = (h > 0) & (h < size) & (w > 0) & (w < size) & (frac >= area[0]) & (frac <= area[1])
    side = float(min(size - 1, round(size * math.sqrt(sum(area) / 2))))
    top, left, h, w = _place_first_accepted(ok, h, w, side, side, size, size, generator, device)
    idx = torch.arange(size, device=device, dtype=torch.float64)
    rows = (idx[None] >= top[:, None]) & (idx[None] < (top + h)[:, None])
    cols = (idx[None] >= left[:, None]) & (idx[None] < (left + w)[:, None])
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1).float()


def copy_paste(views: Views, backgrounds1: Tensor, backgrounds2: Tensor, generator: torch.Generator,
               area: tuple[float, float] = (0.5, 0.8), ratio: tuple[float, float] = (0.8, 1.25)) -> Views:
    """CP2 (Wang et al. 2022): paste a random rectangle of each full-size view onto a background.

    out = fg·mask + bg·(1 − mask), with an independent RandomErasing-style rectangle for view 1
    (query) and view 2 (key); ``backgroundsN`` are already-augmented normalised (B, 3, S, S) images.
    The masks are returned as ``paste1``/``paste2`` (never inferred from pixel values).
    """
    for name, bg in (("backgrounds1", backgrounds1), ("backgrounds2", backgrounds2)):
        if bg.shape != views.x1.shape:
            raise BenchError(f"copy_paste: {name} has shape {tuple(bg.shape)}, expected the views' "
                             f"{tuple(views.x1.shape)}; augment the backgrounds to the same size")
    b, _, size, _ = views.x1.shape
    dev = views.x1.device
    paste1 = sample_paste_masks(b, size, generator, dev, area, ratio)
    paste2 = sample_paste_masks(b, size, generator, dev, area, ratio)
    x1 = torch.where(paste1.bool(), views.x1, backgrounds1)
    x2 = torch.where(paste2.bool(), views.x2, backgrounds2)
    return replace(views, x1=x1, x2=x2, paste1=paste1, paste2=paste2)
