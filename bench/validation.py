"""The one validation pass of a benchmark spec (docs/architecture.md): every field's type and range,
every name and (optionally) every path, checked before anything is written. Each problem is a
one-line ``BenchError`` naming the field, the value and what the field accepts."""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.spec import EVAL_MODES, FREEZE_MODES, INITS, OPTIMIZERS, PRECISIONS, BenchmarkSpec, DatasetEntry, Schedule


def validate_spec(spec: BenchmarkSpec, resources: bool = True) -> None:
    """Check every field's type and range, every name and (with ``resources``) every path, in one
    pass; the first problem is a one-line ``BenchError`` naming the field, the value and what it accepts."""
    _check_name(spec.name)
    _check_methods(spec.methods)
    _check_datasets(spec, resources)
    _check_list("fractions", spec.fractions, lambda where, v: _number(where, v, low=0, low_open=True, high=1))
    _check_list("seeds", spec.seeds, lambda where, v: _number(where, v, integer=True, low=0))
    _check_backbone(spec.backbone)
    _check_init(spec.init, resources)
    for sched, where in ((spec.pretrain, "pretrain"), (spec.finetune, "finetune")):
        _check_schedule(sched, where)
    from bench.store import METRICS

    for name, options in (("metric", METRICS), ("precision", PRECISIONS), ("eval", EVAL_MODES)):
        _choice(name, getattr(spec, name), options)
    for name in ("pretrain_seed", "split_seed"):
        _number(name, getattr(spec, name), integer=True, low=0)
    for name in ("pretrain_per_seed", "compile", "keep_models"):
        _flag(name, getattr(spec, name))
    _number("keep_predictions", spec.keep_predictions, integer=True, low=-1)
    _number("threads", spec.threads, integer=True, low=1, none=True)
    for name in ("description", "showcase_note"):
        if not isinstance(getattr(spec, name), str):
            raise BenchError(f"{name}: {getattr(spec, name)!r} is not text; accepts a string")


def _accepts(integer: bool, low: float | None, high: float | None, low_open: bool, none: bool) -> str:
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        text = f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        text = f"{kind} {'>' if low_open else '≥'} {low:g}"
    else:
        text = kind
    return text + (" or null" if none else "")


def _number(where: str, value: Any, integer: bool = False, low: float | None = None, high: float | None = None,
            low_open: bool = False, none: bool = False) -> None:
    if value is None and none:
        return
    accepts = _accepts(integer, low, high, low_open, none)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BenchError(f"{where}: {value!r} is not {'an integer' if integer else 'a number'}; accepts {accepts}")
    if not math.isfinite(value):
        raise BenchError(f"{where}: {value!r} is not finite; accepts {accepts}")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        raise BenchError(f"{where}: {value!r} is out of range; accepts {accepts}")


