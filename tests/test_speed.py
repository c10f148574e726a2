"""``bench speed``: which rows it times, the figures it derives from them, and the JSON it writes.
Figures are derived from given records; no test asserts a time."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bench import speed
from bench.cli import app
from bench.errors import BenchError
from bench.methods import REGISTRY, method_names
from bench.runtime import Runtime
from bench.speed import (
    COMPUTE_ONLY,
    DATA_PATH,
    SCREENED,
    Settings,
    SpeedRecord,
    annotate,
    summary_rows,
    time_phase,
)

CPU = torch.device("cpu")


def _row(precision: str, pipeline: str, rate: float, compiled: bool = False, compile_s: float | None = None,
         method: str = "byol", phase: str = "pretrain") -> SpeedRecord:
    return SpeedRecord(method, phase, "cpu", "resnet18", 64, 32, precision, rate, [rate], pipeline, compiled,
                       2, 1.0, compile_s)


def test_all_means_every_registered_method_that_pretrains():
    names = speed.speed_methods("all")
    assert names == sorted(n for n in method_names() if REGISTRY[n].pretrains)
    assert "byol" in names and "scratch" not in names and "imagenet" not in names
    assert speed.speed_methods("dicoh:percentile=50,queue=1024,byol") == ["dicoh:percentile=50,queue=1024", "byol"]


def test_auto_times_both_candidates_and_an_asked_precision_only_itself():
    assert speed.precisions_to_time(Runtime(CPU, "auto")) == ["fp32", "bf16"]
    assert speed.precisions_to_time(Runtime(CPU, "bf16")) == ["bf16"]


def test_annotate_derives_overhead_auto_choice_and_compile_payback():
    rows = [_row("fp32", DATA_PATH, 40.0), _row("fp32", COMPUTE_ONLY, 44.0),
            _row("bf16", DATA_PATH, 25.0), _row("bf16", COMPUTE_ONLY, 30.0),
            _row("fp32", DATA_PATH, 50.0, compiled=True, compile_s=30.0),
            _row("fp32", COMPUTE_ONLY, 55.0, compiled=True, compile_s=28.0)]
    annotate(rows, "fp32", default_images=480)
    assert rows[0].data_path_overhead == pytest.approx(0.10)  # 44/40 - 1
    assert rows[2].data_path_overhead == pytest.approx(0.20)
    assert rows[1].data_path_overhead is None  # only data-path rows carry it
    assert {r.auto_precision for r in rows} == {"fp32"}
    # compiled 50 vs eager 40 img/s saves 1/40 - 1/50 = 0.005 s per image: 30 s repaid after 6000 images
    assert rows[4].compile_break_even_images == pytest.approx(6000.0)
    assert rows[4].compile_pays_default_run is False
    assert rows[0].compile_break_even_images is None and rows[0].compile_pays_default_run is None


def test_compile_that_never_pays_is_recorded_without_infinity():
    rows = [_row("fp32", DATA_PATH, 40.0), _row("fp32", DATA_PATH, 30.0, compiled=True, compile_s=5.0)]
    annotate(rows, "fp32", default_images=10**6)
    assert rows[1].compile_break_even_images is None and rows[1].compile_pays_default_run is False
    json.dumps(speed.records_to_json(rows), allow_nan=False)  # valid JSON: no inf/nan


def test_summary_puts_data_path_beside_compute_only():
    rows = [_row("fp32", DATA_PATH, 40.0), _row("fp32", COMPUTE_ONLY, 44.0),
            _row("fp32", DATA_PATH, 50.0, compiled=True, compile_s=30.0)]
    annotate(rows, "fp32", default_images=480)
    lines = summary_rows(rows)
    assert len(lines) == 2
    assert lines[0]["data path"] == "40.0" and lines[0]["compute only"] == "44.0" and lines[0]["overhead"] == "+10%"
    assert lines[1]["compiled"] == "yes" and lines[1]["pays after"] == "6000 img, does not pay"


def _noop_steps(built: list, fail_compiled: bool = False, slow: dict[str, float] | None = None):
    import time

    def make(precision: str, compiled: bool, settings: Settings):
        built.append((precision, compiled, settings.batch))
        if compiled and fail_compiled:
            raise RuntimeError("inductor: no working C++ compiler\nmore detail")
        pause = (slow or {}).get(precision, 0.0)
        return (lambda: time.sleep(pause)), (lambda: time.sleep(pause))

    return make


def test_a_far_slower_precision_is_screened_on_a_few_images_and_not_timed():
    built: list = []
    s = Settings("resnet18", 32, 16, Runtime(CPU, "auto"), warmup=1, windows=1, steps_per_window=1)
    rows = time_phase("byol", "pretrain", _noop_steps(built, slow={"fp32": 0.001, "bf16": 0.02}), s)
    assert built == [("fp32", False, 4), ("bf16", False, 4), ("fp32", False, 16)]  # bf16 never at batch 16
    assert [(r.precision, r.pipeline) for r in rows] == [("bf16", SCREENED), ("fp32", DATA_PATH),
                                                          ("fp32", COMPUTE_ONLY)]
    assert rows[0].batch_size == 4 and rows[1].auto_precision == "fp32"
    line = next(r for r in summary_rows(rows) if r["precision"] == "bf16")
    assert line["data path"].startswith("not timed")


def test_time_phase_times_each_candidate_then_the_auto_choice_compiled():
    built: list = []
    s = Settings("resnet18", 32, 4, Runtime(CPU, "auto", compile=True), warmup=1, windows=1, steps_per_window=1)
    rows = time_phase("byol", "pretrain", _noop_steps(built), s, default_images=480)
    choice = rows[0].auto_precision
    assert built == [("fp32", False, 4), ("bf16", False, 4), (choice, True, 4)]
    assert [(r.precision, r.pipeline, r.compiled) for r in rows] == [
        ("fp32", DATA_PATH, False), ("fp32", COMPUTE_ONLY, False), ("bf16", DATA_PATH, False),
        ("bf16", COMPUTE_ONLY, False), (choice, DATA_PATH, True), (choice, COMPUTE_ONLY, True)]
    assert all(r.compile_s is not None for r in rows if r.compiled)


def test_a_failing_compile_keeps_the_eager_rows_and_says_why():
    s = Settings("resnet18", 32, 4, Runtime(CPU, "fp32", compile=True), warmup=1, windows=1, steps_per_window=1)
    rows = time_phase("byol", "pretrain", _noop_steps([], fail_compiled=True), s)
    assert [r.compiled for r in rows] == [False, False]
    assert rows[0].compile_error == "RuntimeError: inductor: no working C++ compiler"


def test_settings_reject_values_that_cannot_be_timed():
    with pytest.raises(BenchError, match="windows must be ≥ 1"):
        Settings("resnet18", 32, 4, Runtime(CPU), windows=0)
    with pytest.raises(BenchError, match="batch must be ≥ 2"):
        Settings("resnet18", 32, 1, Runtime(CPU))


SMOKE = ["--size", "32", "--batch-size", "2", "--warmup", "1", "--windows", "1", "--steps", "1", "--device", "cpu"]


def test_speed_command_writes_the_new_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["speed", "--methods", "byol", "--precision", "fp32", "--threads", "1",
                                      "--reference-workers", "0", "--out", str(tmp_path), *SMOKE])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "speed.json").read_text())
    assert [(r["phase"], r["pipeline"]) for r in records] == [
        ("pretrain", DATA_PATH), ("pretrain", COMPUTE_ONLY), ("finetune", DATA_PATH), ("finetune", COMPUTE_ONLY),
        ("reference", "PIL+DataLoader(workers=0)")]
    for r in records:
        assert r["precision"] == "fp32" and r["threads"] == 1 and r["images_per_s"] > 0
    data_rows = [r for r in records if r["pipeline"] == DATA_PATH]
    assert all(r["data_path_overhead"] is not None and r["auto_precision"] == "fp32" for r in data_rows)
    assert records[0]["vs_reference"] is not None and records[2]["vs_reference"] is None
    env = json.loads((tmp_path / "speed-runtime.json").read_text())
    assert env["thread_policy"]["requested"] == 1 and env["omp_wait_policy"] and "openmp" in env


def test_speed_iterates_over_every_registered_method(monkeypatch):
    built: list[str] = []

    def pretrain_steps(text, images, s, precision, compiled=False):
        built.append(text)
        return (lambda: None), (lambda: None)

    monkeypatch.setattr(speed, "pretrain_steps", pretrain_steps)
    monkeypatch.setattr(speed, "finetune_steps", lambda *a, **k: ((lambda: None), (lambda: None)))
    s = Settings("resnet18", 32, 2, Runtime(CPU, "fp32"), warmup=1, windows=1, steps_per_window=1)
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    records = speed.run_speed(speed.speed_methods("all"), images, torch.zeros(4, 1, 32, 32, dtype=torch.uint8), s,
                              reference=False)
    assert built == speed.speed_methods("all")
    assert [r.method for r in records if r.phase == "pretrain"][::2] == built
