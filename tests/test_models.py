"""bench.models: the DeepLabv3 head's atrous rates follow the backbone's output stride (DeepLabv3: 16 →
6, 12, 18; 8 → 12, 24, 36), read back from the built model; the state-dict keys are torchvision's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from bench.errors import BenchError
from bench.models import SegmentationModel, aspp_rates, build_segmentation_model, create_backbone, output_stride_of


def atrous_dilations(module: nn.Module) -> list[tuple[int, int]]:
    """The dilations of the ASPP's 3×3 atrous branches, in module order."""
    return [m.dilation for m in module.modules() if isinstance(m, nn.Conv2d) and m.dilation != (1, 1)]


@pytest.mark.parametrize("stride,rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_aspp_rates_follow_the_output_stride(stride, rates):
    model = SegmentationModel(create_backbone("resnet18", output_stride=stride))
    assert output_stride_of(model.backbone) == stride
    assert atrous_dilations(model.head) == [(r, r) for r in rates]
    assert aspp_rates(stride) == rates
    reference = DeepLabHead(512, 1)  # torchvision's default (stride-8 rates): the same keys and shapes
    assert {k: v.shape for k, v in model.head.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    assert model.eval()(x).shape == (2, 1, 64, 64)


def test_finetune_model_is_built_at_stride_16_with_its_rates():
    model = build_segmentation_model("resnet18", "scratch")
    assert output_stride_of(model.backbone) == 16
    assert atrous_dilations(model.head) == [(6, 6), (12, 12), (18, 18)]


def test_explicit_stride_and_undefined_strides():
    backbone = create_backbone("resnet18")  # native stride 32: DeepLabv3 defines no rates for it
    with pytest.raises(BenchError, match="output stride 8 or 16"):
        SegmentationModel(backbone)
    model = SegmentationModel(backbone, output_stride=16)  # a caller may still choose the rates
    assert atrous_dilations(model.head) == [(6, 6), (12, 12), (18, 18)]


def test_a_checkpoint_file_init_is_read_by_the_one_loader(tmp_path, monkeypatch):
    """``build_segmentation_model(backbone, PATH)`` reads PATH with ``bench.files.load_weights``:
    weights only, one-line errors for an unreadable file or one without backbone weights."""
    import bench.files
    import bench.models

    state = {"backbone": create_backbone("resnet18").state_dict()}
    torch.save(state, tmp_path / "ok.pt")
    seen = []
    monkeypatch.setattr(bench.models, "load_weights", lambda path: seen.append(path) or bench.files.load_weights(path))
    build_segmentation_model("resnet18", str(tmp_path / "ok.pt"))
    assert seen == [tmp_path / "ok.pt"]
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(BenchError, match="cannot be read") as err:
        build_segmentation_model("resnet18", str(tmp_path / "bad.pt"))
    assert len(str(err.value).splitlines()) == 1
    torch.save({"head": {}}, tmp_path / "headless.pt")
    with pytest.raises(BenchError, match="no 'backbone' weights"):
        build_segmentation_model("resnet18", str(tmp_path / "headless.pt"))
