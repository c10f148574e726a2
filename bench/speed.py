"""``bench speed``: training throughput (images/s) of each method's pretraining step and of the
fine-tuning step on the current device, at each precision candidate, in three pipelines:

- ``batched-tensor``: the project's data path (uint8 images in device memory, views drawn as whole
  batches each step), as ``bench run`` trains;
- ``compute-only``: the same step on views prepared once in memory (no augmentation in the loop),
  the limit the data path can reach; ``data_path_overhead`` = compute-only rate / data-path rate − 1;
- ``PIL+DataLoader``: as a yardstick, BYOL fed per sample by lightly's ``BYOLTransform``.

With ``compile`` the data path and compute-only steps are also timed compiled, with the compile time
(the warm-up's excess over its steady steps) and whether it repays itself over the default run's
jobs (``bench.runtime.compile_pays``). Throughput is the median over several timed windows after a
warm-up; the device is synchronised only at window boundaries. No test asserts a time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench import augment
from bench.errors import BenchError
from bench.methods import REGISTRY, method_names, parse_method, split_method_list
from bench.protocol import build_pretrain_method, finetune_step, make_optimizer, pretrain_step
from bench.runtime import (
    SCREEN_IMAGES,
    SCREEN_RATIO,
    Runtime,
    choose_precision,
    compile_break_even,
    compile_pays,
    precision_candidates,
    sync,
)
from bench.spec import Schedule

DATA_PATH, COMPUTE_ONLY = "batched-tensor", "compute-only"
SCREENED = "screened"  # a precision far slower on a first look (screen_precisions): one step on a few images


@dataclass
class SpeedRecord:
    method: str
    phase: str  # pretrain | finetune | reference
    device: str
    backbone: str
    size: int
    batch_size: int
    precision: str
    images_per_s: float
    windows: list[float]
    pipeline: str  # batched-tensor | compute-only | PIL+DataLoader(workers=N)
    compiled: bool = False
    threads: int | None = None
    warmup_s: float | None = None  # wall time of the warm-up steps
    compile_s: float | None = None  # compiled rows: warm-up time beyond its steady steps
    data_path_overhead: float | None = None  # data-path rows: compute-only rate / this rate - 1
    vs_reference: float | None = None  # pretraining rows: this rate / the PIL reference's
    auto_precision: str | None = None  # what `auto` chooses from this method's compute-only figures
    compile_break_even_images: float | None = None  # compiled data-path rows; None there: never pays
    compile_pays_default_run: bool | None = None  # over one job of the default run (the quick preset)
    compile_error: str | None = None  # eager rows: why compiling this step failed


@dataclass
class Timing:
    warmup_s: float
    seconds_per_step: list[float]  # one per timed window


@dataclass
class Settings:
    """What every timed row shares."""

    backbone: str
    size: int
    batch: int
    runtime: Runtime
    warmup: int = 2
    windows: int = 3
    steps_per_window: int = 2

    def __post_init__(self) -> None:
        for name, low in (("size", 8), ("batch", 2), ("warmup", 1), ("windows", 1), ("steps_per_window", 1)):
            if getattr(self, name) < low:
                raise BenchError(f"speed: {name.replace('_', ' ')} must be ≥ {low}, got {getattr(self, name)}")


def timed(step: Callable[[], None], device: torch.device, warmup: int, windows: int,
          steps_per_window: int) -> Timing:
    """Seconds per step of each timed window, after ``warmup`` steps (timed as a whole)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    out = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps_per_window):
            step()
        sync(device)
        out.append((time.perf_counter() - start) / steps_per_window)
    return Timing(warmup_s, out)


def speed_methods(text: str = "default") -> list[str]:
    """``default``: the methods of the default run (the quick preset) that pretrain; ``all``: every
    registered method that pretrains; otherwise the comma-separated specs."""
    if text.strip() == "all":
        return [name for name in method_names() if REGISTRY[name].pretrains]
    if text.strip() == "default":
        from bench.spec import load_preset

        return [m for m in load_preset("quick").methods if parse_method(m).cls.pretrains]
    return split_method_list(text)