def _flag(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise BenchError(f"{where}: {value!r} is not a boolean; accepts true or false")


def _choice(where: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise BenchError(f"{where}: {value!r} is not allowed; accepts {', '.join(options)}")


def _check_list(name: str, values: Any, check) -> None:
    if not isinstance(values, tuple) or not values:
        example = {"fractions": "[0.05, 0.1]", "seeds": "[0, 1]"}.get(name, "[...]")
        raise BenchError(f"{name}: the spec names none; give a list, e.g. {name}: {example}")
    seen: set = set()
    for i, value in enumerate(values):
        check(f"{name}[{i}]", value)
        if value in seen:
            raise BenchError(f"{name}: {value!r} is listed twice; list each once")
        seen.add(value)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w .+-]{0,99}", name) or name != name.strip():
        raise BenchError(f"name: {name!r} is not a plain folder name; accepts letters, digits and - _ . + "
                         "(starting with a letter or digit), e.g. my-benchmark")


def _check_methods(methods: Any) -> None:
    from bench.methods import parse_method

    if not isinstance(methods, tuple) or not methods:
        raise BenchError("methods: the spec names no method; e.g. methods: [scratch, byol] (or all)")
    seen: dict[str, str] = {}
    for i, text in enumerate(methods):
        if not isinstance(text, str):
            raise BenchError(f"methods[{i}]: {text!r} is not a method spec; accepts NAME[:key=value,...]")
        identity = json.dumps(parse_method(text).resolved(), sort_keys=True, default=str)
        if identity in seen:
            same = "is listed twice" if seen[identity] == text else f"is the same method as {seen[identity]!r}"
            raise BenchError(f"methods: {text!r} {same}; list each once")
        seen[identity] = text


def _check_datasets(spec: BenchmarkSpec, resources: bool) -> None:
    if spec.train or spec.test:
        if spec.datasets:
            raise BenchError("datasets and train/test both given; use datasets (each trained and tested on "
                             "its own split) or train + test (the generalisation protocol), not both")
        if not spec.train or not spec.test:
            raise BenchError("train and test go together: train lists the training sets, test the sets "
                             "each scored separately")
    elif not spec.datasets:
        raise BenchError("datasets: the spec names no dataset; e.g. datasets: [synthetic-polyp]")
    for name in ("datasets", "train", "test"):
        entries = getattr(spec, name)
        if not isinstance(entries, tuple):
            raise BenchError(f"{name}: {entries!r} is not a list of datasets")
        seen: set = set()
        for i, entry in enumerate(entries):
            where = f"{name}[{i}]"
            _check_entry(where, entry, resources)
            if (entry.ref, entry.n) in seen:
                raise BenchError(f"{name}: {entry.ref!r} is listed twice; list each once")
            seen.add((entry.ref, entry.n))


def _check_entry(where: str, entry: Any, resources: bool) -> None:
    if not isinstance(entry, DatasetEntry):
        raise BenchError(f"{where}: {entry!r} is not a dataset; accepts a name, LAYOUT:PATH, PATH or {{ref: ...}}")
    if not isinstance(entry.ref, str) or not entry.ref.strip():
        raise BenchError(f"{where}.ref: {entry.ref!r} is not a dataset reference; accepts a name, LAYOUT:PATH "
                         "or PATH (bench datasets lists them)")
    _number(f"{where}.n", entry.n, integer=True, low=2, none=True)
    if not isinstance(entry.pool, str) or not entry.pool.strip():
        raise BenchError(f"{where}.pool: {entry.pool!r} is not a pool; accepts self, a folder or a synthetic name")
    if resources:
        _check_ref(f"{where}", entry.ref, pool=False)
        if entry.pool != "self":
            _check_ref(f"{where}.pool", entry.pool, pool=True)


def _check_ref(where: str, ref: str, pool: bool) -> None:
    """Resolve a reference without loading data: the registry name or layout, and that a folder exists."""
    from bench.datasets import layouts, refs

    try:
        source = refs.parse(ref)
        root = getattr(source, "root", None)
        if root is not None:
            layouts.check_folder(root)
        if pool and getattr(source, "layout", None):
            raise BenchError(f"a pool is a plain folder of unlabelled images; pass {root} without "
                             f"'{source.layout}:'")
    except BenchError as err:
        raise BenchError(f"{where}: {err}") from None


def _check_backbone(name: Any) -> None:
    import timm

    if isinstance(name, str) and timm.is_model(name):
        return
    close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise BenchError(f"backbone: {name!r} is not a timm model; {hint}accepts a name from timm.list_models(), "
                     "e.g. resnet18 or resnet50")


def _check_init(init: Any, resources: bool) -> None:
    if init in INITS or (isinstance(init, str) and init and not resources):
        return
    if isinstance(init, str) and init and Path(init).expanduser().is_file():
        return
    raise BenchError(f"init: {init!r} is neither scratch, imagenet nor an existing checkpoint file; accepts "
                     "scratch, imagenet or the path of a .pt file")


def _check_schedule(sched: Any, where: str) -> None:
    if not isinstance(sched, Schedule):
        raise BenchError(f"{where}: {sched!r} is not a schedule; accepts a mapping such as {{size: 64, steps: 100}}")
    from bench.methods.dispersive import LAYERS, VARIANTS

    numbers: dict[str, dict[str, Any]] = {
        "size": {"integer": True, "low": 32}, "batch_size": {"integer": True, "low": 1},
        "lr": {"low": 0, "low_open": True}, "weight_decay": {"low": 0},
        "epochs": {"low": 0, "low_open": True, "none": True}, "steps": {"integer": True, "low": 1, "none": True},
        "warmup_steps": {"integer": True, "low": 0}, "reg_weight": {"low": 0}}
    for key, rule in numbers.items():
        _number(f"{where}.{key}", getattr(sched, key), **rule)
    choices = {"optimizer": OPTIMIZERS, "reg": ("none", "disp"), "reg_variant": VARIANTS, "reg_layer": LAYERS}
    for key, options in choices.items():
        _choice(f"{where}.{key}", getattr(sched, key), tuple(options))
    _check_freeze(sched.freeze, f"{where}.freeze", several=where == "finetune")


def _check_freeze(value: Any, where: str, several: bool) -> None:
    """One fine-tuning protocol, or (fine-tuning only) a non-empty list of distinct ones."""
    if not isinstance(value, (list, tuple)):
        _choice(where, value, FREEZE_MODES)
        return
    if not several:
        raise BenchError(f"{where}: {list(value)!r} is a list; pretraining takes one value (it is ignored there), "
                         f"accepts {', '.join(FREEZE_MODES)}")
    if not value:
        raise BenchError(f"{where}: the list names no protocol; accepts {', '.join(FREEZE_MODES)} or a list of "
                         "them, e.g. [none, backbone]")
    for i, mode in enumerate(value):
        _choice(f"{where}[{i}]", mode, FREEZE_MODES)
        if mode in value[:i]:
            raise BenchError(f"{where}: {mode!r} is listed twice; list each protocol once, e.g. [none, backbone]")
