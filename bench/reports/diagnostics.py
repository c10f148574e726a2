"""Feature diagnostics: pure metrics on embeddings, their tables and t-SNE plots (docs/reports.md).

Analogues of the quantities of DiCoH's Tables 5–7 on another scale, not the paper's numbers: the paper
measures the target branch's projections at the end of pretraining; here the embeddings are a pretrained
backbone's last-stage map (``bench.diagnose`` embeds the test images; this module never runs a model), so
values cannot be set beside the paper's. Per (backbone, dataset):

- ``feature_variance``: per-dimension variance of L2-normalised pixel embeddings, averaged over the D
  dimensions (population variance). For unit vectors it equals (1 − ‖mean‖²)/D: 0 when every pixel maps
  to one direction (collapse), at most 1/D. ``feature_spread`` = D·variance = 1 − ‖mean‖², the same on
  a scale free of D (0 collapse … 1).
- ``positive_similarity``: mean cosine between the embeddings of the same source location in two
  MoCo-v2 views (cell correspondence from the known crop geometry).
- ``negative_similarity``: mean cosine between pixels of *different* images (pixel-to-pixel).
- ``pixel_image_similarity``: mean cosine between a pixel and the global embedding of each *other*
  image (the normalised average pool of its normalised pixel embeddings): DiCoH's pixel-to-image
  negatives.
- ``silhouette``: silhouette score (Rousseeuw 1987) of foreground vs background pixel embeddings,
  Euclidean distance between L2-normalised embeddings (the chord ‖a − b‖ = sqrt(2 − 2·cos), a true
  metric that orders pairs as cosine does), on a class-balanced pixel sample.
- ``linear_separability``: held-out accuracy of a linear SVM (``LinearSVC`` on standardised
  embeddings) trained on the pixels of a random half of the images and tested on the other half,
  each half class-balanced by subsampling (chance = 0.5).
- ``effective_rank``: RankMe (Garrido et al., ICML 2023, Eq. 1): exp of the entropy of the
  L1-normalised singular values of a matrix of pixel embeddings, p_k = σ_k/‖σ‖₁ + ε, ε = 1e-7. It is at
  most min(samples, D), so it is computed on many pixel embeddings (all cells of the test images and of
  their two views, up to a cap), and the sample count is reported beside it.

Plots (sklearn ``TSNE``, matplotlib without pyplot): ``tsne_pixels.png`` (rows datasets, columns
methods, pixels coloured background/foreground), ``tsne_images.png`` (one panel per method, image
embeddings coloured by dataset) and, when both ``X`` and ``X+disp`` were diagnosed,
``tsne_dispersive.png`` (without / with the dispersive regulariser side by side).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
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

from bench.reports.cd import wrap_label
from bench.reports.tables import Cell, Table, to_latex, to_markdown

METRICS = ("feature_variance", "feature_spread", "positive_similarity", "negative_similarity",
           "pixel_image_similarity", "silhouette", "linear_separability", "effective_rank")
HEADERS = {"feature_variance": "Var", "feature_spread": "Var·D", "positive_similarity": "Pos. sim.",
           "negative_similarity": "Neg. sim. (px–px)", "pixel_image_similarity": "Neg. sim. (px–img)",
           "silhouette": "Silhouette", "linear_separability": "Lin. sep.", "effective_rank": "RankMe"}
LEGEND = ("Analogues of DiCoH's Tables 5–7 on another scale, computed on the backbone's last-stage features "
          "(not the target branch's projections the paper measures): not comparable with the paper's values. "
          "Var: per-dimension variance of L2-normalised pixel embeddings (0 = collapse, at most 1/D); Var·D: the "
          "same without the 1/D scale (0 … 1). Pos. sim.: cosine of the same location in two augmented views. "
          "Neg. sim. (px–px): cosine of pixels of different images; (px–img): cosine of a pixel with the global "
          "embedding of another image. Silhouette: foreground vs background pixels (Euclidean on normalised "
          "embeddings, −1…1). Lin. sep.: held-out linear-SVM accuracy fg vs bg (balanced, chance 0.5). RankMe: "
          "effective rank of pixel embeddings, at most min(samples, D); rankme_samples and D are in the table, "
          "and a RankMe with fewer samples than D measures the sample count, not the features.")
RANKME_EPS = 1e-7
RANKME_SAMPLES = 8192
TSNE_POINTS = 400
CLASS_NAMES = {0: "background", 1: "foreground"}
CLASS_COLOURS = {0: "#4C72B0", 1: "#DD8452"}
DATASET_COLOURS = ("#55A868", "#8172B3", "#C44E52", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")


# --- pure metrics ------------------------------------------------------------------------------------

def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their Euclidean norm (zero rows stay zero)."""
    x = _array(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def feature_variance(pixel_emb) -> float:
    """Mean over dimensions of the (population) variance of the L2-normalised embeddings (N, D)."""
    z = l2_normalize(pixel_emb)
    if len(z) == 0:
        return float("nan")
    return float(z.var(axis=0).mean())


def positive_similarity(emb1, emb2) -> float:
    """Mean cosine of corresponding rows of (N, D) and (N, D): the same location seen in two views."""
    z1, z2 = l2_normalize(emb1), l2_normalize(emb2)
    if z1.shape != z2.shape:
        raise ValueError(f"positive pairs need equal shapes, got {z1.shape} and {z2.shape}")
    if len(z1) == 0:
        return float("nan")
    return float((z1 * z2).sum(axis=1).mean())


def negative_similarity(emb, image_index: np.ndarray, rng: np.random.Generator, cap: int = 2000) -> float:
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


def pixel_image_similarity(emb, image_index: np.ndarray, image_keys) -> float:
    """Mean cosine between each pixel (N, D) and the global embedding (M, D) of every image but its own.

    ``image_index`` (N,) holds each pixel's image as a row of ``image_keys``. NaN with fewer than 2 images.
    """
    z, keys, image_index = l2_normalize(emb), l2_normalize(image_keys), np.asarray(image_index)
    if len(keys) < 2 or len(z) == 0:
        return float("nan")
    sims = z @ keys.T
    other = np.arange(len(keys))[None, :] != image_index[:, None]
    return float(sims[other].mean())


def silhouette(emb, labels: np.ndarray, rng: np.random.Generator, cap: int = 2000) -> float:
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


def linear_separability(emb, labels: np.ndarray, image_index: np.ndarray, rng: np.random.Generator,
                        C: float = 1.0) -> float:
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


def effective_rank(emb, eps: float = RANKME_EPS) -> float:
    """RankMe (Garrido et al. 2023, Eq. 1) of an (N, D) embedding matrix: exp(−Σ p_k log p_k), with
    p_k = σ_k / ‖σ‖₁ + ε over its singular values σ. 1 for collapsed (rank-one) embeddings, D for
    whitened ones, at most min(N, D); 0 for an all-zero matrix (no direction at all)."""
    s = np.linalg.svd(_array(emb), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# --- the metrics of one embedded dataset ---------------------------------------------------------------

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
    image_keys: np.ndarray  # (N, D) normalised average pool of the normalised cells (DiCoH's global embedding)
    rank_pixels: np.ndarray  # (R, D) cells of the images and both views, for RankMe (not normalised)


def diagnostic_metrics(emb: Embeddings, rng: np.random.Generator, max_pixels: int = 2000) -> dict[str, float]:
    """The diagnostics of one embedded dataset (see the module docstring)."""
    dim = emb.pixels.shape[1] if emb.pixels.ndim == 2 else 0
    variance = feature_variance(emb.pixels)
    return {
        "feature_variance": variance,
        "feature_spread": variance * dim,
        "positive_similarity": positive_similarity(emb.view1, emb.view2),
        "negative_similarity": negative_similarity(emb.pixels, emb.pixel_image, rng, cap=max_pixels),
        "pixel_image_similarity": pixel_image_similarity(emb.pixels, emb.pixel_image, emb.image_keys),
        "silhouette": silhouette(emb.balanced, emb.balanced_labels, rng, cap=max_pixels),
        "linear_separability": linear_separability(emb.balanced, emb.balanced_labels, emb.balanced_image, rng),
        "effective_rank": effective_rank(emb.rank_pixels),
    }


# --- t-SNE panels ------------------------------------------------------------------------------------

def _sample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, cap, replace=False)) if n > cap else np.arange(n)


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    if x.shape[1] > 50 and len(x) > 50:  # PCA to 50 dimensions first (van der Maaten's recommendation)
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    with threadpool_limits(1):  # Barnes-Hut's OpenMP threads beside torch's slow it down many times
        return tsne.fit_transform(x)


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


