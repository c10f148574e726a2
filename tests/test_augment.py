"""Tests of bench.augment and bench.geometry: view geometry against pixel content, hand-computed
correspondences, torchvision-equivalent colour operations, determinism, masks and CP2 copy-paste."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_images
from torchvision.transforms import functional as TF

from bench.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    ViewAug,
    ViewRecipe,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    copy_paste,
    denormalize,
    finetune_batch,
    gaussian_blur,
    make_views,
    sample_crop_boxes,
    to_input,
)
from bench.errors import BenchError
from bench.geometry import (
    bin_diagonal,
    cell_centers,
    mask_at_cells,
    nearest_cells,
    pixel_index_box,
    positive_pairs,
)

# Geometry only (no colour): view 1 always flipped, view 2 never, so both cases are always covered.
GEO = ViewRecipe("geo", ViewAug(scale=(0.08, 1.0), flip_p=1.0), ViewAug(scale=(0.2, 1.0), flip_p=0.0))
GEO_RANDOM_FLIP = ViewRecipe("geo2", ViewAug(scale=(0.08, 1.0)), ViewAug(scale=(0.08, 1.0)))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def index_image(batch: int = 8, size: int = 256) -> torch.Tensor:
    """uint8 (B, 3, size, size) with R = column index, G = row index: each pixel names its location."""
    cols = torch.arange(size).expand(size, size)
    img = torch.stack([cols, cols.T, torch.zeros_like(cols)]).to(torch.uint8)
    return img.expand(batch, 3, size, size).contiguous()


def source_position(view: torch.Tensor) -> torch.Tensor:
    """(B, S·S, 2): the (x, y) pixel-index position each view pixel was sampled from (R, G channels)."""
    rgb = denormalize(view) * 255
    return rgb[:, :2].flatten(2).transpose(1, 2)


# --- geometry against pixel content ---------------------------------------------------------


@pytest.mark.parametrize("recipe", [GEO, GEO_RANDOM_FLIP])
def test_cell_centers_locate_view_pixels_in_source(recipe):
    """Sampling the index image at each cell centre reproduces the view's pixel value there.

    A source pixel j covers [j, j + 1) in pixel units, so the normalised coordinate u is pixel-index
    position 256·u − 0.5 (clamped to the image at the border, as roi_align does).
    """
    size = 32
    views = make_views(index_image(), recipe, size, gen(1))
    for x, box, flip in ((views.x1, views.box1, views.flip1), (views.x2, views.box2, views.flip2)):
        expected = (cell_centers(box, flip, size, size) * 256 - 0.5).clamp(0, 255)
        assert torch.allclose(source_position(x), expected, atol=0.05)  # half-pixel slips would show 0.5
    assert views.flip1.all() or recipe is GEO_RANDOM_FLIP
    assert not views.flip2.any() or recipe is GEO_RANDOM_FLIP


def test_nearest_cells_map_view1_pixels_to_matching_view2_pixels():
    """Cell i of view 1 and its nearest cell R(i) of view 2 show (nearly) the same source pixel."""
    size, grid = 32, 8
    views = make_views(index_image(), GEO, size, gen(2))
    pooled1 = torch.nn.functional.avg_pool2d(views.x1, size // grid)  # the 8×8 "feature map" of each view
    pooled2 = torch.nn.functional.avg_pool2d(views.x2, size // grid)
    p1, p2 = source_position(pooled1), source_position(pooled2)  # (B, 64, 2) in source pixels
    index, valid = nearest_cells(views.box1, views.flip1, views.box2, views.flip2, grid, grid)
    dist = torch.cdist(p1, p2)  # (B, 64, 64) measured from the pixels
    chosen = dist.gather(2, index[..., None]).squeeze(2)
    assert (chosen <= dist.min(dim=2).values + 1.0).all()  # the geometric match is the pixel match
    # where R(i) is valid the two cells are within 0.7 larger-bin diagonals (in pixels: ·256)
    diag = torch.maximum(bin_diagonal(views.box1, grid, grid), bin_diagonal(views.box2, grid, grid)) * 256
    assert valid.any()
    assert (chosen[valid] <= (0.7 * diag[:, None].expand_as(chosen))[valid] + 1.0).all()


def test_cell_centers_hand_values():
    # box x ∈ [0.2, 0.6], y ∈ [0.1, 0.5], 2×2 cells of 0.2×0.2: centres x 0.3, 0.5 and y 0.2, 0.4
    box = torch.tensor([[0.2, 0.1, 0.6, 0.5], [0.2, 0.1, 0.6, 0.5]])
    got = cell_centers(box, torch.tensor([False, True]), 2, 2)
    plain = torch.tensor([[0.3, 0.2], [0.5, 0.2], [0.3, 0.4], [0.5, 0.4]])
    mirrored = torch.tensor([[0.5, 0.2], [0.3, 0.2], [0.5, 0.4], [0.3, 0.4]])  # columns swap, rows don't
    assert torch.allclose(got[0], plain) and torch.allclose(got[1], mirrored)
    # h ≠ w: one row (y centre 0.3) of four columns 0.1 wide (x centres 0.25, 0.35, 0.45, 0.55)
    got = cell_centers(box[:1], torch.tensor([False]), 1, 4)
    assert torch.allclose(got[0], torch.tensor([[0.25, 0.3], [0.35, 0.3], [0.45, 0.3], [0.55, 0.3]]))
    # bin diagonal of 0.1 × 0.4 cells
    assert torch.allclose(bin_diagonal(box[:1], 1, 4), torch.tensor([math.hypot(0.1, 0.4)]))


def test_positive_pairs_full_image_vs_left_half():
    """View 1 = whole image, view 2 = left half, 2×2 cells.

    Centres: view 1 (0.25, 0.25) (0.75, 0.25) (0.25, 0.75) (0.75, 0.75); view 2 (0.125, 0.25)
    (0.375, 0.25) (0.125, 0.75) (0.375, 0.75). Bin diagonals √(0.5² + 0.5²) = 0.707 and
    √(0.25² + 0.5²) = 0.559, so a pair is positive when its distance < 0.7·0.707 = 0.495:
    i0: j0 0.125 ✓, j1 0.125 ✓, j2/j3 ≥ 0.515 ✗; i1: j1 0.375 ✓, j0 0.625 ✗, j3 0.625 ✗;
    i2: j2, j3 ✓ (mirror of i0); i3: j3 ✓ only.
    """
    full, left = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    no = torch.tensor([False])
    expected = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(positive_pairs(full, no, left, no, 2, 2)[0], expected)
    # flipping view 2 swaps its two columns: j0 ↔ j1, j2 ↔ j3
    flipped = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(positive_pairs(full, no, left, torch.tensor([True]), 2, 2)[0], flipped)
    # view 1 flipped as well: its columns (rows of the mask) swap, i0 ↔ i1, i2 ↔ i3
    assert torch.equal(positive_pairs(full, torch.tensor([True]), left, no, 2, 2)[0], expected[[1, 0, 3, 2]])


def test_nearest_cells_hand_values():
    """View 1 = whole image, view 2 = x ∈ [0.1, 0.5], y ∈ [0, 0.6], 2×2 cells.

    View 2 centres j0 (0.2, 0.15) j1 (0.4, 0.15) j2 (0.2, 0.45) j3 (0.4, 0.45); larger bin diagonal
    0.707 (view 1; view 2's is √(0.2² + 0.3²) = 0.361). Nearest: i0 (0.25, 0.25) → j0 at 0.112
    (0.158 diagonals); i1 (0.75, 0.25) → j1 at 0.364 (0.515); i2 (0.25, 0.75) → j2 at 0.304 (0.430);
    i3 (0.75, 0.75) → j3 at 0.461 (0.652): all < 0.7, and only i3 fails a 0.6 threshold.
    """
    full, box2 = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.1, 0.0, 0.5, 0.6]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    index, valid = nearest_cells(full, no, box2, no, 2, 2)
    assert index.tolist() == [[0, 1, 2, 3]] and valid.all()
    _, valid = nearest_cells(full, no, box2, no, 2, 2, threshold=0.6)
    assert valid.tolist() == [[True, True, True, False]]
    index, _ = nearest_cells(full, no, box2, yes, 2, 2)  # view 2 mirrored: its columns swap
    assert index.tolist() == [[1, 0, 3, 2]]


def test_pixel_index_box_hand_values_and_source_size():
    """PixPro's coordinates: a crop of columns 2..5 (w = 4) and rows 0..9 of a 10-wide, 20-high source has
    edges (0.2, 0, 0.6, 0.5) and official coordinates (2/9, 0/19, 5/9, 9/19)."""
    box = torch.tensor([[0.2, 0.0, 0.6, 0.5]])
    torch.testing.assert_close(pixel_index_box(box, 20, 10), torch.tensor([[2 / 9, 0.0, 5 / 9, 9 / 19]]))
    full = pixel_index_box(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 64, 64)  # the whole image: still 0..1
    torch.testing.assert_close(full, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(BenchError, match="too small"):
        pixel_index_box(box, 1, 10)
    views = make_views(random_images(2, 48), "byol", 32, gen())
    assert views.source_size == (48, 48)


def test_mask_at_cells_hand_values():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1  # left half: cell centres at x = 4, 12 | 20, 28 px are inside | outside
    assert torch.equal(mask_at_cells(mask, 4, 4), torch.tensor([[1.0, 1, 0, 0] * 4]))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :4] = 1  # the first cell's centre x = 4 px lies between pixel 3 (in) and pixel 4 (out)
    assert torch.allclose(mask_at_cells(mask, 2, 4), torch.tensor([[0.5, 0, 0, 0] * 2]))


# --- random resized crop ---------------------------------------------------------------------


def test_crop_boxes_follow_torchvision_rule():
    boxes = sample_crop_boxes(512, 64, 64, (0.08, 1.0), (3 / 4, 4 / 3), gen(3), torch.device("cpu"))
    w_px, h_px = (boxes[:, 2] - boxes[:, 0]) * 64, (boxes[:, 3] - boxes[:, 1]) * 64
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert torch.allclose(boxes * 64, (boxes * 64).round(), atol=1e-4)  # integer pixel crops
    area = w_px * h_px / 64**2
    assert area.min() >= 0.08 - 2 * 9 / 64**2 and area.max() <= 1.0  # rounding of w, h moves area a bit
    aspect = w_px / h_px  # rounding w and h to integers changes the ratio by at most ~1/h each way
    assert (aspect >= 3 / 4 * (1 - 1 / h_px) / (1 + 1 / h_px) - 1e-6).all()
    assert (aspect <= 4 / 3 * (1 + 1 / h_px) / (1 - 1 / h_px) + 1e-6).all()
    assert area.std() > 0.1  # not degenerate


def test_crop_fallback_is_centre_crop():
    # scale > 1 never fits: torchvision falls back to the centre crop of the largest allowed ratio;
    # a 64×128 source has ratio 2 > 4/3, so h = 64, w = round(64·4/3) = 85, left = (128 − 85)//2 = 21
    boxes = sample_crop_boxes(3, 64, 128, (1.5, 2.0), (3 / 4, 4 / 3), gen(0), torch.device("cpu"))
    assert torch.allclose(boxes, torch.tensor([[21 / 128, 0.0, 106 / 128, 1.0]]).expand(3, 4))


def test_light_and_photometric_crops():
    img = random_images(64, 32)
    light = make_views(img, "light", 32, gen(0))
    area = (light.box1[:, 2] - light.box1[:, 0]) * (light.box1[:, 3] - light.box1[:, 1])
    assert area.min() >= 0.5 - 2 * 6 / 32**2
    photo = make_views(img, "photometric", 32, gen(0))
    assert torch.equal(photo.box1, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(64, 4))


# --- views: determinism, shapes, masks ---------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_determinism(recipe):
    img = random_images(4, 48)
    a, b = make_views(img, recipe, 32, gen(7)), make_views(img, recipe, 32, gen(7))
    for name in ("x1", "x2", "box1", "box2", "flip1", "flip2"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = make_views(img, recipe, 32, gen(8))
    assert not torch.equal(a.x1, c.x1)


@pytest.mark.parametrize("size", [32, 48])
def test_shapes_and_types(size):
    img = random_images(4, 64)
    masks = (img[:, :1] > 128).to(torch.uint8)
    ids = torch.tensor([10, 11, 12, 13])
    for recipe in RECIPES:
        v = make_views(img, recipe, size, gen(0), image_ids=ids, masks=masks)
        assert v.x1.shape == v.x2.shape == (4, 3, size, size) and v.x1.dtype == torch.float32
        assert v.box1.shape == v.box2.shape == (4, 4)
        assert v.flip1.dtype == torch.bool and v.flip1.shape == (4,)
        assert v.masks.shape == (4, 1, size, size)
        assert torch.equal(v.image_ids, ids) and v.paste1 is None
    assert torch.equal(make_views(img, "byol", size, gen(0)).image_ids, torch.arange(4))


def test_masks_follow_view1_exactly():
    """An image that *is* its mask (0/255 grey) gives view-1 pixels that are the cropped mask."""
    blob = random_images(8, 64)[:, :1] > 150
    img = (blob * 255).to(torch.uint8).expand(8, 3, 64, 64).contiguous()
    views = make_views(img, GEO_RANDOM_FLIP, 32, gen(4), masks=blob.to(torch.uint8))
    value = denormalize(views.x1)[:, :1]
    clear = (value - 0.5).abs() > 1e-3  # away from exact interpolation ties
    assert clear.float().mean() > 0.99
    assert torch.equal(views.masks[clear], (value > 0.5).float()[clear])
    assert set(views.masks.unique().tolist()) <= {0.0, 1.0} and views.masks.sum() > 0
    assert views.flip1.any() and not views.flip1.all()  # both flip states were exercised


def test_finetune_batch_masks_follow_image():
    blob = random_images(8, 64, seed=3)[:, :1] > 150
    img = (blob * 255).to(torch.uint8).expand(8, 3, 64, 64).contiguous()
    geo = ViewRecipe("geo", ViewAug(scale=(0.5, 1.0)), ViewAug())
    x, y = finetune_batch(img, blob.float(), 32, gen(5), recipe=geo)
    value = denormalize(x)[:, :1]
    clear = (value - 0.5).abs() > 1e-3
    assert x.shape == (8, 3, 32, 32) and y.shape == (8, 1, 32, 32)
    assert torch.equal(y[clear], (value > 0.5).float()[clear])
    x, y = finetune_batch(img, blob.float(), 32, gen(5))  # the default "light" recipe runs
    assert set(y.unique().tolist()) <= {0.0, 1.0}


def test_to_input_normalises():
    img = random_images(2, 32)
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    assert torch.allclose(to_input(img), (img / 255 - mean) / std, atol=1e-6)
    flat = torch.full((2, 3, 40, 40), 200, dtype=torch.uint8)
    out = to_input(flat, 24)
    assert out.shape == (2, 3, 24, 24) and torch.allclose(out, to_input(flat[..., :24, :24]), atol=1e-5)


def test_unknown_recipe_and_bad_input():
    with pytest.raises(BenchError, match="recipe"):
        make_views(random_images(2, 32), "simclr", 32, gen())
    with pytest.raises(BenchError):
        make_views(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "byol", 32, gen())


def test_recipe_parameters():
    byol = RECIPES["byol"]
    v1, v2 = byol.view1, byol.view2
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1, 0.1, 0, 0.2)
    jitter = (v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p, v1.gray_p)
    assert jitter == (0.4, 0.4, 0.2, 0.1, 0.8, 0.2) and jitter == (v2.brightness, v2.contrast, v2.saturation,
                                                                 v2.hue, v2.jitter_p, v2.gray_p)
    assert v1.scale == (0.08, 1.0) and v1.flip_p == 0.5
    moco = RECIPES["mocov2"]
    assert moco.view1 == moco.view2 and moco.view1.scale == (0.2, 1.0) and moco.view1.saturation == 0.4
    assert RECIPES["dicoh"].view1.noise_p == 0.5 and RECIPES["dicoh"].view1.noise_std == 0.05
    assert RECIPES["photometric"].view1.scale is None
    assert blur_kernel_size(224) == 23 and blur_kernel_size(64) == 7 and blur_kernel_size(16) == 3


# --- colour operations against torchvision --------------------------------------------------


def test_colour_ops_match_torchvision_per_sample():
    x = torch.rand(4, 3, 12, 12, generator=gen(0))
    factor = torch.tensor([0.5, 1.2, 1.7, 0.9])
    for ours, theirs in ((adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast),
                         (adjust_saturation, TF.adjust_saturation)):
        ref = torch.stack([theirs(x[i], float(factor[i])) for i in range(4)])
        assert torch.allclose(ours(x, factor), ref, atol=1e-6), ours.__name__
    shift = torch.tensor([-0.4, -0.05, 0.1, 0.33])
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(4)])
    assert torch.allclose(adjust_hue(x, shift), ref, atol=1e-5)
    sigma = torch.tensor([0.1, 0.6, 1.3, 2.0])
    ref = torch.stack([TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2) for i in range(4)])
    assert torch.allclose(gaussian_blur(x, sigma, 7), ref, atol=1e-5)


def test_grey_and_noise_probabilities_act():
    img = torch.full((64, 3, 16, 16), 128, dtype=torch.uint8)
    img[:, 0] = 200
    grey = make_views(img, ViewRecipe("g", ViewAug(scale=None, flip_p=0, gray_p=1.0), ViewAug()), 16, gen())
    rgb = denormalize(grey.x1)
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
    noise_only = ViewRecipe("n", ViewAug(scale=None, noise_p=1.0, noise_std=0.05), ViewAug())
    noisy = make_views(img, noise_only, 16, gen())
    diff = denormalize(noisy.x1)[:, 1] - 128 / 255  # green channel mid-grey, far from clamping
    assert abs(diff.std().item() - 0.05) < 0.003 and abs(diff.mean().item()) < 0.003
    plain = make_views(img, ViewRecipe("p", ViewAug(scale=None), ViewAug()), 16, gen())
    assert torch.allclose(denormalize(plain.x1), img / 255, atol=1e-5)  # nothing enabled: identity


# --- CP2 copy-paste ------------------------------------------------------------------------


def _cp2_inputs(batch: int = 16, size: int = 32):
    views = make_views(random_images(batch, 48), "mocov2", size, gen(0))
    bg = make_views(random_images(batch, 48, seed=9), "mocov2", size, gen(1))
    return views, bg.x1, bg.x2


def test_copy_paste_composition_and_masks():
    views, bg1, bg2 = _cp2_inputs()
    out = copy_paste(views, bg1, bg2, gen(2))
    for x, fg, bg, m in ((out.x1, views.x1, bg1, out.paste1), (out.x2, views.x2, bg2, out.paste2)):
        assert m.shape == (16, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
        inside = m.bool().expand_as(x)
        assert torch.equal(x[inside], fg[inside]) and torch.equal(x[~inside], bg[~inside])
        area = m.mean(dim=(1, 2, 3))
        assert ((area >= 0.5) & (area <= 0.8)).all()
        rows, cols = m[:, 0].any(dim=2), m[:, 0].any(dim=1)
        h, w = rows.sum(1).float(), cols.sum(1).float()
        assert torch.equal(m.sum(dim=(1, 2, 3)), h * w)  # a filled axis-aligned rectangle
        slack = (1 + 1 / w) / (1 - 1 / w)  # rounding h and w to integers
        assert ((h / w >= 0.8 / slack) & (h / w <= 1.25 * slack)).all()
    assert torch.equal(out.box1, views.box1) and torch.equal(out.image_ids, views.image_ids)


def test_copy_paste_rectangles_are_independent_and_not_inferred_from_pixels():
    views, _, _ = _cp2_inputs()
    out = copy_paste(views, views.x1, views.x2, gen(3))  # fg == bg: pixels carry no trace of the mask
    assert torch.equal(out.x1, views.x1)
    differs = (out.paste1 != out.paste2).flatten(1).any(dim=1)
    assert differs.sum() >= 14  # q and k rectangles drawn independently
    assert not torch.equal(out.paste1[0], out.paste1[1])  # and per image
    with pytest.raises(BenchError, match="backgrounds1"):
        copy_paste(views, views.x1[:, :, :16, :16], views.x2, gen())
