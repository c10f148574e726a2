"""The run folder defends itself: checksums on checkpoints and records, claims shared by concurrent
processes, unreadable records treated as absent, one-line I/O errors, the user's umask, precision as
part of the folder's identity, and SIGTERM handled like Ctrl-C. Damaged files are made by the tests."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.errors import BenchError
from bench.files import checksum, load_weights, write_json
from bench.interrupt import Terminated, exit_code, terminate_as_interrupt
from bench.spec import BenchmarkSpec, DatasetEntry
from bench.store import Store
from tests.conftest import TINY_SPEC as TINY

JOB = "byol-0123456789"



def spec_dict(**changes) -> dict:
    spec = BenchmarkSpec(name="t", methods=("scratch", "byol"), datasets=(DatasetEntry("synthetic-polyp", 16),),
                         fractions=(0.1,), seeds=(0,), precision="fp32")
    return spec.replace(**changes).to_dict()


def bound(root: Path, lines: list[str] | None = None, **changes) -> Store:
    store = Store(root, report=None if lines is None else lines.append)
    store.bind_spec(spec_dict(**changes))
    return store


def record(cell_id: str, **extra) -> dict:
    return {"cell_id": cell_id, "method": "byol", "dataset": "d", "fraction": 0.1, "seed": 0, "status": "ok",
            "metrics": {"miou": 0.5}, **extra}


def finish_job(store: Store, job_id: str = JOB) -> str:
    digest = store.save_checkpoint(job_id, {"backbone": {"w": torch.arange(6.0)}})
    store.mark_job(job_id, {"kind": "pretrain"})
    return digest


# --- 1. checksums ---------------------------------------------------------------------------------

def test_checkpoint_carries_its_checksum_and_loads_verified(tmp_path):
    store = bound(tmp_path / "run")
    digest = finish_job(store)
    path = store.checkpoint(JOB)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads((path.parent / "DONE").read_text())["sha256"] == digest
    assert (path.parent / "backbone.pt.sha256").read_text() == f"{digest}  backbone.pt\n"
    assert Store(tmp_path / "run").job_done(JOB)
    assert torch.equal(store.load_checkpoint(JOB)["backbone"]["w"], torch.arange(6.0))


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign"])
def test_damaged_checkpoint_is_moved_aside_and_recomputed(tmp_path, damage):
    finish_job(bound(tmp_path / "run"))
    path = Store(tmp_path / "run").checkpoint(JOB)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid checkpoint, but not the one that was saved
        torch.save({"backbone": {"w": torch.zeros(6)}}, path)
    lines: list[str] = []
    rerun = Store(tmp_path / "run", report=lines.append)
    assert not rerun.job_done(JOB)
    assert lines == [f"pretrain/{JOB}/backbone.pt failed its checksum: moved aside as backbone.pt.corrupt, "
                     "recomputing"]
    assert (path.parent / "backbone.pt.corrupt").is_file() and not path.exists()
    assert not (path.parent / "DONE").exists()
    with pytest.raises(BenchError, match="no verified checkpoint; rerun bench run"):
        rerun.load_checkpoint(JOB)
    finish_job(rerun)  # the rerun recomputes it
    assert Store(tmp_path / "run").job_done(JOB)


def test_older_done_marker_is_verified_once_by_loading(tmp_path):
    store = bound(tmp_path / "run")
    finish_job(store)
    done = store.job_dir(JOB) / "DONE"
    done.write_text("2024-05-01T12:00:00")  # what older versions wrote
    assert Store(tmp_path / "run").job_done(JOB)
    assert json.loads(done.read_text())["sha256"] == hashlib.sha256(store.checkpoint(JOB).read_bytes()).hexdigest()
    done.write_text("2024-05-01T12:00:00")
    store.checkpoint(JOB).write_bytes(b"PK\x03\x04 not a zip")
    lines: list[str] = []
    assert not Store(tmp_path / "run", report=lines.append).job_done(JOB)
    assert "failed its checksum" in lines[0]


def test_unreadable_done_and_config_and_missing_checkpoint(tmp_path):
    store = bound(tmp_path / "run")
    finish_job(store)
    folder = store.job_dir(JOB)
    (folder / "config.json").write_bytes(b"\xff\xfe")
    lines: list[str] = []
    assert not Store(tmp_path / "run", report=lines.append).job_done(JOB)
    assert lines[0].startswith(f"pretrain/{JOB}/config.json is not a valid record (not UTF-8 text)")
    finish_job(store)
    (folder / "DONE").write_text("[]")
    assert not Store(tmp_path / "run").job_done(JOB)
    finish_job(store)
    store.checkpoint(JOB).unlink()
    lines.clear()
    assert not Store(tmp_path / "run", report=lines.append).job_done(JOB)
    assert "names a checkpoint that is missing" in lines[0]


def test_load_weights_names_the_file(tmp_path):
    bad = tmp_path / "enc.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(BenchError, match=f"checkpoint {re.escape(str(bad))} cannot be read"):
        load_weights(bad)
    torch.save([1, 2], bad)
    with pytest.raises(BenchError, match="not a state dict"):
        load_weights(bad)


def test_record_checksum_is_stable_and_catches_edits(tmp_path):
    store = bound(tmp_path / "run")
    store.write_cell("c1", record("c1", metrics={"miou": 0.123456789, "hd95": float("nan")}))
    written = json.loads(store.cell_path("c1").read_text())
    assert written["checksum"] == checksum(written)
    assert Store(tmp_path / "run").cell_done("c1")
    written["metrics"]["miou"] = 0.9  # a hand edit
    store.cell_path("c1").write_text(json.dumps(written))
    lines: list[str] = []
    assert Store(tmp_path / "run", report=lines.append).cell_record("c1") is None
    assert "its checksum does not match its content" in lines[0]


# --- 3. unreadable records ------------------------------------------------------------------------

@pytest.mark.parametrize("content, why", [
    (b"\xff\xfe{\"status\": \"ok\"}", "not UTF-8 text"),
    (b'{"status": "ok"}', "missing or wrong cell_id, method, dataset, fraction, seed"),
    (b"[]", "a JSON list, not an object"),
    (b'{"cell_id": "c1", ', "not valid JSON"),
    (json.dumps(record("c2")).encode(), "it belongs to cell c2"),
    (json.dumps(record("c1", status="done")).encode(), "unknown status 'done'"),
])
def test_invalid_cell_records_count_as_absent(tmp_path, content, why):
    store = bound(tmp_path / "run")
    store.write_cell("c1", record("c1"))
    store.cell_path("c1").write_bytes(content)
    lines: list[str] = []
    rerun = Store(tmp_path / "run", report=lines.append)
    assert rerun.results_table().empty  # no traceback, the bad record is left out
    assert not rerun.cell_done("c1") and rerun.cell_record("c1") is None
    assert len(lines) == 1 and lines[0].startswith(f"cells/c1.json is not a valid record ({why}")
    assert lines[0].endswith("moved aside as c1.json.corrupt, recomputing")
    assert (tmp_path / "run" / "cells" / "c1.json.corrupt").read_bytes() == content


def test_corrupt_spec_json_counts_as_absent(tmp_path):
    bound(tmp_path / "run")
    (tmp_path / "run" / "spec.json").write_bytes(b"\x00\xff garbage")
    lines: list[str] = []
    store = Store(tmp_path / "run", report=lines.append)
    assert store.read_spec() is None and lines == []  # reading (bench status) changes nothing
    store.bind_spec(spec_dict())  # a run binds the folder anew
    assert lines == ["spec.json is unreadable (not UTF-8 text): moved aside as spec.json.corrupt, the folder takes "
                     "this run's spec"]
    assert store.read_spec()["name"] == "t"


# --- 7. I/O errors ------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "cells" / "c1.json"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(BenchError, match=f"cannot write {re.escape(str(target))}: No space left on device; "
                                         "free some space or pass another --out"):
        write_json(target, {"x": 1})
    assert list((tmp_path / "cells").iterdir()) == []


def test_checkpoint_write_failure_is_one_line(tmp_path, monkeypatch):
    store = Store(tmp_path)

    def failing(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(BenchError, match=f"cannot write {re.escape(str(store.checkpoint(JOB)))}"):
        store.save_checkpoint(JOB, {"backbone": {}})
    assert list(store.job_dir(JOB).iterdir()) == []


def test_read_only_folder_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(BenchError, match="Read-only file system; pass a writable folder as --out"):
        Store(tmp_path / "run").bind_spec(spec_dict())


def test_out_that_is_a_file(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    with pytest.raises(BenchError, match=f"cannot create the folder {re.escape(str(out))}: .*not a folder"):
        Store(out).bind_spec(spec_dict())
    with pytest.raises(BenchError, match="a part of the path is a file"):
        Store(out / "run").bind_spec(spec_dict())
    assert out.read_text() == "not a folder"


# --- 9. the user's umask ----------------------------------------------------------------------------

def test_records_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        store = bound(tmp_path / "run")
        store.write_cell("c1", record("c1"))
        finish_job(store)
        for path in (store.cell_path("c1"), store.checkpoint(JOB), tmp_path / "run" / "spec.json"):
            assert path.stat().st_mode & 0o777 == 0o640, path
    finally:
        os.umask(old)


# --- 11. precision is part of the identity ---------------------------------------------------------

def test_precision_is_part_of_the_folder_identity(tmp_path):
    store = bound(tmp_path / "run", precision="fp32")
    store.write_cell("c1", record("c1", precision="fp32"))
    finish_job(store)
    assert json.loads(store.cell_path("c1").read_text())["precision_requested"] == "fp32"
    for asked in ("bf16", "auto"):
        with pytest.raises(BenchError, match="different spec .*differs in: precision"):
            bound(tmp_path / "run", precision=asked)
    lines: list[str] = []
    forced = Store(tmp_path / "run", report=lines.append)
    forced.bind_spec(spec_dict(precision="bf16"), force_new=True)
    assert not forced.cell_done("c1") and not forced.job_done(JOB)  # never reused across precisions
    assert "cells/c1.json was computed for precision fp32, the spec asks bf16: recomputing" in lines
    assert store.cell_path("c1").is_file(), "not corrupt: kept until recomputed"


def test_older_spec_json_without_new_fields_is_the_same_spec(tmp_path):
    old = spec_dict()
    for key in ("eval", "train", "test", "keep_predictions", "keep_models", "threads"):
        del old[key]
    del old["finetune"]["freeze"]
    write_json(tmp_path / "run" / "spec.json", old)
    Store(tmp_path / "run").bind_spec(spec_dict(keep_predictions=0, threads=2))  # not refused


# --- 8. SIGTERM -----------------------------------------------------------------------------------

def test_sigterm_becomes_an_interrupt_with_exit_code_143():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info, terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert isinstance(info.value, KeyboardInterrupt) and exit_code(info.value) == 143
    assert exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before


# --- end to end -----------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def bench(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error:") and "Traceback" not in result.output
    for word in words:
        assert word in error, error


def test_cli_rejects_duplicates_bad_values_and_a_file_as_out(tiny, tmp_path):
    one_line_error(bench("run", "--spec", tiny, "--seeds", "0,0"), "seeds: 0 is listed twice")
    one_line_error(bench("run", "--spec", tiny, "--methods", "byol,byol"), "'byol' is listed twice")
    one_line_error(bench("run", "--spec", tiny, "--backbone", "resnet5"), "resnet50")
    one_line_error(bench("run", "--spec", tiny, "--init", "imagenet21k"), "init: 'imagenet21k'")
    one_line_error(bench("run", "--spec", tiny, "--methods", "byol:momentum=-5"), "momentum=-5 is out of range")
    one_line_error(bench("run", "--spec", tiny, "--seeds", "-1"), "seeds[0]")
    fresh = tmp_path / "never-written"
    one_line_error(bench("run", "--spec", tiny, "--out", fresh, "--set", "finetune.lr=fast"), "finetune.lr: 'fast'")
    missing_init = tmp_path / "init.yaml"
    missing_init.write_text(TINY.replace("init: scratch", f"init: {tmp_path / 'gone.pt'}"))
    one_line_error(bench("run", "--spec", missing_init, "--out", fresh), "init:", "gone.pt")
    assert not fresh.exists(), "a refused spec writes nothing"
    out = tmp_path / "file"
    out.write_text("x")
    one_line_error(bench("run", "--spec", tiny, "--out", out, "--no-progress"), str(out), "not a folder")
    assert out.read_text() == "x"


def test_damaged_run_folder_is_repaired_by_a_rerun(tiny, tmp_path):
    out = tmp_path / "run"
    assert bench("run", "--spec", tiny, "--out", out, "--no-progress", "--no-report").exit_code == 0
    checkpoint = next((out / "pretrain").iterdir()) / "backbone.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    byol, scratch = sorted((out / "cells").glob("*.json"))
    byol.write_bytes(b"\xff\xfe\x00")
    scratch.write_text('{"status": "ok"}')
    status = bench("status", out)
    assert status.exit_code == 0 and "Traceback" not in status.output, status.output
    notes = " ".join(status.stderr.split())
    assert "backbone.pt failed its checksum" in notes and notes.count("not a valid record") == 2, notes
    again = bench("run", "--spec", tiny, "--out", out, "--no-progress", "--no-report")
    assert again.exit_code == 0, again.output
    assert "2 ran, 1 reused" not in again.output and "3 ran, 0 reused" in again.output
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 and set(table["status"]) == {"ok"}
    (out / "spec.json").write_text("[]")
    one_line_error(bench("status", out), "no readable spec.json")
    third = bench("run", "--spec", tiny, "--out", out, "--no-progress", "--no-report")
    assert third.exit_code == 0 and "0 ran, 3 reused" in third.output, third.output
    assert "spec.json is unreadable" in " ".join(third.output.split())


def test_cli_precision_change_is_another_spec(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--spec", tiny, "--out", out, "--no-progress", "--no-report", "--methods", "scratch"]
    assert bench(*args).exit_code == 0
    one_line_error(bench(*args, "--precision", "bf16"), "differs in: precision", "--force-new")
    forced = bench(*args, "--precision", "bf16", "--force-new")
    assert forced.exit_code == 0 and "1 ran, 0 reused" in forced.output, forced.output
    record = json.loads(next((out / "cells").glob("*.json")).read_text())
    assert record["precision_requested"] == "bf16" and record["numerics"] == "bf16"  # asked, and resolved


ROOT = Path(__file__).resolve().parents[1]


def _command(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bench", "run", "--spec", str(spec), "--out", str(out), "--no-progress",
            "--no-report"]


def _bench_process(spec: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(_command(spec, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "BENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_processes_share_the_work(tiny, tmp_path):
    spec = tmp_path / "two.yaml"
    spec.write_text(TINY.replace("fractions: [0.5]", "fractions: [0.1, 0.5]"))
    out = tmp_path / "run"
    processes = [_bench_process(spec, out, _env(tmp_path)) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stdout + stderr
    ran = [int(re.search(r"(\d+) ran, (\d+) reused", stdout).group(1)) for stdout, _ in outputs]
    assert sum(ran) == 5, outputs  # 1 pretraining + 4 cells, each computed exactly once
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok"}
    assert not list((out / "claims").iterdir()) and not list(out.rglob("*.corrupt"))


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_the_rerun_resumes(tmp_path):
    spec = tmp_path / "slow.yaml"
    spec.write_text(TINY.replace("fractions: [0.5]", "fractions: [0.1, 0.5]").replace("steps: 2, batch_size: 2",
                                                                                       "steps: 8, batch_size: 2"))
    out = tmp_path / "run"
    process = _bench_process(spec, out, _env(tmp_path))
    deadline = time.time() + 600
    while not list((out / "cells").glob("*.json")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before a SIGTERM could be sent"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stdout + stderr
    assert stderr.strip().splitlines()[-1].startswith("terminated (SIGTERM): finished cells are kept in results.csv")
    assert "Traceback" not in stderr
    assert not list((out / "claims").iterdir()), "no stale claim"
    kept = pd.read_csv(out / "results.csv")
    assert 1 <= len(kept) < 4
    again = subprocess.run(_command(spec, out), capture_output=True, text=True, env=_env(tmp_path), timeout=900,
                           cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    reused = int(re.search(r"(\d+) ran, (\d+) reused", again.stdout).group(2))
    assert reused >= len(kept)
    assert len(pd.read_csv(out / "results.csv")) == 4
