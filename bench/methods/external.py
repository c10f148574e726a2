"""Your encoder as a row of the benchmark: ``--methods byol,mine=ckpt:path/to/encoder.pth``.

``LABEL=ckpt:PATH`` is the ``external`` method: no pretraining job; every finetune cell of the row
starts from the checkpoint, read by ``bench.checkpoints`` (any of the formats in docs/encoders.md).
The file's absolute path and content hash are the method's config, so they enter the cell identity:
a changed checkpoint is a new row. The row is named LABEL in every table and diagram.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

from bench.checkpoints import CKPT, MatchReport, check_encoder, external_init, file_sha256
from bench.errors import BenchError
from bench.methods import MODIFIERS, REGISTRY, MethodSpec, register
from bench.methods.base import Method

LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,39}")


@register
class External(Method):
    name = "external"
    paper = "your encoder: LABEL=ckpt:PATH (a .pth/.pt/.safetensors checkpoint), fine-tuned like every row"
    group = "external"
    pretrains = False
    defaults = {"path": "", "sha256": ""}

    @classmethod
    def describe(cls) -> str:
        return "LABEL=ckpt:PATH, e.g. mine=ckpt:encoder.pth"


def parse_external(text: str) -> MethodSpec:
    """``LABEL=ckpt:PATH`` -> the ``external`` method with the file's absolute path and sha256."""
    label, eq, rest = text.strip().partition("=")
    label = label.strip()
    if not eq or not rest.startswith(CKPT):
        raise BenchError(f"{text.strip()!r}: an external encoder is written LABEL=ckpt:PATH, e.g. mine=ckpt:enc.pth")
    if not LABEL.fullmatch(label):
        raise BenchError(f"{label!r} is not a row name: use letters, digits, _ . - (starting with a letter), "
                         "e.g. mine=ckpt:encoder.pth")
    if label.lower() in REGISTRY or label.lower() in MODIFIERS:
        raise BenchError(f"{label!r} is a method name; name your encoder's row differently, e.g. {label}-ours")
    path = Path(rest[len(CKPT):].strip()).expanduser()
    if not path.is_file():
        raise BenchError(f"checkpoint {path} of {label!r} does not exist; pass an existing .pth/.pt/.safetensors "
                         "file (a relative path is taken from the current folder)")
    path = path.resolve()
    cfg = {"path": str(path), "sha256": file_sha256(path)}
    return MethodSpec(External.name, cfg, alias=label)


def finetune_init(method: MethodSpec, spec: Any) -> str | None:
    """The ``init`` of a finetune cell without pretraining: the class's own (scratch, imagenet) or, for an
    external encoder, its file and hash, after checking that it loads completely into ``spec.backbone``."""
    if method.name != External.name:
        return getattr(method.cls, "init", None)
    _check_labels(tuple(spec.methods))
    check_encoder(method.cfg["path"], method.cfg["sha256"], spec.backbone)
    return external_init(Path(method.cfg["path"]), method.cfg["sha256"])


@functools.lru_cache(maxsize=16)
def _check_labels(methods: tuple[str, ...]) -> None:
    """Two rows under one name would be pooled in every table: refuse."""
    from bench.methods import parse_method

    seen: dict[str, str] = {}
    for text in methods:
        label = parse_method(text).label
        if label in seen:
            raise BenchError(f"two methods are named {label!r} ({seen[label]!r} and {text!r}); give each row its "
                             "own name")
        seen[label] = text


def external_reports(spec: Any) -> list[MatchReport]:
    """What each external encoder of ``spec`` gives the backbone (refuses an incomplete one)."""
    from bench.methods import parse_method

    reports = []
    for text in spec.methods:
        method = parse_method(text)
        if method.name == External.name:
            finetune_init(method, spec)
            report = check_encoder(method.cfg["path"], method.cfg["sha256"], spec.backbone)
            reports.append(dataclasses.replace(report, source=f"{method.label} ({report.source})"))
    return reports
