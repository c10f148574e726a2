"""``bench diagnose``: embed each dataset's test images with every pretrained backbone of a run.

This is the part of the feature diagnostics that runs models (docs/reports.md): it builds the
backbones from the run's checkpoints, embeds the test images and two MoCo-v2 views of them, and
hands numpy arrays to ``bench.reports.diagnostics``, whose metrics, tables and plots import no
training code. Every method sees the same pixel sample and the same views of a dataset (one generator
seeded per dataset), so the comparison is paired.

Pixel embeddings are the backbone's last-stage map, L2-normalised per location; a cell's label is the
mask sampled at the cell centre (``bench.geometry.mask_at_cells``). Pixels are sampled with a fixed
seed and capped (``max_pixels``) so that the metrics take seconds on a CPU; RankMe takes up to
``rankme_samples`` cells of the images and of both views, so that it is not capped by the count.

Example::

    df = run_diagnostics(Path("reports/quick"), {"kvasir": data}, {"byol": backbone})
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from bench.augment import make_views, to_input
from bench.errors import BenchError
from bench.geometry import mask_at_cells, nearest_cells
from bench.reports.diagnostics import RANKME_SAMPLES, TSNE_POINTS, Embeddings, diagnostic_metrics, write_diagnostics


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
                  max_pixels: int = 2000, batch_size: int = 16, rankme_samples: int = RANKME_SAMPLES) -> Embeddings:
    """Embed a set of test images (N, 3, S, S) uint8 with masks (N, S, S) and two MoCo-v2 views of them."""
    if images_uint8.ndim != 4 or masks.shape != (images_uint8.shape[0], *images_uint8.shape[2:]):
        raise BenchError(f"diagnostics need images (N,3,S,S) and masks (N,S,S), got {tuple(images_uint8.shape)} "
                         f"and {tuple(masks.shape)}; pass the dataset's test images and their masks")
    rng = _numpy_rng(generator)
    size = images_uint8.shape[-1]
    was_training = backbone.training
    backbone.eval()
    cells, raw, labels, pooled, view1, view2 = [], [], [], [], [], []
    quota = -(-rankme_samples // (3 * len(images_uint8)))  # RankMe cells per image and source (bounded memory)
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
            f1, f2 = _last_stage(backbone, views.x1), _last_stage(backbone, views.x2)
            for f in (feats, f1, f2):
                rows = f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]).numpy()
                raw.append(rows[_sample(len(rows), quota * len(imgs), rng)])
            z1, z2 = _flat(f1), _flat(f2)
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
    rank_pool = np.concatenate(raw)
    keys = nn.functional.normalize(cells_t.mean(dim=1), dim=-1).numpy()
    return Embeddings(pixels=flat[uniform], pixel_image=image_of[uniform], balanced=flat[balanced],
                      balanced_labels=flat_labels[balanced], balanced_image=image_of[balanced],
                      view1=v1[pairs], view2=v2[pairs], images=torch.cat(pooled).numpy(), image_keys=keys,
                      rank_pixels=rank_pool[_sample(len(rank_pool), rankme_samples, rng)])


def diagnose_backbone(backbone: nn.Module, images_uint8: Tensor, masks: Tensor, generator: torch.Generator,
                      max_pixels: int = 2000) -> dict[str, float]:
    """Diagnostics of one backbone on test images (N, 3, S, S) uint8 and masks (N, S, S); eval mode, no grad."""
    emb = embed_dataset(backbone, images_uint8, masks, generator, max_pixels)
    return diagnostic_metrics(emb, _numpy_rng(generator), max_pixels)


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
                    max_images: int | None = None, tsne_points: int = TSNE_POINTS,
                    rankme_samples: int = RANKME_SAMPLES) -> pd.DataFrame:
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
    rows, pixel_panels, image_sets = [], {}, {m: ([], []) for m in backbones}
    for d_index, (d_name, data) in enumerate(datasets.items()):
        images, masks = _test_split(data, max_images, seed)
        for method, backbone in backbones.items():
            generator = torch.Generator().manual_seed(seed + 1000 * d_index)  # same views for every method
            emb = embed_dataset(backbone, images, masks, generator, max_pixels, rankme_samples=rankme_samples)
            metrics = diagnostic_metrics(emb, _numpy_rng(generator), max_pixels)
            rows.append({"method": method, "dataset": d_name, "n_images": len(images), "n_pixels": len(emb.pixels),
                         "n_positive_pairs": len(emb.view1), "n_dims": emb.pixels.shape[1],
                         "rankme_samples": len(emb.rank_pixels), **metrics})
            pixel_panels[(d_name, method)] = (emb.balanced, emb.balanced_labels)
            image_sets[method][0].append(emb.images)
            image_sets[method][1].append(np.full(len(emb.images), d_index))
    df = pd.DataFrame(rows)
    write_diagnostics(out, df, pixel_panels, image_sets, list(datasets), list(backbones), seed, tsne_points)
    return df


def diagnose_run(out: Path, seed: int = 0, max_pixels: int = 2000, max_images: int | None = 64,
                 cache_dir: Path | None = None) -> list[Path]:
    """``bench diagnose``: embed each dataset's test images with every pretrained backbone of the run
    (and the baselines) and write the diagnostics and t-SNE plots to ``<out>/diagnostics``."""
    from bench.checkpoints import backbone_for_init
    from bench.grid import build_grid
    from bench.models import create_backbone
    from bench.runner import DataCache, baseline_skips, dataset_label
    from bench.status import open_run
    from bench.store import write_atomic

    store, spec = open_run(out)
    grid = build_grid(spec, baseline_skips(spec))
    data = DataCache(spec, cache_dir)
    target = Path(out) / "diagnostics"
    frames, files = [], []
    for entry in spec.datasets:
        name = dataset_label(entry)
        backbones = {}
        for cell in grid.cells:
            if cell.dataset != entry or cell.label in backbones:
                continue
            if cell.pretrain_id is None:
                torch.manual_seed(seed)
                backbones[cell.label] = backbone_for_init(spec.backbone, cell.config["init"])  # ckpt: rows too
            elif store.job_done(cell.pretrain_id):
                backbone = create_backbone(spec.backbone)
                backbone.load_state_dict(store.load_checkpoint(cell.pretrain_id)["backbone"], strict=True)
                backbones[cell.label] = backbone
        if not backbones:
            continue
        folder = target / name
        frames.append(run_diagnostics(Path(out), {name: data.dataset(entry, spec.finetune.size)}, backbones,
                                      out_dir=folder, seed=seed, max_pixels=max_pixels, max_images=max_images))
        for png in folder.glob("*.png"):  # the report embeds the PNGs of diagnostics/
            files.append(target / f"{png.stem}_{name}.png")
            shutil.copyfile(png, files[-1])
    if not frames:
        raise BenchError(f"{out} has no finished pretraining and no baseline to diagnose; run bench run first")
    table = pd.concat(frames, ignore_index=True)
    write_atomic(target / "diagnostics.csv", table.to_csv(index=False))
    return [target / "diagnostics.csv", *files]
