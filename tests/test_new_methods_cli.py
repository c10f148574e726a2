"""The methods of issue 18 through the CLI: each runs inside ``bench run`` on a tiny grid (pretraining and a
fine-tuning cell), ``bench speed`` reports their images/s, ``bench methods`` lists the registry by family, and
the DiCoH presets name the paper's tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from bench.cli import app
from bench.methods import GROUPS, REGISTRY, method_groups, parse_method
from tests.conftest import TINY_SPEC

NEW = ["simclr", "simsiam", "barlowtwins", "vicreg", "vicregl", "dino", "simmim", "spark", "concl", "ca2cl"]
# the wide projectors (8192, 65536 prototypes) are narrowed to keep the CPU test short; the paper widths run in
# tests/test_cli.py's every-method test
SPECS = ["simclr", "simsiam:proj_dim=256", "barlowtwins:proj_dim=256", "vicreg:proj_dim=256",
         "vicregl:proj_dim=256,maps_dim=64", "dino:out_dim=1024,local_crops=2", "simmim", "spark:decoder_width=128",
         "concl:warmup=0.0", "ca2cl"]

TINY = TINY_SPEC.replace("name: tiny\nmethods: [scratch, byol]", "name: tiny-new\nmethods: [scratch]")
PRESETS = Path(__file__).resolve().parents[1] / "benchmarks"
runner = CliRunner()


def bench(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny_spec(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_every_new_method_runs_inside_bench_run(tiny_spec, tmp_path):
    assert [s.split(":")[0] for s in SPECS] == NEW
    result = bench("run", "--spec", tiny_spec, "--out", tmp_path / "run", "--no-progress", "--no-report",
                   "--methods", ",".join(SPECS))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert len(table) == len(SPECS) and set(table["status"]) == {"ok"}, table[["method", "error"]]
    assert {m.split("[")[0] for m in table["method"]} == set(NEW)
    assert table["miou"].between(0, 1).all()


def test_bench_speed_reports_images_per_second(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    chosen = ["spark:decoder_width=64", "ca2cl"]  # the two with their own step mechanics (hooks, double forward)
    result = bench("speed", "--methods", ",".join(chosen), "--size", "32", "--batch-size", "4", "--warmup", "1",
                   "--windows", "1", "--steps", "1", "--no-reference", "--device", "cpu", "--precision", "fp32",
                   "--out", tmp_path)
    assert result.exit_code == 0, result.output
    records = [r for r in json.loads((tmp_path / "speed.json").read_text()) if r["phase"] == "pretrain"]
    assert {r["method"].split("[")[0] for r in records} == {"spark", "ca2cl"}
    assert all(r["images_per_s"] > 0 for r in records)


def test_bench_methods_lists_the_families():
    groups = method_groups()
    assert list(groups)[: len(GROUPS)] == [g for g in GROUPS if g in groups]  # the families in their order
    assert {"simclr", "ca2cl"} <= set(groups["global contrastive"])
    assert {"simsiam", "barlowtwins", "vicreg", "dino"} <= set(groups["global non-contrastive"])
    assert {"vicregl", "concl"} <= set(groups["dense contrastive"])
    assert {"simmim", "spark"} <= set(groups["masked modelling"])
    assert sorted(n for names in groups.values() for n in names) == sorted(REGISTRY)  # nobody dropped
    listing = bench("methods")
    assert listing.exit_code == 0, listing.output
    text = listing.output
    for group in ("global contrastive", "masked modelling"):
        assert group in text
    for name in NEW:
        assert name in text
    assert text.index("masked modelling") < text.index("simmim") < text.index("spark")


def test_dicoh_presets_name_the_papers_tables():
    paper = yaml.safe_load((PRESETS / "dicoh-paper.yaml").read_text())
    assert paper["methods"] == ["imagenet", "byol", "mocov2", "densecl", "pixpro", "cp2", "concl", "ca2cl", "dicoh"]
    mim = yaml.safe_load((PRESETS / "dicoh-mim.yaml").read_text())
    assert {"simmim", "spark"} <= set(mim["methods"])
    for key in ("backbone", "init", "pretrain", "finetune", "fractions", "seeds", "datasets"):
        assert mim[key] == paper[key]  # Table 12 runs on the paper's protocol
    for spec in paper["methods"] + mim["methods"]:
        assert parse_method(spec).name == spec
