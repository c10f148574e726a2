"""The procedural generators: seeded, binary masks of sane size, one polyp / many glands, not trivial."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bench.datasets import load_dataset
from bench.datasets.synthetic import CHUNK, GENERATORS, generate, smooth_noise


@pytest.mark.parametrize("name", list(GENERATORS))
def test_seeded(name: str):
    a_images, a_masks = generate(name, 8, 48, seed=0)
    b_images, b_masks = generate(name, 8, 48, seed=0)
    c_images, _ = generate(name, 8, 48, seed=1)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_masks, b_masks)
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (8, 3, 48, 48) and a_images.dtype == np.uint8
    assert a_masks.shape == (8, 48, 48) and set(np.unique(a_masks)) == {0, 1}


@pytest.mark.parametrize("name", list(GENERATORS))
def test_prefix_stable(name: str):
    short, _ = generate(name, CHUNK + 3, 32, seed=0)
    long, _ = generate(name, 2 * CHUNK + 5, 32, seed=0)
    assert np.array_equal(short, long[: CHUNK + 3])


def test_polyp_masks():
    images, masks = generate("synthetic-polyp", 64, 64, seed=0)
    fractions = masks.reshape(64, -1).mean(axis=1)
    assert fractions.min() >= 0.04 and fractions.max() <= 0.32          # 5–30% of the image
    assert fractions.std() > 0.05                                       # varying size
    components = [ndimage.label(m)[1] for m in masks]
    assert components == [1] * 64                                        # one blob each
    centres = np.array([ndimage.center_of_mass(m) for m in masks])
    assert centres.std(axis=0).min() > 4                                 # varying position (pixels)


def test_polyp_not_trivially_separable():
    """Similar hue: no threshold on one colour channel or chromaticity segments the polyps well."""
    images, masks = generate("synthetic-polyp", 32, 64, seed=0)
    x = images.astype(np.float64) / 255
    truth = masks.astype(bool)
    features = [x[:, 0], x[:, 1], x[:, 2], x[:, 0] / (x.sum(axis=1) + 1e-6), x[:, 1] / (x[:, 0] + 1e-6)]
    best = 0.0
    for feature in features:
        for t in np.quantile(feature, np.linspace(0.02, 0.98, 49)):
            for pred in (feature > t, feature <= t):
                best = max(best, (pred & truth).sum() / (pred | truth).sum())
    assert 0.2 < best < 0.7
    # ... yet the polyp is there: its mean colour differs from the mucosa's
    inside = x.transpose(1, 0, 2, 3)[:, truth].mean(axis=1)
    outside = x.transpose(1, 0, 2, 3)[:, ~truth].mean(axis=1)
    assert np.abs(inside - outside).max() > 0.03


def test_gland_masks():
    images, masks = generate("synthetic-gland", 32, 96, seed=0)
    fractions = masks.reshape(32, -1).mean(axis=1)
    assert 0.1 < fractions.mean() < 0.45 and fractions.min() > 0.05
    counts = np.array([ndimage.label(m)[1] for m in masks])
    assert counts.min() >= 3 and counts.mean() > 5                      # many glands
    # rings: the lumen (gland centre) is lighter than the epithelial ring around it
    grey = images.mean(axis=1)
    eroded = np.stack([ndimage.binary_erosion(m, iterations=4) for m in masks])
    ring = masks.astype(bool) & ~np.stack([ndimage.binary_erosion(m, iterations=2) for m in masks])
    assert grey[eroded].mean() > grey[ring].mean() + 20


def test_smooth_noise_normalised():
    field = smooth_noise(np.random.default_rng(0), 3, 64, 0.1)
    assert field.shape == (3, 64, 64) and field.dtype == np.float32
    assert np.allclose(field.mean(axis=(1, 2)), 0, atol=1e-5) and np.allclose(field.std(axis=(1, 2)), 1, atol=1e-3)
    # smooth: neighbouring pixels are strongly correlated (white noise would give ≈ 0)
    corr = np.corrcoef(field[:, :, :-1].ravel(), field[:, :, 1:].ravel())[0, 1]
    assert corr > 0.9


def test_load_dataset_synthetic(tmp_path):
    data = load_dataset("synthetic-polyp", 32, cache_dir=tmp_path, n=12)
    assert data.name == "synthetic-polyp" and data.ids[:2] == ["00000", "00001"] and len(data.ids) == 12
    assert data.images.shape == (12, 3, 32, 32) and (len(data.train), len(data.test)) == (10, 2)
    images, masks = generate("synthetic-polyp", 12, 32, seed=0)
    assert np.array_equal(data.images, images) and np.array_equal(data.masks, masks)
    other = load_dataset("synthetic-polyp:seed=2", 32, cache_dir=tmp_path, n=12)
    assert other.fingerprint != data.fingerprint and not np.array_equal(other.images, data.images)
    default = load_dataset("synthetic-gland", 32, cache_dir=tmp_path)
    assert len(default.ids) == 200


def test_skin_masks():
    images, masks = generate("synthetic-skin", 64, 64, seed=0)
    fractions = masks.reshape(64, -1).mean(axis=1)
    assert fractions.min() >= 0.08 and fractions.max() <= 0.45 and fractions.std() > 0.05   # one large lesion
    assert [ndimage.label(m)[1] for m in masks] == [1] * 64
    centres = np.array([ndimage.center_of_mass(m) for m in masks])
    assert np.abs(centres - 31.5).max() < 16                             # near the centre, as dermoscopy frames it
    grey = images.astype(np.float64).mean(axis=1)
    inside, outside = grey[masks == 1].mean(), grey[masks == 0].mean()
    assert outside - inside > 20                                         # the lesion is darker than the skin
    per_image = [(g[m == 1].mean() < g[m == 0].mean()) for g, m in zip(grey, masks, strict=True)]
    assert all(per_image)
    # coarse enough for stride-16 logits: every lesion is wider than one 16-pixel logit cell at 64 px
    diameters = 2 * np.sqrt(masks.reshape(64, -1).sum(axis=1) / np.pi)
    assert diameters.min() > 20


def test_cell_masks():
    images, masks = generate("synthetic-cell", 32, 64, seed=0)
    fractions = masks.reshape(32, -1).mean(axis=1)
    assert 0.15 < fractions.mean() < 0.4 and fractions.min() > 0.05
    counts = np.array([ndimage.label(m)[1] for m in masks])
    assert counts.min() >= 3 and counts.mean() > 5                       # many nuclei
    sizes = np.concatenate([np.bincount(ndimage.label(m)[0].ravel())[1:] for m in masks])
    assert np.median(sizes) > 100                                        # ≥ ~12 px across at 64 px
    grey = images.astype(np.float64).mean(axis=1)
    assert grey[masks == 0].mean() - grey[masks == 1].mean() > 40       # dark nuclei on a light background


@pytest.mark.parametrize("name", ["synthetic-skin", "synthetic-cell"])
def test_new_sets_load_and_cache(tmp_path, name):
    data = load_dataset(name, 32, cache_dir=tmp_path, n=10)
    images, masks = generate(name, 10, 32, seed=0)
    assert np.array_equal(data.images, images) and np.array_equal(data.masks, masks)
    again = load_dataset(name, 32, cache_dir=tmp_path, n=10)
    assert again.fingerprint == data.fingerprint and data.mask_stats().empty == 0


def test_existing_sets_unchanged():
    """The default run's data: the bytes of synthetic-polyp and synthetic-gland at 64 px (seed 0) are fixed."""
    import hashlib

    expected = {"synthetic-polyp": "22e69c6bf526cd32", "synthetic-gland": "451e74eb98124b11"}
    for name, digest in expected.items():
        images, masks = generate(name, 200, 64, seed=0)
        assert hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest()[:16] == digest, name
