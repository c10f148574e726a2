"""Encoder checkpoints in: every supported layout maps onto the harness backbone tensor for tensor,
incomplete or foreign checkpoints are refused in one line, and external encoders run as benchmark rows."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import bench
from bench import protocol
from bench.checkpoints import backbone_for_init, external_init, file_sha256, load_init, load_into, read_encoder
from bench.cli import app
from bench.errors import BenchError
from bench.grid import build_grid
from bench.methods import parse_method, split_method_list
from bench.models import create_backbone
from bench.spec import spec_from_dict


@pytest.fixture(scope="module")
def resnet() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict with non-default BatchNorm statistics."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_()
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    return model.state_dict()


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}


def assert_is_resnet(state: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """The harness state equals the torchvision tensors (same names for ResNet), nothing random."""
    expected = create_backbone("resnet18").state_dict()
    assert set(state) == set(expected)
    for key in expected:
        assert torch.equal(state[key], source[key]), key


def torchvision_file(state):
    return state


def solo_learn(state):
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}  # solo-learn sets fc = Identity
    return {"state_dict": {**{f"backbone.{k}": v for k, v in backbone.items()},
                           **{f"momentum_backbone.{k}": v for k, v in perturbed(backbone).items()},
                           "projector.0.weight": torch.randn(64, 512), "classifier.weight": torch.randn(10, 512)}}


def moco_official(state):
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return {"epoch": 200, "arch": "resnet18", "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in body.items()},
        **{f"module.encoder_k.{k}": v for k, v in perturbed(body).items()},
        "module.encoder_q.fc.0.weight": torch.randn(32, 512), "module.encoder_q.fc.2.weight": torch.randn(8, 32),
        "module.queue": torch.randn(8, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(3)}}, "param_groups": [{"lr": 0.03}]}}


def mmselfsup(state):
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return {"meta": {"epoch": 200, "mmengine_version": "0.10"}, "state_dict": {
        **{f"backbone.{k}": v for k, v in body.items()},
        **{f"momentum_encoder.module.0.{k}": v for k, v in perturbed(body).items()},
        "neck.mlp.0.weight": torch.randn(64, 512), "head.predictor.0.weight": torch.randn(64, 64)}}


def pixpro_official(state):
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return {"opt": argparse.Namespace(arch="resnet18", lr=1.0), "epoch": 100, "model": {
        **{f"module.encoder.{k}": v for k, v in body.items()},
        **{f"module.encoder_k.{k}": v for k, v in perturbed(body).items()},
        "module.projector.linear1.weight": torch.randn(64, 512)}}


def lightly_example(state):
    """lightly's examples: backbone = nn.Sequential(*list(resnet.children())[:-1]) + a momentum copy."""
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(state)
    sequential = nn.Sequential(*list(model.children())[:-1]).state_dict()
    return {**{f"backbone.{k}": v for k, v in sequential.items()},
            **{f"backbone_momentum.{k}": v for k, v in perturbed(sequential).items()},
            "projection_head.layers.0.weight": torch.randn(64, 512)}


@pytest.mark.parametrize("layout", [torchvision_file, solo_learn, moco_official, mmselfsup, pixpro_official,
                                    lightly_example])
def test_every_layout_gives_the_online_encoder_exactly(layout, resnet, tmp_path):
    path = tmp_path / "encoder.pth"
    torch.save(layout(resnet), path)
    state, report = read_encoder(path, "resnet18")
    assert_is_resnet(state, resnet)  # the online encoder, not its perturbed momentum copy
    assert report.matched == report.total == 100  # resnet18: 100 tensors besides the BatchNorm counters
    assert "momentum" not in report.prefix and "_k" not in report.prefix


def test_report_counts_what_it_ignored(resnet, tmp_path):
    path = tmp_path / "moco.pth"
    torch.save(moco_official(resnet), path)
    _, report = read_encoder(path, "resnet18")
    assert report.prefix == "state_dict.module.encoder_q."
    assert report.ignored == {"momentum encoder": 120, "classifier/head": 2, "queue": 2, "optimizer state": 1}
    assert "100/100 resnet18 backbone tensors" in report.line() and "11.18M parameters" in report.line()


