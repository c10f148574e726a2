"""Feature diagnostics: the pure metrics of bench/reports/diagnostics.py on embeddings whose answers are
known, the embedding driver of bench/diagnose.py on a stub backbone whose features are known, and the files
the report includes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bench.diagnose import diagnose_backbone, embed_dataset, run_diagnostics
from bench.errors import BenchError
from bench.reports.diagnostics import (
    METRICS,
    dispersive_pairs,
    effective_rank,
    feature_variance,
    linear_separability,
    negative_similarity,
    pixel_image_similarity,
    positive_similarity,
    silhouette,
    tsne_panels,
    wrap_label,
)
from tests.conftest import tiny_backbone


def two_clusters(n_images: int = 10, per_image: int = 20, dim: int = 16, spread: float = 0.01, seed: int = 0):
    """Every image has foreground and background pixels; class k sits near the unit vector e_k."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(per_image) % 2, n_images)
    image_index = np.repeat(np.arange(n_images), per_image)
    emb = np.eye(dim)[labels] + spread * rng.standard_normal((len(labels), dim))
    return emb, labels, image_index


# --- metrics -----------------------------------------------------------------------------------------

def test_feature_variance_hand_computed():
    # rows normalise to (0.6, 0.8) and (0, 1): variances 0.3² = 0.09 and 0.1² = 0.01, mean 0.05
    assert feature_variance(np.array([[3.0, 4.0], [0.0, 2.0]])) == pytest.approx(0.05)
    assert feature_variance(torch.ones(50, 8) * torch.arange(1, 51)[:, None]) == pytest.approx(0.0, abs=1e-12)


def test_positive_similarity_hand_computed():
    # cos((1,0), (1,1)) = 1/√2 and cos((0,2), (0,1)) = 1: mean (1/√2 + 1)/2
    emb1 = np.array([[1.0, 0.0], [0.0, 2.0]])
    emb2 = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert positive_similarity(emb1, emb2) == pytest.approx((1 / math.sqrt(2) + 1) / 2)


