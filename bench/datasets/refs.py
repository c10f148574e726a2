"""Dataset references: the strings a spec, the CLI and ``load_dataset`` take (docs/datasets.md).

- a registry name: ``synthetic-polyp`` (options: ``synthetic-polyp:seed=1,n=300``);
- ``LAYOUT:PATH``, e.g. ``kvasir-seg:/data/Kvasir-SEG``, or a bare ``PATH`` (layout recognised);
- ``#PART`` selects a part of a layout made of parts: ``pranet:/data/PraNet#Kvasir``, ``#train``;
- ``?key=value&key=value`` options: ``mask=RULE`` (auto, threshold, nonzero, label, color=R,G,B),
  ``split=FILE.csv`` (a user split), ``name=NAME`` (the name of its test set), ``seen=yes|no``
  (whether a test set counts as seen in training).

Example:
    >>> parse("kvasir-seg:/data/Kvasir-SEG?mask=nonzero&split=folds.csv")   # doctest: +ELLIPSIS
    FolderRef(layout='kvasir-seg', root=PosixPath('/data/Kvasir-SEG'), part=None, mask='nonzero', ...)
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from bench.datasets import layouts, synthetic
from bench.datasets.decode import check_rule
from bench.errors import BenchError

OPTIONS = ("mask", "split", "name", "seen")


@dataclass(frozen=True)
class SyntheticRef:
    name: str
    n: int | None = None
    seed: int | None = None
    split: Path | None = None
    label: str | None = None
    seen: bool | None = None


@dataclass(frozen=True)
class FolderRef:
    layout: str | None
    root: Path
    part: str | None = None
    mask: str | None = None
    split: Path | None = None
    label: str | None = None      # ``name=``: the name of its test set
    seen: bool | None = None


def known() -> list[str]:
    return [*synthetic.GENERATORS, *layouts.LAYOUTS]


def suggest(word: str) -> str:
    close = difflib.get_close_matches(word.lower(), known(), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def _synthetic_options(name: str, text: str) -> dict[str, int]:
    options: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in ("n", "seed") or not value.strip().lstrip("-").isdigit():
            raise BenchError(f"bad option {item!r} in {name}; use e.g. {name}:seed=1,n=300")
        options[key.strip()] = int(value)
    return options


def _query(ref: str, text: str) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in filter(None, text.split("&")):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if key not in OPTIONS or not sep or not value:
            raise BenchError(f"bad option {item!r} in {ref!r}; options: {', '.join(f'{o}=...' for o in OPTIONS)} "
                             "(e.g. PATH?mask=nonzero&split=split.csv)")
        if key == "mask":
            options["mask"] = check_rule(value)
        elif key == "split":
            options["split"] = Path(value).expanduser()
        elif key == "seen":
            if value.lower() not in ("yes", "no", "true", "false"):
                raise BenchError(f"seen={value!r} in {ref!r}; use seen=yes or seen=no")
            options["seen"] = value.lower() in ("yes", "true")
        else:
            options["label"] = value
    return options


def parse(ref: str) -> SyntheticRef | FolderRef:
    """The parsed reference; BenchError with a suggestion for an unknown name or layout."""
    ref = str(ref).strip()
    if ref in synthetic.GENERATORS:
        return SyntheticRef(ref)
    text, options = ref, {}
    if "?" in ref and not Path(ref).expanduser().exists():
        text, _, query = ref.partition("?")
        options = _query(ref, query)
    part = None
    if "#" in text and not Path(text).expanduser().exists():
        text, _, part = text.rpartition("#")
        part = part.strip() or None
    match = re.fullmatch(r"([A-Za-z][\w.-]+):(.*)", text)
    if match and not Path(text).expanduser().exists():
        prefix, rest = match.group(1).lower(), match.group(2)
        if prefix in synthetic.GENERATORS:
            return _synthetic(prefix, rest, options, part, ref)
        if prefix in layouts.LAYOUTS:
            if not rest:
                raise BenchError(f"{ref!r} names no folder; use {prefix}:PATH")
            return FolderRef(prefix, Path(rest).expanduser(), part, **options)
        raise BenchError(f"unknown dataset layout {prefix!r}; {suggest(prefix)}known layouts: "
                         f"{', '.join(layouts.LAYOUTS)} (bench datasets describes them)")
    if text in synthetic.GENERATORS:
        return _synthetic(text, "", options, part, ref)
    path = Path(text).expanduser()
    if not path.exists() and not re.search(r"[/\\~.]", text):
        raise BenchError(f"unknown dataset {text!r}; {suggest(text)}give a registry name "
                         f"({', '.join(synthetic.GENERATORS)}), LAYOUT:PATH or a folder path")
    return FolderRef(None, path, part, **options)


def _synthetic(name: str, text: str, options: dict, part: str | None, ref: str) -> SyntheticRef:
    if part is not None or "mask" in options:
        raise BenchError(f"{ref!r}: a synthetic set has no parts and no mask rule; use e.g. {name}:seed=1,n=300")
    values = _synthetic_options(name, text)
    return SyntheticRef(name, values.get("n"), values.get("seed"), **options)