# --- tables and files ----------------------------------------------------------------------------------

def _fmt(value: float, metric: str) -> str:
    if not np.isfinite(value):
        return "–"
    if metric == "feature_variance":  # of order 1/D: three significant digits, not three decimals
        return f"{value:#.3g}"
    return f"{value:.1f}" if metric == "effective_rank" else f"{value:.3f}"


def diagnostics_tables(df: pd.DataFrame) -> list[Table]:
    """One table per dataset: a row per method, a column per diagnostic (the report's shared table model)."""
    out = []
    for dataset, part in df.groupby("dataset", sort=False):
        first = part.iloc[0]
        samples = part["rankme_samples"].astype(int).tolist() if "rankme_samples" in part else []
        dim = int(first["n_dims"]) if "n_dims" in part else 0
        capped = " RankMe is capped by the sample count here (fewer samples than D)." \
            if samples and min(samples) < dim else ""
        rows = [[Cell(str(r["method"]))] + [Cell(_fmt(r[m], m)) for m in METRICS] for _, r in part.iterrows()]
        caption = (f"Feature diagnostics on {dataset}: {int(first['n_images'])} test images, D = {dim} feature "
                   f"dimensions, RankMe over {min(samples, default=0)} pixel embeddings.{capped}")
        out.append(Table(["Method", *(HEADERS[m] for m in METRICS)], rows, caption, f"tab:diagnostics-{dataset}"))
    return out