def test_init_file_and_diagnostics_use_the_same_loader(resnet, tmp_path):
    path = tmp_path / "torchvision.pth"
    torch.save(resnet, path)  # with fc.*: a strict load would refuse it
    backbone = create_backbone("resnet18", output_stride=16)
    assert load_into(backbone, path).matched == 100  # --init FILE of a pretraining
    assert_is_resnet(backbone.state_dict(), resnet)
    assert_is_resnet(backbone_for_init("resnet18", external_init(path, file_sha256(path))).state_dict(), resnet)


def test_safetensors_with_timm_names(resnet, tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.items() if not k.endswith("num_batches_tracked")}, str(path))
    state, report = read_encoder(path, "resnet18")
    assert_is_resnet(state, resnet)  # the counters absent from the file are 0, as in a fresh model
    assert report.filled == 20 and "BatchNorm counters" in report.line()


def test_torchvision_convnext_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_scale"):
                param.uniform_(0.5, 1.5)  # 1e-6 at init would hide a wrong block mapping
    path = tmp_path / "convnext.pth"
    torch.save({"model": model.state_dict()}, path)
    backbone = create_backbone("convnext_tiny").eval()
    state, report = read_encoder(path, "convnext_tiny")
    backbone.load_state_dict(state, strict=True)
    assert report.view == "torchvision" and report.ignored == {"classifier/head": 4}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone(x)[-1], model.features(x), atol=1e-5)


@pytest.mark.parametrize(("edit", "words"), [
    (lambda s: {k: v for k, v in s.items() if not k.startswith("layer4.1")}, ["90/100", "missing layer4.1", "partial"]),
    (lambda s: {**s, "conv1.weight": torch.randn(64, 3, 3, 3)}, ["conv1.weight", "shape"]),
    (lambda s: {**s, **{f"layer1.2.{k}": v for k, v in s.items() if k.startswith("layer1.0.")}},
     ["layer1.2", "another architecture"]),
    (lambda s: {f"projector.{i}.weight": torch.randn(4, 4) for i in range(3)}, ["no resnet18 backbone", "projector"]),
])
def test_incomplete_or_foreign_checkpoints_are_refused(edit, words, resnet, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save(edit(dict(resnet)), path)
    with pytest.raises(BenchError) as err:
        read_encoder(path, "resnet18")
    assert len(str(err.value).splitlines()) == 1
    for word in words:
        assert word in str(err.value)


class Opaque:
    pass


def test_unsafe_pickles_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {}, "config": Opaque()}, path)
    with pytest.raises(BenchError, match="weights-only load refuses"):
        read_encoder(path, "resnet18")
    with pytest.raises(BenchError, match="does not exist"):
        read_encoder(tmp_path / "absent.pth", "resnet18")


def test_corrupt_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(BenchError, match="is not a readable PyTorch checkpoint") as err:
        read_encoder(path, "resnet18")
    assert len(str(err.value).splitlines()) == 1 and str(path) in str(err.value)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(BenchError, match="not a state dict"):
        read_encoder(path, "resnet18")


