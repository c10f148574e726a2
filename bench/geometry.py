"""Where the cells of two views' feature maps sit in the source image, and which of them correspond.

Boxes are crop boxes (x0, y0, x1, y1) in normalised source coordinates: 0 is the left/top edge and 1 the
right/bottom edge of the source image (``bench.augment.Views``); a flipped view was mirrored after the
crop. ``cell_centers`` gives where each cell of an h×w map of a view sits in the source;
``positive_pairs`` (PixPro) and ``nearest_cells`` (DiCoH's spatial map R) compare two views' centres in
units of the larger bin diagonal; ``pixel_index_box`` converts a box to PixPro's official coordinates;
``mask_at_cells`` samples a view-space mask (CP2's paste masks) at the cell centres.
See docs/methods.md ("pixpro", "dicoh", "cp2").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError


def cell_centers(box: Tensor, flip: Tensor, h: int, w: int) -> Tensor:
    """Source-coordinate centres (B, h·w, 2) in (x, y) order of the cells of an h×w map of each view.

    x = x0 + (c' + 0.5)·(x1 − x0)/w with c' = w − 1 − c for flipped views, y = y0 + (r + 0.5)·(y1 − y0)/h;
    cells in row-major order (index r·w + c), as ``feature.flatten(2)``.
    """
    box = box.float()
    cols = torch.arange(w, device=box.device, dtype=box.dtype)
    rows = torch.arange(h, device=box.device, dtype=box.dtype)
    cols = torch.where(flip[:, None].to(box.device), w - 1 - cols[None], cols[None])  # (B, w)
    x = box[:, 0:1] + (cols + 0.5) * (box[:, 2:3] - box[:, 0:1]) / w  # (B, w)
    y = box[:, 1:2] + (rows[None] + 0.5) * (box[:, 3:4] - box[:, 1:2]) / h  # (B, h)
    grid = torch.stack([x[:, None, :].expand(-1, h, -1), y[:, :, None].expand(-1, -1, w)], dim=-1)
    return grid.reshape(box.shape[0], h * w, 2)


def bin_diagonal(box: Tensor, h: int, w: int) -> Tensor:
    """Diagonal (B,) of one cell of an h×w map of each view, in normalised source units."""
    box = box.float()
    return torch.hypot((box[:, 2] - box[:, 0]) / w, (box[:, 3] - box[:, 1]) / h)


def pixel_index_box(box: Tensor, height: int, width: int) -> Tensor:
    """A box in PixPro's official coordinates (``RandomResizedCropCoord``): the indices of the crop's first
    and last pixel over (W − 1) and (H − 1), i.e. (j/(W−1), i/(H−1), (j+w−1)/(W−1), (i+h−1)/(H−1)) for a
    crop of w×h pixels at column j, row i; ``box`` holds its edges j/W, i/H, (j+w)/W, (i+h)/H."""
    if height < 2 or width < 2:
        raise BenchError(f"a source of {height}×{width} pixels is too small for pixel-index coordinates")
    box = box.float()
    x0, y0 = box[:, 0] * width / (width - 1), box[:, 1] * height / (height - 1)
    x1, y1 = (box[:, 2] * width - 1) / (width - 1), (box[:, 3] * height - 1) / (height - 1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def _normalised_distances(box1: Tensor, flip1: Tensor, box2: Tensor, flip2: Tensor, h: int, w: int) -> Tensor:
    """(B, h·w, h·w): distance between cell i of view 1 and cell j of view 2 / larger bin diagonal."""
    c1, c2 = cell_centers(box1, flip1, h, w), cell_centers(box2, flip2, h, w)
    dist = torch.cdist(c1, c2, compute_mode="donot_use_mm_for_euclid_dist")
    diag = torch.maximum(bin_diagonal(box1, h, w), bin_diagonal(box2, h, w))
    return dist / diag[:, None, None]


def positive_pairs(box1: Tensor, flip1: Tensor, box2: Tensor, flip2: Tensor, h: int, w: int,
                   threshold: float = 0.7) -> Tensor:
    """PixPro's positive mask (Xie et al. 2021, §3.1): (B, h·w, h·w) bool, True where the centres of
    cell i (view 1) and cell j (view 2) are closer than ``threshold`` larger-bin diagonals."""
    return _normalised_distances(box1, flip1, box2, flip2, h, w) < threshold


def nearest_cells(box1: Tensor, flip1: Tensor, box2: Tensor, flip2: Tensor, h: int, w: int,
                  threshold: float = 0.7) -> tuple[Tensor, Tensor]:
    """DiCoH's spatial map R: for each cell i of view 1 the cell j of view 2 with the nearest source
    centre (ties: lowest j), and whether that distance is below ``threshold`` larger-bin diagonals.
    Returns (index (B, h·w) long, valid (B, h·w) bool)."""
    dist, index = _normalised_distances(box1, flip1, box2, flip2, h, w).min(dim=2)
    return index, dist < threshold


def mask_at_cells(mask: Tensor, h: int, w: int) -> Tensor:
    """A view-space mask (B, 1, S, S) sampled bilinearly at the cell centres of an h×w grid: (B, h·w).

    Cell (r, c) is sampled at ((c + 0.5)/w, (r + 0.5)/h) of the view; a binary mask gives 1 inside,
    0 outside and a fraction where the centre falls between a foreground and a background pixel.
    """
    b = mask.shape[0]
    xs = (torch.arange(w, device=mask.device, dtype=torch.float32) + 0.5) / w * 2 - 1
    ys = (torch.arange(h, device=mask.device, dtype=torch.float32) + 0.5) / h * 2 - 1
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
    out = F.grid_sample(mask.float(), grid.expand(b, h, w, 2), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.reshape(b, h * w)
