"""Procedural, seeded, homogeneous segmentation sets: the embedded default data (docs/datasets.md).

Four generators in the spirit of the real sets, at the requested size directly (vectorised numpy):

- ``synthetic-polyp``: one smooth lobed blob (polyp) on a mucosa-like texture (pinkish red, smooth
  colour noise, warped folds), endoscope vignetting and a few specular highlights. The polyp has
  nearly the hue of the mucosa; what sets it apart is a finer texture, dome shading, a slightly
  more saturated red and a soft shadow at its rim. Its area is 5–30% of the image (up to
  clipping at the border), its position varies. Mask = the blob.
- ``synthetic-gland``: ring-shaped glands on an H&E-like pink stroma (jittered 3×3 grid, each
  cell holding a gland with probability 0.85): pale lumen, purple epithelial ring with dark
  nuclei; scattered nuclei in the stroma. Mask = gland area (ring + lumen).
- ``synthetic-skin`` (ISIC-like): one large lobed lesion (10–40% of the image, near the centre)
  of tan to dark brown with a fuzzy border, a pigment network and a darker core, on skin texture;
  thin hairs on half of the images, the dermoscope's dark rim on a third. Mask = the lesion.
- ``synthetic-cell`` (nucleus-like): dark, textured, lobed nuclei on a jittered 3×3 grid at 64 px
  (4×4, 6×6 at larger sizes; each present with probability 0.75, so ≥ ~12 px across and resolvable
  by stride-16 logits), paler cell bodies around them and small dark debris (not foreground) on a
  light background with uneven illumination. Mask = the nuclei.

Low inter-image diversity is the point (DiCoH's "homogeneous medical domain"): every image is a
draw from the same narrow distribution. Images are generated in chunks of ``CHUNK`` with an RNG
seeded by ``(seed, chunk index)`` (always a full chunk, the tail cut), so the first 100 images of
``n=200`` equal those of ``n=100``.

Example:
    >>> images, masks = generate("synthetic-polyp", n=4, size=64, seed=0)
    >>> images.shape, images.dtype, masks.shape, set(masks.ravel().tolist()) <= {0, 1}
    ((4, 3, 64, 64), dtype('uint8'), (4, 64, 64), True)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

GENERATOR_VERSION = 3  # bump whenever a generator's output changes (part of the cache key)
CHUNK = 32

Arrays = tuple[np.ndarray, np.ndarray]


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """(n, 1, 1) float32 per-image parameters, so that the (n, S, S) arithmetic stays float32."""
    return rng.uniform(low, high, (n, 1, 1)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (yy, xx), each (1, S, S) float32."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return yy[None], xx[None]


def smooth_noise(rng: np.random.Generator, n: int, size: int, scale: float) -> np.ndarray:
    """(n, S, S) float32 Gaussian random field, zero mean and unit std per image.

    White noise low-pass filtered in Fourier space with a Gaussian of std ``scale`` (a fraction
    of the image side): the correlation length is about ``scale·S`` pixels, at any S.
    """
    white = rng.standard_normal((n, size, size), dtype=np.float32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    sigma = scale * size
    filt = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2)).astype(np.float32)
    field = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(size, size)).astype(np.float32)
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-8
    return field


def _lobed_radius(angle: np.ndarray, rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """1 + Σ_k a_k cos(kφ + p_k), k = 2..4: a smooth lobed outline (relative radius), (n, S, S)."""
    radius = np.ones_like(angle)
    for k in (2, 3, 4):
        a = _uniform(rng, 0, amplitude / np.sqrt(k - 1), n)
        radius += a * np.cos(k * angle + _uniform(rng, 0, 2 * np.pi, n))
    return radius


def _specular(rng: np.random.Generator, n: int, yy: np.ndarray, xx: np.ndarray,
              centres: tuple[np.ndarray, np.ndarray], spread: np.ndarray, spots: int = 5) -> np.ndarray:
    """(n, S, S) highlight strength in [0, 1]: 1–``spots`` small Gaussian glints near ``centres``."""
    out = np.zeros((n,) + yy.shape[1:], np.float32)
    count = rng.integers(1, spots + 1, (n, 1, 1))
    for s in range(spots):
        cy = centres[0] + rng.normal(0, 1, (n, 1, 1)).astype(np.float32) * spread
        cx = centres[1] + rng.normal(0, 1, (n, 1, 1)).astype(np.float32) * spread
        sig_y, sig_x = rng.uniform(0.004, 0.014, (2, n, 1, 1)).astype(np.float32)
        glint = np.exp(-0.5 * (((yy - cy) / sig_y) ** 2 + ((xx - cx) / sig_x) ** 2))
        out = np.maximum(out, np.where(s < count, glint, 0).astype(np.float32))
    return np.clip(1.6 * out, 0, 1)


def _polyp_chunk(rng: np.random.Generator, n: int, size: int) -> Arrays:
    yy, xx = _grid(size)
    px = 1.0 / size
    # Mucosa: pinkish red, large-scale colour/illumination noise, fine texture, warped folds.
    base = np.array([0.80, 0.40, 0.36], np.float32) + rng.normal(0, 0.02, (n, 3)).astype(np.float32)
    low, mid = smooth_noise(rng, n, size, 0.12), smooth_noise(rng, n, size, 0.03)
    theta = _uniform(rng, 0, np.pi, n)
    along = xx * np.cos(theta) + yy * np.sin(theta) + 0.06 * smooth_noise(rng, n, size, 0.10)
    folds = (0.5 + 0.5 * np.sin(2 * np.pi * _uniform(rng, 2.0, 4.0, n) * along)) ** 6
    mucosa_shade = 1 + 0.08 * low + 0.04 * mid - 0.14 * folds
    mucosa = base[:, :, None, None] * mucosa_shade[:, None]

    # Polyp: lobed outline r(φ) = R·(1 + Σ a_k cos(kφ + p_k)), area fraction in [0.05, 0.30].
    area = _uniform(rng, 0.05, 0.30, n)
    radius0 = np.sqrt(area / np.pi)
    margin = np.minimum(0.85 * radius0 + 0.03, 0.5)
    cy = _uniform(rng, 0, 1, n) * (1 - 2 * margin) + margin
    cx = _uniform(rng, 0, 1, n) * (1 - 2 * margin) + margin
    dy, dx = yy - cy, xx - cx
    rho = np.sqrt(dy**2 + dx**2)
    lobes = _lobed_radius(np.arctan2(dy, dx), rng, n, amplitude=0.15)
    boundary = radius0 * lobes
    alpha = np.clip(0.5 + (boundary - rho) / (1.5 * px), 0, 1)          # soft 1.5-pixel edge
    mask = (rho < boundary).astype(np.uint8)
    dome = np.sqrt(np.clip(1 - (rho / boundary) ** 2, 0, 1))
    light = _uniform(rng, 0, 2 * np.pi, n)
    tilt = (dx * np.cos(light) + dy * np.sin(light)) / radius0
    fine = smooth_noise(rng, n, size, 0.012)
    polyp_shade = 0.90 + 0.14 * dome * (1 - 0.35 * tilt) + 0.035 * fine + 0.05 * low
    tint = np.array([1.0, 0.87, 0.92], np.float32) + rng.normal(0, 0.02, (n, 3)).astype(np.float32)
    polyp = (base * tint)[:, :, None, None] * polyp_shade[:, None]
    rim = np.exp(-0.5 * ((rho - boundary) / (0.025 + 0.1 * radius0)) ** 2) * (rho >= boundary)
    image = (mucosa * (1 - 0.18 * rim[:, None])) * (1 - alpha[:, None]) + polyp * alpha[:, None]

    # Endoscope vignetting and specular highlights (mostly on the dome, some on the mucosa).
    r = np.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / np.sqrt(0.5)
    vignette = 1 - _uniform(rng, 0.45, 0.6, n) * r**2.2
    image = image * vignette[:, None].astype(np.float32)
    glints = np.maximum(_specular(rng, n, yy, xx, (cy - 0.3 * radius0, cx - 0.3 * radius0), radius0 * 0.4),
                        0.8 * _specular(rng, n, yy, xx, (0.5, 0.5), np.full((n, 1, 1), 0.25), spots=2))
    image = image + (1 - image) * glints[:, None]
    image = image + rng.normal(0, 0.01, image.shape).astype(np.float32)
    return _to_uint8(image), mask


def glands_per_side(size: int) -> int:
    """Glands per row and column: fewer at small sizes, so that a gland stays ≥ ~20 px across and a
    stride-16 segmentation model can resolve it (at 64 px, 3×3 glands would be ~10 px wide)."""
    return 2 if size < 80 else 3 if size < 192 else 4


def _gland_chunk(rng: np.random.Generator, n: int, size: int, cells: int | None = None) -> Arrays:
    cells = cells or glands_per_side(size)
    yy, xx = _grid(size)
    px = 1.0 / size
    stroma_base = np.array([0.91, 0.64, 0.77], np.float32) + rng.normal(0, 0.02, (n, 3)).astype(np.float32)
    fibres = smooth_noise(rng, n, size, 0.02)
    stroma = stroma_base[:, :, None, None] * (1 + 0.06 * fibres + 0.04 * smooth_noise(rng, n, size, 0.1))[:, None]
    gland = np.zeros((n, size, size), np.float32)   # soft coverage of glands (ring + lumen)
    lumen = np.zeros((n, size, size), np.float32)   # soft coverage of lumina
    for i in range(cells):
        for j in range(cells):
            present = _uniform(rng, 0, 1, n) < 0.85
            cy = (i + 0.5) / cells + _uniform(rng, -0.05, 0.05, n)
            cx = (j + 0.5) / cells + _uniform(rng, -0.05, 0.05, n)
            semi_minor = _uniform(rng, 0.07, 0.115, n) * 3 / cells   # glands fill their cell alike
            semi_major = np.minimum(semi_minor * _uniform(rng, 1.0, 1.6, n), 0.16 * 3 / cells)
            angle = _uniform(rng, 0, np.pi, n)
            dy, dx = yy - cy, xx - cx
            u = dx * np.cos(angle) + dy * np.sin(angle)
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            lobes = _lobed_radius(np.arctan2(v, u), rng, n, amplitude=0.08)
            rho = np.sqrt((u / semi_major) ** 2 + (v / semi_minor) ** 2) / lobes   # 1 on the outline
            scale = semi_minor / px   # pixels per unit of rho, roughly
            ring = _uniform(rng, 0.30, 0.45, n)
            outer = np.clip(0.5 + (1 - rho) * scale, 0, 1) * present
            inner = np.clip(0.5 + (1 - ring - rho) * scale, 0, 1) * present
            gland, lumen = np.maximum(gland, outer), np.maximum(lumen, inner)
    mask = (gland >= 0.5).astype(np.uint8)
    nuclei = (smooth_noise(rng, n, size, 0.006) > 0.9).astype(np.float32)
    epithelium = np.array([0.62, 0.38, 0.68], np.float32)[None, :, None, None] \
        * (1 - 0.35 * nuclei[:, None]) * (1 + 0.05 * fibres[:, None])
    lumen_colour = np.array([0.96, 0.90, 0.94], np.float32)[None, :, None, None] \
        * (1 - 0.04 * smooth_noise(rng, n, size, 0.03)[:, None])
    stroma_nuclei = (smooth_noise(rng, n, size, 0.006) > 1.8).astype(np.float32)
    stroma = stroma * (1 - 0.4 * stroma_nuclei[:, None])
    ring_cover = (gland - lumen)[:, None]
    image = stroma * (1 - gland[:, None]) + epithelium * ring_cover + lumen_colour * lumen[:, None]
    image = image + rng.normal(0, 0.012, image.shape).astype(np.float32)
    return _to_uint8(image), mask


def _hairs(rng: np.random.Generator, n: int, yy: np.ndarray, xx: np.ndarray, px: float) -> np.ndarray:
    """(n, S, S) in [0, 1]: 0–4 thin, slightly curved dark hairs per image (half of the images have none)."""
    cover = np.zeros((n,) + yy.shape[1:], np.float32)
    count = np.where(rng.uniform(0, 1, (n, 1, 1)) < 0.5, 0, rng.integers(1, 5, (n, 1, 1)))
    for h in range(4):
        angle = _uniform(rng, 0, np.pi, n)
        cy, cx = _uniform(rng, 0.1, 0.9, n), _uniform(rng, 0.1, 0.9, n)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        distance = np.abs(v - _uniform(rng, -0.6, 0.6, n) * u**2)
        width = _uniform(rng, 0.5, 0.9, n) * px
        hair = np.clip(1 - (distance - width) / px, 0, 1)
        cover = np.maximum(cover, np.where(h < count, hair, 0).astype(np.float32))
    return cover


def _skin_chunk(rng: np.random.Generator, n: int, size: int) -> Arrays:
    """ISIC-like: one large pigmented lesion on skin texture, hairs, dermoscope dark corners."""
    yy, xx = _grid(size)
    px = 1.0 / size
    skin = np.array([0.87, 0.69, 0.60], np.float32) + rng.normal(0, 0.03, (n, 3)).astype(np.float32)
    shade = 1 + 0.06 * smooth_noise(rng, n, size, 0.15) + 0.025 * smooth_noise(rng, n, size, 0.01)
    background = skin[:, :, None, None] * shade[:, None]

    area = _uniform(rng, 0.10, 0.40, n)           # lesions fill much of a dermoscopic image
    radius0 = np.sqrt(area / np.pi)
    cy, cx = _uniform(rng, 0.38, 0.62, n), _uniform(rng, 0.38, 0.62, n)
    dy, dx = yy - cy, xx - cx
    rho = np.sqrt(dy**2 + dx**2)
    boundary = radius0 * _lobed_radius(np.arctan2(dy, dx), rng, n, amplitude=0.22)
    mask = (rho < boundary).astype(np.uint8)
    edge = _uniform(rng, 1.5, 4.0, n) * px          # a fuzzy lesion border, 1.5–4 pixels
    alpha = np.clip(0.5 + (boundary - rho) / (2 * edge), 0, 1)
    brown = np.array([0.50, 0.32, 0.24], np.float32) + rng.normal(0, 0.04, (n, 3)).astype(np.float32)
    network = smooth_noise(rng, n, size, 0.02)      # pigment network: a fine, irregular darker mesh
    core = np.clip(1 - rho / boundary, 0, 1)
    darkness = _uniform(rng, 0.45, 0.9, n)          # light (tan) to dark lesions
    lesion_shade = 1 - 0.10 * np.clip(network, 0, None) - 0.18 * core * _uniform(rng, 0, 1, n)
    lesion = (skin * (1 - darkness[:, 0]) + brown * darkness[:, 0])[:, :, None, None] * lesion_shade[:, None]
    image = background * (1 - alpha[:, None]) + lesion * alpha[:, None]

    image = image * (1 - 0.75 * _hairs(rng, n, yy, xx, px)[:, None])
    corners = np.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2) > _uniform(rng, 0.62, 0.75, n)
    dark = (rng.uniform(0, 1, (n, 1, 1)) < 0.3) & corners   # a third of the images show the scope's rim
    image = np.where(dark[:, None], image * 0.12, image)
    image = image + rng.normal(0, 0.012, image.shape).astype(np.float32)
    return _to_uint8(image), mask


def cells_per_side(size: int) -> int:
    """Nuclei per row and column: each nucleus stays ≥ ~12 px across, resolvable at stride 16."""
    return 3 if size < 80 else 4 if size < 192 else 6


def _cell_chunk(rng: np.random.Generator, n: int, size: int) -> Arrays:
    """Nucleus-like: many dark, textured nuclei with paler cell bodies on a light background, plus debris."""
    cells = cells_per_side(size)
    yy, xx = _grid(size)
    px = 1.0 / size
    paper = np.array([0.94, 0.86, 0.91], np.float32) + rng.normal(0, 0.02, (n, 3)).astype(np.float32)
    illumination = 1 + 0.07 * smooth_noise(rng, n, size, 0.2)
    image = paper[:, :, None, None] * illumination[:, None]
    nuclei = np.zeros((n, size, size), np.float32)
    body = np.zeros((n, size, size), np.float32)
    stain = np.zeros((n, size, size), np.float32)
    for i in range(cells):
        for j in range(cells):
            present = _uniform(rng, 0, 1, n) < 0.75
            cy = (i + 0.5) / cells + _uniform(rng, -0.08, 0.08, n) / cells
            cx = (j + 0.5) / cells + _uniform(rng, -0.08, 0.08, n) / cells
            radius = _uniform(rng, 0.30, 0.42, n) / cells
            stretch, angle = _uniform(rng, 1.0, 1.35, n), _uniform(rng, 0, np.pi, n)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / stretch
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            rho = np.sqrt(u**2 + v**2) / _lobed_radius(np.arctan2(v, u), rng, n, amplitude=0.10)
            cover = np.clip(0.5 + (radius - rho) / px, 0, 1) * present
            halo = np.clip(0.5 + (1.7 * radius - rho) / (2 * px), 0, 1) * present
            nuclei, body = np.maximum(nuclei, cover), np.maximum(body, halo)
            stain = np.where(cover > 0, _uniform(rng, 0.6, 1.0, n), stain)   # pale to dark nuclei
    mask = (nuclei >= 0.5).astype(np.uint8)
    chromatin = 1 - 0.25 * np.clip(smooth_noise(rng, n, size, 0.01), 0, None)
    dye = np.array([0.33, 0.20, 0.50], np.float32)[None, :, None, None]
    nucleus_colour = image * (1 - stain[:, None]) + dye * stain[:, None] * chromatin[:, None]
    image = image * (1 - 0.10 * body[:, None] * np.array([0.2, 1.0, 0.5], np.float32)[None, :, None, None])
    image = image * (1 - nuclei[:, None]) + nucleus_colour * nuclei[:, None]
    debris = (smooth_noise(rng, n, size, 0.006) > 2.3).astype(np.float32) * (1 - body)   # specks, not nuclei
    image = image * (1 - 0.45 * debris[:, None])
    image = image + rng.normal(0, 0.012, image.shape).astype(np.float32)
    return _to_uint8(image), mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


GENERATORS: dict[str, tuple[Callable[[np.random.Generator, int, int], Arrays], str]] = {
    "synthetic-polyp": (_polyp_chunk, "procedural polyp-like set: one lobed blob on mucosa texture, "
                                      "vignetting, specular highlights (embedded default)"),
    "synthetic-gland": (_gland_chunk, "procedural gland-like set: ring-shaped glands on H&E-like "
                                      "stroma (embedded default)"),
    "synthetic-skin": (_skin_chunk, "procedural skin-lesion set (ISIC-like): one large pigmented lesion on "
                                    "skin texture, hairs, dermoscope rim"),
    "synthetic-cell": (_cell_chunk, "procedural nucleus set: many dark textured nuclei with pale cell bodies "
                                    "and debris on a light background"),
}


def generate(name: str, n: int, size: int, seed: int = 0) -> Arrays:
    """``n`` images (n, 3, S, S) uint8 and masks (n, S, S) uint8 in {0, 1} from generator ``name``."""
    chunk_fn = GENERATORS[name][0]
    images = np.empty((n, 3, size, size), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for index, start in enumerate(range(0, n, CHUNK)):
        stop = min(n, start + CHUNK)
        chunk_images, chunk_masks = chunk_fn(np.random.default_rng([seed, index]), CHUNK, size)
        images[start:stop], masks[start:stop] = chunk_images[: stop - start], chunk_masks[: stop - start]
    return images, masks
