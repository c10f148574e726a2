"""The two baselines without pretraining: ``scratch`` (random init) and ``imagenet`` (timm's
ImageNet weights). They have no pretrain job; the finetune model starts from their init
(docs/methods.md, "Baselines")."""

from __future__ import annotations

from bench.methods import register
from bench.methods.base import Method


@register
class Scratch(Method):
    name = "scratch"
    paper = "baseline: random initialisation, no pretraining"
    pretrains = False
    group = "baselines"
    init = "scratch"


@register
class ImageNet(Method):
    name = "imagenet"
    paper = "baseline: supervised ImageNet weights (timm), no further pretraining"
    pretrains = False
    group = "baselines"
    init = "imagenet"
