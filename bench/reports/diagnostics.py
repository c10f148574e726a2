"""Feature diagnostics of pretrained backbones: the quantities of DiCoH's Tables 5–7 (DESIGN.md §10).

For each backbone (pretrained methods and the ``scratch`` / ``imagenet`` baselines) and each dataset,
the test images are embedded and summarised by:

- ``feature_variance``: per-dimension variance of L2-normalised pixel embeddings, averaged over the
  dimensions (population variance). For unit vectors it equals (1 − ‖mean‖²)/D: 0 when every pixel
  maps to the same direction (collapse), at most 1/D.
- ``positive_similarity``: mean cosine between the embeddings of the same source location in two
  MoCo-v2 views (cell correspondence from the known crop geometry, ``bench.augment.nearest_cells``).
- ``negative_similarity``: mean cosine between pixels of *different* images.
- ``silhouette``: silhouette score (Rousseeuw 1987) of foreground vs background pixel embeddings,
  Euclidean distance between L2-normalised embeddings (the chord ‖a − b‖ = sqrt(2 − 2·cos), a true
  metric that orders pairs as cosine does), on a class-balanced pixel sample.
- ``linear_separability``: held-out accuracy of a linear SVM (``LinearSVC`` on standardised
  embeddings) trained on the pixels of a random half of the images and tested on the other half,
  each half class-balanced by subsampling (chance = 0.5).
- ``effective_rank``: RankMe (Garrido et al., ICML 2023, Eq. 1): exp of the entropy of the
  L1-normalised singular values of the image-embedding matrix (global average pool of the last
  stage), p_k = σ_k/‖σ‖₁ + ε, ε = 1e-7. It is bounded by min(#images, D).

Pixel embeddings are the backbone's last-stage map, L2-normalised per location; a cell's label is the
mask sampled at the cell centre (``bench.augment.mask_at_cells``). Pixels are sampled with a fixed seed
and capped (``max_pixels``) so that the metrics take seconds on a CPU. Every method sees the same
pixel sample and the same views of a dataset (one generator seeded per dataset), so the comparison is
paired.

Plots (sklearn ``TSNE``, matplotlib without pyplot): ``tsne_pixels.png`` (rows datasets, columns
methods, pixels coloured background/foreground), ``tsne_images.png`` (one panel per method, image
embeddings coloured by dataset) and, when both ``X`` and ``X+disp`` were diagnosed,
``tsne_dispersive.png`` (without / with the dispersive regulariser side by side).

Example::

    df = run_diagnostics(Path("reports/quick"), {"kvasir": data}, {"byol": backbone})
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from bench.augment import make_views, mask_at_cells, nearest_cells, to_input
from bench.errors import BenchError

METRICS = ("feature_variance", "positive_similarity", "negative_similarity", "silhouette",
           "linear_separability", "effective_rank")
HEADERS = {"feature_variance": "Var", "positive_similarity": "Pos. sim.", "negative_similarity": "Neg. sim.",
           "silhouette": "Silhouette", "linear_separability": "Lin. sep.", "effective_rank": "RankMe"}
LEGEND = ("Var: per-dimension variance of L2-normalised pixel embeddings (0 = collapse, at most 1/D). "
          "Pos. sim.: cosine of the same location in two augmented views. Neg. sim.: cosine of pixels of "
          "different images. Silhouette: foreground vs background pixels (Euclidean on normalised "
          "embeddings, −1…1). Lin. sep.: held-out linear-SVM accuracy fg vs bg (balanced, chance 0.5). "
          "RankMe: effective rank of image embeddings (at most min(#images, D)).")
RANKME_EPS = 1e-7
TSNE_POINTS = 400
CLASS_NAMES = {0: "background", 1: "foreground"}
CLASS_COLOURS = {0: "#4C72B0", 1: "#DD8452"}
DATASET_COLOURS = ("#55A868", "#8172B3", "#C44E52", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")


# --- pure metrics ------------------------------------------------------------------------------------

def _array(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def l2_normalize(x: np.ndarray | Tensor, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their Euclidean norm (zero rows stay zero)."""
    x = _array(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def feature_variance(pixel_emb: np.ndarray | Tensor) -> float:
    """Mean over dimensions of the (population) variance of the L2-normalised embeddings (N, D)."""
    z = l2_normalize(pixel_emb)
    if len(z) == 0:
        return float("nan")
    return float(z.var(axis=0).mean())


def positive_similarity(emb1: np.ndarray | Tensor, emb2: np.ndarray | Tensor) -> float:
    """Mean cosine of corresponding rows of (N, D) and (N, D): the same location seen in two views."""
    z1, z2 = l2_normalize(emb1), l2_normalize(emb2)
    if z1.shape != z2.shape:
        raise ValueError(f"positive pairs need equal shapes, got {z1.shape} and {z2.shape}")
    if len(z1) == 0:
        return float("nan")
    return float((z1 * z2).sum(axis=1).mean())


def negative_similarity(emb: np.ndarray | Tensor, image_index: np.ndarray, rng: np.random.Generator,
                        cap: int = 2000) -> float:
    """Mean cosine over all pairs of pixels that come from different images.

    ``emb`` (N, D) pixel embeddings, ``image_index`` (N,) the image of each pixel. Above ``cap`` pixels a
    random subset of ``cap`` (drawn with ``rng``) is used; the mean over its pairs is exact.
    """
    z, image_index = l2_normalize(emb), np.asarray(image_index)
    if len(z) > cap:
        keep = rng.choice(len(z), cap, replace=False)
        z, image_index = z[keep], image_index[keep]
    different = image_index[:, None] != image_index[None, :]
    if not different.any():
        return float("nan")
    return float((z @ z.T)[different].mean())


def silhouette(emb: np.ndarray | Tensor, labels: np.ndarray, rng: np.random.Generator,
               cap: int = 2000) -> float:
    """Silhouette score of ``labels`` on L2-normalised embeddings, Euclidean (chord) distance.

    Above ``cap`` points a random subset (``rng``) is scored. NaN when fewer than two classes or
    fewer than three points are left (the score is undefined there).
    """
    z, labels = l2_normalize(emb), np.asarray(labels)
    if len(z) > cap:
        keep = rng.choice(len(z), cap, replace=False)
        z, labels = z[keep], labels[keep]
    if not 2 <= len(np.unique(labels)) <= len(z) - 1:
        return float("nan")
    return float(silhouette_score(z, labels, metric="euclidean"))


def _balanced(indices: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """``indices`` subsampled so that every class present has the minority count; None if one class."""
    classes, counts = np.unique(labels[indices], return_counts=True)
    if len(classes) < 2:
        return None
    n = counts.min()
    picked = [rng.choice(indices[labels[indices] == c], n, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def linear_separability(emb: np.ndarray | Tensor, labels: np.ndarray, image_index: np.ndarray,
                        rng: np.random.Generator, C: float = 1.0) -> float:
    """Held-out accuracy of a linear SVM separating the classes of pixel embeddings.

    The images are split at random (``rng``) into halves; ``LinearSVC`` (on standardised, L2-normalised
    embeddings) is trained on the pixels of the first half and tested on the pixels of the other, each
    half class-balanced by subsampling, so 0.5 is chance. Splitting by image keeps a classifier from
    scoring by recognising the image. NaN when a half lacks a class or there are fewer than two images.
    """
    z, labels, image_index = l2_normalize(emb), np.asarray(labels), np.asarray(image_index)
    images = np.unique(image_index)
    if len(images) < 2:
        return float("nan")
    train_images = rng.permutation(images)[: len(images) // 2]
    in_train = np.isin(image_index, train_images)
    train = _balanced(np.flatnonzero(in_train), labels, rng)
    test = _balanced(np.flatnonzero(~in_train), labels, rng)
    if train is None or test is None:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=5000))
    with warnings.catch_warnings():  # an unconverged solver still gives an honest held-out accuracy
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(z[train], labels[train])
    return float((clf.predict(z[test]) == labels[test]).mean())


def effective_rank(image_emb: np.ndarray | Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023, Eq. 1) of an (N, D) embedding matrix: exp(−Σ p_k log p_k), with
    p_k = σ_k / ‖σ‖₁ + ε over its singular values σ. 1 for collapsed (rank-one) embeddings, D for
    whitened ones; 0 for an all-zero matrix (no direction at all)."""
    s = np.linalg.svd(_array(image_emb), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# --- embedding a dataset -----------------------------------------------------------------------------

@dataclass
class Embeddings:
    """What the metrics of one (backbone, dataset) need; pixel rows are L2-normalised, float32."""

    pixels: np.ndarray  # (P, D) uniform sample of cells of all images
    pixel_image: np.ndarray  # (P,) image of each sampled cell
    balanced: np.ndarray  # (Q, D) class-balanced sample (≤ max_pixels/2 per class)
    balanced_labels: np.ndarray  # (Q,) 0 background, 1 foreground
    balanced_image: np.ndarray  # (Q,)
    view1: np.ndarray  # (V, D) cells of view 1 that have a valid partner ...
    view2: np.ndarray  # (V, D) ... and that partner in view 2
    images: np.ndarray  # (N, D) global average pool of the last stage (not normalised)


def _last_stage(backbone: nn.Module, x: Tensor) -> Tensor:
    param = next(backbone.parameters(), None)
    out = backbone(x if param is None else x.to(param.device))
    return (out[-1] if isinstance(out, (list, tuple)) else out).float().cpu()


def _flat(maps: Tensor) -> Tensor:
    """(B, D, h, w) → (B, h·w, D) L2-normalised per location."""
    return nn.functional.normalize(maps.flatten(2).transpose(1, 2), dim=-1)


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


def _sample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, cap, replace=False)) if n > cap else np.arange(n)


@torch.no_grad()
def embed_dataset(backbone: nn.Module, images_uint8: Tensor, masks: Tensor, generator: torch.Generator,
                  max_pixels: int = 2000, batch_size: int = 16) -> Embeddings:
    """Embed a set of test images (N, 3, S, S) uint8 with masks (N, S, S) and two MoCo-v2 views of them."""
    if images_uint8.ndim != 4 or masks.shape != (images_uint8.shape[0], *images_uint8.shape[2:]):
        raise BenchError(f"diagnostics need images (N,3,S,S) and masks (N,S,S), got {tuple(images_uint8.shape)} "
                         f"and {tuple(masks.shape)}; pass the dataset's test images and their masks")
    rng = _numpy_rng(generator)
    size = images_uint8.shape[-1]
    was_training = backbone.training
    backbone.eval()
    cells, labels, pooled, view1, view2 = [], [], [], [], []
    try:
        for start in range(0, len(images_uint8), batch_size):
            imgs = images_uint8[start:start + batch_size]
            feats = _last_stage(backbone, to_input(imgs))
            h, w = feats.shape[-2:]
            cells.append(_flat(feats))
            pooled.append(feats.mean(dim=(2, 3)))
            mask = (masks[start:start + batch_size] > 0).float()[:, None]
            labels.append(mask_at_cells(mask, h, w) > 0.5)
            views = make_views(imgs, "mocov2", size, generator)
            z1, z2 = _flat(_last_stage(backbone, views.x1)), _flat(_last_stage(backbone, views.x2))
            index, valid = nearest_cells(views.box1, views.flip1, views.box2, views.flip2, h, w)
            partner = torch.gather(z2, 1, index[..., None].expand(-1, -1, z2.shape[-1]))
            view1.append(z1[valid])
            view2.append(partner[valid])
    finally:
        backbone.train(was_training)
    cells_t, labels_t = torch.cat(cells), torch.cat(labels)
    image_of = torch.arange(len(cells_t))[:, None].expand(-1, cells_t.shape[1]).reshape(-1).numpy()
    flat = cells_t.reshape(-1, cells_t.shape[-1]).numpy()
    flat_labels = labels_t.reshape(-1).long().numpy()
    uniform = _sample(len(flat), max_pixels, rng)
    per_class = [np.flatnonzero(flat_labels == c) for c in (0, 1)]
    n_class = min(len(i) for i in per_class)
    balanced = np.sort(np.concatenate([i[_sample(len(i), min(n_class, max_pixels // 2), rng)]
                                       for i in per_class]))
    v1, v2 = torch.cat(view1).numpy(), torch.cat(view2).numpy()
    pairs = _sample(len(v1), max_pixels, rng)
    return Embeddings(pixels=flat[uniform], pixel_image=image_of[uniform], balanced=flat[balanced],
                      balanced_labels=flat_labels[balanced], balanced_image=image_of[balanced],
                      view1=v1[pairs], view2=v2[pairs], images=torch.cat(pooled).numpy())


def diagnostic_metrics(emb: Embeddings, rng: np.random.Generator, max_pixels: int = 2000) -> dict[str, float]:
    """The six diagnostics of one embedded dataset (see the module docstring)."""
    return {
        "feature_variance": feature_variance(emb.pixels),
        "positive_similarity": positive_similarity(emb.view1, emb.view2),
        "negative_similarity": negative_similarity(emb.pixels, emb.pixel_image, rng, cap=max_pixels),
        "silhouette": silhouette(emb.balanced, emb.balanced_labels, rng, cap=max_pixels),
        "linear_separability": linear_separability(emb.balanced, emb.balanced_labels, emb.balanced_image, rng),
        "effective_rank": effective_rank(emb.images),
    }


def diagnose_backbone(backbone: nn.Module, images_uint8: Tensor, masks: Tensor, generator: torch.Generator,
                      max_pixels: int = 2000) -> dict[str, float]:
    """Diagnostics of one backbone on test images (N, 3, S, S) uint8 and masks (N, S, S); eval mode, no grad."""
    emb = embed_dataset(backbone, images_uint8, masks, generator, max_pixels)
    return diagnostic_metrics(emb, _numpy_rng(generator), max_pixels)


# --- t-SNE panels ------------------------------------------------------------------------------------

def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    if x.shape[1] > 50 and len(x) > 50:  # PCA to 50 dimensions first (van der Maaten's recommendation)
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    with threadpool_limits(1):  # Barnes-Hut's OpenMP threads beside torch's slow it down many times
        return tsne.fit_transform(x)


def wrap_label(text: str, width: int = 22) -> str:
    """Break a method label into lines of about ``width`` characters, only before ``+``/``[``/`` · `` or
    after ``,`` (never inside a name or an override)."""
    pieces = [p for p in re.split(r"(?=\+)|(?=\[)|(?<=,)|(?= · )", text) if p]
    lines = [""]
    for piece in pieces:
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append(piece.lstrip())
        else:
            lines[-1] += piece
    return "\n".join(lines)


def _grid(keys: list[tuple[str, str]], max_cols: int) -> tuple[dict, int, int, bool]:
    """Panel positions: (row, column) keys as a grid, or one untitled row wrapped after ``max_cols``."""
    rows = list(dict.fromkeys(r for r, _ in keys))
    cols = list(dict.fromkeys(c for _, c in keys))
    if rows == [""] and len(cols) > max_cols:
        return {k: divmod(i, max_cols) for i, k in enumerate(keys)}, -(-len(keys) // max_cols), max_cols, True
    return {(r, c): (rows.index(r), cols.index(c)) for r, c in keys}, len(rows), len(cols), False


def tsne_panels(panels: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]], path: Path,
                names: Mapping, colours: Mapping | None = None, title: str = "", seed: int = 0,
                max_points: int = TSNE_POINTS, max_cols: int = 6) -> Path:
    """One t-SNE scatter per panel, in a grid: ``panels[(row, column)] = (embeddings (N, D), labels (N,))``.

    Rows and columns appear in the order of the keys; row names label the left edge, column names head
    the top row. A single untitled row (row name "") wraps after ``max_cols`` panels, each panel then
    titled. Points are coloured by label with one legend for the figure: ``names`` maps each label to its
    legend text, ``colours`` to its colour. Panels with more than ``max_points`` points are subsampled
    (seeded). Axes carry no ticks (t-SNE coordinates have no meaning), every panel the same style.
    """
    where, n_rows, n_cols, wrapped = _grid(list(panels), max_cols)
    colours = colours or {k: DATASET_COLOURS[i % len(DATASET_COLOURS)] for i, k in enumerate(names)}
    fig = Figure(figsize=(2.3 * n_cols + 0.5, 2.3 * n_rows + 0.9), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    rng = np.random.default_rng(seed)
    for (row, col), (emb, labels) in panels.items():
        i, j = where[(row, col)]
        ax = axes[i, j]
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_box_aspect(1)
        if i == 0 or wrapped:
            ax.set_title(wrap_label(col), fontsize=9)
        if j == 0 and row:
            ax.set_ylabel(wrap_label(row), fontsize=9)
        _scatter(ax, _array(emb), np.asarray(labels), names, colours, rng, max_points, seed)
    handles = [Line2D([], [], marker="o", ls="", color=colours[k], label=str(v)) for k, v in names.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def _scatter(ax, emb: np.ndarray, labels: np.ndarray, names: Mapping, colours: Mapping,
             rng: np.random.Generator, max_points: int, seed: int) -> None:
    keep = _sample(len(emb), max_points, rng)
    emb, labels = emb[keep], labels[keep]
    if len(emb) < 5 or np.ptp(emb, axis=0).max(initial=0.0) < 1e-9:
        # t-SNE needs a few distinct points (sklearn's PCA init divides by their spread and crashes)
        note = "too few points" if len(emb) < 5 else "all embeddings identical\n(collapsed)"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    xy = _tsne(emb, seed)
    for label in names:
        on = labels == label
        ax.scatter(xy[on, 0], xy[on, 1], s=6, c=colours[label], alpha=0.7, linewidths=0)


def dispersive_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(without, with) pairs among method labels: ``byol`` and ``byol+disp`` (any ``[...]`` overrides)."""
    pairs = []
    for name in methods:
        base = re.sub(r"\+disp(\[[^\]]*\])?", "", name)
        if base != name and base in methods:
            pairs.append((base, name))
    return pairs


# --- tables ------------------------------------------------------------------------------------------

def _fmt(value: float, metric: str) -> str:
    if not np.isfinite(value):
        return "–"
    if metric == "feature_variance":  # of order 1/D: three significant digits, not three decimals
        return f"{value:#.3g}"
    return f"{value:.1f}" if metric == "effective_rank" else f"{value:.3f}"


def _markdown(df: pd.DataFrame) -> str:
    lines = ["# Feature diagnostics", "", LEGEND, ""]
    for dataset, part in df.groupby("dataset", sort=False):
        n_images = int(part["n_images"].iloc[0])
        lines += [f"## {dataset} ({n_images} test images)", "",
                  "| Method | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
                  "|---|" + "---:|" * len(METRICS)]
        for _, row in part.iterrows():
            lines.append(f"| {row['method']} | " + " | ".join(_fmt(row[m], m) for m in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def _latex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", str(text))


def _latex(df: pd.DataFrame) -> str:
    out = ["% Feature diagnostics (DiCoH Tables 5-7); needs \\usepackage{booktabs}"]
    for dataset, part in df.groupby("dataset", sort=False):
        out += ["\\begin{table}[t]", "\\centering",
                f"\\caption{{Feature diagnostics on {_latex_escape(dataset)} test images.}}",
                "\\begin{tabular}{l" + "r" * len(METRICS) + "}", "\\toprule",
                "Method & " + " & ".join(HEADERS[m] for m in METRICS) + " \\\\", "\\midrule"]
        for _, row in part.iterrows():
            cells = [_fmt(row[m], m).replace("–", "--") for m in METRICS]
            out.append(f"{_latex_escape(row['method'])} & " + " & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


# --- driver ------------------------------------------------------------------------------------------

def _test_split(data, max_images: int | None, seed: int) -> tuple[Tensor, Tensor]:
    test = np.asarray(data.test)
    if len(test) == 0:
        raise BenchError(f"dataset {data.name!r} has no test images to diagnose; check its split")
    if max_images is not None and len(test) > max_images:
        test = np.sort(np.random.default_rng(seed).choice(test, max_images, replace=False))
    return torch.from_numpy(np.ascontiguousarray(data.images[test])), torch.from_numpy(
        np.ascontiguousarray(data.masks[test]))


def run_diagnostics(run_dir: Path, datasets: Mapping[str, object], backbones: Mapping[str, nn.Module],
                    out_dir: Path | None = None, seed: int = 0, max_pixels: int = 2000,
                    max_images: int | None = None, tsne_points: int = TSNE_POINTS) -> pd.DataFrame:
    """Diagnose every backbone on the test images of every dataset; write tables and t-SNE plots.

    ``datasets``: name → SegmentationData-like (``.name``, ``.images`` (N,3,S,S) uint8, ``.masks``
    (N,S,S) uint8, ``.test`` indices); ``backbones``: method label → backbone (the baselines included).
    Writes ``diagnostics.csv``, ``.md``, ``.tex``, ``tsne_pixels.png``, ``tsne_images.png`` (and
    ``tsne_dispersive.png`` when a method was diagnosed with and without ``+disp``) into ``out_dir``
    (default ``run_dir/diagnostics``). ``max_images`` caps the test images per dataset (seeded).
    Returns one row per (method, dataset).
    """
    if not backbones:
        raise BenchError("no backbones to diagnose; pretrain first or name the baselines (scratch, imagenet)")
    if not datasets:
        raise BenchError("no datasets to diagnose; name at least one dataset with test images")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    rows, pixel_panels, image_sets = [], {}, {m: ([], []) for m in backbones}
    for d_index, (d_name, data) in enumerate(datasets.items()):
        images, masks = _test_split(data, max_images, seed)
        for method, backbone in backbones.items():
            generator = torch.Generator().manual_seed(seed + 1000 * d_index)  # same views for every method
            emb = embed_dataset(backbone, images, masks, generator, max_pixels)
            metrics = diagnostic_metrics(emb, _numpy_rng(generator), max_pixels)
            rows.append({"method": method, "dataset": d_name, "n_images": len(images),
                         "n_pixels": len(emb.pixels), "n_positive_pairs": len(emb.view1), **metrics})
            pixel_panels[(d_name, method)] = (emb.balanced, emb.balanced_labels)
            image_sets[method][0].append(emb.images)
            image_sets[method][1].append(np.full(len(emb.images), d_index))
    df = pd.DataFrame(rows)
    df.to_csv(out / "diagnostics.csv", index=False)
    (out / "diagnostics.md").write_text(_markdown(df))
    (out / "diagnostics.tex").write_text(_latex(df))
    _write_plots(out, pixel_panels, image_sets, list(datasets), list(backbones), seed, tsne_points)
    return df


def _write_plots(out: Path, pixel_panels: dict, image_sets: dict, dataset_names: list[str],
                 methods: list[str], seed: int, tsne_points: int) -> None:
    single = len(dataset_names) == 1
    tsne_panels({("" if single else d, m): pixel_panels[(d, m)] for d in dataset_names for m in methods},
                out / "tsne_pixels.png", CLASS_NAMES, CLASS_COLOURS, seed=seed, max_points=tsne_points,
                title="t-SNE of test pixel embeddings" + (f" ({dataset_names[0]})" if single else ""))
    tsne_panels({("", m): (np.concatenate(e), np.concatenate(lab)) for m, (e, lab) in image_sets.items()},
                out / "tsne_images.png", dict(enumerate(dataset_names)), seed=seed, max_points=tsne_points,
                title="t-SNE of test image embeddings, by dataset")
    pairs = dispersive_pairs(methods)
    if pairs:
        panels = {}
        bases = [base for base, _ in pairs]
        for base, disp in pairs:
            name = base if bases.count(base) == 1 else disp  # several +disp variants of one base: name each
            for d in dataset_names:
                row = name if single else f"{name} · {d}"
                panels[(row, "without +disp")] = pixel_panels[(d, base)]
                panels[(row, "with +disp")] = pixel_panels[(d, disp)]
        tsne_panels(panels, out / "tsne_dispersive.png", CLASS_NAMES, CLASS_COLOURS, seed=seed,
                    max_points=tsne_points, title="t-SNE of test pixel embeddings: dispersive regulariser")
