"""Spec → grid expansion, config hashing and checkpoint reuse, the store's atomic records, and the
claims that let concurrent processes share a run folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.errors import BenchError
from bench.grid import build_grid, config_hash
from bench.spec import BenchmarkSpec, DatasetEntry, Schedule, load_spec, spec_from_dict
from bench.store import Store, write_json


def spec(**changes) -> BenchmarkSpec:
    base = BenchmarkSpec(name="t", methods=("scratch", "byol"), datasets=(DatasetEntry("synthetic-polyp", 16),),
                         fractions=(0.05, 0.1), seeds=(0, 1, 2))
    return base.replace(**changes)


def test_one_pretrain_job_serves_every_fraction_and_seed():
    grid = build_grid(spec())
    assert len(grid.jobs) == 1  # byol once; scratch has none
    assert len(grid.cells) == 2 * 2 * 3
    byol_cells = [c for c in grid.cells if c.method.name == "byol"]
    assert {c.pretrain_id for c in byol_cells} == {grid.jobs[0].id}
    assert all(c.pretrain_id is None for c in grid.cells if c.method.name == "scratch")
    assert len({c.id for c in grid.cells}) == len(grid.cells)


def test_pretrain_per_seed_makes_one_job_per_seed():
    grid = build_grid(spec(pretrain_per_seed=True))
    assert len(grid.jobs) == 3


def test_datasets_sharing_a_pool_share_the_job():
    shared = spec(datasets=(DatasetEntry("a", pool="folder:/x"), DatasetEntry("b", pool="folder:/x")))
    assert len(build_grid(shared).jobs) == 1
    own = spec(datasets=(DatasetEntry("a"), DatasetEntry("b")))
    assert len(build_grid(own).jobs) == 2


def test_any_hyperparameter_change_changes_the_identity():
    base = build_grid(spec())
    other_method = build_grid(spec(methods=("scratch", "byol:momentum=0.996")))
    assert base.jobs[0].id != other_method.jobs[0].id
    other_schedule = build_grid(spec(pretrain=Schedule(lr=0.5)))
    assert base.jobs[0].id != other_schedule.jobs[0].id
    other_finetune = build_grid(spec(finetune=Schedule(steps=7)))
    assert base.jobs[0].id == other_finetune.jobs[0].id  # the checkpoint is reused ...
    assert {c.id for c in base.cells}.isdisjoint({c.id for c in other_finetune.cells})  # ... cells are new
    assert build_grid(spec()).jobs[0].id == base.jobs[0].id  # and identity is stable


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_skipped_methods_are_reported():
    grid = build_grid(spec(methods=("scratch", "imagenet")), skip={"imagenet": "no weights offline"})
    assert grid.left_out == (("imagenet", "no weights offline"),)
    assert {c.method.name for c in grid.cells} == {"scratch"}


def test_spec_validation_errors(tmp_path):
    with pytest.raises(BenchError, match="fractions\\[0\\]: 0.0 is out of range; accepts a number in \\(0, 1\\]"):
        spec_from_dict({"fractions": [0.0]})
    with pytest.raises(BenchError, match="accepts a number in \\(0, 1\\]"):
        spec_from_dict({"fractions": [1.5]})
    with pytest.raises(BenchError, match="unknown field"):
        spec_from_dict({"methodz": ["byol"]})
    with pytest.raises(BenchError, match="unknown method 'dicho'"):
        spec_from_dict({"methods": ["dicho"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [byol\n")
    with pytest.raises(BenchError, match="not valid YAML"):
        load_spec(bad)
    good = tmp_path / "mine.yaml"
    good.write_text("methods: [scratch]\ndatasets: [synthetic-gland]\npretrain: {steps: 3}\n")
    loaded = load_spec(good)
    assert loaded.name == "mine" and loaded.pretrain.steps == 3 and loaded.datasets[0].ref == "synthetic-gland"


def test_store_refuses_another_spec_unless_forced(tmp_path):
    store = Store(tmp_path / "run")
    store.bind_spec(spec().to_dict())
    store.bind_spec(spec().to_dict())  # same spec: fine (resume)
    with pytest.raises(BenchError, match="different spec.*--force-new"):
        store.bind_spec(spec(seeds=(0,)).to_dict())
    store.write_cell("c1", {"cell_id": "c1", "method": "m", "dataset": "d", "fraction": 0.1, "seed": 0,
                            "status": "ok", "metrics": {"miou": 0.5}})
    store.bind_spec(spec(seeds=(0,)).to_dict(), force_new=True)
    assert store.cell_done("c1"), "forcing a new spec must not destroy records"
    assert list((tmp_path / "run").glob("spec.previous-*.json"))


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_results_table_flattens_records(tmp_path):
    store = Store(tmp_path)
    store.write_cell("c1", {"cell_id": "c1", "method": "byol", "dataset": "d", "fraction": 0.1, "seed": 0,
                            "status": "ok", "metrics": {"miou": 0.5, "hd95": 3.0}, "cost": {"finetune_s": 2.0}})
    store.write_cell("c2", {"cell_id": "c2", "method": "byol", "dataset": "d", "fraction": 0.1, "seed": 1,
                            "status": "failed", "error": "loss became nan", "precision": "fp32"})
    store.write_cell("c3", {"cell_id": "c3", "method": "supervised", "dataset": "d", "fraction": 0.1, "seed": 0,
                            "status": "ok", "metrics": {"miou": 0.7}, "numerics": "bf16", "reference": "upper",
                            "eval": "native", "n_test": 4, "n_test_empty_gt": 1, "test_set": "kvasir", "seen": True})
    table = store.write_results()
    assert list(table["status"]) == ["ok", "failed", "ok"]
    assert table.loc[1, "precision_mode"] == "fp32" and table.loc[2, "precision_mode"] == "bf16"
    assert table.loc[2, "reference"] == "upper" and table.loc[2, "n_test_empty_gt"] == 1
    assert table.loc[2, "test_set"] == "kvasir" and pd.isna(table.loc[0, "test_set"])
    assert table.loc[0, "miou"] == 0.5 and table.loc[0, "finetune_s"] == 2.0
    assert table.loc[1, "error"] == "loss became nan"
    assert (tmp_path / "results.csv").is_file()


def test_method_lists_keep_override_commas():
    from bench.methods import split_method_list

    assert split_method_list("dicoh, byol:momentum=0.996,hidden_dim=512,cp2") == [
        "dicoh", "byol:momentum=0.996,hidden_dim=512", "cp2"]


# --- claims ------------------------------------------------------------------------------------

def test_claim_is_exclusive_and_always_released(tmp_path):
    a, b = Store(tmp_path), Store(tmp_path)
    with a.claim("cell-1") as mine:
        assert mine
        with b.claim("cell-1") as theirs:
            assert not theirs
        holder = json.loads((tmp_path / "claims" / "cell-1").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert set(b.in_flight()) == {"cell-1"}
    assert not (tmp_path / "claims" / "cell-1").exists() and b.in_flight() == {}
    with pytest.raises(RuntimeError), a.claim("cell-2"):
        raise RuntimeError("the work failed")
    assert list((tmp_path / "claims").iterdir()) == []


def _write_claim(path: Path, **holder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": "2024-05-01T12:00:00", "nonce": "n", **holder}))


def test_stale_claims_are_taken_over(tmp_path):
    path = tmp_path / "claims" / "job"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    _write_claim(path, pid=ended.pid, host=socket.gethostname())
    lines: list[str] = []
    store = Store(tmp_path, report=lines.append)
    assert store.in_flight() == {}
    store.wait_released("job")  # returns at once: its owner is gone
    with store.claim("job") as mine:
        assert mine
    assert lines == [f"claims/job: took over the stale claim of pid {ended.pid} on {socket.gethostname()} "
                     "(started 2024-05-01T12:00:00)"]
    _write_claim(path, pid=1, host="another-node")  # fresh heartbeat on another host: held
    with store.claim("job") as mine:
        assert not mine
    old = time.time() - 3600
    os.utime(path, (old, old))  # no heartbeat for an hour: stale
    with store.claim("job") as mine:
        assert mine
    _write_claim(path, pid=os.getpid(), host=socket.gethostname())  # this process's own leftover
    with store.claim("job") as mine:
        assert mine
    path.write_text("")  # unreadable, recent: someone is writing it
    with store.claim("job") as mine:
        assert not mine


def test_heartbeat_keeps_a_long_claim_fresh(tmp_path):
    store = Store(tmp_path, heartbeat_s=0.01)
    path = tmp_path / "claims" / "job"
    with store.claim("job"):
        os.utime(path, (0, 0))
        for _ in range(500):
            if path.stat().st_mtime > 0:
                break
            time.sleep(0.01)
        assert path.stat().st_mtime > 0


def test_wait_released_returns_when_the_holder_finishes(tmp_path):
    holder, waiter = Store(tmp_path), Store(tmp_path)
    held, done = threading.Event(), threading.Event()

    def hold():
        with holder.claim("cell"):
            held.set()
            done.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(30)
    threading.Timer(0.05, done.set).start()
    waiter.wait_released("cell", poll_s=0.01)
    assert not (tmp_path / "claims" / "cell").exists()
    thread.join()
