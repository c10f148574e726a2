"""Tests of bench.metrics on hand-made masks with hand-computed answers, the empty-mask
conventions, and HD95 against a brute-force transcription of medpy's definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from bench.errors import BenchError
from bench.metrics import segmentation_metrics, summarize


def squares() -> tuple[np.ndarray, np.ndarray]:
    """Two 4×4 squares in an 8×8 image, the second shifted by one pixel down and right."""
    pred = np.zeros((1, 8, 8), bool)
    truth = np.zeros((1, 8, 8), bool)
    pred[0, 1:5, 1:5] = True
    truth[0, 2:6, 2:6] = True
    return pred, truth


def test_offset_squares_hand_values():
    """Overlap 3×3 = 9, union 16 + 16 − 9 = 23: IoU = 9/23, Dice = 2·9/32 = 9/16, precision = recall = 9/16.

    HD95: each surface is the 12-pixel ring of its square. From the first ring to the second: the
    corner (1, 1) is √2 from (2, 2); (4, 2) and (2, 4) lie on the second ring (0); the other nine
    pixels are 1 away. The other direction is the mirror image. Pooled, sorted: four 0s, eighteen 1s,
    two √2s; the 95th percentile sits at rank 0.95·23 = 21.85, between the last 1 (rank 21) and the
    first √2 (rank 22): 1 + 0.85·(√2 − 1).
    """
    m = segmentation_metrics(*squares())
    assert m["iou"][0] == pytest.approx(9 / 23)
    assert m["dice"][0] == pytest.approx(9 / 16)
    assert m["precision"][0] == pytest.approx(9 / 16) and m["recall"][0] == pytest.approx(9 / 16)
    assert m["hd95"][0] == pytest.approx(1 + 0.85 * (math.sqrt(2) - 1))
    assert all(v.dtype == np.float64 and v.shape == (1,) for v in m.values())


def test_precision_and_recall_differ_for_nested_masks():
    # prediction 2×2 inside a 4×4 truth: TP 4, FP 0, FN 12 → precision 1, recall 1/4, IoU 1/4, Dice 8/20
    pred, truth = np.zeros((1, 6, 6), bool), np.zeros((1, 6, 6), bool)
    truth[0, 1:5, 1:5] = True
    pred[0, 2:4, 2:4] = True
    m = segmentation_metrics(pred, truth)
    assert (m["precision"][0], m["recall"][0]) == (1.0, 0.25)
    assert m["iou"][0] == pytest.approx(0.25) and m["dice"][0] == pytest.approx(0.4)
    # HD95: the inner 2×2 block is all surface, each pixel 1 from the truth ring (4 distances of 1);
    # truth ring (12 px) to the block: 4 corners at √2, 8 edge pixels at 1. Pooled: twelve 1s, four
    # √2s; rank 0.95·15 = 14.25 lies between two √2s → √2.
    assert m["hd95"][0] == pytest.approx(math.sqrt(2))


def test_empty_mask_conventions():
    h, w = 6, 8  # diagonal 10
    empty, full = np.zeros((h, w), bool), np.zeros((h, w), bool)
    full[2:4, 2:5] = True
    pred = np.stack([empty, empty, full])
    truth = np.stack([empty, full, empty])
    m = segmentation_metrics(pred, truth)
    # both empty: perfect; empty prediction: nothing found; empty truth: everything predicted is wrong
    assert m["iou"].tolist() == [1.0, 0.0, 0.0] and m["dice"].tolist() == [1.0, 0.0, 0.0]
    assert m["precision"].tolist() == [1.0, 0.0, 0.0] and m["recall"].tolist() == [1.0, 0.0, 0.0]
    assert m["hd95"].tolist() == [0.0, 10.0, 10.0]


def test_hd95_single_pixels_at_known_distance():
    pred, truth = np.zeros((1, 20, 20), bool), np.zeros((1, 20, 20), bool)
    pred[0, 3, 4] = True
    truth[0, 6, 8] = True  # 3 rows and 4 columns away: 5 pixels
    assert segmentation_metrics(pred, truth)["hd95"][0] == pytest.approx(5.0)
    assert segmentation_metrics(truth, pred)["hd95"][0] == pytest.approx(5.0)  # symmetric


def _brute_surface(mask: np.ndarray) -> list[tuple[int, int]]:
    """medpy's surface with connectivity 1: a pixel of the mask with a 4-neighbour outside it
    (outside the image counts as outside the mask)."""
    h, w = mask.shape
    points = []
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                continue
            neighbours = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
            if any(not (0 <= y < h and 0 <= x < w) or not mask[y, x] for y, x in neighbours):
                points.append((r, c))
    return points


def _brute_hd95(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = _brute_surface(a), _brute_surface(b)
    directed = [min(math.dist(p, q) for q in sb) for p in sa] + [min(math.dist(q, p) for p in sa) for q in sb]
    return float(np.percentile(directed, 95))


def test_hd95_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:30]
    masks = []
    for _ in range(12):  # blobs (some touching the border) plus speckle
        cy, cx, r = rng.uniform(0, 24), rng.uniform(0, 30), rng.uniform(3, 9)
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) | (rng.random((24, 30)) < 0.03))
    pred, truth = np.stack(masks[:6]), np.stack(masks[6:])
    got = segmentation_metrics(pred, truth)["hd95"]
    expected = [_brute_hd95(p, t) for p, t in zip(pred, truth, strict=True)]
    assert got == pytest.approx(expected)


def _medpy_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """medpy.metric.binary.hd95 transcribed: erosion surfaces, EDT of the other surface's complement."""
    cross = ndimage.generate_binary_structure(2, 1)
    sa, sb = a ^ ndimage.binary_erosion(a, structure=cross), b ^ ndimage.binary_erosion(b, structure=cross)
    d1 = ndimage.distance_transform_edt(~sb)[sa]
    d2 = ndimage.distance_transform_edt(~sa)[sb]
    return float(np.percentile(np.hstack((d1, d2)), 95))


