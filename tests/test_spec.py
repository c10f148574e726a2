"""Spec validation: every field's type and range, duplicates, names and paths, YAML pitfalls, method
override ranges, ``methods: all``, ``--set`` settings and the schedule's identity - all in the one pass
that runs before anything is written."""

from __future__ import annotations

import pytest

from bench.errors import BenchError
from bench.methods import method_names, parse_method
from bench.spec import (
    BenchmarkSpec,
    DatasetEntry,
    Schedule,
    apply_settings,
    load_preset,
    load_spec,
    preset_names,
    spec_from_dict,
)

BASE = {"name": "t", "methods": ["scratch", "byol"], "datasets": [{"ref": "synthetic-polyp", "n": 16}],
        "fractions": [0.1], "seeds": [0]}


def build(**changes):
    return spec_from_dict({**BASE, **changes})


def refused(match: str, **changes) -> str:
    with pytest.raises(BenchError, match=match) as info:
        build(**changes)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("changes, words", [
    ({"compile": "no"}, ["compile", "'no'", "true or false"]),
    ({"keep_models": 1}, ["keep_models", "true or false"]),
    ({"pretrain_per_seed": "yes"}, ["pretrain_per_seed"]),
    ({"fractions": [True]}, ["fractions[0]", "True", "(0, 1]"]),
    ({"fractions": ["0.1"]}, ["fractions[0]", "'0.1'", "number"]),
    ({"seeds": [-1]}, ["seeds[0]", "-1", "≥ 0"]),
    ({"seeds": [0.5]}, ["seeds[0]", "integer"]),
    ({"seeds": ["1"]}, ["seeds[0]", "integer"]),
    ({"pretrain": {"steps": -5}}, ["pretrain.steps", "-5", "≥ 1"]),
    ({"pretrain": {"steps": 2.5}}, ["pretrain.steps", "integer"]),
    ({"pretrain": {"lr": "fast"}}, ["pretrain.lr", "'fast'", "> 0"]),
    ({"finetune": {"lr": -1}}, ["finetune.lr", "> 0"]),
    ({"finetune": {"lr": float("nan")}}, ["finetune.lr", "finite"]),
    ({"pretrain": {"epochs": "3"}}, ["pretrain.epochs", "number"]),
    ({"pretrain": {"epochs": 0}}, ["pretrain.epochs", "> 0"]),
    ({"finetune": {"size": "64"}}, ["finetune.size", "integer"]),
    ({"finetune": {"size": 16}}, ["finetune.size", "≥ 32"]),
    ({"finetune": {"batch_size": 0}}, ["finetune.batch_size", "≥ 1"]),
    ({"finetune": {"weight_decay": -0.1}}, ["finetune.weight_decay", "≥ 0"]),
    ({"finetune": {"warmup_steps": -1}}, ["finetune.warmup_steps"]),
    ({"finetune": {"optimizer": "lamb"}}, ["finetune.optimizer", "sgd, adamw, adam"]),
    ({"finetune": {"reg": "l2"}}, ["finetune.reg", "none, disp"]),
    ({"finetune": {"reg_variant": "x"}}, ["finetune.reg_variant", "cos"]),
    ({"finetune": {"freeze": "head"}}, ["finetune.freeze", "none, backbone"]),
    ({"precision": "fp16"}, ["precision", "auto, bf16, fp32"]),
    ({"eval": "both"}, ["eval", "native, resized"]),
    ({"metric": "mIoU"}, ["metric", "miou"]),
    ({"keep_predictions": -2}, ["keep_predictions", "≥ -1"]),
    ({"threads": 0}, ["threads", "≥ 1"]),
    ({"split_seed": "0"}, ["split_seed", "integer"]),
    ({"datasets": [{"ref": "synthetic-polyp", "n": 0}]}, ["datasets[0].n", "≥ 2"]),
    ({"datasets": [{"ref": 5}]}, ["datasets[0].ref"]),
    ({"description": 3}, ["description", "string"]),
])
def test_wrong_types_and_ranges_are_one_line_errors(changes, words):
    message = refused(".", **changes)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "/abs", "", " x", "a\\b", ".hidden", "a\nb"])
def test_names_that_escape_the_folder_are_refused(name):
    refused("name: .* is not a plain folder name", name=name)


def test_plain_names_pass():
    for name in ("quick", "full-quick", "dicoh-paper", "my run.v2", "A_1"):
        assert build(name=name).name == name