def test_the_package_calls_torch_load_in_one_place():
    """Every checkpoint of the package is read by ``bench.files.load_weights`` (weights_only=True)."""
    calls = []
    for source in sorted(Path(bench.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls.append(f"{source.name}:{node.lineno}")
                assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords), calls[-1]
    assert [c.split(":")[0] for c in calls] == ["files.py"], calls


def test_a_changed_file_is_a_new_row_and_refused_under_the_old_identity(resnet, tmp_path):
    path = tmp_path / "enc.pth"
    torch.save(resnet, path)
    spec = spec_from_dict({"name": "t", "methods": ["scratch", f"mine=ckpt:{path}"], "datasets": ["synthetic-polyp"],
                           "fractions": [0.5], "seeds": [0], "backbone": "resnet18"})
    before = {c.label: c.id for c in build_grid(spec).cells}
    old_init = external_init(path, file_sha256(path))
    torch.save(perturbed(resnet), path)
    after = {c.label: c.id for c in build_grid(spec).cells}
    assert before["scratch"] == after["scratch"] and before["mine"] != after["mine"]
    with pytest.raises(BenchError, match="changed since"):
        load_init(create_backbone("resnet18"), "resnet18", old_init)


def test_external_specs_parse_and_name_their_rows(resnet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(resnet, tmp_path / "enc.pth")
    assert split_method_list("byol,dicoh:percentile=50,mine=ckpt:enc.pth") == [
        "byol", "dicoh:percentile=50", "mine=ckpt:enc.pth"]
    spec = parse_method("mine=ckpt:enc.pth")
    assert spec.label == "mine" and not spec.cls.pretrains
    assert spec.cfg == {"path": str(tmp_path / "enc.pth"), "sha256": file_sha256(tmp_path / "enc.pth")}
    for bad, word in [("byol=ckpt:enc.pth", "method name"), ("external", "LABEL=ckpt:PATH"),
                      ("mine=ckpt:absent.pth", "does not exist"), ("9x=ckpt:enc.pth", "row name")]:
        with pytest.raises(BenchError, match=word):
            parse_method(bad)
    torch.save(perturbed(resnet), tmp_path / "other.pth")
    twice = spec_from_dict({"name": "t", "methods": ["mine=ckpt:enc.pth", "mine=ckpt:other.pth"],
                            "datasets": ["synthetic-polyp"], "fractions": [0.5], "seeds": [0]})
    with pytest.raises(BenchError, match="two methods are named 'mine'"):
        build_grid(twice)


# --- as rows of a benchmark, through the CLI -----------------------------------------------------

TINY = """
name: tiny-external
methods: [scratch]
datasets:
  - {ref: synthetic-polyp, n: 16}
fractions: [0.5]
seeds: [0]
backbone: resnet18
init: scratch
pretrain: {size: 32, steps: 1, batch_size: 4}
finetune: {size: 32, steps: 1, batch_size: 2, optimizer: adamw, lr: 0.001}
precision: fp32
"""


def test_three_checkpoints_benchmarked_as_rows(resnet, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(TINY)
    files = {"tv": torchvision_file(resnet), "solo": solo_learn(resnet), "moco": moco_official(resnet)}
    for label, content in files.items():
        torch.save(content, tmp_path / f"{label}.pth")
    initial: list[dict[str, torch.Tensor]] = []
    original = protocol.build_segmentation_model

    def capture(backbone_name, init, *args, **kwargs):
        model = original(backbone_name, init, *args, **kwargs)
        initial.append({k: v.clone() for k, v in model.backbone.state_dict().items()})
        return model

    monkeypatch.setattr(protocol, "build_segmentation_model", capture)
    methods = "scratch," + ",".join(f"{label}=ckpt:{tmp_path / label}.pth" for label in files)
    result = CliRunner().invoke(app, ["run", "--spec", str(tmp_path / "tiny.yaml"), "--methods", methods,
                                      "--out", str(tmp_path / "run"), "--no-progress", "--no-report"])
    assert result.exit_code == 0, result.output
    for label in files:
        assert f"external encoder {label} ({label}.pth): 100/100 resnet18 backbone tensors" in result.output
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert set(table["method"]) == {"scratch", "tv", "solo", "moco"} and set(table["status"]) == {"ok"}
    assert len(initial) == 4
    from_files = [s for s in initial if torch.equal(s["layer4.1.bn2.running_var"], resnet["layer4.1.bn2.running_var"])]
    assert len(from_files) == 3, "each external row starts from its file, scratch from random weights"
    for state in from_files:
        assert_is_resnet(state, resnet)
    records = [json.loads(p.read_text()) for p in (tmp_path / "run" / "cells").glob("*.json")]
    moco = next(r for r in records if r["method"] == "moco")
    assert moco["config"]["method"]["cfg"]["sha256"] == file_sha256(tmp_path / "moco.pth")


def test_a_partial_checkpoint_stops_the_run_in_one_line(resnet, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(TINY)
    torch.save({k: v for k, v in resnet.items() if not k.startswith("layer4")}, tmp_path / "part.pth")
    result = CliRunner().invoke(app, ["run", "--spec", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"),
                                      "--methods", f"scratch,mine=ckpt:{tmp_path / 'part.pth'}", "--no-progress"])
    assert result.exit_code == 2, result.output
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error:") and "layer4.0, layer4.1" in error
    assert not (tmp_path / "run" / "cells").exists()