def test_hd95_matches_medpy_code_path_on_noisy_masks():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64]
    truth = np.stack([(yy - 30) ** 2 + (xx - 20 - 4 * i) ** 2 < (8 + 2 * i) ** 2 for i in range(4)])
    pred = np.roll(truth, (3, -2), axis=(1, 2)) ^ (rng.random(truth.shape) < 0.02)  # shifted + speckle
    got = segmentation_metrics(pred, truth)["hd95"]
    assert got == pytest.approx([_medpy_hd95(p, t) for p, t in zip(pred, truth, strict=True)])


def test_torch_and_integer_inputs_and_errors():
    pred, truth = squares()
    m = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(truth.astype(np.uint8)))
    assert m["iou"][0] == pytest.approx(9 / 23)
    assert segmentation_metrics(pred[0], truth[0])["iou"].shape == (1,)  # a single (H, W) image
    with pytest.raises(BenchError, match="shape"):
        segmentation_metrics(pred, truth[:, :7])
    with pytest.raises(BenchError, match="binary"):
        segmentation_metrics(pred * 0.7, truth)


def test_summarize_means():
    per_image = {"iou": np.array([1.0, 0.0, 0.5]), "dice": np.array([1.0, 0.0, 2 / 3]),
                 "precision": np.array([1.0, 0.0, 1.0]), "recall": np.array([1.0, 0.0, 0.5]),
                 "hd95": np.array([0.0, 10.0, 2.0])}
    s = summarize(per_image)
    assert s["miou"] == pytest.approx(0.5) and s["iou"] == s["miou"]
    assert s["mdice"] == pytest.approx(5 / 9) and s["dice"] == s["mdice"]
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["hd95"] == pytest.approx(4.0)
    assert all(isinstance(v, float) for v in s.values())
