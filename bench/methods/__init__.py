"""The method registry: names → classes, and method specs such as ``dicoh:percentile=50`` or
``byol+disp:variant=cos,weight=0.2`` resolved to a class, its overrides and its modifiers.

Grammar: ``NAME[:k=v,...][+MODIFIER[:k=v,...]]...``. Overrides name keys of the class's
``defaults``; values are coerced to the default's type and checked against ``choices``.
"""

from __future__ import annotations

import difflib
import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError
from bench.methods.base import Method, Modifier

REGISTRY: dict[str, type[Method]] = {}
MODIFIERS: dict[str, type[Modifier]] = {}


def register(cls):
    """Class decorator: add a Method (or Modifier) subclass to the registry under ``cls.name``."""
    table = MODIFIERS if issubclass(cls, Modifier) else REGISTRY
    if cls.name in table:
        raise ValueError(f"method {cls.name!r} registered twice")
    table[cls.name] = cls
    return cls


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "queue"):
            importlib.import_module(f"{__name__}.{info.name}")


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method spec: the class, its full config and its modifiers with theirs."""

    name: str
    cfg: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    modifiers: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = ()  # (name, cfg, overrides)
    alias: str = ""  # the row's name when the user chose one (``LABEL=ckpt:PATH``, bench.methods.external)

    @property
    def cls(self) -> type[Method]:
        return REGISTRY[self.name]

    @property
    def label(self) -> str:
        """Readable variant name, e.g. ``dicoh[percentile=50]`` or ``byol+disp[weight=0.2]``."""
        if self.alias:
            return self.alias
        text = self.name + _bracket(self.overrides)
        for mod_name, _, mod_overrides in self.modifiers:
            text += f"+{mod_name}{_bracket(mod_overrides)}"
        return text

    def resolved(self) -> dict[str, Any]:
        """Everything that identifies the method's computation (enters the config hash)."""
        return {"name": self.name, "cfg": self.cfg,
                "modifiers": [{"name": n, "cfg": c} for n, c, _ in self.modifiers]}


def _bracket(overrides: dict[str, Any]) -> str:
    if not overrides:
        return ""
    return "[" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "]"


def method_names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


GROUPS: tuple[str, ...] = ("global contrastive", "global non-contrastive", "dense contrastive", "masked modelling",
                           "flow/dispersive", "baselines", "references")
OTHER_GROUP = "other"  # methods that declare no ``group``


def method_groups() -> dict[str, list[str]]:
    """The registry by family: ``GROUPS`` in order, then any other declared group (sorted), then ``other``
    for methods that declare none; names sorted within a group, empty groups left out."""
    _load_all()
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in sorted(REGISTRY):
        groups.setdefault(REGISTRY[name].group or OTHER_GROUP, []).append(name)
    order = [*GROUPS, *sorted(g for g in groups if g not in GROUPS and g != OTHER_GROUP), OTHER_GROUP]
    return {g: groups[g] for g in order if groups.get(g)}


def unknown_name_error(kind: str, name: str, known: list[str]) -> BenchError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return BenchError(f"unknown {kind} {name!r}: {hint}known: {', '.join(known)}")