def write_diagnostics(out: Path, df: pd.DataFrame, pixel_panels: Mapping, image_sets: Mapping,
                      dataset_names: list[str], methods: list[str], seed: int = 0,
                      tsne_points: int = TSNE_POINTS) -> list[Path]:
    """``diagnostics.csv|md|tex`` and the t-SNE plots of embedded datasets (see the module docstring).

    ``pixel_panels[(dataset, method)] = (balanced pixels, labels)``; ``image_sets[method] = (list of image
    embedding arrays, list of dataset index arrays)``.
    """
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "diagnostics.csv", index=False)
    tables = diagnostics_tables(df)
    (out / "diagnostics.md").write_text("# Feature diagnostics\n\n" + LEGEND + "\n\n"
                                        + "\n".join(to_markdown(t) for t in tables))
    (out / "diagnostics.tex").write_text("% Feature diagnostics; needs \\usepackage{booktabs}\n"
                                         + "\n".join(to_latex(t) for t in tables))
    return [out / "diagnostics.csv", out / "diagnostics.md", out / "diagnostics.tex",
            *_write_plots(out, pixel_panels, image_sets, dataset_names, methods, seed, tsne_points)]


def _write_plots(out: Path, pixel_panels: Mapping, image_sets: Mapping, dataset_names: list[str],
                 methods: list[str], seed: int, tsne_points: int) -> list[Path]:
    single = len(dataset_names) == 1
    paths = [tsne_panels({("" if single else d, m): pixel_panels[(d, m)] for d in dataset_names for m in methods},
                         out / "tsne_pixels.png", CLASS_NAMES, CLASS_COLOURS, seed=seed, max_points=tsne_points,
                         title="t-SNE of test pixel embeddings" + (f" ({dataset_names[0]})" if single else "")),
             tsne_panels({("", m): (np.concatenate(e), np.concatenate(lab)) for m, (e, lab) in image_sets.items()},
                         out / "tsne_images.png", dict(enumerate(dataset_names)), seed=seed, max_points=tsne_points,
                         title="t-SNE of test image embeddings, by dataset")]
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
        paths.append(tsne_panels(panels, out / "tsne_dispersive.png", CLASS_NAMES, CLASS_COLOURS, seed=seed,
                                 max_points=tsne_points,
                                 title="t-SNE of test pixel embeddings: dispersive regulariser"))
    return paths