def test_duplicates_are_refused():
    refused("seeds: 0 is listed twice", seeds=[0, 0])
    refused("fractions: 0.1 is listed twice", fractions=[0.1, 0.10])
    refused("methods: 'byol' is listed twice", methods=["byol", "byol"])
    message = refused("methods:", methods=["byol", "byol:momentum=0.99"])  # 0.99 is byol's default
    assert "same method" in message
    refused("datasets: 'synthetic-polyp' is listed twice", datasets=["synthetic-polyp", "synthetic-polyp"])
    assert len(build(datasets=["synthetic-polyp", {"ref": "synthetic-polyp", "n": 30}]).datasets) == 2


def test_backbone_init_and_dataset_names_are_checked_with_suggestions(tmp_path):
    assert "did you mean resnet50" in refused("backbone: 'resnet5' is not a timm model", backbone="resnet5")
    refused("backbone: '../../x' is not a timm model", backbone="../../x")
    refused("init: 'imagenet21k' is neither scratch, imagenet nor an existing checkpoint", init="imagenet21k")
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert build(init=str(weights)).init == str(weights)
    assert "did you mean 'synthetic-polyp'" in refused("datasets\\[0\\]: unknown dataset", datasets=["synthetic-polip"])
    refused("does not exist", datasets=[f"kvasir-seg:{tmp_path / 'nope'}"])
    refused("unknown dataset layout 'kvasr'", datasets=[f"kvasr:{tmp_path}"])
    refused("datasets\\[0\\].pool", datasets=[{"ref": "synthetic-polyp", "pool": str(tmp_path / "missing")}])


def test_resources_false_skips_only_machine_checks(tmp_path):
    gone = {**BASE, "datasets": [f"kvasir-seg:{tmp_path / 'moved'}"], "init": str(tmp_path / "gone.pt")}
    assert spec_from_dict(gone, resources=False).init.endswith("gone.pt")
    with pytest.raises(BenchError, match="compile"):
        spec_from_dict({**gone, "compile": "no"}, resources=False)


def test_method_override_ranges():
    for text, words in [("byol:momentum=-5", "[0, 1]"), ("byol:momentum=1.5", "[0, 1]"),
                        ("byol:hidden_dim=0", "≥ 1"), ("mocov2:queue=0", "≥ 1"), ("mocov2:temperature=0", "> 0"),
                        ("byol:momentum=nan", "finite"), ("mocov2:temperature=inf", "finite"),
                        ("byol+disp:weight=-1", "≥ 0"), ("byol+disp:tau=0", "> 0"),
                        ("meanflow:mask_share=2", "[0, 1]"), ("byol:hidden_dim=abc", "not a int")]:
        with pytest.raises(BenchError) as info:
            parse_method(text)
        assert words in str(info.value) and text.split("+")[-1].split(":")[-1] in str(info.value), str(info.value)
    assert parse_method("densecl:warmup_steps=0").cfg["warmup_steps"] == 0
    assert parse_method("byol:momentum=0.996").cfg["momentum"] == 0.996
    refused("momentum=-5 is out of range", methods=["byol:momentum=-5"])


def test_class_bounds_override_the_generic_range(monkeypatch):
    from bench.methods.byol import BYOL

    monkeypatch.setattr(BYOL, "bounds", {"momentum": (0.9, 1.0)}, raising=False)
    with pytest.raises(BenchError, match=r"momentum=0.5 is out of range; accepts a number in \[0.9, 1.0\]"):
        parse_method("byol:momentum=0.5")
    assert parse_method("byol:momentum=0.95").cfg["momentum"] == 0.95


def test_every_registered_default_passes_its_own_ranges():
    from bench.methods import MODIFIERS, REGISTRY, _check_range

    for table in (REGISTRY, MODIFIERS):
        for name, cls in table.items():
            for key, value in cls.defaults.items():
                _check_range(f"{name}:{key}", key, value, getattr(cls, "bounds", {}).get(key))