def precisions_to_time(runtime: Runtime) -> list[str]:
    """``auto`` → every candidate of the device (fp32 and bf16 where supported); else the one asked."""
    return precision_candidates(runtime.device) if runtime.precision == "auto" else [runtime.precision]


def _record(s: Settings, method: str, phase: str, precision: str, timing: Timing, pipeline: str,
            compiled: bool = False) -> SpeedRecord:
    rates = [s.batch / max(t, 1e-9) for t in timing.seconds_per_step]
    compile_s = None
    if compiled:  # the warm-up's excess over as many steady steps
        compile_s = max(0.0, timing.warmup_s - s.warmup * statistics.median(timing.seconds_per_step))
    return SpeedRecord(method, phase, str(s.runtime.device), s.backbone, s.size, s.batch, precision,
                       float(statistics.median(rates)), rates, pipeline, compiled, torch.get_num_threads(),
                       timing.warmup_s, compile_s)


def _time_pair(s: Settings, method: str, phase: str, precision: str, steps: tuple[Callable, Callable],
               compiled: bool) -> list[SpeedRecord]:
    """The data-path and compute-only rows of one configuration."""
    out = []
    for pipeline, step in zip((DATA_PATH, COMPUTE_ONLY), steps, strict=True):
        timing = timed(step, s.runtime.device, s.warmup, s.windows, s.steps_per_window)
        out.append(_record(s, method, phase, precision, timing, pipeline, compiled))
    return out


# --- the steps ------------------------------------------------------------------------------------

def pretrain_steps(method_text: str, images: torch.Tensor, s: Settings, precision: str,
                   compiled: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
    """(data-path step, compute-only step) of one method, sharing one freshly built model."""
    spec = parse_method(method_text)
    device = s.runtime.device
    total = s.warmup + 2 * s.windows * s.steps_per_window
    method = build_pretrain_method(spec, s.backbone, "scratch", s.size, len(images), s.batch, total, device,
                                   compiled)
    optimizer = make_optimizer([p for p in method.parameters() if p.requires_grad], Schedule(optimizer="sgd"))
    pool = images.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    masks = torch.zeros(len(images), 1, images.shape[-2], images.shape[-1], dtype=torch.uint8, device=device)
    counter = iter(range(10**9))

    def draw() -> augment.Views:
        idx = torch.randint(len(pool), (s.batch,), device=device, generator=gen)
        return method.make_views(pool[idx], idx, gen, masks=masks[idx] if spec.cls.uses_labels else None)

    ready = [draw() for _ in range(2)]  # the compute-only step alternates two prepared batches

    def data_step() -> None:
        pretrain_step(method, optimizer, draw(), next(counter), device, precision)

    def compute_step() -> None:
        k = next(counter)
        pretrain_step(method, optimizer, ready[k % 2], k, device, precision)

    return data_step, compute_step


def finetune_steps(images: torch.Tensor, masks: torch.Tensor, s: Settings, precision: str,
                   compiled: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
    """(data-path step, compute-only step) of fine-tuning (backbone + DeepLabv3 head)."""
    from bench.models import build_segmentation_model

    device = s.runtime.device
    model = s.runtime.prepare(build_segmentation_model(s.backbone, "scratch"))
    if compiled:
        model.compile()
    model.train()
    optimizer = make_optimizer(list(model.parameters()), Schedule())
    pool, labels = images.to(device), masks.to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(pool), (s.batch,), device=device, generator=gen)
        return augment.finetune_batch(pool[idx], labels[idx], s.size, gen)

    ready = [draw() for _ in range(2)]
    counter = iter(range(10**9))

    def data_step() -> None:
        finetune_step(model, optimizer, *draw(), device, precision)

    def compute_step() -> None:
        finetune_step(model, optimizer, *ready[next(counter) % 2], device, precision)

    return data_step, compute_step


# --- the PIL + DataLoader reference ---------------------------------------------------------------

class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform):
        from PIL import Image

        self.images = [Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))) for img in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i])


def _endless(loader) -> Iterator:
    while True:
        yield from loader


