"""Models (init, strict checkpoint loading) and the protocol's loops: the fine-tuned model really
learns, the loss and the sampling behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import datasets
from bench.errors import BenchError
from bench.grid import build_grid
from bench.metrics import segmentation_metrics, summarize
from bench.models import (
    SegmentationModel,
    build_segmentation_model,
    create_backbone,
    dice_bce_loss,
    imagenet_weights_available,
)
from bench.protocol import FinetuneData, batches, finetune, lr_factor
from bench.runtime import Runtime
from bench.spec import BenchmarkSpec, DatasetEntry, Schedule


def test_segmentation_model_predicts_at_input_size():
    model = SegmentationModel(create_backbone("resnet18", output_stride=16)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 64)).shape == (2, 1, 48, 64)


def test_checkpoint_loads_strictly_and_safely(tmp_path):
    backbone = create_backbone("resnet18")  # stride 32, as pretraining uses
    torch.nn.init.constant_(backbone.conv1.weight, 0.5)
    torch.save({"backbone": backbone.state_dict()}, tmp_path / "ok.pt")
    model = build_segmentation_model("resnet18", str(tmp_path / "ok.pt"))
    assert torch.all(model.backbone.conv1.weight == 0.5)
    broken = dict(backbone.state_dict())
    broken.pop("conv1.weight")
    torch.save({"backbone": broken}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="conv1.weight"):
        build_segmentation_model("resnet18", str(tmp_path / "bad.pt"))
    with pytest.raises(BenchError, match="does not exist"):
        build_segmentation_model("resnet18", str(tmp_path / "missing.pt"))


def test_pretrained_aspp_is_loaded_into_the_head(tmp_path):
    source = SegmentationModel(create_backbone("resnet18", output_stride=16))
    torch.nn.init.constant_(source.head[0].convs[0][0].weight, 0.25)
    head = {k: v for k, v in source.head.state_dict().items() if not k.startswith("4.")}
    torch.save({"backbone": source.backbone.state_dict(), "head": head}, tmp_path / "cp2.pt")
    model = build_segmentation_model("resnet18", str(tmp_path / "cp2.pt"))
    assert torch.all(model.head[0].convs[0][0].weight == 0.25)


def test_imagenet_availability_looks_only_at_the_caches(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    ok, why = imagenet_weights_available("resnet18")
    assert not ok and "not in the local hub cache" in why
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert imagenet_weights_available("resnet18") == (True, "")
    assert not imagenet_weights_available("no_such_net")[0]


def test_dice_bce_loss_by_hand():
    logits = torch.zeros(1, 1, 1, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[[1.0, 0.0]]]])
    bce = np.log(2)
    dice = (2 * 0.5 + 1) / (1.0 + 1.0 + 1)  # (2·Σpy + 1) / (Σp + Σy + 1)
    assert dice_bce_loss(logits, target).item() == pytest.approx(bce + 1 - dice, rel=1e-6)


def test_batches_are_full_epochs_of_permutations():
    gen = torch.Generator().manual_seed(0)
    out = list(batches(5, 4, 5, gen))
    assert all(len(b) == 4 for b in out)
    flat = torch.cat(out)
    assert sorted(flat[:5].tolist()) == [0, 1, 2, 3, 4]  # each epoch visits every item once
    assert sorted(flat[5:10].tolist()) == [0, 1, 2, 3, 4]


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


def test_scratch_clearly_beats_constant_predictions(tmp_path):
    """The quick preset's promise at a smaller size: fine-tuning from scratch on 10% of a synthetic
    set learns, beating both the all-background and the all-foreground prediction by a margin."""
    data = datasets.load_dataset("synthetic-polyp", 64, tmp_path, n=100)
    chosen = datasets.label_fraction(data.train, 0.1, seed=0)
    spec = BenchmarkSpec(methods=("scratch",), datasets=(DatasetEntry("synthetic-polyp", 100),), fractions=(0.1,),
                         seeds=(0,), finetune=Schedule(size=64, steps=40, batch_size=8, lr=1e-3))
    cell = build_grid(spec).cells[0]
    result = finetune(cell, FinetuneData(data.images, data.masks, data.ids, chosen, data.test),
                      Runtime(torch.device("cpu"), "fp32"))
    truth = data.masks[data.test] > 0
    background = summarize(segmentation_metrics(np.zeros_like(truth), truth))["miou"]
    foreground = summarize(segmentation_metrics(np.ones_like(truth), truth))["miou"]
    assert result.metrics["miou"] > max(background, foreground) + 0.15, (result.metrics, foreground)
