"""Benchmark specs (docs/architecture.md): dataclasses, presets in ``benchmarks/*.yaml``, YAML loading
and the one validation pass that checks every field before anything is written. CLI flags and
``--set KEY=VALUE`` override a spec's fields and go through the same pass."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BenchError

PRESET_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
DEFAULT_PRESET = "quick"
PRECISIONS = ("auto", "bf16", "fp32")
EVAL_MODES = ("native", "resized")  # score at each image's original resolution, or at the working size
INITS = ("scratch", "imagenet")
OPTIMIZERS = ("sgd", "adamw", "adam")
FREEZE_MODES = ("none", "backbone")  # fine-tuning protocols: full fine-tuning | frozen backbone (head only)
FINETUNE_ONLY = ("reg", "reg_weight", "reg_variant", "reg_layer", "freeze")


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
    # finetune: none | backbone (train the head only: linear-probe style), or a list of them: the grid
    # then holds every cell once per protocol (``protocols``)
    freeze: str | tuple[str, ...] = "none"

    def num_steps(self, num_images: int) -> int:
        """Optimiser steps for a set of ``num_images`` images (at least one)."""
        if self.steps is not None:
            return max(1, int(self.steps))
        epochs = self.epochs if self.epochs is not None else 1
        per_epoch = max(1, -(-num_images // self.batch_size))
        return max(1, round(epochs * per_epoch))

    def protocols(self) -> tuple[str, ...]:
        """The fine-tuning protocols asked for: ``freeze`` as a tuple (one element for a single value)."""
        return self.freeze if isinstance(self.freeze, tuple) else (self.freeze,)

    def identity(self, phase: str) -> dict[str, Any]:
        """The fields that identify a training run of ``phase`` ("pretrain" or "finetune"): pretraining
        leaves out the fine-tuning-only fields (reg*, freeze); fine-tuning leaves out ``freeze`` while
        it is "none", so cells made before the field existed keep their ids. A fine-tuning schedule of
        several protocols has no identity of its own: each cell's is that of its one protocol."""
        values = dataclasses.asdict(self)
        if phase == "pretrain":
            return {k: v for k, v in values.items() if k not in FINETUNE_ONLY}
        if isinstance(values["freeze"], tuple):
            raise ValueError("identity of a schedule with several fine-tuning protocols: take one, "
                             "dataclasses.replace(schedule, freeze=protocol)")
        if values["freeze"] == "none":
            del values["freeze"]
        return values


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
    methods: tuple[str, ...] = ("scratch", "byol")  # "all" expands to every registered method
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
    precision: str = "auto"  # auto | bf16 | fp32, as asked (part of the folder's identity)
    compile: bool = False  # torch.compile the backbone (pretraining) and the segmentation model
    eval: str = "native"  # native | resized
    train: tuple[DatasetEntry, ...] = ()  # generalisation protocol: train on these pooled ...
    test: tuple[DatasetEntry, ...] = ()  # ... and score each of these separately
    keep_predictions: int = 64  # predicted masks kept per cell: 0 none, -1 all
    keep_models: bool = False  # keep each cell's fine-tuned model
    threads: int | None = None  # CPU threads per process (None: the runtime's policy)
    description: str = ""
    showcase_note: str = ""  # printed after a run that ran a subset of the registry

    def __post_init__(self) -> None:
        methods = self.methods
        if isinstance(methods, (list, tuple)) and any(_is_all(m) for m in methods):
            object.__setattr__(self, "methods", expand_methods(methods))

    def replace(self, **changes: Any) -> BenchmarkSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dataset_entries(self) -> tuple[DatasetEntry, ...]:
        """Every dataset the spec names (``datasets``, ``train`` and ``test``), each once, in order."""
        return tuple(dict.fromkeys((*self.datasets, *self.train, *self.test)))


# --- methods: "all" ---------------------------------------------------------------------------

def _is_all(text: Any) -> bool:
    return isinstance(text, str) and text.strip().lower() == "all"