def split_method_list(text: str) -> list[str]:
    """Split ``"dicoh,byol+disp:variant=cos,weight=0.2"`` into method specs: a comma-separated piece
    that is a bare ``key=value`` continues the overrides of the previous spec."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if specs and "=" in piece and ":" not in piece.split("=", 1)[0] and "=ckpt:" not in piece:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def parse_method(text: str) -> MethodSpec:
    """Resolve ``NAME[:k=v,...][+MOD[:k=v,...]]`` against the registry (one-line errors);
    ``LABEL=ckpt:PATH`` is an external encoder (bench.methods.external)."""
    _load_all()
    if "=ckpt:" in text or text.strip().lower().split(":")[0].split("+")[0].strip() == "external":
        from bench.methods.external import parse_external

        return parse_external(text)
    parts = [p.strip() for p in text.strip().split("+")]
    name, overrides = _split_overrides(parts[0])
    if name not in REGISTRY:
        raise unknown_name_error("method", name, sorted(REGISTRY))
    cls = REGISTRY[name]
    cfg = _apply_overrides(name, cls.defaults, cls.choices, overrides, getattr(cls, "bounds", {}))
    modifiers = []
    for part in parts[1:]:
        mod_name, mod_overrides = _split_overrides(part)
        if mod_name not in MODIFIERS:
            raise unknown_name_error("modifier", mod_name, sorted(MODIFIERS))
        mod = MODIFIERS[mod_name]
        mod_cfg = _apply_overrides(f"{name}+{mod_name}", mod.defaults, mod.choices, mod_overrides,
                                   getattr(mod, "bounds", {}))
        modifiers.append((mod_name, mod_cfg, _coerced(mod.defaults, mod_overrides)))
    if modifiers and not cls.pretrains:
        raise BenchError(f"{name!r} has no pretraining, so modifier(s) {'+'.join(parts[1:])} cannot apply")
    return MethodSpec(name, cfg, _coerced(cls.defaults, overrides), tuple(modifiers))


def _split_overrides(part: str) -> tuple[str, dict[str, str]]:
    name, _, rest = part.partition(":")
    overrides: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise BenchError(f"override {item!r} in {part!r} is not KEY=VALUE (e.g. dicoh:percentile=50)")
        overrides[key.strip()] = value.strip()
    return name.strip().lower(), overrides


def _coerced(defaults: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    return {k: _coerce(defaults[k], v) for k, v in overrides.items()}


def _apply_overrides(where: str, defaults: dict[str, Any], choices: dict[str, tuple],
                     overrides: dict[str, str], bounds: dict[str, tuple] | None = None) -> dict[str, Any]:
    """``defaults`` with ``overrides`` coerced to the defaults' types and checked against ``choices``,
    the generic ranges of ``_RANGES`` and the class's own ``bounds`` (key -> (low, high), inclusive)."""
    cfg = dict(defaults)
    for key, raw in overrides.items():
        if key not in defaults:
            valid = "; ".join(_describe_key(k, defaults, choices) for k in defaults) or "none"
            raise BenchError(f"{where} has no override {key!r}; valid: {valid}")
        try:
            value = _coerce(defaults[key], raw)
        except ValueError:
            raise BenchError(f"{where}:{key}={raw} is not a {type(defaults[key]).__name__}") from None
        if key in choices and value not in choices[key]:
            allowed = "|".join(map(str, choices[key]))
            raise BenchError(f"{where}:{key}={raw} is not allowed; choose {key}={allowed}")
        _check_range(f"{where}:{key}={raw}", key, value, (bounds or {}).get(key))
        cfg[key] = value
    return cfg


# Generic ranges by what a key means: (matches key, low, high, low excluded, what it accepts)
_RANGES: tuple[tuple[Any, float | None, float | None, bool, str], ...] = (
    (lambda k: k == "warmup_steps" or k.endswith("_warmup_steps"), 0, None, False, "an integer ≥ 0"),
    (lambda k: k in ("queue", "steps") or "dim" in k or k.endswith(("_steps", "_blocks", "_size")), 1, None, False,
     "an integer ≥ 1 (a size)"),
    (lambda k: k in ("momentum", "ema") or k.endswith(("_momentum", "_share")), 0, 1, False, "a number in [0, 1]"),
    (lambda k: k in ("tau", "temperature", "eps") or k.endswith(("_tau", "_temperature", "_eps")), 0, None, True,
     "a number > 0"),
    (lambda k: k == "weight" or k.endswith("_weight"), 0, None, False, "a number ≥ 0"),
)


def _check_range(where: str, key: str, value: Any, bound: tuple | None) -> None:
    """Numbers must be finite and inside the class's ``bounds`` for ``key`` or else the generic range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise BenchError(f"{where} is not finite; accepts a finite number")
    if bound is not None:
        low, high = bound
        rule = (low, high, False, f"a number in [{'-inf' if low is None else low}, {'inf' if high is None else high}]")
    else:
        rule = next((r[1:] for r in _RANGES if r[0](key)), None)
    if rule is None:
        return
    low, high, low_open, accepts = rule
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        raise BenchError(f"{where} is out of range; accepts {accepts}")


def _describe_key(key: str, defaults: dict[str, Any], choices: dict[str, tuple]) -> str:
    if key in choices:
        return f"{key}={'|'.join(map(str, choices[key]))}"
    return f"{key}=<{type(defaults[key]).__name__}, default {defaults[key]}>"


def _coerce(default: Any, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    if isinstance(default, bool):
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def build_method(spec: MethodSpec, backbone, ctx) -> Method:
    """Instantiate a method with its modifiers attached."""
    method = spec.cls(backbone, ctx, spec.cfg)
    for mod_name, mod_cfg, _ in spec.modifiers:
        method.modifiers.append(MODIFIERS[mod_name](method, mod_cfg))
    return method


__all__ = ["REGISTRY", "MODIFIERS", "GROUPS", "Method", "Modifier", "MethodSpec", "register", "parse_method",
           "build_method", "method_names", "method_groups", "split_method_list"]
