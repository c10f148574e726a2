"""Masks decoded by what they hold, forced rules, mask statistics and check, native masks, the Pillow cap."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.datasets import NativeMasks, check_masks, decode, inspect, load_dataset
from bench.errors import BenchError
from tests.test_datasets_layouts import SIDE, box_mask, write_image

BOX_FRACTION = 128 / SIDE**2   # the 16×8 box of box_mask at full resolution


def _folder(root: Path, masks: list[np.ndarray], suffix: str = ".png") -> Path:
    for i, mask in enumerate(masks):
        write_image(root / "images" / f"{i}.jpg", seed=i)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(mask)
        image.save(root / "masks" / f"{i}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return root


def _rgb(mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros((*mask.shape, 3), np.uint8)
    out[mask > 0] = colour
    return out


# ----------------------------------------------------------------------------------------------
# Decoding by content


@pytest.mark.parametrize("values", [(0, 1), (0, 255), (0, 38), (90, 200)])
def test_two_level_masks(tmp_path: Path, values):
    low, high = values
    mask = np.where(box_mask() > 0, high, low).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "m.png")
    fg, kind = decode.decode_mask(tmp_path / "m.png")
    assert np.array_equal(fg, box_mask() > 0) and decode.KINDS[kind] == "two-level"


def test_jpeg_noisy_grey_thresholds_at_128(tmp_path: Path):
    mask = box_mask()
    mask[0, 0] = 100     # a stray value below half scale stays background
    Image.fromarray(np.repeat(mask[..., None], 3, -1)).save(tmp_path / "m.jpg", quality=60)
    channel = np.asarray(Image.open(tmp_path / "m.jpg")).astype(np.float64).mean(axis=-1)
    assert len(np.unique(channel)) > 2                      # the premise: JPEG noise, many levels
    fg, kind = decode.decode_mask(tmp_path / "m.jpg")
    assert decode.KINDS[kind].startswith("noisy grey") and np.array_equal(fg, channel >= 128)


def test_coloured_and_palette_masks(tmp_path: Path):
    Image.fromarray(_rgb(box_mask(), (255, 0, 0))).save(tmp_path / "red.png")
    Image.fromarray(_rgb(box_mask(), (0, 160, 0))).save(tmp_path / "green.png")
    for name in ("red.png", "green.png"):
        assert np.array_equal(decode.read_mask(tmp_path / name), box_mask() > 0), name
    assert not decode.read_mask(tmp_path / "red.png", "threshold").any()    # mean 85 < 128: the old rule fails
    palette = Image.fromarray((box_mask() > 0).astype(np.uint8), mode="L").convert("P")
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(decode.read_mask(tmp_path / "palette.png"), box_mask() > 0)
    assert np.array_equal(decode.read_mask(tmp_path / "palette.png", "label"), box_mask() > 0)


def test_instance_labels_and_forced_rules(tmp_path: Path):
    labels = np.zeros((SIDE, SIDE), np.uint8)
    labels[8:16, 8:16], labels[8:16, 16:24], labels[20:28, 4:12] = 1, 2, 7
    Image.fromarray(labels).save(tmp_path / "labels.png")
    fg, kind = decode.decode_mask(tmp_path / "labels.png")
    assert decode.KINDS[kind] == "labels" and np.array_equal(fg, labels > 0)
    assert not decode.read_mask(tmp_path / "labels.png", "threshold").any()
    two = np.stack([np.where(box_mask() > 0, 0, 255)] * 3, -1).astype(np.uint8)   # white background, red box
    two[box_mask() > 0] = (255, 0, 0)
    Image.fromarray(two).save(tmp_path / "onwhite.png")
    assert np.array_equal(decode.read_mask(tmp_path / "onwhite.png", "color=255,0,0"), box_mask() > 0)
    assert decode.read_mask(tmp_path / "onwhite.png", "nonzero").all()


@pytest.mark.parametrize("bad", ["treshold", "color=300,0,0", "color=1,2"])
def test_unknown_rule(bad):
    with pytest.raises(BenchError, match="unknown mask rule"):
        decode.check_rule(bad)
    assert decode.check_rule("COLOUR = 255, 0, 0") == "color=255,0,0"


# ----------------------------------------------------------------------------------------------
# Folders: 0/1 masks, RGB masks, empty masks (the mask check)


def test_zero_one_mask_folder(tmp_path: Path):
    root = _folder(tmp_path / "Kvasir-SEG", [box_mask(1)] * 4)   # named layout, 0/1 masks
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.name == "kvasir-seg"
    stats = data.mask_stats()
    assert (stats.n, stats.empty, stats.full) == (4, 0, 0)
    assert stats.min == stats.max == pytest.approx(BOX_FRACTION)
    check_masks(data, str(root))   # passes
    assert data.mask_kinds == {"two-level": 4}


def test_rgb_mask_folder(tmp_path: Path):
    root = _folder(tmp_path / "set", [_rgb(box_mask(), (0, 255, 0))] * 3 + [_rgb(box_mask(), (255, 0, 0))])
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.name == "generic" and data.mask_stats().median == pytest.approx(BOX_FRACTION)
    check_masks(data, str(root))
    green = load_dataset(f"generic:{root}?mask=color=0,255,0", 16, cache_dir=tmp_path / "cache")
    assert green.mask_stats().empty == 1 and green.mask_rule == "color=0,255,0"   # the red one is not green
    assert green.fingerprint != data.fingerprint


def test_all_empty_folder_is_refused(tmp_path: Path):
    root = _folder(tmp_path / "Kvasir-SEG", [np.zeros((SIDE, SIDE), np.uint8)] * 3 + [box_mask()])
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.mask_stats().empty, data.mask_stats().n) == (3, 4)
    with pytest.raises(BenchError) as info:
        check_masks(data, str(root))
    message = str(info.value)
    assert "\n" not in message and "3 of 4 masks are empty" in message
    assert f"LAYOUT:{root}?mask=nonzero" in message and "median 0.0%" in message
    with pytest.raises(BenchError, match=r"kvasir-seg:.*\?mask=nonzero"):
        check_masks(data, f"kvasir-seg:{root}")


def test_all_full_folder_is_refused(tmp_path: Path):
    root = _folder(tmp_path / "set", [np.full((SIDE, SIDE), 255, np.uint8)] * 2)
    with pytest.raises(BenchError, match=r"2 of 2 masks are all foreground.*mask=threshold"):
        check_masks(load_dataset(str(root), 16, cache_dir=tmp_path / "cache"), str(root))


def test_mask_rule_keyword_and_ref_option(tmp_path: Path):
    labels = np.zeros((SIDE, SIDE), np.uint8)
    labels[8:16, 8:24] = 3
    labels[0, 0] = 200   # one bright pixel: auto thresholds at 128 and keeps only it
    root = _folder(tmp_path / "set", [labels] * 2)
    auto = load_dataset(str(root), 32, cache_dir=tmp_path / "cache")
    assert auto.mask_stats().max == pytest.approx(1 / SIDE**2)
    forced = load_dataset(str(root), 32, cache_dir=tmp_path / "cache", mask_rule="nonzero")
    assert forced.mask_stats().min == pytest.approx(129 / SIDE**2) and forced.mask_rule == "nonzero"
    by_ref = load_dataset(f"{root}?mask=nonzero", 32, cache_dir=tmp_path / "cache")
    assert np.array_equal(by_ref.masks, forced.masks)
    with pytest.raises(BenchError, match="given twice"):
        load_dataset(f"{root}?mask=label", 32, cache_dir=tmp_path / "cache", mask_rule="nonzero")


def test_inspect_prints_the_statistics(tmp_path: Path):
    root = _folder(tmp_path / "set", [box_mask(), np.zeros((SIDE, SIDE), np.uint8)])
    report = inspect(str(root))
    text = "\n".join(report.lines())
    assert report.stats.empty == 1 and "1 empty, 0 full (of 2); rule auto" in text and "median" in text


# ----------------------------------------------------------------------------------------------
# Native-resolution masks


def test_native_mask_equals_direct_decode(tmp_path: Path, shared_data: Path):
    data = load_dataset(str(shared_data / "Kvasir-SEG"), 32, cache_dir=tmp_path)
    assert not data.native_is_resized
    for i, name in enumerate(data.ids):
        direct = decode.read_mask(shared_data / "Kvasir-SEG" / "masks" / f"{name}.jpg")
        native = data.native_mask(i)
        assert native.dtype == bool and np.array_equal(native, direct)
        assert data.native_size(i) == direct.shape == Image.open(shared_data / "Kvasir-SEG" / "images" /
                                                                 f"{name}.jpg").size[::-1]
    again = load_dataset(str(shared_data / "Kvasir-SEG"), 32, cache_dir=tmp_path)   # from the cache
    assert np.array_equal(again.native_mask(3), data.native_mask(3))


def test_native_mask_of_a_tiff_layout(tmp_path: Path, shared_data: Path):
    data = load_dataset(str(shared_data / "CVC-ColonDB"), 32, cache_dir=tmp_path)
    i = data.ids.index("77")
    assert np.array_equal(data.native_mask(i), decode.read_mask(shared_data / "CVC-ColonDB" / "p77.tiff"))
    assert data.native_size(i) == (500, 574)


def test_native_of_synthetic_is_the_resized_mask(tmp_path: Path):
    data = load_dataset("synthetic-polyp", 32, cache_dir=tmp_path, n=6)
    assert data.native_is_resized and data.native_size(2) == (32, 32)
    assert np.array_equal(data.native_mask(2), data.masks[2] == 1)


def test_native_storage_is_compact_and_exact():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:500, 0:600]
    masks = []
    for _ in range(20):
        cy, cx, ry, rx = rng.uniform(150, 350), rng.uniform(150, 450), rng.uniform(40, 140), rng.uniform(40, 140)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
    native = NativeMasks.pack(masks)
    assert all(np.array_equal(native.mask(i), m) for i, m in enumerate(masks))
    assert native.nbytes / len(masks) < 5_000     # a few hundred 600×500 masks: a few MB at most
    assert np.allclose(native.fractions(), [m.mean() for m in masks])
    sub = native.subset([3, 1])
    assert np.array_equal(sub.mask(0), masks[3]) and sub.size(1) == (500, 600)
    joined = NativeMasks.concat([sub, NativeMasks.from_resized(np.ones((1, 4, 4), np.uint8))])
    assert len(joined) == 3 and np.array_equal(joined.mask(1), masks[1]) and joined.mask(2).all()


# ----------------------------------------------------------------------------------------------
# Pillow: decompression-bomb cap


def test_decoding_cap(tmp_path: Path, monkeypatch):
    write_image(tmp_path / "big.png", size=(12, 12))      # 144 pixels: over the cap, under twice it
    write_image(tmp_path / "huge.png", size=(32, 32))     # 1024 pixels: over twice the cap (Pillow's error)
    monkeypatch.setattr(decode, "MAX_PIXELS", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # Pillow's warning must not escape
        for name, words in (("big.png", "12×12 = 144 pixels"), ("huge.png", "over twice the cap")):
            with pytest.raises(BenchError) as info:
                decode.read_image(tmp_path / name)
            message = str(info.value)
            assert "\n" not in message and name in message and words in message and "cap of 100 pixels" in message


def test_default_cap_is_set():
    assert decode.MAX_PIXELS == 8192 * 8192 and Image.MAX_IMAGE_PIXELS == decode.MAX_PIXELS
