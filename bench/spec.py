"""Benchmark specs (DESIGN.md §3): dataclasses, presets in ``benchmarks/*.yaml``, YAML loading and
validation. CLI flags override a spec's fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BenchError

PRESET_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
DEFAULT_PRESET = "quick"


@dataclass(frozen=True)
class Schedule:
    """One training loop's settings (pretraining or fine-tuning). ``steps`` wins over ``epochs``."""

    size: int = 64
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: float | None = None
    steps: int | None = None
    warmup_steps: int = 0
    reg: str = "none"  # finetune regulariser: none | disp (Med-DisSeg's Disp-II)
    reg_weight: float = 0.6
    reg_variant: str = "l2"
    reg_layer: str = "early"

    def num_steps(self, num_images: int) -> int:
        """Optimiser steps for a set of ``num_images`` images (at least one)."""
        if self.steps is not None:
            return max(1, int(self.steps))
        epochs = self.epochs if self.epochs is not None else 1
        per_epoch = max(1, -(-num_images // self.batch_size))
        return max(1, round(epochs * per_epoch))


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset of the benchmark: ``ref`` as ``bench.datasets.load_dataset`` takes it, the size of a
    synthetic set, and the unlabelled pool it pretrains on (``self``: its own training images)."""

    ref: str
    n: int | None = None
    pool: str = "self"


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str = DEFAULT_PRESET
    methods: tuple[str, ...] = ("scratch", "byol")
    datasets: tuple[DatasetEntry, ...] = (DatasetEntry("synthetic-polyp"),)
    fractions: tuple[float, ...] = (0.05, 0.1)
    seeds: tuple[int, ...] = (0, 1)
    backbone: str = "resnet18"
    init: str = "scratch"
    pretrain: Schedule = field(default_factory=Schedule)
    finetune: Schedule = field(default_factory=Schedule)
    metric: str = "miou"
    pretrain_seed: int = 0
    pretrain_per_seed: bool = False
    split_seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    compile: bool = False  # torch.compile the backbone (pretraining) and the segmentation model
    description: str = ""
    showcase_note: str = ""  # printed after a run that ran a subset of the registry

    def replace(self, **changes: Any) -> BenchmarkSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> BenchmarkSpec:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        from bench.methods import unknown_name_error

        raise unknown_name_error("preset", name, preset_names())
    return load_spec(path)


def load_spec(path: Path) -> BenchmarkSpec:
    """Read a YAML spec (``yaml.safe_load``) and validate every field."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"spec file {path} does not exist; pass a YAML file or --preset "
                         f"({', '.join(preset_names())})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BenchError(f"spec {path} is not valid YAML{where}: fix the syntax") from None
    if not isinstance(raw, dict):
        raise BenchError(f"spec {path} must be a YAML mapping of fields (name, methods, datasets, ...)")
    raw.setdefault("name", path.stem)
    return spec_from_dict(raw, where=str(path))


def spec_from_dict(raw: dict[str, Any], where: str = "spec") -> BenchmarkSpec:
    known = {f.name for f in fields(BenchmarkSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BenchError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    values = dict(raw)
    for key in ("pretrain", "finetune"):
        if key in values:
            values[key] = _schedule(values[key], f"{where}: {key}")
    if "datasets" in values:
        values["datasets"] = tuple(_dataset_entry(d, where) for d in _as_list(values["datasets"]))
    if isinstance(values.get("methods"), str):
        from bench.methods import split_method_list

        values["methods"] = split_method_list(values["methods"])
    for key in ("methods", "fractions", "seeds"):
        if key in values:
            values[key] = tuple(_as_list(values[key]))
    spec = BenchmarkSpec(**values)
    validate(spec)
    return spec


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] if "," in value else [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _schedule(raw: Any, where: str) -> Schedule:
    if isinstance(raw, Schedule):
        return raw
    if not isinstance(raw, dict):
        raise BenchError(f"{where} must be a mapping such as {{size: 64, steps: 100}}")
    known = {f.name for f in fields(Schedule)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return Schedule(**raw)


def _dataset_entry(raw: Any, where: str) -> DatasetEntry:
    if isinstance(raw, DatasetEntry):
        return raw
    if isinstance(raw, str):
        return DatasetEntry(raw)
    if isinstance(raw, dict) and "ref" in raw:
        extra = sorted(set(raw) - {"ref", "n", "pool"})
        if extra:
            raise BenchError(f"{where}: dataset entry has unknown key(s) {', '.join(extra)}; use ref, n, pool")
        return DatasetEntry(str(raw["ref"]), raw.get("n"), str(raw.get("pool", "self")))
    raise BenchError(f"{where}: a dataset is a name, LAYOUT:PATH, PATH or {{ref: ..., pool: ...}}, not {raw!r}")


def parse_fractions(values: list[Any]) -> tuple[float, ...]:
    out = []
    for value in values:
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            raise BenchError(f"fraction {value!r} is not a number; use e.g. --fractions 0.05,0.1") from None
        if not 0.0 < fraction <= 1.0:
            raise BenchError(f"fraction {value} is not in (0, 1]; use e.g. --fractions 0.05,0.1")
        out.append(fraction)
    return tuple(out)


def validate(spec: BenchmarkSpec) -> None:
    """Check what can be checked without data (methods exist, fractions in range, choices)."""
    from bench.methods import parse_method

    if not spec.methods:
        raise BenchError("the spec names no method; pass e.g. --methods scratch,byol")
    if not spec.datasets:
        raise BenchError("the spec names no dataset; pass e.g. --datasets synthetic-polyp")
    if not spec.seeds:
        raise BenchError("the spec names no seed; pass e.g. --seeds 0,1")
    for text in spec.methods:
        parse_method(text)
    parse_fractions(list(spec.fractions))
    for sched, where in ((spec.pretrain, "pretrain"), (spec.finetune, "finetune")):
        if sched.optimizer not in ("sgd", "adamw", "adam"):
            raise BenchError(f"{where}.optimizer {sched.optimizer!r} unknown; use sgd, adamw or adam")
        if sched.size < 32 or sched.batch_size < 1:
            raise BenchError(f"{where}: size must be ≥ 32 and batch_size ≥ 1")
    if spec.finetune.reg not in ("none", "disp"):
        raise BenchError(f"finetune.reg {spec.finetune.reg!r} unknown; use none or disp")
    if spec.precision not in ("auto", "bf16", "fp32"):
        raise BenchError(f"precision {spec.precision!r} unknown; use auto, bf16 or fp32")
    if not spec.name or "/" in spec.name:
        raise BenchError(f"spec name {spec.name!r} must be a plain folder name")
