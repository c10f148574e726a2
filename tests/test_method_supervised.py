"""The `supervised` positive control (bench/methods/supervised.py): its flags, the fine-tuning view and
loss, a short run that lowers the loss, and an export that the fine-tuning model loads (backbone + ASPP)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images, tiny_backbone, tiny_context

from bench.augment import Views, finetune_batch
from bench.errors import BenchError
from bench.methods import build_method, parse_method
from bench.methods.supervised import Supervised
from bench.models import build_segmentation_model, dice_bce_loss


def build(spec: str = "supervised", size: int = 32, batch_size: int = 4):
    backbone = tiny_backbone(output_stride=Supervised.output_stride)
    return build_method(parse_method(spec), backbone, tiny_context(backbone, batch_size=batch_size, image_size=size))


def labelled(n: int = 8, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images whose bright blob is the foreground mask (uint8 0/1)."""
    images = random_images(n, size, seed=seed)
    masks = (images.float().mean(1, keepdim=True) > images.float().mean()).to(torch.uint8)
    return images, masks


def test_flags_and_registry():
    spec = parse_method("supervised")
    cls = spec.cls
    assert cls is Supervised and spec.cfg == {"export_head": True, "optimizer": "adamw", "lr": 0.003,
                                              "weight_decay": 0.0001}
    assert cls.uses_labels and cls.trains_on_labelled and cls.reads_labels(spec.cfg)
    assert cls.label_fraction == 1.0 and cls.reference == "upper" and cls.group == "references"
    assert cls.pretrains and cls.output_stride == 16 and cls.recipe == "light"
    dilations = [m.dilation for m in build().head.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.dilation != (1, 1)]
    assert dilations == [(6, 6), (12, 12), (18, 18)]  # the fine-tuning head at stride 16


def test_view_is_the_finetune_batch_and_loss_is_dice_bce():
    method = build()
    images, masks = labelled(4)
    views = method.make_views(images, torch.arange(4), torch.Generator().manual_seed(5), masks=masks)
    x, y = finetune_batch(images, masks, 32, torch.Generator().manual_seed(5))
    assert torch.equal(views.x1, x) and torch.equal(views.masks, y) and views.x2 is views.x1
    loss, logs = method.step(views, 0)
    assert set(logs) >= {"loss", "std"}
    method.eval()  # eval: the head's dropout is off, so the step's loss can be recomputed exactly
    with torch.no_grad():
        eval_loss, _ = method.step(views, 0)
        logits = method.logits(x)[0]
    assert eval_loss.item() == pytest.approx(dice_bce_loss(logits, y).item(), rel=1e-5)
    assert torch.isfinite(loss) and loss.requires_grad


def test_needs_masks():
    method = build()
    x = torch.randn(2, 3, 32, 32)
    box, flip = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(2, 1), torch.zeros(2, dtype=torch.bool)
    with pytest.raises(BenchError, match="supervised trains on labelled images"):
        method.step(Views(x, x, box, box, flip, flip, torch.arange(2)), 0)


def test_short_run_lowers_the_loss():
    torch.manual_seed(0)
    method = build(size=32)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    images, masks = labelled(8)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(12):
        idx = torch.randperm(8, generator=generator)[:4]
        views = method.make_views(images[idx], idx, generator, masks=masks[idx])
        loss, _ = method.step(views, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05


def test_export_loads_backbone_and_aspp_into_the_finetune_model(tmp_path):
    method = build()
    with torch.no_grad():  # distinguishable from a fresh head
        for p in method.head.parameters():
            p.add_(0.5)
    state = method.export()
    assert set(state) == {"backbone", "head"} and not any(k.startswith("4.") for k in state["head"])
    torch.save(state, tmp_path / "backbone.pt")
    model = build_segmentation_model("resnet18", str(tmp_path / "backbone.pt"))
    own = model.head.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state["head"].items())
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in state["backbone"].items())
    assert set(build("supervised:export_head=false").export()) == {"backbone"}


def test_it_trains_with_its_own_optimiser_not_the_ssl_schedules():
    """The control is a segmentation network trained on every label: AdamW at the fine-tuning rate by
    default, whatever the pretraining schedule's SGD; an override is part of its identity."""
    from bench.grid import build_grid
    from bench.protocol import method_schedule
    from bench.spec import load_preset

    spec = load_preset("quick")
    assert spec.pretrain.optimizer == "sgd"
    job = next(j for j in build_grid(spec).jobs if j.method.name == "supervised")
    schedule = method_schedule(job)
    assert (schedule.optimizer, schedule.lr) == ("adamw", 0.003) and schedule.steps == spec.pretrain.steps
    other = parse_method("supervised:lr=0.01,optimizer=sgd")
    assert (other.cfg["optimizer"], other.cfg["lr"]) == ("sgd", 0.01)
    with pytest.raises(BenchError, match="optimizer"):
        parse_method("supervised:optimizer=lamb")
