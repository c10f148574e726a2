"""``bench export``: a pretrained backbone of a run, with the keys another library loads, plus a JSON
card beside it (docs/encoders.md).

The run keeps each backbone as timm ``features_only`` weights (``pretrain/<job>/backbone.pt``, key
``backbone``). Export renames them for

- ``timm``: ``timm.create_model(backbone)``;
- ``torchvision``: ``torchvision.models.<backbone>()`` (ResNets and ConvNeXt tiny/small/base/large);
- ``smp``: segmentation_models_pytorch's encoder: the torchvision-style ResNet encoder for
  ``resnet18``…``resnet152``/``resnext50_32x4d``, else its timm-universal encoder ``tu-<backbone>``.

Loaded with ``strict=False``, only the target's classifier (and, for ConvNeXt, the head's final norm)
is missing: the layers after the last feature stage were never part of the pretrained backbone.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from bench.checkpoints import file_sha256, naming
from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.grid import PretrainJob
    from bench.spec import BenchmarkSpec

FORMATS = ("timm", "torchvision", "smp")
SUFFIXES = (".safetensors", ".pth", ".pt")
# segmentation_models_pytorch's own ResNet encoders (torchvision's ResNet class without fc and avgpool)
SMP_RESNETS = frozenset({"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                         "resnext101_32x8d"})
SCORE_METRICS = ("miou", "dice", "precision", "recall", "hd95")


@dataclass(frozen=True)
class Target:
    """The backbone renamed for one library, and how that library takes it."""

    format: str
    state: dict[str, Tensor]
    model: str  # the constructor whose keys ``state`` has
    load: str  # a snippet that loads the file
    missing: tuple[str, ...]  # keys the target model reports missing with strict=False


def convert(state: dict[str, Tensor], backbone: str, fmt: str) -> Target:
    """Rename a ``features_only`` state dict of ``backbone`` for ``fmt`` (timm | torchvision | smp)."""
    if fmt not in FORMATS:
        raise BenchError(f"--format {fmt!r} unknown; use {', '.join(FORMATS)}")
    names = naming(backbone)
    if set(state) != set(names.shapes):
        raise BenchError(f"the checkpoint is not a {backbone} features_only state dict (keys differ); "
                         "was the run made with another backbone?")
    if names.to_model is None:
        raise BenchError(f"cannot relate {backbone}'s features_only names to its model's; export a ResNet or ConvNeXt")
    to_model = names.to_model
    load_file = "from safetensors.torch import load_file  # or torch.load(path, weights_only=True) for .pth"
    if fmt == "timm":
        out = {to_model[f]: v for f, v in state.items()}
        missing = set(names.model_shapes) - set(out)
        model = f"timm.create_model({backbone!r})"
        return Target(fmt, out, model, f"{load_file}\nmodel = {model}\nmodel.load_state_dict(load_file(PATH), "
                      "strict=False)", tuple(sorted(missing)))
    tv = names.to_torchvision
    if fmt == "torchvision" or (fmt == "smp" and backbone in SMP_RESNETS and tv is not None):
        if tv is None:
            raise BenchError(f"torchvision has no {backbone} twin; use --format timm or smp "
                             "(torchvision twins: ResNets, ConvNeXt tiny/small/base/large)")
        out = {tv[to_model[f]]: v.reshape(names.torchvision_shapes[tv[to_model[f]]]) for f, v in state.items()}
        if fmt == "smp":
            model = f"segmentation_models_pytorch.Unet({backbone!r}, encoder_weights=None).encoder"
            return Target(fmt, out, model, _smp_load(load_file, backbone), ())
        missing = set(names.torchvision_shapes) - set(out)
        model = f"torchvision.models.{backbone}()"
        return Target(fmt, out, model, f"{load_file}\nmodel = {model}\nmodel.load_state_dict(load_file(PATH), "
                      "strict=False)", tuple(sorted(missing)))
    # smp's timm-universal encoder: timm.create_model(name, features_only=True) under "model."
    out = {f"model.{f}": v for f, v in state.items()}
    model = f"segmentation_models_pytorch.Unet('tu-{backbone}', encoder_weights=None).encoder"
    return Target(fmt, out, model, _smp_load(load_file, f"tu-{backbone}"), ())


def _smp_load(load_file: str, encoder: str) -> str:
    return (f"{load_file}\nimport segmentation_models_pytorch as smp\nmodel = smp.Unet({encoder!r}, "
            "encoder_weights=None)\nmodel.encoder.load_state_dict(load_file(PATH))")


def write_weights(path: Path, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """``.safetensors`` (with ``metadata``) or ``.pth``/``.pt`` (torch.save), written atomically."""
    from bench.store import write_atomic

    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        write_atomic(path, save(state, metadata={"format": "pt", **metadata}))
        return
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


# --- from a run folder ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Exported:
    weights: Path
    card: Path
    target: Target
    method: str
    job_id: str

    def lines(self) -> list[str]:
        missing = ", ".join(self.target.missing) or "nothing"
        return [f"wrote {self.weights} ({self.method}, {len(self.target.state)} tensors for {self.target.model}; "
                f"missing on load: {missing})", f"card: {self.card}"]


def export_encoder(run: Path, method: str, fmt: str = "timm", out: Path | None = None,
                   job_id: str | None = None) -> Exported:
    """Export the pretrained backbone of ``method`` in the run folder ``run`` as ``fmt``, with its card."""
    from bench.grid import config_hash, slug
    from bench.status import open_run

    run = Path(run)
    store, spec = open_run(run)
    job = _find_job(spec, run, method, job_id)
    if not store.job_done(job.id):
        raise BenchError(f"the pretraining of {job.method.label} ({job.id}) has not finished in {run}; "
                         "run bench run first")
    state = store.load_checkpoint(job.id)["backbone"]
    target = convert(state, spec.backbone, fmt)
    out = Path(out) if out is not None else run / "export" / f"{slug(job.method.label)}-{fmt}.safetensors"
    if out.suffix not in SUFFIXES:
        raise BenchError(f"--out {out} must end in {', '.join(SUFFIXES)}")
    write_weights(out, target.state, {"backbone": spec.backbone, "method": job.method.label, "target": fmt})
    config = store.job_config(job.id) or {}
    card = {
        "file": out.name, "sha256": file_sha256(out), "format": fmt, "model": target.model, "load": target.load,
        "missing_keys_on_load": list(target.missing), "tensors": len(target.state),
        "parameters": sum(v.numel() for k, v in target.state.items() if not k.endswith("num_batches_tracked")),
        "backbone": spec.backbone, "method": job.method.label, "method_config": job.method.resolved(),
        "overrides": {**job.method.overrides, **{f"+{n}": o for n, _, o in job.method.modifiers if o}},
        "pretraining": _pretraining(job, config, config_hash(job.config)),
        "versions": config.get("versions"), "exported_with": _versions(),
        "finetune_scores": finetune_scores(run / "results.csv", job.method.label),
        "run": str(run.resolve()), "spec": spec.name,
    }
    from bench.store import write_json

    card_path = out.with_suffix(".json")
    write_json(card_path, card)
    return Exported(out, card_path, target, job.method.label, job.id)


def _find_job(spec: BenchmarkSpec, run: Path, method: str, job_id: str | None) -> PretrainJob:
    """The pretrain job of ``method`` (a name or a label) in the spec of run folder ``run``."""
    from bench.grid import build_grid
    from bench.methods import parse_method

    try:
        wanted = parse_method(method)
    except BenchError:
        wanted = None  # a label such as dicoh[percentile=50]
    own = [t for t in spec.methods if "=ckpt:" not in t]  # external encoders have no pretraining
    labels = {t: parse_method(t) for t in own}
    chosen = [t for t, m in labels.items()
              if m.label == method or (wanted is not None and m.resolved() == wanted.resolved())]
    if not chosen:
        raise BenchError(f"{run} has no method {method!r}; its methods: {', '.join(m.label for m in labels.values())}")
    jobs = list(build_grid(spec.replace(methods=tuple(chosen))).jobs)
    if not jobs:
        raise BenchError(f"{method} has no pretraining (a baseline): there is no pretrained backbone to export")
    if job_id is not None:
        jobs = [j for j in jobs if j.id == job_id]
        if not jobs:
            raise BenchError(f"{method} has no pretraining job {job_id!r} in {run}")
    if len(jobs) > 1:
        raise BenchError(f"{method} has {len(jobs)} pretrained backbones in {run} (one per dataset or seed); "
                         f"pass --job with one of: {', '.join(j.id for j in jobs)}")
    return jobs[0]


def _pretraining(job, config: dict[str, Any], digest: str) -> dict[str, Any]:
    result = config.get("result", {})
    return {"job_id": job.id, "config_hash": digest, "pool": job.pool, "dataset": job.dataset.ref,
            "init": job.config.get("init"), "seed": job.seed, "labels": job.config.get("labels"),
            "schedule": job.config.get("schedule"), "steps": result.get("steps"), "seconds": result.get("seconds"),
            "images_per_s": result.get("images_per_s"), "device": result.get("device"),
            "precision": result.get("numerics", result.get("precision")),
            "protocol": job.config.get("protocol")}


def finetune_scores(results_csv: Path, label: str) -> list[dict[str, Any]]:
    """Mean, std and number of seeds of each metric per (dataset, fraction, fine-tuning protocol) for
    ``label`` (ok cells); a run with both protocols gives one entry per protocol, never a pooled one."""
    if not results_csv.is_file():
        return []
    table = pd.read_csv(results_csv)
    rows = table[(table["method"] == label) & (table["status"] == "ok")].copy()
    rows["freeze"] = rows["freeze"].fillna("none") if "freeze" in rows else "none"
    scores = []
    for (dataset, fraction, freeze), group in rows.groupby(["dataset", "fraction", "freeze"]):
        entry: dict[str, Any] = {"dataset": dataset, "fraction": float(fraction), "freeze": str(freeze),
                                 "seeds": len(group)}
        for metric in (m for m in SCORE_METRICS if m in group):
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            if len(values):
                std = float(values.std()) if len(values) > 1 else None
                entry[metric] = {"mean": float(values.mean()), "std": None if std is None or math.isnan(std) else std}
        scores.append(entry)
    return scores


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    import bench

    return {"bench": bench.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__}