def expand_methods(methods: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Replace ``all`` by every registered method that runs by its plain name (not e.g. ``external``,
    which needs a checkpoint) and is not listed by that name elsewhere."""
    from bench.methods import method_names, parse_method

    def runs_plain(name: str) -> bool:
        try:
            parse_method(name)
        except BenchError:
            return False
        return True

    listed = {m.strip() for m in methods if isinstance(m, str)}
    out: list[str] = []
    for text in methods:
        if _is_all(text):
            out += [name for name in method_names() if name not in listed and name not in out and runs_plain(name)]
        else:
            out.append(text)
    return tuple(out)


# --- loading --------------------------------------------------------------------------------------

class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``1e-4`` as a number (YAML 1.2)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor`` may repeat; the base class merges
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text with ``SpecLoader``; one-line errors that name the line."""
    try:
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = str(getattr(err, "problem", "") or "")
        if "appears twice" in problem:
            raise BenchError(f"{where}{at}: {problem}; keep one") from None
        if "constructor for the tag" in problem:
            raise BenchError(f"{where}{at}: YAML tags (such as !!python/object) are not allowed in a spec; "
                             "write plain values") from None
        raise BenchError(f"{where} is not valid YAML{at}: fix the syntax") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, resources: bool = False) -> BenchmarkSpec:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        from bench.methods import unknown_name_error

        raise unknown_name_error("preset", name, preset_names())
    return load_spec(path, resources)


def load_spec(path: Path, resources: bool = False) -> BenchmarkSpec:
    """Read a YAML spec (safe loader, no duplicate keys) and validate every field; the checks that look
    at this machine (dataset folders, init files) only with ``resources`` - ``validate(spec)`` does them
    once the CLI's flags are applied, before the run writes anything."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"spec file {path} does not exist; pass a YAML file or --preset "
                         f"({', '.join(preset_names())})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise BenchError(f"spec {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise BenchError(f"cannot read spec {path}: {err.strerror}") from None
    raw = parse_yaml(text, f"spec {path}")
    if not isinstance(raw, dict):
        raise BenchError(f"spec {path} must be a YAML mapping of fields (name, methods, datasets, ...)")
    raw.setdefault("name", path.stem)
    return spec_from_dict(raw, where=str(path), resources=resources)


def spec_from_dict(raw: dict[str, Any], where: str = "spec", resources: bool = True) -> BenchmarkSpec:
    """Build and validate a spec from plain values (YAML, JSON, ``--set``). ``resources=False`` skips
    the checks that look at this machine (dataset folders, init files): for reading a run's spec.json."""
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: a spec is a mapping of fields (name, methods, datasets, ...)")
    known = [f.name for f in fields(BenchmarkSpec)]
    unknown = sorted(str(k) for k in set(raw) - set(known))
    if unknown:
        raise BenchError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    values = dict(raw)
    for key in ("pretrain", "finetune"):
        if key in values:
            values[key] = _schedule(values[key], f"{where}: {key}")
    for key in ("datasets", "train", "test"):
        if key in values:
            values[key] = tuple(_dataset_entry(d, f"{where}: {key}") for d in _as_list(values[key]))
    if ("train" in raw or "test" in raw) and "datasets" not in raw:
        values["datasets"] = ()
    if isinstance(values.get("methods"), str):
        from bench.methods import split_method_list

        values["methods"] = split_method_list(values["methods"])
    if isinstance(values.get("fractions"), str):
        values["fractions"] = parse_fractions(_as_list(values["fractions"]))
    if isinstance(values.get("seeds"), str):
        values["seeds"] = parse_seeds(_as_list(values["seeds"]))
    for key in ("methods", "fractions", "seeds"):
        if key in values:
            values[key] = tuple(_as_list(values[key]))
    if "fractions" in values:
        values["fractions"] = tuple(_as_float(v) for v in values["fractions"])
    try:
        spec = BenchmarkSpec(**values)
        validate(spec, resources=resources)
    except BenchError as err:
        raise BenchError(f"{where}: {err}") from None
    return spec


