"""Encoders out: ``bench export`` renames a run's pretrained backbone for timm, torchvision and
segmentation_models_pytorch; each target loads it with only its classifier missing and computes the
harness backbone's features; the card describes where the weights came from."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from bench.checkpoints import read_encoder
from bench.cli import app
from bench.errors import BenchError
from bench.export import convert
from bench.grid import build_grid, config_hash
from bench.models import create_backbone
from bench.spec import spec_from_dict
from bench.store import Store, write_json

TINY = """
name: tiny-export
methods: [scratch, byol]
datasets:
  - {ref: synthetic-polyp, n: 16}
fractions: [0.5]
seeds: [0, 1]
backbone: resnet18
init: scratch
pretrain: {size: 32, steps: 2, batch_size: 4, optimizer: sgd, lr: 0.01}
finetune: {size: 32, steps: 1, batch_size: 2, optimizer: adamw, lr: 0.001}
precision: fp32
"""


def bench(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    """A real tiny run: byol pretrained for 2 steps, two fine-tuning seeds."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENCH_CACHE", str(root / "cache"))
        (root / "tiny.yaml").write_text(TINY)
        result = bench("run", "--spec", root / "tiny.yaml", "--out", root / "run", "--no-progress", "--no-report")
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def convnext_run(tmp_path_factory) -> Path:
    """A run folder holding a finished convnext_tiny pretraining (weights drawn here, stored by the Store)."""
    root = tmp_path_factory.mktemp("convnext") / "run"
    spec = spec_from_dict({"name": "convnext", "methods": ["byol"], "datasets": ["synthetic-polyp"],
                           "fractions": [0.5], "seeds": [0], "backbone": "convnext_tiny", "precision": "fp32"})
    job = build_grid(spec).jobs[0]
    torch.manual_seed(0)
    backbone = create_backbone("convnext_tiny")
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(torch.randn_like(param) * 0.02)  # layer scales far from their 1e-6 init
    store = Store(root)
    write_json(root / "spec.json", json.loads(json.dumps(spec.to_dict(), default=str)))
    store.save_checkpoint(job.id, {"backbone": backbone.state_dict()})
    store.mark_job(job.id, {**job.config, "result": {"steps": 7, "seconds": 1.0}, "versions": {"torch": "x"}})
    return root


