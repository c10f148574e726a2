"""Decoding image and mask files: RGB images, masks binarised by what they hold (docs/datasets.md).

Mask rules (``LAYOUT:PATH?mask=RULE`` or ``mask_rule=`` forces one for a whole dataset):

- ``auto`` (default): decided per mask from its values. Colour channels are reduced to one value
  per pixel (their mean when the mask is grey, their maximum when it is coloured, so that pure red
  or green counts), then: one level → empty if 0, else full; two levels → the higher one is
  foreground (0/1, 0/255, any two-level grey); more levels with a maximum ≥ half of full scale →
  threshold at half scale (128 for 8-bit: JPEG-noisy grey); more levels below half scale → labels,
  nonzero is foreground (instance/class labels, GlaS) when every label is a solid region, else the
  midpoint between the lowest and highest value. Palette images are read as their colours.
- ``threshold``: mean of the colour channels ≥ half of full scale.
- ``nonzero``: any colour channel > 0.
- ``label``: the stored value > 0 (palette index, grey level or any channel): instance labels.
- ``color=R,G,B``: pixels within ±48 of that colour in every channel (JPEG-tolerant).

Size cap: Pillow's ``Image.MAX_IMAGE_PIXELS`` is set to ``MAX_PIXELS`` (8192² ≈ 67 Mpx, 200 MB
as RGB); a larger file is a BenchError naming it (a decompression-bomb guard: tile whole-slide
images first). Pillow's own bomb warning is never printed raw.
"""

from __future__ import annotations

import re
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.errors import BenchError

TIFF_EXTENSIONS = (".tif", ".tiff")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)
MAX_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
COLOR_TOLERANCE = 48
GREY_SPREAD = 48        # channel spread above which a pixel counts as coloured
SOLID_LABEL_PIXELS = 16  # a label level with fewer pixels than this is noise, not a region
RULES = ("auto", "threshold", "nonzero", "label", "color=R,G,B")

# How ``auto`` read a mask (stored with the dataset; counted in notes and in the mask check's message)
# ("noisy grey": thresholded at half scale; "labels": nonzero; "midpoint": between lowest and highest value)
KINDS = ("empty", "full", "two-level", "noisy grey", "labels", "midpoint", "forced rule")
_OPEN_LOCK = threading.Lock()   # warnings.catch_warnings is process-wide: one header read at a time


class Decoded(NamedTuple):
    image: np.ndarray     # (3, S, S) uint8, or (3, H, W) at full resolution when no size is given
    mask: np.ndarray      # (S, S) uint8 in {0, 1}, or (H, W) at full resolution
    native: np.ndarray    # (H, W) bool: the mask at the file's own resolution
    kind: int             # index into KINDS


def check_rule(rule: str) -> str:
    """The rule, normalised; BenchError for an unknown one."""
    text = str(rule).strip().lower().replace(" ", "")
    if text in ("auto", "threshold", "nonzero", "label"):
        return text
    match = re.fullmatch(r"(?:color|colour)=(\d{1,3}),(\d{1,3}),(\d{1,3})", text)
    if match and all(int(v) <= 255 for v in match.groups()):
        return "color={},{},{}".format(*(int(v) for v in match.groups()))
    raise BenchError(f"unknown mask rule {rule!r}; use one of {', '.join(RULES)} (e.g. ?mask=color=255,0,0)")


def _too_large(path: Path, size: tuple[int, int] | None) -> BenchError:
    what = f"{size[0]}×{size[1]} = {size[0] * size[1]:,} pixels" if size else "over twice the cap"
    return BenchError(f"{path} is {what}, over the decoding cap of {MAX_PIXELS:,} pixels (a decompression-bomb "
                      "guard); downscale or tile the image, or remove the pair")


def _pil_open(path: Path) -> Image.Image:
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # said below, in one line
        try:
            image = Image.open(path)
        except Image.DecompressionBombError:
            raise _too_large(path, None) from None
    if image.size[0] * image.size[1] > MAX_PIXELS:
        image.close()
        raise _too_large(path, image.size)
    return image