def reference_speed(images: torch.Tensor, s: Settings, workers: int = 2) -> SpeedRecord:
    """The same BYOL model and step in fp32, fed by PIL images → lightly ``BYOLTransform`` → DataLoader."""
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    device = s.runtime.device
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=s.size),
                              view_2_transform=BYOLView2Transform(input_size=s.size))
    loader = torch.utils.data.DataLoader(_PILDataset(images.numpy(), transform), batch_size=s.batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    batches = _endless(loader)
    total = s.warmup + s.windows * s.steps_per_window
    method = build_pretrain_method(parse_method("byol"), s.backbone, "scratch", s.size, len(images), s.batch,
                                   total, device)
    optimizer = make_optimizer([p for p in method.parameters() if p.requires_grad], Schedule(optimizer="sgd"))
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).repeat(s.batch, 1)
    flips = torch.zeros(s.batch, dtype=torch.bool, device=device)
    counter = iter(range(10**9))

    def step() -> None:
        x1, x2 = next(batches)
        views = augment.Views(x1.to(device, non_blocking=True), x2.to(device, non_blocking=True), box, box,
                              flips, flips, torch.arange(s.batch, device=device))
        pretrain_step(method, optimizer, views, next(counter), device, "fp32")

    timing = timed(step, device, s.warmup, s.windows, s.steps_per_window)
    return _record(s, "byol", "reference", "fp32", timing, f"PIL+DataLoader(workers={workers})")


# --- one whole measurement ------------------------------------------------------------------------

Steps = Callable[[str, bool, Settings], tuple[Callable, Callable]]


def screen_precisions(method: str, phase: str, make_steps: Steps, s: Settings) -> tuple[list[str], list[SpeedRecord]]:
    """Every precision to time, after a first look on ``SCREEN_IMAGES`` images (one untimed and one
    timed compute-only step each): one more than ``SCREEN_RATIO`` slower than the fastest is not timed
    further (emulated bf16 took minutes per window on one EPYC) and gets a ``screened`` row instead."""
    precisions = precisions_to_time(s.runtime)
    if len(precisions) < 2 or s.batch <= SCREEN_IMAGES:
        return precisions, []
    small = replace(s, batch=SCREEN_IMAGES)
    rows = {}
    for precision in precisions:
        _data_step, compute_step = make_steps(precision, False, small)
        rows[precision] = _record(small, method, phase, precision,
                                  timed(compute_step, s.runtime.device, 1, 1, 1), SCREENED)
    fastest = max(r.images_per_s for r in rows.values())
    kept = [p for p in precisions if rows[p].images_per_s * SCREEN_RATIO >= fastest]
    return kept, [rows[p] for p in precisions if p not in kept]


def time_phase(method: str, phase: str, make_steps: Steps, s: Settings,
               default_images: int | None = None) -> list[SpeedRecord]:
    """Every row of one method (or of fine-tuning): each precision eager (after ``screen_precisions``),
    then — with compile — the precision ``auto`` chooses (or the one asked) compiled."""
    kept, rows = screen_precisions(method, phase, make_steps, s)
    for precision in kept:
        rows += _time_pair(s, method, phase, precision, make_steps(precision, False, s), compiled=False)
    compute = {r.precision: r.images_per_s for r in rows if r.pipeline == COMPUTE_ONLY}
    choice = choose_precision(compute, s.runtime.margin)  # screened-out precisions are far slower
    if s.runtime.compile:
        try:
            rows += _time_pair(s, method, phase, choice, make_steps(choice, True, s), compiled=True)
        except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for inductor: keep the eager rows
            reason = (str(err).strip().splitlines() or [""])[0]
            for r in rows:
                r.compile_error = f"{type(err).__name__}: {reason}"
    annotate(rows, choice, default_images)
    return rows


def annotate(rows: list[SpeedRecord], auto_precision: str, default_images: int | None) -> None:
    """Fill the derived fields of one method's rows: overhead, auto choice, compile payback."""
    by_config = {(r.precision, r.compiled, r.pipeline): r for r in rows}
    for r in rows:
        r.auto_precision = auto_precision
        if r.pipeline != DATA_PATH:
            continue
        compute = by_config.get((r.precision, r.compiled, COMPUTE_ONLY))
        if compute is not None:
            r.data_path_overhead = compute.images_per_s / r.images_per_s - 1.0
        eager = by_config.get((r.precision, False, DATA_PATH))
        if r.compiled and eager is not None and r.compile_s is not None:
            even = compile_break_even(r.compile_s, eager.images_per_s, r.images_per_s)
            r.compile_break_even_images = even if math.isfinite(even) else None  # None: never (JSON has no inf)
            if default_images is not None:
                r.compile_pays_default_run = compile_pays(r.compile_s, eager.images_per_s, r.images_per_s,
                                                          default_images)