def test_negative_similarity_uses_only_pairs_of_different_images():
    # a, b from image 0 (orthogonal), c from image 1 at 45°: the cross-image pairs (a,c), (b,c) both have
    # cosine 1/√2; counting the same-image pair (a,b) would give (0 + 2/√2)/3 ≈ 0.471 instead
    emb = np.array([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    assert negative_similarity(emb, np.array([0, 0, 1]), np.random.default_rng(0)) == pytest.approx(
        1 / math.sqrt(2))


def test_pixel_image_similarity_skips_the_pixels_own_image():
    # pixel p0 of image 0 = (1, 0), p1 of image 1 = (0, 1); keys: image 0 (1, 0), image 1 (1, 1)/√2, image 2 (0, 1)
    # p0 with images 1, 2: 1/√2, 0; p1 with images 0, 2: 0, 1 → mean (1/√2 + 1)/4
    emb = np.array([[2.0, 0.0], [0.0, 1.0]])
    keys = np.array([[1.0, 0.0], [3.0, 3.0], [0.0, 5.0]])
    assert pixel_image_similarity(emb, np.array([0, 1]), keys) == pytest.approx((1 / math.sqrt(2) + 1) / 4)
    assert math.isnan(pixel_image_similarity(emb, np.array([0, 0]), keys[:1]))


def test_silhouette_hand_computed_on_normalised_embeddings():
    # unit vectors a1 = (1,0), a2 = (.6,.8) | b1 = (-1,0), b2 = (-.6,.8); chord distances:
    # a1a2 = b1b2 = √.8, a1b1 = 2, a1b2 = a2b1 = √3.2, a2b2 = 1.2
    # s(a1) = 1 − √.8 / ((2 + √3.2)/2); s(a2) = 1 − √.8 / ((√3.2 + 1.2)/2); b1, b2 mirror a1, a2
    emb = np.array([[5.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [-0.6, 0.8]])  # a1 scaled: normalisation matters
    s_a1 = 1 - math.sqrt(0.8) / ((2 + math.sqrt(3.2)) / 2)
    s_a2 = 1 - math.sqrt(0.8) / ((math.sqrt(3.2) + 1.2) / 2)
    expected = (s_a1 + s_a2) / 2  # ≈ 0.4647
    assert silhouette(emb, np.array([0, 0, 1, 1]), np.random.default_rng(0)) == pytest.approx(expected)


def test_silhouette_separable_clusters_near_one_and_undefined_for_one_class():
    emb, labels, _ = two_clusters(spread=0.001)  # within-class chords ≈ 0.006, between ≈ √2
    rng = np.random.default_rng(0)
    assert silhouette(emb, labels, rng) > 0.99
    assert silhouette(emb, labels, rng, cap=50) > 0.99  # subsampled
    assert math.isnan(silhouette(emb, np.zeros(len(emb), dtype=int), rng))


def test_linear_separability_is_one_for_separable_and_chance_for_random_labels():
    emb, labels, image_index = two_clusters(spread=0.05)
    assert linear_separability(emb, labels, image_index, np.random.default_rng(0)) == 1.0
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((2000, 16))
    random_labels = rng.integers(0, 2, 2000)
    acc = linear_separability(noise, random_labels, np.repeat(np.arange(40), 50), rng)
    assert 0.4 < acc < 0.6


def test_linear_separability_holds_out_whole_images():
    # every image is one class and has its own random direction: a classifier can only memorise images.
    # A pixel-level split would score ~1; with held-out images the score must stay near chance.
    rng = np.random.default_rng(0)
    n_images, per_image, dim = 40, 30, 64
    centres = rng.standard_normal((n_images, dim))
    image_index = np.repeat(np.arange(n_images), per_image)
    emb = centres[image_index] + 0.05 * rng.standard_normal((len(image_index), dim))
    labels = (np.arange(n_images) % 2)[image_index]
    assert linear_separability(emb, labels, image_index, rng) < 0.8
    assert math.isnan(linear_separability(emb, labels, np.zeros(len(emb), dtype=int), rng))


def test_effective_rank_known_answers():
    rng = np.random.default_rng(0)
    collapsed = np.outer(rng.uniform(0.5, 2.0, 100), rng.standard_normal(32))  # rank one
    assert effective_rank(collapsed) == pytest.approx(1.0, abs=0.01)
    assert effective_rank(collapsed + 1e-6 * rng.standard_normal((100, 32))) == pytest.approx(1.0, abs=0.01)
    # singular values (3, 1): p = (.75, .25), exp(−.75 ln .75 − .25 ln .25) = 1.7548
    assert effective_rank(np.diag([3.0, 1.0])) == pytest.approx(1.7548, abs=1e-3)
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0, rel=1e-5)
    assert effective_rank(np.zeros((5, 4))) == 0.0


def test_dispersive_pairs():
    names = ["scratch", "byol", "byol+disp", "dicoh", "dicoh[percentile=50]+disp[weight=0.2]", "cp2+disp"]
    assert dispersive_pairs(names) == [("byol", "byol+disp")]  # dicoh[percentile=50] and cp2 were not run
    names.append("dicoh[percentile=50]")
    assert dispersive_pairs(names)[1] == ("dicoh[percentile=50]", "dicoh[percentile=50]+disp[weight=0.2]")
    assert dispersive_pairs(["byol+disp"]) == []


def test_wrap_label_breaks_only_between_parts():
    assert wrap_label("dicoh[percentile=50]+disp[weight=0.2]") == "dicoh[percentile=50]\n+disp[weight=0.2]"
    assert wrap_label("byol+disp") == "byol+disp"
    assert wrap_label("m[a=1,b=2]", width=5) == "m\n[a=1,\nb=2]"


def test_tsne_panels_survive_collapsed_embeddings(tmp_path):
    # identical points crash sklearn's t-SNE (PCA init divides by their spread); the panel says so instead
    labels = np.arange(30) % 2
    panels = {("", "collapsed"): (np.ones((30, 8)), labels),
              ("", "healthy"): (np.random.default_rng(0).standard_normal((30, 8)), labels)}
    path = tsne_panels(panels, tmp_path / "t.png", {0: "background", 1: "foreground"})
    assert path.stat().st_size > 5000


# --- driver ------------------------------------------------------------------------------------------

class ColourPool(nn.Module):
    """A stub backbone whose 'last stage' is the input average-pooled over 8×8 cells (features = colour)."""

    def __init__(self):
        super().__init__()

    def forward(self, x):
        return [nn.functional.avg_pool2d(x, 8)]


def red_green_set(n: int = 6, size: int = 64, seed: int = 0):
    """Foreground red, background green; the foreground is an 8-px-aligned rectangle, wider than tall (a
    transposed mask would mislabel cells), of varying area, covering the first 32-px cell's centre."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 3, size, size), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        r0, c0 = 8 * rng.integers(0, 2, size=2)
        height, width = 8 * rng.integers(2, 4), 8 * rng.integers(4, 6)
        masks[i, r0:r0 + height, c0:c0 + width] = 1
    images[:, 0] = 220 * masks
    images[:, 1] = 200 * (1 - masks)
    return torch.from_numpy(images), torch.from_numpy(masks)


def test_diagnose_backbone_on_known_features():
    images, masks = red_green_set()
    out = diagnose_backbone(ColourPool(), images, masks, torch.Generator().manual_seed(0))
    assert set(out) == set(METRICS)
    # on the unaugmented images every cell is pure red or pure green: two points, perfectly labelled
    assert out["silhouette"] == pytest.approx(1.0)
    assert out["linear_separability"] == 1.0
    # pixel embeddings live in the three colour channels: not collapsed, at most D = 3
    assert 1.05 < out["effective_rank"] <= 3.0
    assert 0.0 < out["feature_variance"] < 1 / 3
    assert out["feature_spread"] == pytest.approx(3 * out["feature_variance"])
    assert -1.0 <= out["negative_similarity"] <= 1.0 and 0.0 < out["positive_similarity"] <= 1.0
    assert -1.0 <= out["pixel_image_similarity"] <= 1.0


def test_rankme_takes_enough_pixel_samples():
    # 6 images of 64 px → 8×8 cells each, plus two views: 3 · 6 · 64 = 1152 samples, capped at 500
    images, masks = red_green_set()
    emb = embed_dataset(ColourPool(), images, masks, torch.Generator().manual_seed(0), rankme_samples=500)
    assert emb.rank_pixels.shape == (500, 3)
    emb = embed_dataset(ColourPool(), images, masks, torch.Generator().manual_seed(0), rankme_samples=10_000)
    assert len(emb.rank_pixels) == 3 * 6 * 64  # every cell of the images and of both views
    assert len(emb.rank_pixels) > len(images)  # far above the image count that capped RankMe before


def test_diagnose_backbone_resnet_is_deterministic_and_restores_mode():
    images, masks = red_green_set(n=4, seed=1)  # 2 × 2 cells, each image has both classes
    backbone = tiny_backbone()
    backbone.train()
    a = diagnose_backbone(backbone, images, masks, torch.Generator().manual_seed(3), max_pixels=100)
    b = diagnose_backbone(backbone, images, masks, torch.Generator().manual_seed(3), max_pixels=100)
    assert a == b
    assert backbone.training
    assert all(np.isfinite(v) for v in a.values())
    with pytest.raises(BenchError, match="masks"):
        diagnose_backbone(backbone, images, masks[:, :32], torch.Generator().manual_seed(0))


def test_run_diagnostics_writes_tables_and_plots(tmp_path):
    sets = {}
    for k, name in enumerate(["polyps", "glands"]):
        images, masks = red_green_set(n=10, seed=k)
        sets[name] = SimpleNamespace(name=name, images=images.numpy(), masks=masks.numpy(), test=np.arange(6, 10))
    backbones = {"scratch": tiny_backbone(), "colour": ColourPool(), "colour+disp": ColourPool()}
    df = run_diagnostics(tmp_path, sets, backbones, max_pixels=200, tsne_points=60)
    out = tmp_path / "diagnostics"
    assert len(df) == 6 and set(METRICS) <= set(df.columns)
    assert (df["n_images"] == 4).all()
    assert (df.loc[df["method"] == "colour", "n_dims"] == 3).all()
    assert (df.loc[df["method"] == "scratch", "rankme_samples"] >= 4 * 3).all()
    csv = pd.read_csv(out / "diagnostics.csv")
    assert list(csv["method"]) == ["scratch", "colour", "colour+disp"] * 2
    assert csv.loc[csv["method"] == "colour", "linear_separability"].tolist() == [1.0, 1.0]
    # the same views and pixels for every method: identical backbones give identical rows
    same = csv.set_index(["method", "dataset"])[list(METRICS)]
    pd.testing.assert_frame_equal(same.loc["colour"], same.loc["colour+disp"])
    md = (out / "diagnostics.md").read_text()
    assert "Feature diagnostics on polyps: 4 test images" in md and "| colour+disp |" in md
    assert "not comparable with the paper's values" in md and "RankMe over" in md
    tex = (out / "diagnostics.tex").read_text()
    assert tex.count("\\begin{tabular}") == 2 and "\\bottomrule" in tex
    for png in ("tsne_pixels.png", "tsne_images.png", "tsne_dispersive.png"):
        assert (out / png).stat().st_size > 5000
    with pytest.raises(BenchError, match="no backbones"):
        run_diagnostics(tmp_path, sets, {})
    empty = {"x": SimpleNamespace(name="x", images=sets["polyps"].images, masks=sets["polyps"].masks,
                                  test=np.array([], dtype=int))}
    with pytest.raises(BenchError, match="no test images"):
        run_diagnostics(tmp_path, empty, backbones)