def _tifffile_read(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        shape = tif.pages[0].shape
        if len(shape) >= 2 and int(np.prod(shape[:2])) > MAX_PIXELS:
            raise _too_large(path, (int(shape[1]), int(shape[0])))
        return np.asarray(tif.asarray(key=0))


def open_file(path: Path) -> Image.Image | np.ndarray:
    """A decoded PIL image, or a numpy array from ``tifffile`` for TIFFs that PIL cannot read."""
    try:
        with _pil_open(path) as image:
            image.load()  # decodes now: a truncated file raises here, not later
            return image
    except DECODE_ERRORS as err:
        reason = f"{type(err).__name__}: {err}"
    if path.suffix.lower() in TIFF_EXTENSIONS:
        try:
            array = _tifffile_read(path)
            if array.ndim in (2, 3) and array.size:
                return array
            reason += f"; tifffile read an array of shape {array.shape}"
        except BenchError:
            raise
        except Exception as err:  # tifffile raises several types for bad files
            reason += f"; tifffile: {type(err).__name__}: {err}"
    raise BenchError(f"cannot decode {path} ({reason}); the file is corrupt or truncated: replace it with "
                     "the released file or remove the pair")


def full_scale(array: np.ndarray) -> float:
    """The value of "white": 255 for 8-bit data, 65535 for 16-bit data, 1 for [0, 1] floats."""
    if array.dtype == bool:
        return 1.0
    peak = float(array.max()) if array.size else 0.0
    if np.issubdtype(array.dtype, np.integer):
        return 255.0 if array.dtype == np.uint8 or peak <= 255 else 65535.0
    return 1.0 if peak <= 1.0 else 255.0


def _channels_last(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        return np.moveaxis(array, 0, -1)
    return array


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    image = open_file(path)
    if isinstance(image, Image.Image) and image.mode in ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1",
                                                           "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    array = _channels_last(np.asarray(image))
    array = np.clip(array.astype(np.float64) / full_scale(array) * 255, 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array[..., :3] if array.shape[-1] >= 3 else np.repeat(array[..., :1], 3, axis=-1)


def _mask_array(path: Path, rule: str) -> np.ndarray:
    """(H, W) or (H, W, C) numbers; palette images as colours unless the rule reads labels."""
    image = open_file(path)
    if isinstance(image, Image.Image):
        if image.mode in ("P", "PA"):
            image = image.convert("L") if rule == "label" else image.convert("RGB")
        elif image.mode in ("LA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("L" if image.mode == "LA" else "RGB")
    array = _channels_last(np.asarray(image))
    if array.ndim == 3 and array.shape[-1] < 3:
        array = array[..., 0]
    return array[..., :3] if array.ndim == 3 else array


def half_scale(scale: float) -> float:
    """The threshold of the ``threshold`` rule: 128 for 8-bit data, 32768 for 16-bit, 0.5 for [0, 1]."""
    return (scale + 1) / 2 if scale > 1 else 0.5


def _by_content(values: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """(foreground, kind) of one value per pixel, by the levels it holds (see the module docstring)."""
    levels, counts = np.unique(values, return_counts=True)
    if levels.size == 1:
        return np.full(values.shape, bool(levels[0] > 0)), 0 if levels[0] <= 0 else 1
    if levels.size == 2:
        return values == levels[1], 2
    if float(levels[-1]) >= half_scale(scale):
        return values >= half_scale(scale), 3
    nonzero = levels > 0
    if levels[0] == 0 and (counts[nonzero] >= SOLID_LABEL_PIXELS).all():
        return values > 0, 4
    return values > (float(levels[0]) + float(levels[-1])) / 2, 5


def decode_mask(path: Path, rule: str = "auto") -> tuple[np.ndarray, int]:
    """(H, W) bool foreground of the mask file, and how ``auto`` read it (``KINDS`` index)."""
    array = _mask_array(path, rule)
    if rule == "auto":
        if array.ndim == 3:
            spread = array.max(axis=-1).astype(np.float64) - array.min(axis=-1)
            coloured = (spread > GREY_SPREAD * full_scale(array) / 255).mean() > 0.001
            values = array.max(axis=-1) if coloured else array.mean(axis=-1)
            return _by_content(values, full_scale(array))
        return _by_content(array, full_scale(array))
    if rule.startswith("color="):
        target = np.array([int(v) for v in rule[6:].split(",")], np.float64)
        rgb = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array
        rgb = rgb.astype(np.float64) * (255.0 / full_scale(rgb))
        return (np.abs(rgb - target) <= COLOR_TOLERANCE).all(axis=-1), 6
    if rule in ("nonzero", "label"):
        return (array.max(axis=-1) if array.ndim == 3 else array) > 0, 6
    grey = array.mean(axis=-1) if array.ndim == 3 else array
    return grey >= half_scale(full_scale(array)), 6   # threshold: 128 for 8-bit masks


def read_mask(path: Path, rule: str = "auto") -> np.ndarray:
    """(H, W) bool: the mask binarised with ``rule``."""
    return decode_mask(path, rule)[0]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) → (S, S, 3) uint8, bilinear with antialiasing, aspect ratio not kept."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool → (S, S) bool: area averaging (Pillow BOX) thresholded at 0.5."""
    area = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(area) >= 0.5


def decode_pair(pair, size: int | None, rule: str) -> Decoded:
    """One image/mask pair (``layouts.Pair``): image and mask at S×S (full size when ``size`` is None).

    Extra mask files of the pair (one per class, or numbered masks) are united with the first.
    """
    image = read_image(pair.image)
    native, kind = decode_mask(pair.mask, rule)
    for extra in getattr(pair, "extra", ()):
        other, _ = decode_mask(extra, rule)
        if other.shape != native.shape:
            raise BenchError(f"masks {pair.mask} and {extra} of one image differ in size; keep the released ones")
        native = native | other
    if native.shape != image.shape[:2]:
        h, w = image.shape[:2]
        raise BenchError(f"mask {pair.mask} is {native.shape[1]}×{native.shape[0]} but its image {pair.image} is "
                         f"{w}×{h}; replace the mask with the one released for this image")
    mask = native
    if size is not None:
        image, mask = resize_image(image, size), resize_mask(native, size)
    return Decoded(np.ascontiguousarray(image.transpose(2, 0, 1)), mask.astype(np.uint8), native, kind)


def read_pool_image(path: Path, size: int) -> np.ndarray:
    """(3, S, S) uint8: one unlabelled image, resized like the labelled images."""
    return np.ascontiguousarray(resize_image(read_image(path), size).transpose(2, 0, 1))
