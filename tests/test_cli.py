"""The CLI end to end on a tiny grid: a complete run, resume after an interruption, a NaN-ing method,
and every bad input answered with one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_SPEC
from PIL import Image
from typer.testing import CliRunner

from bench import protocol
from bench.cli import app

TINY = TINY_SPEC.replace("fractions: [0.5]", "fractions: [0.1, 0.5]")  # two cells per method

runner = CliRunner()


@pytest.fixture
def tiny_spec(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def bench(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *words: str) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error:"), output
    for word in words:
        assert word.lower() in error.lower(), output


def test_tiny_run_end_to_end_and_resume(tiny_spec, tmp_path):
    from bench.protocol import PROTOCOL_VERSION
    from bench.reports.predictions import read_predictions

    out = tmp_path / "run"
    result = bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--set", "keep_predictions=2",
                   "--keep-models")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert set(run["phases_s"]) == {"data", "pretrain", "finetune", "evaluate", "report"}
    assert run["phases_s"]["finetune"] > 0 and run["phases_s"]["report"] > 0
    assert run["protocol_version"] == PROTOCOL_VERSION and run["runtime"]["device"] == "cpu"
    assert "5 ran, 0 reused, 0 failed in" in result.output and "fine-tuning" in result.output  # 1 job, 4 cells
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok"}
    assert set(table["method"]) == {"scratch", "byol"}
    assert table["miou"].between(0, 1).all()
    jobs = list((out / "pretrain").iterdir())
    assert len(jobs) == 1, "byol's one checkpoint serves both fractions"
    assert (jobs[0] / "DONE").is_file() and (jobs[0] / "backbone.pt").is_file()
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(records) == 4
    record = next(r for r in records if r["method"] == "byol")
    assert record["pretrain_id"] == jobs[0].name
    assert len(record["per_image"]["iou"]) == record["split"]["n_test"]
    assert record["versions"]["torch"] == torch.__version__ and record["numerics"] == "fp32"
    assert record["protocol_version"] == PROTOCOL_VERSION and record["eval"] == "native"
    assert record["freeze"] == "none" and record["reference"] is None and record["runtime"]["threads"] >= 1
    masks, iou = read_predictions(out / record["predictions"])
    assert list(masks) == record["test_ids"][:2] and list(iou.values()) == pytest.approx(record["per_image"]["iou"][:2])
    weights = torch.load(out / record["model"], weights_only=True)
    assert "head.4.weight" in weights and any(k.startswith("backbone.") for k in weights)
    ranks = pd.read_csv(out / "report" / "ranks.csv")
    assert set(ranks["method"]) == {"scratch", "byol"}
    # a rerun recomputes nothing
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    again = bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--no-report")
    assert again.exit_code == 0, again.output
    assert "0 ran, 5 reused" in again.output
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_interrupted_run_resumes_without_recomputing(tiny_spec, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = protocol.finetune

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("bench.runner.finetune", flaky)
    first = bench("run", "--spec", tiny_spec, "--out", out, "--no-progress")
    assert first.exit_code == 130, first.output
    done = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert len(done) == 2
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    calls.clear()
    monkeypatch.setattr("bench.runner.finetune", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    second = bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--no-report")
    assert second.exit_code == 0, second.output
    assert len(calls) == 2, "only the two unfinished cells run again"
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp


def test_nan_loss_fails_the_job_and_the_run_goes_on(tiny_spec, tmp_path, monkeypatch):
    from bench.methods.byol import BYOL

    def nan_step(self, views, step):
        loss = self.projector(views.x1.new_zeros(2, self.ctx.feature_channels[-1])).sum() * float("nan")
        return loss, {"loss": loss.detach()}

    monkeypatch.setattr(BYOL, "training_step", nan_step)
    out = tmp_path / "run"
    result = bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--no-report")
    assert result.exit_code == 1, result.output
    table = pd.read_csv(out / "results.csv")
    assert set(table.loc[table["method"] == "scratch", "status"]) == {"ok"}
    failed = table[table["method"] == "byol"]
    assert set(failed["status"]) == {"failed"}
    assert failed["error"].str.contains("nan").all()
    job = next((out / "pretrain").iterdir())
    assert "nan" in (job / "FAILED").read_text()


def test_unknown_method_suggests(tiny_spec):
    one_line_error(bench("run", "--spec", tiny_spec, "--methods", "dicho"), "unknown method", "dicoh")


def test_unknown_override_lists_keys(tiny_spec):
    one_line_error(bench("run", "--spec", tiny_spec, "--methods", "byol:momentun=0.9"), "momentum")


@pytest.mark.parametrize("fraction", ["0", "-0.1", "1.5", "abc"])
def test_impossible_fractions(tiny_spec, fraction):
    one_line_error(bench("run", "--spec", tiny_spec, "--fractions", fraction), "fraction")


def test_unknown_dataset_and_missing_root(tiny_spec, tmp_path):
    one_line_error(bench("run", "--spec", tiny_spec, "--datasets", "synthetic-polip"), "synthetic-polyp")
    one_line_error(bench("run", "--spec", tiny_spec, "--datasets", f"kvasir-seg:{tmp_path / 'nope'}"), "nope")


def _write(path: Path, size=(40, 32), color=100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (color, color, color)).save(path)


def test_bad_folders(tiny_spec, tmp_path):
    odd = tmp_path / "odd"
    (odd / "stuff").mkdir(parents=True)
    (odd / "readme.txt").write_text("x")
    one_line_error(bench("run", "--spec", tiny_spec, "--datasets", str(odd)), "layout")

    unpaired = tmp_path / "unpaired"
    for name in ("a", "b", "c"):
        _write(unpaired / "images" / f"{name}.jpg")
    _write(unpaired / "masks" / "a.jpg")
    one_line_error(bench("run", "--spec", tiny_spec, "--datasets", f"kvasir-seg:{unpaired}"), "mask")

    mismatch = tmp_path / "mismatch"
    _write(mismatch / "images" / "a.jpg", size=(40, 32))
    _write(mismatch / "masks" / "a.jpg", size=(20, 16), color=255)
    _write(mismatch / "images" / "b.jpg")
    _write(mismatch / "masks" / "b.jpg", color=255)
    one_line_error(bench("run", "--spec", tiny_spec, "--datasets", f"kvasir-seg:{mismatch}"), "20×16", "40×32")


def test_corrupt_image_is_named(tiny_spec, tmp_path, shared_data):
    root = tmp_path / "Kvasir-SEG"
    shutil.copytree(shared_data / "Kvasir-SEG", root)
    victim = sorted((root / "images").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    one_line_error(bench("run", "--spec", tiny_spec, "--datasets", f"kvasir-seg:{root}"), victim.name)
    one_line_error(bench("datasets", str(root)), victim.name)


def test_other_spec_in_the_same_folder_is_refused(tiny_spec, tmp_path):
    out = tmp_path / "run"
    assert bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--no-report",
                 "--methods", "scratch").exit_code == 0
    one_line_error(bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--seeds", "1"),
                   "different spec", "--force-new")
    forced = bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--no-report", "--seeds", "1",
                   "--methods", "scratch", "--force-new")
    assert forced.exit_code == 0, forced.output
    assert len(list((out / "cells").glob("*.json"))) == 4, "records of the old spec are kept"


def test_methods_and_datasets_listings():
    listing = bench("methods")
    assert listing.exit_code == 0
    for name in ("scratch", "imagenet", "byol"):
        assert name in listing.output
    assert "Grill" in listing.output
    datasets = bench("datasets")
    assert datasets.exit_code == 0 and "synthetic-polyp" in datasets.output and "kvasir-seg" in datasets.output


def test_datasets_inspects_real_excerpt(shared_data):
    result = bench("datasets", str(shared_data / "CVC-ColonDB"))
    assert result.exit_code == 0, result.output
    assert "cvc-colondb" in result.output and "8" in result.output


def test_report_on_a_csv(tmp_path, shared_data):
    result = bench("report", shared_data / "demsar2006_table6.csv", "--metric", "auc", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    ranks = pd.read_csv(tmp_path / "r" / "ranks.csv")
    assert ranks.set_index("method").loc["C4.5+m+cf", "avg_rank"] == pytest.approx(1.929, abs=1e-3)


def test_status_and_diagnose_after_a_run(tiny_spec, tmp_path):
    out = tmp_path / "run"
    assert bench("run", "--spec", tiny_spec, "--out", out, "--no-progress", "--no-report",
                 "--fractions", "0.5").exit_code == 0
    status = bench("status", out)
    assert status.exit_code == 0, status.output
    assert "byol" in status.output and "done 1" in status.output  # one pretrain job done
    result = bench("diagnose", out, "--max-pixels", "200", "--max-images", "4")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "diagnostics" / "diagnostics.csv")
    assert set(table["method"]) == {"scratch", "byol"}
    assert table["effective_rank"].notna().all()
    one_line_error(bench("status", tmp_path / "nothing"), "not a run folder")


def test_speed_writes_records(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    result = bench("speed", "--methods", "byol", "--size", "32", "--batch-size", "4", "--windows", "1", "--warmup",
                   "1", "--steps", "1", "--precision", "fp32", "--reference-workers", "0", "--device", "cpu",
                   "--out", tmp_path)
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "speed.json").read_text())
    assert {r["phase"] for r in records} == {"pretrain", "finetune", "reference"}
    for r in records:
        assert r["images_per_s"] > 0 and r["batch_size"] == 4 and r["size"] == 32 and r["device"] == "cpu"


def _metrics(out: Path) -> dict:
    table = pd.read_csv(out / "results.csv")
    assert set(table["status"]) == {"ok"}, table[["cell_id", "error"]]
    return {row.cell_id: (row.miou, row.dice, row.hd95) for row in table.itertuples()}


def test_workers_and_submitit_local_equal_the_sequential_run(tiny_spec, tmp_path):
    args = ["--spec", tiny_spec, "--no-progress", "--no-report", "--fractions", "0.5"]
    assert bench("run", *args, "--out", tmp_path / "seq").exit_code == 0
    parallel = bench("run", *args, "--out", tmp_path / "par", "--workers", "2")
    assert parallel.exit_code == 0, parallel.output
    assert _metrics(tmp_path / "par") == _metrics(tmp_path / "seq")
    local = bench("run", *args, "--out", tmp_path / "sub", "--executor", "submitit-local")
    assert local.exit_code == 0, local.output
    assert _metrics(tmp_path / "sub") == _metrics(tmp_path / "seq")
    # a failed task is resubmitted by a rerun: drop one record and mark it failed, rerun, it comes back ok
    cell = next((tmp_path / "sub" / "cells").glob("byol*.json"))
    record = json.loads(cell.read_text())
    cell.write_text(json.dumps({**record, "status": "failed", "error": "node died"}))
    again = bench("run", *args, "--out", tmp_path / "sub", "--executor", "submitit-local")
    assert again.exit_code == 0, again.output
    assert json.loads(cell.read_text())["status"] == "ok"
    assert _metrics(tmp_path / "sub") == _metrics(tmp_path / "seq")


def test_every_registered_method_runs_inside_bench_run(tiny_spec, tmp_path):
    """``--methods all`` (every registered method; imagenet only when its weights are cached) plus a
    modifier and an override: every cell ends ok."""
    from bench.methods import method_names

    result = bench("run", "--spec", tiny_spec, "--out", tmp_path / "all", "--no-progress", "--no-report",
                   "--fractions", "0.5", "--methods", "all,byol+disp,meanflow:domain=image")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "all" / "results.csv")
    expected = {m for m in method_names() if m not in ("imagenet", "external")}
    expected |= {"byol+disp", "meanflow[domain=image]"}
    assert expected <= set(table["method"]) and set(table["status"]) == {"ok"}, table[["method", "error"]]


def test_compile_flag_compiles_backbone_and_model(tiny_spec, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    result = bench("run", "--spec", tiny_spec, "--out", tmp_path / "c", "--no-progress", "--no-report",
                   "--fractions", "0.5", "--compile")
    assert result.exit_code == 0, result.output
    assert "SegmentationModel" in compiled and len(compiled) == 3  # 1 backbone (byol) + 2 finetune models
    record = json.loads(next((tmp_path / "c" / "cells").glob("*.json")).read_text())
    assert record["compiled"] is True


def test_help_version_and_flags_without_a_type():
    alone = bench()
    assert "Usage" in alone.output and "run" in alone.output and "--install-completion" in alone.output
    version = bench("--version")
    assert version.exit_code == 0 and version.output.strip().endswith(__import__("bench").__version__)
    for command in ("run", "report", "speed"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "--no-progress" in text or "--lower-is-better" in text or "--compile" in text, text
        assert "<bool>" not in text and "<str>" in text, text


def test_set_changes_any_field_and_is_validated(tiny_spec):
    from bench.cli import build_spec

    spec = build_spec(tiny_spec, None, {"seeds": "3"}, ["pretrain.steps=7", "finetune.lr=1e-4", "eval=resized"])
    assert spec.pretrain.steps == 7 and spec.finetune.lr == 1e-4 and spec.eval == "resized" and spec.seeds == (3,)
    one_line_error(bench("run", "--spec", tiny_spec, "--set", "pretrain.stepz=3"), "pretrain.stepz", "steps")
    one_line_error(bench("run", "--spec", tiny_spec, "--set", "eval=native-ish"), "eval")


def test_auto_workers_resolve_from_the_grid_the_device_and_the_cores(tiny_spec, monkeypatch):
    """``--workers auto`` (the default): one process per usable core on a CPU, never more than the grid's
    items, one when threads are asked for or the executor is SLURM's."""
    from bench import cli, runtime
    from bench.grid import build_grid
    from bench.spec import load_spec

    spec = load_spec(Path(tiny_spec))
    items = len(build_grid(spec).jobs) + len(build_grid(spec).cells)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 64)
    assert cli._workers(spec, "auto", "cpu", "local") == min(runtime.MAX_AUTO_WORKERS, items)
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert cli._workers(spec, "auto", "cpu", "local") == 2
    assert cli._workers(spec, "auto", "cpu", "slurm") == 1
    assert cli._workers(spec.replace(threads=2), "auto", "cpu", "local") == 1
    assert cli._workers(spec, "3", "cpu", "local") == 3