def test_yaml_pitfalls(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("methods: [scratch]\npretrain: {steps: 2}\npretrain: {steps: 3}\n")
    with pytest.raises(BenchError, match="line 3: key 'pretrain' appears twice; keep one"):
        load_spec(dup)
    inner = tmp_path / "inner.yaml"
    inner.write_text("methods: [scratch]\npretrain:\n  steps: 2\n  steps: 3\n")
    with pytest.raises(BenchError, match="key 'steps' appears twice"):
        load_spec(inner)
    tag = tmp_path / "tag.yaml"
    tag.write_text("methods: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(BenchError, match="YAML tags .* are not allowed in a spec") as info:
        load_spec(tag)
    assert "fix the syntax" not in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"methods: [scr\xffatch]\n")
    with pytest.raises(BenchError, match="not UTF-8"):
        load_spec(binary)
    floats = tmp_path / "floats.yaml"
    floats.write_text("methods: [scratch]\ndatasets: [synthetic-polyp]\nfinetune: {lr: 1e-4, weight_decay: 5E-5}\n"
                      "compile: no\n")
    spec = load_spec(floats)
    assert spec.finetune.lr == 1e-4 and spec.finetune.weight_decay == 5e-5 and spec.compile is False
    anchors = tmp_path / "anchors.yaml"
    anchors.write_text("methods: [scratch]\npretrain: &s {size: 32, steps: 2}\nfinetune:\n  <<: *s\n  steps: 3\n")
    spec = load_spec(anchors)
    assert (spec.finetune.size, spec.finetune.steps) == (32, 3)


def test_methods_all_expands_to_the_registry():
    spec = build(methods="all")
    plain = [name for name in method_names() if name != "external"]  # external needs LABEL=ckpt:PATH
    assert set(spec.methods) == set(plain) and "byol" in plain
    mixed = build(methods=["all", "meanflow:domain=image", "byol+disp"])
    assert "meanflow" in mixed.methods and "meanflow:domain=image" in mixed.methods
    assert mixed.methods.count("byol") == 1 and mixed.methods[-1] == "byol+disp"
    assert BenchmarkSpec(methods=("all",)).methods == spec.methods  # also for the CLI's replace()


def test_train_test_protocol_fields():
    spec = spec_from_dict({**{k: v for k, v in BASE.items() if k != "datasets"},
                           "train": ["synthetic-polyp"], "test": ["synthetic-polyp", "synthetic-gland"]})
    assert spec.datasets == () and [e.ref for e in spec.test] == ["synthetic-polyp", "synthetic-gland"]
    assert [e.ref for e in spec.dataset_entries()] == ["synthetic-polyp", "synthetic-gland"]
    refused("train and test go together", datasets=[], train=["synthetic-polyp"])
    refused("datasets and train/test both given", train=["synthetic-polyp"], test=["synthetic-gland"])
    refused("test: 'synthetic-gland' is listed twice", datasets=[], train=["synthetic-polyp"],
            test=["synthetic-gland", "synthetic-gland"])


def test_new_fields_default_to_todays_behaviour():
    spec = build()
    assert (spec.eval, spec.keep_predictions, spec.keep_models, spec.threads) == ("native", 64, False, None)
    assert (spec.train, spec.test, spec.finetune.freeze) == ((), (), "none")


def test_schedule_identity():
    sched = Schedule(steps=3, reg="disp", reg_weight=0.2)
    pretrain = sched.identity("pretrain")
    assert "steps" in pretrain and not any(k.startswith("reg") for k in pretrain) and "freeze" not in pretrain
    assert Schedule(reg="disp").identity("pretrain") == Schedule().identity("pretrain")
    finetune = sched.identity("finetune")
    assert finetune["reg"] == "disp" and "freeze" not in finetune
    assert Schedule(freeze="backbone").identity("finetune")["freeze"] == "backbone"


def test_apply_settings():
    spec = build()
    changed = apply_settings(spec, ["pretrain.steps=200", "finetune.lr=1e-4", "seeds=0,1,2", "compile=true"])
    assert changed.pretrain.steps == 200 and changed.finetune.lr == 1e-4
    assert changed.seeds == (0, 1, 2) and changed.compile is True
    assert changed.finetune.steps == spec.finetune.steps and changed.datasets == spec.datasets
    assert apply_settings(spec, ["pretrain.epochs=null"]).pretrain.epochs is None
    protocol = apply_settings(spec, ["train=synthetic-polyp", "test=synthetic-polyp,synthetic-gland"])
    assert protocol.datasets == () and len(protocol.test) == 2
    assert apply_settings(spec, ["methods=all"]).methods == build(methods="all").methods
    for setting, match in [("pretrain.steps=fast", "pretrain.steps: 'fast'"), ("pretrain.stepz=3", "unknown setting"),
                           ("nothing", "not KEY=VALUE"), ("compile=maybe", "compile"), ("name=..", "name"),
                           ("finetune.size.x=3", "unknown setting")]:
        with pytest.raises(BenchError, match=match):
            apply_settings(spec, [setting])


def test_every_preset_loads_and_validates():
    for name in preset_names():
        spec = load_preset(name)
        assert spec.methods and isinstance(spec, BenchmarkSpec)


def test_comma_strings_still_work():
    spec = build(methods="scratch, byol:momentum=0.996", fractions="0.05, 0.1", seeds="0,1")
    assert spec.methods == ("scratch", "byol:momentum=0.996")
    assert spec.fractions == (0.05, 0.1) and spec.seeds == (0, 1)
    assert build(fractions=[1]).fractions == (1.0,)
    assert isinstance(build().datasets[0], DatasetEntry)
