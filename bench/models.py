"""Backbone (timm, ``features_only``) + DeepLabv3 ASPP head (torchvision), and their initialisation
(docs/methods.md, "The fine-tuning model")."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from bench.errors import BenchError
from bench.files import load_weights


def create_backbone(name: str, pretrained: bool = False, output_stride: int | None = None) -> nn.Module:
    """A timm ``features_only`` backbone returning every stage's feature map (first to last).

    ``output_stride=16`` dilates the last stage (DeepLabv3); the weights are the same at any
    stride, so a checkpoint pretrained at stride 32 loads into a stride-16 model.
    """
    kwargs = {"features_only": True, "pretrained": pretrained}
    if output_stride is not None and output_stride != 32:
        kwargs["output_stride"] = output_stride
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        if "Unknown model" in str(err):
            close = timm.list_models(f"*{name}*")[:5]
            raise BenchError(f"unknown backbone {name!r}; timm has e.g. {', '.join(close) or 'resnet18'}") \
                from None
        raise


def feature_channels(backbone: nn.Module) -> tuple[int, ...]:
    return tuple(backbone.feature_info.channels())


# DeepLabv3 (Chen et al. 2017, "Rethinking Atrous Convolution"): ASPP rates per output stride
ASPP_RATES: dict[int, tuple[int, int, int]] = {16: (6, 12, 18), 8: (12, 24, 36)}


def output_stride_of(backbone: nn.Module) -> int:
    """The stride of the backbone's last feature map (timm's ``feature_info``; 16 when dilated)."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise BenchError("the backbone has no feature_info: pass output_stride= to build its DeepLabv3 head")
    return int(info.reduction()[-1])


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLabv3's atrous rates for an output stride: 16 → (6, 12, 18), 8 → (12, 24, 36)."""
    if output_stride not in ASPP_RATES:
        raise BenchError(f"DeepLabv3's ASPP is defined for output stride 8 or 16, not {output_stride}; "
                         "build the backbone with output_stride=16")
    return ASPP_RATES[output_stride]


def deeplab_head(in_channels: int, num_classes: int, output_stride: int) -> DeepLabHead:
    """torchvision's DeepLabHead with the ASPP rates of ``output_stride`` (state-dict keys as torchvision's)."""
    return DeepLabHead(in_channels, num_classes, atrous_rates=aspp_rates(output_stride))


class SegmentationModel(nn.Module):
    """Backbone + DeepLabv3 ASPP head on the last stage, bilinear upsampling to the input size.

    The ASPP's rates follow the backbone's output stride (read from it unless ``output_stride`` is given).
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 1, output_stride: int | None = None):
        super().__init__()
        self.backbone = backbone
        stride = output_stride if output_stride is not None else output_stride_of(backbone)
        self.head = deeplab_head(feature_channels(backbone)[-1], num_classes, stride)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)[-1]
        return F.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)


def imagenet_weights_available(name: str) -> tuple[bool, str]:
    """Whether timm's ImageNet weights for ``name`` are on this machine (Hugging Face hub cache or
    torch hub cache), and why not. Looks at the caches only: nothing is downloaded."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        return False, f"timm has no ImageNet weights for {name}"
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in ("model.safetensors", "pytorch_model.bin", cfg.hf_hub_filename):
            if filename and isinstance(try_to_load_from_cache(repo, filename), str):
                return True, ""
    if cfg.url and (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file():
        return True, ""
    return False, (f"ImageNet weights for {name} are not in the local hub cache (no download at run time; "
                   f"put {cfg.hf_hub_id or cfg.url} in the Hugging Face cache to use them)")


def build_segmentation_model(backbone_name: str, init: str, output_stride: int = 16) -> SegmentationModel:
    """The finetune model. ``init``: ``scratch``, ``imagenet`` or a checkpoint file written by pretraining."""
    if init in ("scratch", "imagenet"):
        return SegmentationModel(create_backbone(backbone_name, init == "imagenet", output_stride))
    model = SegmentationModel(create_backbone(backbone_name, False, output_stride))
    if init.startswith("ckpt:"):  # an external encoder (LABEL=ckpt:PATH): keys mapped by bench.checkpoints
        from bench.checkpoints import load_init

        load_init(model.backbone, backbone_name, init)
        return model
    load_checkpoint(model, Path(init))
    return model


def load_checkpoint(model: SegmentationModel, path: Path) -> None:
    """Strict load of an exported backbone (and, if present, the pretrained ASPP head: CP2)."""
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist; rerun pretraining or pass an existing file")
    state = load_weights(path)  # the one checkpoint reader (weights_only=True, one-line errors)
    if not isinstance(state.get("backbone"), dict):
        raise BenchError(f"checkpoint {path} holds no 'backbone' weights; pass a file written by pretraining")
    model.backbone.load_state_dict(state["backbone"], strict=True)
    if "head" in state:
        load_aspp(model.head, state["head"])


def load_aspp(head: DeepLabHead, state: dict[str, Tensor]) -> None:
    """Load a pretrained ASPP (DeepLabHead minus its final classifier conv) into the finetune head."""
    own = head.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("4.")]
    if missing:
        raise BenchError(f"checkpoint head lacks {missing[:3]}: it is not a DeepLabHead ASPP")
    head.load_state_dict({k: v for k, v in state.items() if k in own and not k.startswith("4.")}, strict=False)


def dice_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCE + soft Dice (per image, smoothed by 1), the usual polyp-segmentation loss."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)
    return bce + (1 - dice).mean()