def apply_settings(spec: BenchmarkSpec, settings: list[str]) -> BenchmarkSpec:
    """``--set KEY=VALUE`` for any field (``seeds=0,1``, ``pretrain.steps=200``, ``finetune.lr=1e-4``);
    the values are read as YAML scalars and the result goes through the full validation."""
    raw = spec.to_dict()
    top = [f.name for f in fields(BenchmarkSpec) if f.name not in ("pretrain", "finetune")]
    inner = [f.name for f in fields(Schedule)]
    keys = {text.partition("=")[0].strip() for text in settings}
    if keys & {"train", "test"} and "datasets" not in keys:
        raw["datasets"] = []  # the generalisation protocol replaces the per-dataset one
    for text in settings:
        key, eq, value = text.partition("=")
        parts = key.strip().split(".")
        if not eq or not key.strip():
            raise BenchError(f"--set {text!r} is not KEY=VALUE; e.g. --set pretrain.steps=200")
        if len(parts) == 1 and parts[0] in top:
            raw[parts[0]] = _setting_value(value)
        elif len(parts) == 2 and parts[0] in ("pretrain", "finetune") and parts[1] in inner:
            raw[parts[0]][parts[1]] = _setting_value(value)
        else:
            raise BenchError(f"--set {key.strip()}: unknown setting; valid: {', '.join(top)}, "
                             f"pretrain.KEY or finetune.KEY with KEY one of {', '.join(inner)}")
    return spec_from_dict(raw, where="--set")


def _setting_value(text: str) -> Any:
    try:
        return yaml.load(text.strip(), Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
    except yaml.YAMLError:
        return text.strip()


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] if "," in value else [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _schedule(raw: Any, where: str) -> Schedule:
    if isinstance(raw, Schedule):
        return raw
    if not isinstance(raw, dict):
        raise BenchError(f"{where} must be a mapping such as {{size: 64, steps: 100}}")
    known = [f.name for f in fields(Schedule)]
    unknown = sorted(str(k) for k in set(raw) - set(known))
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    floats = ("lr", "weight_decay", "epochs", "reg_weight")
    values = {k: _as_float(v) if k in floats else v for k, v in raw.items()}
    if "freeze" in values:
        values["freeze"] = _freeze(values["freeze"])
    return Schedule(**values)


def _freeze(value: Any) -> Any:
    """``freeze`` as given: one protocol (a string), or a list of them (YAML list, ``none,backbone``) as
    a tuple; a list of one is that string, so ``[backbone]`` and ``backbone`` are the same spec."""
    if isinstance(value, str) and "," in value:
        value = _as_list(value)
    if isinstance(value, (list, tuple)):
        value = tuple(value)
        return value[0] if len(value) == 1 and isinstance(value[0], str) else value
    return value


def _dataset_entry(raw: Any, where: str) -> DatasetEntry:
    if isinstance(raw, DatasetEntry):
        return raw
    if isinstance(raw, str):
        return DatasetEntry(raw)
    if isinstance(raw, dict) and "ref" in raw:
        extra = sorted(str(k) for k in set(raw) - {"ref", "n", "pool"})
        if extra:
            raise BenchError(f"{where}: dataset entry has unknown key(s) {', '.join(extra)}; use ref, n, pool")
        return DatasetEntry(raw["ref"], raw.get("n"), raw.get("pool", "self"))
    raise BenchError(f"{where}: a dataset is a name, LAYOUT:PATH, PATH or {{ref: ..., pool: ...}}, not {raw!r}")


def parse_fractions(values: list[Any]) -> tuple[float, ...]:
    out = []
    for value in values:
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            raise BenchError(f"fraction {value!r} is not a number; use e.g. --fractions 0.05,0.1") from None
        if isinstance(value, bool) or not 0.0 < fraction <= 1.0:
            raise BenchError(f"fraction {value} is not in (0, 1]; use e.g. --fractions 0.05,0.1")
        out.append(fraction)
    return tuple(out)


def parse_seeds(values: list[Any]) -> tuple[int, ...]:
    try:
        return tuple(int(str(v)) for v in values)
    except ValueError:
        raise BenchError(f"seeds {','.join(map(str, values))!r} must be integers ≥ 0, e.g. 0,1,2") from None


# --- validation -----------------------------------------------------------------------------------

def validate(spec: BenchmarkSpec, resources: bool = True) -> None:
    """Check every field's type and range, every name and (with ``resources``) every path that looks at
    this machine (dataset folders, init files), in one pass (``bench.validation``)."""
    from bench.validation import validate_spec

    validate_spec(spec, resources)