def default_run_images() -> dict[str, int]:
    """Training images of one job of the default run (the quick preset): per pretraining, per cell."""
    from bench.spec import load_preset

    spec = load_preset("quick")
    n = next((d.n for d in spec.datasets if getattr(d, "n", None)), 120)
    return {phase: sched.num_steps(n) * sched.batch_size
            for phase, sched in (("pretrain", spec.pretrain), ("finetune", spec.finetune))}


def run_speed(methods: list[str], images: torch.Tensor, masks: torch.Tensor, s: Settings, reference: bool = True,
              reference_workers: int = 2, status: Callable[[str], None] | None = None) -> list[SpeedRecord]:
    """Every row: each method's pretraining, fine-tuning, then the PIL reference (if asked)."""
    status = status or (lambda _text: None)
    budget = default_run_images()
    records: list[SpeedRecord] = []
    for text in methods:
        status(f"timing pretraining of {text}")
        records += time_phase(parse_method(text).label, "pretrain",
                              lambda p, c, st, text=text: pretrain_steps(text, images, st, p, c), s,
                              budget["pretrain"])
    status("timing fine-tuning")
    records += time_phase("segmentation", "finetune", lambda p, c, st: finetune_steps(images, masks, st, p, c), s,
                          budget["finetune"])
    if reference:
        status("timing the per-sample PIL reference pipeline")
        ref = reference_speed(images, s, reference_workers)
        for r in records:
            if r.phase == "pretrain":
                r.vs_reference = r.images_per_s / ref.images_per_s
        records.append(ref)
    return records


def _fmt(value: float | None, text: str = "{:.1f}") -> str:
    return "" if value is None else text.format(value)


def summary_rows(records: list[SpeedRecord]) -> list[dict[str, str]]:
    """One printed line per method × phase × precision × compiled: data path beside compute-only (img/s)."""
    lines: dict[tuple, dict[str, str]] = {}
    for r in records:
        key = (r.method, r.phase, r.precision, r.compiled)
        line = lines.setdefault(key, {"method": r.method, "phase": r.phase, "precision": r.precision,
                                      "compiled": "yes" if r.compiled else "", "data path": "", "compute only": "",
                                      "overhead": "", "vs PIL": "", "auto": r.auto_precision or "",
                                      "compile s": "", "pays after": ""})
        if r.pipeline == COMPUTE_ONLY:
            line["compute only"] = _fmt(r.images_per_s)
            continue
        if r.pipeline == SCREENED:
            line["data path"] = f"not timed: {_fmt(r.images_per_s)} on {r.batch_size} images"
            continue
        line["data path"] = _fmt(r.images_per_s) + ("" if r.pipeline == DATA_PATH else " (PIL)")
        line["overhead"] = _fmt(None if r.data_path_overhead is None else 100 * r.data_path_overhead, "{:+.0f}%")
        line["vs PIL"] = _fmt(r.vs_reference, "{:.2f}×")
        line["compile s"] = _fmt(r.compile_s)
        if r.compiled:
            even = "never" if r.compile_break_even_images is None else _fmt(r.compile_break_even_images, "{:.0f} img")
            pays = {True: ", pays", False: ", does not pay", None: ""}[r.compile_pays_default_run]
            line["pays after"] = even + pays
    return list(lines.values())


def records_to_json(records: list[SpeedRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def write_speed(out: Path, records: list[SpeedRecord], runtime: Runtime | None = None) -> Path:
    """``speed.json`` (one flat record per timed row); with ``runtime`` also ``speed-runtime.json``
    (device, threads and their policy, OpenMP, precision settings)."""
    from bench.store import write_json

    path = Path(out) / "speed.json"
    write_json(path, records_to_json(records))
    if runtime is not None:
        write_json(Path(out) / "speed-runtime.json", runtime.provenance())
    return path
