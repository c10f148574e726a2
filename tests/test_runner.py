"""The run layer below the CLI: what enters a job's and a cell's identity, the supervised control's one
job per dataset, the frozen-backbone probe, native-resolution evaluation, and a measured precision
choice that leaves the numbers as they are."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import protocol
from bench.datasets import NativeMasks
from bench.grid import build_grid
from bench.metrics import segmentation_metrics
from bench.protocol import FinetuneData, evaluate, finetune, pretrain
from bench.records import prediction_arrays
from bench.runner import DataCache, Runner
from bench.runtime import Runtime
from bench.spec import BenchmarkSpec, DatasetEntry, Schedule
from bench.store import Store

CPU = torch.device("cpu")
SMALL = dict(datasets=(DatasetEntry("synthetic-polyp", 20),), fractions=(0.5,), seeds=(0,), precision="fp32",
             pretrain=Schedule(size=32, steps=2, batch_size=4, optimizer="sgd", lr=0.01),
             finetune=Schedule(size=32, steps=2, batch_size=2))


def spec_of(**changes) -> BenchmarkSpec:
    return BenchmarkSpec(**{"methods": ("scratch", "byol"), **SMALL, **changes})


def ids(spec: BenchmarkSpec) -> tuple[list[str], list[str]]:
    grid = build_grid(spec)
    return [j.id for j in grid.jobs], [c.id for c in grid.cells]


def test_identity_has_protocol_eval_and_freeze_but_not_what_is_kept(monkeypatch):
    jobs, cells = ids(spec_of())
    for other in (spec_of(eval="resized"), spec_of(finetune=dataclasses.replace(SMALL["finetune"], freeze="backbone"))):
        assert ids(other)[0] == jobs and set(ids(other)[1]).isdisjoint(cells)
    for same in (spec_of(keep_predictions=5, keep_models=True, threads=1),
                 spec_of(pretrain=dataclasses.replace(SMALL["pretrain"], reg="disp", reg_weight=0.1))):
        assert ids(same) == (jobs, cells)  # fine-tuning-only fields of the pretrain schedule: not its identity
    monkeypatch.setattr("bench.grid.PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)
    newer = ids(spec_of())
    assert set(newer[0]).isdisjoint(jobs) and set(newer[1]).isdisjoint(cells)


def test_supervised_control_has_one_job_per_dataset_on_all_labels(tmp_path):
    spec = spec_of(methods=("supervised", "meanflow"), fractions=(0.25, 0.5), seeds=(0, 1))
    grid = build_grid(spec)
    supervised = [j for j in grid.jobs if j.method.name == "supervised"]
    meanflow = [j for j in grid.jobs if j.method.name == "meanflow"]
    assert len(supervised) == 1 and len(meanflow) == 4  # MeanFlow reads the cell's own labelled subset
    job = supervised[0]
    assert job.labels.all and job.labels.aligned and job.config["labels"]["seed"] is None
    cells = [c for c in grid.cells if c.method.name == "supervised"]
    assert len(cells) == 4 and {c.pretrain_id for c in cells} == {job.id}
    assert {c.reference for c in cells} == {"upper"} and {c.reference for c in grid.cells if c not in cells} == {None}
    runner = Runner(spec, tmp_path / "run", Runtime(CPU, "fp32"), cache_dir=tmp_path)
    train = runner.data.dataset(job.dataset, 32).train
    assert runner._pretrain_data(job).labelled.images.shape[0] == len(train)


def test_frozen_backbone_keeps_backbone_and_batchnorm_and_trains_the_head(tmp_path):
    frozen = dataclasses.replace(SMALL["finetune"], freeze="backbone")
    spec = spec_of(methods=("scratch",), finetune=frozen, keep_models=True)
    cell = build_grid(spec).cells[0]
    data = DataCache(spec, tmp_path).dataset(cell.dataset, 32)
    chosen = DataCache(spec, tmp_path).labelled(cell.dataset, 32, 0.5, 0)
    torch.manual_seed(cell.seed)
    initial = protocol.build_segmentation_model("resnet18", "scratch").state_dict()
    result = finetune(cell, FinetuneData(data.images, data.masks, data.ids, chosen, data.test), Runtime(CPU, "fp32"))
    backbone = {k: v for k, v in result.state.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, initial[k]) for k, v in backbone.items())  # running stats too
    head = [k for k in result.state if k.startswith("head.") and k.endswith("weight")]
    assert any(not torch.equal(result.state[k], initial[k]) for k in head)


class FixedLogits(nn.Module):
    """Logits +4 on the left half of the image, -4 elsewhere, whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], 1, *x.shape[-2:]), -4.0)
        logits[..., : x.shape[-1] // 2] = 4.0
        return logits


def test_native_evaluation_scores_against_the_original_masks():
    """One 8×8 working-size image whose original mask is 30×50: the native score is the upsampled
    prediction scored against that mask, and differs from the resized score."""
    original = np.zeros((30, 50), bool)
    original[:, :20] = True  # the true boundary at x = 20 of 50, not at the middle
    resized = np.zeros((1, 8, 8), np.uint8)
    resized[0, :, :3] = 1
    data = FinetuneData(np.zeros((1, 3, 8, 8), np.uint8), resized, ["a"], np.array([0]), np.array([0]),
                        NativeMasks.pack([original]))
    runtime = Runtime(CPU, "fp32")
    native, kept = evaluate(FixedLogits(), data, runtime, "fp32", native=True, keep=1)
    up = F.interpolate(FixedLogits()(torch.zeros(1, 3, 8, 8)), size=(30, 50), mode="bilinear", align_corners=False)
    expected = segmentation_metrics((up[0] > 0).numpy(), original[None])
    for key in ("iou", "dice", "precision", "recall", "hd95"):
        np.testing.assert_allclose(native[key], expected[key])
    assert native["iou"][0] == pytest.approx(20 / 25) and kept[0].shape == (30, 50)
    at_working_size, _ = evaluate(FixedLogits(), data, runtime, "fp32", native=False)
    assert at_working_size["iou"][0] == pytest.approx(3 / 4) and at_working_size["hd95"][0] != native["hd95"][0]


def test_measured_precision_choice_leaves_the_results_unchanged(tmp_path, monkeypatch):
    """``auto`` on the CPU times fp32 and bf16 on a copy at the first pretraining and fine-tuning; a
    second run reads the cached choice. Both give the same weights and scores. (One timed call per
    candidate: what is tested is that the trial leaves no trace, not the timing.)"""
    from bench import runtime as runtime_module

    measure = runtime_module.measure_trial
    monkeypatch.setattr(runtime_module, "measure_trial",
                        lambda trial, candidates, device, batch=1: measure(trial, candidates, device, batch, 0, 1))
    spec = spec_of(precision="auto", pretrain=dataclasses.replace(SMALL["pretrain"], steps=1),
                   finetune=dataclasses.replace(SMALL["finetune"], steps=1))
    grid = build_grid(spec)
    job, cell = grid.jobs[0], next(c for c in grid.cells if c.pretrain_id)
    cache = DataCache(spec, tmp_path / "data")
    ds = cache.dataset(cell.dataset, 32)
    chosen = cache.labelled(cell.dataset, 32, 0.5, 0)
    outcomes = []
    for _ in range(2):
        runtime = Runtime(CPU, "auto", cache=tmp_path / "precision")
        state = pretrain(job, protocol.PretrainData(cache.pool(job.dataset, 32)), runtime).state
        metrics = finetune(cell, FinetuneData(ds.images, ds.masks, ds.ids, chosen, ds.test, init_state=state),
                           runtime).per_image
        outcomes.append((state, metrics, {d["source"] for d in runtime.decisions.values()}))
    (first, first_metrics, how_first), (second, second_metrics, how_second) = outcomes
    assert how_first == {"measured"} and how_second == {"cache"}
    assert all(torch.equal(first["backbone"][k], second["backbone"][k]) for k in first["backbone"])
    assert first_metrics == second_metrics


def test_prediction_arrays_round_trip_through_the_reports_reader(tmp_path):
    from bench.reports.predictions import read_predictions

    masks = [np.eye(5, dtype=bool), np.ones((3, 7), bool)]
    np.savez(tmp_path / "p.npz", **prediction_arrays(["a", "b"], masks, [0.5, 1.0]))
    read, iou = read_predictions(tmp_path / "p.npz")
    assert np.array_equal(read["a"], masks[0]) and np.array_equal(read["b"], masks[1]) and iou == {"a": 0.5, "b": 1.0}


def test_generalisation_protocol_writes_one_record_per_test_set(tmp_path):
    """Train on synthetic-polyp's training split, test on its test split (seen) and on all of
    synthetic-gland (unseen): one fine-tuning, one record and one results row per test set."""
    from bench.executors import run_benchmark

    spec = spec_of(methods=("scratch",), datasets=(), train=(DatasetEntry("synthetic-polyp", 20),),
                   test=(DatasetEntry("synthetic-polyp", 20), DatasetEntry("synthetic-gland", 20)),
                   finetune=dataclasses.replace(SMALL["finetune"], steps=1), keep_predictions=1)
    summary = run_benchmark(spec, tmp_path / "run", Runtime(CPU, "fp32"), cache_dir=tmp_path / "data")
    assert summary.ok and summary.ran == 1
    cell = build_grid(spec).cells[0]
    store = Store(tmp_path / "run")
    own = store.cell_record(cell.id)
    assert own["status"] == "ok" and set(own["test_sets"]) == {"synthetic-polyp", "synthetic-gland"}
    records = {name: store.cell_record(part) for name, part in own["test_sets"].items()}
    assert records["synthetic-polyp"]["seen"] is True and records["synthetic-gland"]["seen"] is False
    assert records["synthetic-polyp"]["n_test"] == 4 and records["synthetic-gland"]["n_test"] == 20
    assert all(r["train_set"] == "synthetic-polyp" and r["metrics"]["miou"] >= 0 for r in records.values())
    assert all((tmp_path / "run" / r["predictions"]).is_file() for r in records.values())
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert sorted(table["cell_id"]) == sorted(own["test_sets"].values())
    assert table.set_index("test_set")["seen"].to_dict() == {"synthetic-polyp": True, "synthetic-gland": False}
    assert set(table["protocol_version"]) == {protocol.PROTOCOL_VERSION} and set(table["eval"]) == {"native"}
    again = run_benchmark(spec, tmp_path / "run", Runtime(CPU, "fp32"), cache_dir=tmp_path / "data")
    assert again.ran == 0 and again.reused == 1


def test_run_json_gathers_the_precision_decisions_taken_in_worker_processes(tmp_path, monkeypatch):
    """With --workers the cells decide their number format in other processes: run.json, written by
    the main process, still records each decision (from the cells' records)."""
    import json

    from bench import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "measure_trial", lambda *a, **k: {"fp32": 40.0, "bf16": 20.0})
    spec = spec_of(methods=("scratch",), precision="auto")
    grid = build_grid(spec)
    worker = Runner(spec, tmp_path / "run", Runtime(CPU, "auto", cache=tmp_path / "p"), cache_dir=tmp_path / "d")
    worker.store.bind_spec(spec.to_dict())
    worker.run_cell(grid.cells[0])
    main = Runner(spec, tmp_path / "run", Runtime(CPU, "auto", cache=tmp_path / "p"), cache_dir=tmp_path / "d")
    assert main.runtime.decisions == {}
    main.finish(grid, [])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    (decision,) = run["runtime"]["precision_decisions"].values()
    assert decision["choice"] == "fp32" and decision["images_per_s"] == {"fp32": 40.0, "bf16": 20.0}