def target_features(fmt: str, backbone: str, path: Path, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Load the exported file into the target library's model; its last feature map and missing keys."""
    state = load_file(str(path))
    if fmt == "timm":
        model = timm.create_model(backbone).eval()
        missing = model.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys
        return model.forward_features(x), missing.missing_keys
    if fmt == "torchvision":
        model = torchvision.models.get_model(backbone, weights=None).eval()
        missing = model.load_state_dict(state, strict=False)
        assert not missing.unexpected_keys
        body = model.features if backbone.startswith("convnext") else nn.Sequential(*list(model.children())[:-2])
        return body(x), missing.missing_keys
    smp = pytest.importorskip("segmentation_models_pytorch")
    name = backbone if backbone == "resnet18" else f"tu-{backbone}"
    encoder = smp.Unet(name, encoder_weights=None).encoder.eval()
    nn.Module.load_state_dict(encoder, state, strict=True)  # smp's encoders have no classifier at all
    return encoder(x)[-1], []


def harness_backbone(run: Path, backbone: str) -> nn.Module:
    model = create_backbone(backbone).eval()
    job = next((run / "pretrain").iterdir())
    model.load_state_dict(torch.load(job / "backbone.pt", weights_only=True)["backbone"], strict=True)
    return model


CLASSIFIER = {"timm": ("fc.", "head."), "torchvision": ("fc.", "classifier."), "smp": ()}


@pytest.mark.parametrize("fmt", ["timm", "torchvision", "smp"])
@pytest.mark.parametrize("which", ["resnet_run", "convnext_run"])
def test_exported_backbone_loads_into_each_target_with_the_same_features(which, fmt, request, tmp_path):
    run = request.getfixturevalue(which)
    backbone = "resnet18" if which == "resnet_run" else "convnext_tiny"
    out = tmp_path / "encoder.safetensors"
    result = bench("export", run, "--method", "byol", "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    card = json.loads(out.with_suffix(".json").read_text())
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, missing = target_features(fmt, backbone, out, x)
        expected = harness_backbone(run, backbone)(x)[-1]
    torch.testing.assert_close(features, expected)
    assert missing and all(k.startswith(CLASSIFIER[fmt]) for k in missing) if fmt != "smp" else not missing
    assert sorted(missing) == sorted(card["missing_keys_on_load"])
    # and the exported file comes back into the harness tensor for tensor (a ckpt: row of it)
    state, _ = read_encoder(out, backbone)
    reference = harness_backbone(run, backbone).state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_card_says_where_the_weights_come_from(resnet_run, tmp_path):
    out = tmp_path / "byol.safetensors"
    assert bench("export", resnet_run, "--method", "byol", "--out", out).exit_code == 0
    card = json.loads(out.with_suffix(".json").read_text())
    spec = spec_from_dict(json.loads((resnet_run / "spec.json").read_text()))
    job = next(j for j in build_grid(spec).jobs if j.method.label == "byol")
    assert card["method"] == "byol" and card["backbone"] == "resnet18" and card["format"] == "timm"
    assert card["pretraining"]["job_id"] == job.id and card["pretraining"]["config_hash"] == config_hash(job.config)
    assert card["pretraining"]["steps"] == 2 and card["pretraining"]["schedule"]["size"] == 32
    assert card["pretraining"]["precision"] == "fp32" and card["pretraining"]["seed"] == job.seed
    assert card["pretraining"]["dataset"] == "synthetic-polyp" and card["versions"]["torch"] == torch.__version__
    results = pd.read_csv(resnet_run / "results.csv")
    byol = results[results["method"] == "byol"]
    (score,) = card["finetune_scores"]
    assert score["seeds"] == 2 and score["fraction"] == 0.5 and score["freeze"] == "none"
    assert score["miou"]["mean"] == pytest.approx(byol["miou"].mean())
    assert score["miou"]["std"] == pytest.approx(byol["miou"].std())
    assert card["missing_keys_on_load"] == ["fc.bias", "fc.weight"] and "timm.create_model" in card["load"]


@pytest.mark.parametrize(("args", "words"), [
    (["--method", "scratch"], ["no pretraining"]),
    (["--method", "simclr"], ["no method 'simclr'", "byol"]),
    (["--method", "byol", "--format", "onnx"], ["--format", "timm, torchvision, smp"]),
    (["--method", "byol", "--out", "encoder.bin"], [".safetensors"]),
])
def test_export_refuses_in_one_line(args, words, resnet_run, tmp_path):
    result = bench("export", resnet_run, *args)
    assert result.exit_code == 2, result.output
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error:")
    for word in words:
        assert word in error


def test_export_outside_a_run_folder_says_what_status_says(tmp_path):
    """A missing folder, or one without spec.json: the same one-line error (exit 2) as ``bench status``."""
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "absent", tmp_path / "empty"):
        exported, status = bench("export", folder, "--method", "byol"), bench("status", folder)
        assert exported.exit_code == status.exit_code == 2, exported.output
        error = exported.stderr.strip()
        assert len(error.splitlines()) == 1 and "is not a run folder" in error and "Traceback" not in exported.output
        assert error == status.stderr.strip()
    assert not (tmp_path / "absent").exists()


def test_no_torchvision_twin_is_refused():
    state = create_backbone("efficientnet_b0").state_dict()
    with pytest.raises(BenchError, match="torchvision has no efficientnet_b0 twin"):
        convert(state, "efficientnet_b0", "torchvision")
    assert set(convert(state, "efficientnet_b0", "smp").state) == {f"model.{k}" for k in state}


def test_card_scores_keep_the_two_protocols_apart(tmp_path):
    from bench.export import finetune_scores

    rows = [{"method": "byol", "status": "ok", "dataset": "d", "fraction": 0.1, "seed": s, "freeze": f,
             "miou": 0.5 if f == "none" else 0.3} for s in (0, 1) for f in ("none", "backbone")]
    csv = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    scores = {s["freeze"]: s for s in finetune_scores(csv, "byol")}
    assert set(scores) == {"none", "backbone"} and all(s["seeds"] == 2 for s in scores.values())
    assert scores["none"]["miou"]["mean"] == 0.5 and scores["backbone"]["miou"]["mean"] == 0.3
