"""Read any encoder checkpoint into the harness backbone (docs/encoders.md).

The harness backbone is timm's ``features_only`` model of the spec's backbone. A checkpoint may name
the same tensors in several ways, under any prefix and inside any wrapping dict:

- timm ``features_only`` names (the harness's own ``pretrain/<job>/backbone.pt``),
- timm model names (``timm.create_model(name).state_dict()``),
- torchvision names (``torchvision.models.<name>().state_dict()``; ResNets and ConvNeXts),
- the children of an ``nn.Sequential(*list(model.children())[:-1])`` (lightly's examples),

and the prefix is whatever wraps the encoder: ``backbone.`` (solo-learn, mmselfsup/mmpretrain,
lightly), ``module.encoder_q.`` (MoCo, DenseCL), ``module.encoder.`` (PixPro), ``state_dict.``,
``model.``... Nested dicts are flattened to dotted keys, every (prefix, naming) pair is tried, and
the one that finds the most backbone tensors wins; online encoders are preferred over their momentum
copies. Anything less than the whole backbone, a shape mismatch, or extra tensors inside backbone
modules (another depth of the same family) is refused with a one-line ``BenchError``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torchvision
from torch import Tensor, nn

from bench.errors import BenchError
from bench.files import load_weights
from bench.models import create_backbone

CKPT = "ckpt:"  # the init of an external encoder: ckpt:<absolute path>#sha256=<content hash>
SAFE_GLOBALS = [argparse.Namespace]  # PixPro-style {'opt': args, 'model': ...}: a plain attribute bag
MOMENTUM = {"k", "key", "momentum", "target", "teacher", "ema", "mom"}  # tokens of momentum-copy prefixes
VIEW_ORDER = ("timm", "torchvision", "timm features_only", "sequential children")  # tie-break: first wins


# --- reading a file -------------------------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor in a ``.safetensors`` or ``.pth``/``.pt`` file, nested dicts flattened to dotted keys."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist; pass an existing .pth, .pt or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise BenchError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = load_weights(path)  # the one checkpoint reader (weights_only=True)
    except BenchError as err:
        cause = err.__context__  # what torch.load raised, if it raised (load_weights words it generically)
        if isinstance(cause, pickle.UnpicklingError):
            found = re.search(r"GLOBAL ([\w.]+)", str(cause))
            what = found.group(1) if found else "Python objects"
            raise BenchError(f"{path} holds pickled {what} that a weights-only load refuses; in a trusted "
                             "environment re-save just its state dict (the tensors) as encoder.pth or "
                             ".safetensors") from None
        if isinstance(cause, Exception):
            why = str(cause).strip().splitlines()[0][:120] if str(cause).strip() else type(cause).__name__
            raise BenchError(f"{path} is not a readable PyTorch checkpoint ({why})") from None
        raise  # not a dict of tensors
    flat: dict[str, Tensor] = {}
    _flatten(obj, "", flat)
    if not flat:
        raise BenchError(f"{path} holds no tensors; pass a state dict (or a dict wrapping one)")
    return flat


def _flatten(obj: object, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(obj, Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}{key}.", out)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The content hash of a file (cached per path, size and modification time)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist; pass an existing .pth, .pt or .safetensors file")
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# --- the names a backbone's tensors go by ---------------------------------------------------------

@dataclass(frozen=True)
class Naming:
    """How the tensors of a ``features_only`` backbone are named elsewhere."""

    backbone: str
    shapes: dict[str, torch.Size]  # features_only key -> shape
    dtypes: dict[str, torch.dtype]
    to_model: dict[str, str] | None  # features_only key -> timm model key (None: names not relatable)
    model_shapes: dict[str, torch.Size]  # every key of timm.create_model(name)
    to_torchvision: dict[str, str] | None  # timm model key -> torchvision key (None: no torchvision twin)
    torchvision_shapes: dict[str, torch.Size] = field(default_factory=dict)
    children: dict[str, str] = field(default_factory=dict)  # timm top-level child -> its index
    parameters: frozenset[str] = frozenset()  # features_only keys that are parameters (not buffers)

    @functools.cached_property
    def views(self) -> dict[str, dict[str, str]]:
        """For each naming: name in that naming -> features_only key."""
        views = {"timm features_only": {f: f for f in self.shapes}}
        if self.to_model is None:
            return views
        views["timm"] = {m: f for f, m in self.to_model.items()}
        if self.to_torchvision is not None:
            views["torchvision"] = {self.to_torchvision[m]: f for f, m in self.to_model.items()}
        views["sequential children"] = {self.sequential(m): f for f, m in self.to_model.items()}
        return views

    def sequential(self, model_key: str) -> str:
        head, _, rest = model_key.partition(".")
        return f"{self.children[head]}.{rest}"

    def head_modules(self, view: str) -> set[str]:
        """First key components of the model's tensors outside the backbone (classifier, final norm...)."""
        generic = {"fc", "head", "classifier"}
        if self.to_model is None:
            return generic
        inside = set(self.to_model.values())
        extra = [m for m in self.model_shapes if m not in inside]
        if view == "torchvision" and self.to_torchvision is not None:
            used = {self.to_torchvision[m] for m in inside}
            return {k.split(".")[0] for k in self.torchvision_shapes if k not in used} | generic
        if view == "sequential children":
            return {self.sequential(m).split(".")[0] for m in extra}
        return {m.split(".")[0] for m in extra} | generic

    def body_modules(self, view: str) -> set[str]:
        return {k.split(".")[0] for k in self.views[view]} - self.head_modules(view)


def _meta_models(name: str) -> tuple[nn.Module, nn.Module]:
    with torch.device("meta"):
        return create_backbone(name), timm.create_model(name)


@functools.lru_cache(maxsize=16)
def naming(backbone: str) -> Naming:
    """The names of ``backbone``'s tensors in each known naming (built on the meta device: no memory)."""
    features, model = _meta_models(backbone)
    feature_state, model_state = features.state_dict(), model.state_dict()
    flat = {k.replace(".", "_"): k for k in model_state}  # FeatureDictNet joins flattened module names with _
    to_model: dict[str, str] | None = {f: flat.get(f.replace(".", "_")) for f in feature_state}
    if any(m is None or model_state[m].shape != feature_state[f].shape for f, m in to_model.items()):
        to_model = None
    tv = None if to_model is None else _torchvision_twin(backbone, model_state)
    return Naming(backbone, {k: v.shape for k, v in feature_state.items()},
                  {k: v.dtype for k, v in feature_state.items()}, to_model,
                  {k: v.shape for k, v in model_state.items()}, None if tv is None else tv[0],
                  {} if tv is None else tv[1], {n: str(i) for i, (n, _) in enumerate(model.named_children())},
                  frozenset(name for name, _ in features.named_parameters()))


def _torchvision_twin(backbone: str, model_state: dict[str, Tensor]) -> tuple[dict[str, str], dict] | None:
    """timm -> torchvision key map when torchvision has the same network under the same name."""
    if backbone not in torchvision.models.list_models(module=torchvision.models):
        return None
    with torch.device("meta"):
        tv_state = torchvision.models.get_model(backbone, weights=None).state_dict()
    rename = _timm_to_torchvision_convnext if backbone.startswith("convnext") else (lambda k: k)
    mapping = {k: rename(k) for k in model_state}
    if set(mapping.values()) != set(tv_state):
        return None
    if any(_squeeze(tv_state[mapping[k]].shape) != _squeeze(v.shape) for k, v in model_state.items()):
        return None
    return mapping, {k: v.shape for k, v in tv_state.items()}


_CONVNEXT_BLOCK = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3", "mlp.fc2": "block.5"}


def _timm_to_torchvision_convnext(key: str) -> str:
    """timm ConvNeXt names -> torchvision's (``features.<2i+1>`` = stage i, ``features.<2i>`` = its downsample)."""
    if key.startswith("stem."):
        return "features.0." + key[len("stem."):]
    if key.startswith("head.norm."):
        return "classifier.0." + key[len("head.norm."):]
    if key.startswith("head.fc."):
        return "classifier.2." + key[len("head.fc."):]
    found = re.fullmatch(r"stages\.(\d+)\.downsample\.(\d)\.(\w+)", key)
    if found:
        stage, part, tensor = found.groups()
        return f"features.{2 * int(stage)}.{part}.{tensor}"
    found = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if found:
        stage, block, rest = found.groups()
        where = f"features.{2 * int(stage) + 1}.{block}"
        if rest == "gamma":
            return f"{where}.layer_scale"
        module, _, tensor = rest.rpartition(".")
        if module in _CONVNEXT_BLOCK:
            return f"{where}.{_CONVNEXT_BLOCK[module]}.{tensor}"
    return key  # not a torchvision-shaped ConvNeXt (e.g. conv_mlp variants): the twin check then fails


def _squeeze(shape: torch.Size) -> tuple[int, ...]:
    """Shape without unit dimensions: timm's layer scale (C,) is torchvision's (C, 1, 1)."""
    return tuple(s for s in shape if s != 1)


# --- matching -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatchReport:
    """What a checkpoint gave the backbone: printed by the caller."""

    source: str
    backbone: str
    prefix: str
    view: str
    matched: int
    total: int
    parameters: int
    ignored: dict[str, int]
    filled: int = 0  # BatchNorm counters (num_batches_tracked) absent from the file

    def line(self) -> str:
        where = _where(self.prefix)
        ignored = sum(self.ignored.values())
        detail = ", ".join(f"{n} {kind}" for kind, n in sorted(self.ignored.items(), key=lambda x: -x[1]))
        text = (f"{self.source}: {self.matched}/{self.total} {self.backbone} backbone tensors "
                f"({self.parameters / 1e6:.2f}M parameters) {where}, {self.view} names; ignored {ignored}"
                + (f" ({detail})" if detail else ""))
        return text + (f"; {self.filled} BatchNorm counters set to 0" if self.filled else "")


def match_state(tensors: dict[str, Tensor], backbone: str, source: str = "checkpoint"
                ) -> tuple[dict[str, Tensor], MatchReport]:
    """The ``features_only`` state dict of ``backbone`` found in ``tensors`` (flat, dotted keys)."""
    names = naming(backbone)
    views = names.views
    hits = _candidates(tensors, views)
    required = [f for f in names.shapes if not f.endswith("num_batches_tracked")]
    (prefix, view), found = max(hits.items(), key=lambda item: _rank(item, required)) if hits else (("", ""), {})
    missing = [f for f in required if f not in found]
    if 2 * len(missing) > len(required):  # not even half: name what the file holds instead
        raise BenchError(f"no {backbone} backbone in {source} (at most {len(required) - len(missing)}/{len(required)} "
                         f"of its tensors under one prefix; the file's keys begin with {_top(tensors)}); pass a "
                         f"{backbone} state dict with timm or torchvision names, under any prefix")
    if missing:
        inverse = {f: n for n, f in views[view].items()}
        raise BenchError(f"{source} holds {len(required) - len(missing)}/{len(required)} {backbone} backbone "
                         f"tensors {_where(prefix)} ({view} names); missing {_groups(inverse[f] for f in missing)}: "
                         "a partial checkpoint or another architecture")
    _refuse_extras(tensors, names, prefix, view, source)
    state = {f: _fit(tensors[k], names.shapes[f], names.dtypes[f], k, source) for f, k in found.items()}
    filled = [f for f in names.shapes if f not in state]
    for f in filled:  # only num_batches_tracked can be absent here
        state[f] = torch.zeros((), dtype=torch.long)
    used = set(found.values())
    report = MatchReport(source, backbone, prefix, view, len(required), len(required),
                         sum(state[f].numel() for f in names.parameters),
                         _ignored([k for k in tensors if k not in used], names, prefix, view), len(filled))
    return state, report


def _candidates(tensors: dict[str, Tensor], views: dict[str, dict[str, str]]
                ) -> dict[tuple[str, str], dict[str, str]]:
    """(prefix, view) -> {features_only key: checkpoint key} for every way a key can end in a known name."""
    hits: dict[tuple[str, str], dict[str, str]] = {}
    for key in tensors:
        parts = key.split(".")
        for i in range(len(parts)):
            suffix, prefix = ".".join(parts[i:]), "".join(p + "." for p in parts[:i])
            for view, names in views.items():
                if suffix in names:
                    hits.setdefault((prefix, view), {}).setdefault(names[suffix], key)
    return hits


def _rank(item: tuple[tuple[str, str], dict[str, str]], required: list[str]) -> tuple:
    (prefix, view), found = item
    coverage = sum(f in found for f in required)
    momentum = bool(MOMENTUM & set(re.split(r"[._]", prefix.lower())))
    return coverage, not momentum, -len(prefix), -VIEW_ORDER.index(view)


def _refuse_extras(tensors: dict[str, Tensor], names: Naming, prefix: str, view: str, source: str) -> None:
    """Tensors under the prefix inside backbone modules that the backbone lacks: another depth or variant."""
    known = names.views[view]
    body = names.body_modules(view)
    extras = [k[len(prefix):] for k in tensors if k.startswith(prefix) and k[len(prefix):] not in known
              and k[len(prefix):].split(".")[0] in body]
    if extras:
        raise BenchError(f"{source} has {len(extras)} tensors {_where(prefix)} that {names.backbone} lacks "
                         f"({_groups(extras)}): it is another architecture; set the spec's backbone to match it")


def _fit(value: Tensor, shape: torch.Size, dtype: torch.dtype, key: str, source: str) -> Tensor:
    if value.shape != shape:
        if _squeeze(value.shape) != _squeeze(shape):
            raise BenchError(f"{source}: {key} has shape {tuple(value.shape)} but the backbone needs "
                             f"{tuple(shape)}: another architecture (or a CIFAR-style stem)")
        value = value.reshape(shape)
    return value.to(dtype).contiguous()


def _ignored(keys: list[str], names: Naming, prefix: str, view: str) -> dict[str, int]:
    heads = names.head_modules(view)
    kinds: Counter[str] = Counter()
    for key in keys:
        tokens = set(re.split(r"[._]", key.lower()))
        if key.startswith(prefix) and key[len(prefix):].split(".")[0] in heads:
            kinds["classifier/head"] += 1
        elif "queue" in key.lower():
            kinds["queue"] += 1
        elif tokens & {"optimizer", "optim", "scaler", "amp", "scheduler"}:
            kinds["optimizer state"] += 1
        elif tokens & MOMENTUM:
            kinds["momentum encoder"] += 1
        elif tokens & {"projector", "projection", "predictor", "prediction", "neck", "head", "mlp", "proj"}:
            kinds["projector/predictor"] += 1
        else:
            kinds["other"] += 1
    return dict(kinds)


def _groups(keys, depth: int = 2, limit: int = 4) -> str:
    """Distinct module prefixes (up to ``depth`` components, tensor name dropped) of ``keys``, e.g.
    ``layer4.0, layer4.1``."""
    seen: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        seen.setdefault(".".join(parts[:max(1, min(depth, len(parts) - 1))]), None)
    names = list(seen)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _where(prefix: str) -> str:
    return f"under '{prefix}'" if prefix else "at the top level"


def _top(tensors: dict[str, Tensor]) -> str:
    return _groups(tensors, depth=2, limit=4)


# --- loading --------------------------------------------------------------------------------------

def read_encoder(path: Path, backbone: str) -> tuple[dict[str, Tensor], MatchReport]:
    """The ``features_only`` state dict of ``backbone`` in the checkpoint at ``path``, and what matched."""
    path = Path(path)
    return match_state(read_tensors(path), backbone, source=path.name)


def load_encoder(module: nn.Module, backbone: str, path: Path) -> MatchReport:
    """Load the checkpoint at ``path`` into a ``features_only`` backbone ``module`` (all its tensors)."""
    state, report = read_encoder(path, backbone)
    module.load_state_dict(state, strict=True)
    return report


def external_init(path: Path, sha256: str) -> str:
    """The finetune ``init`` of an external encoder: the file and the content it must still have."""
    return f"{CKPT}{Path(path)}#sha256={sha256}"


def load_init(module: nn.Module, backbone: str, init: str) -> MatchReport:
    """Load an ``external_init`` string, refusing a file whose content changed since the grid was built."""
    path, _, expected = init[len(CKPT):].rpartition("#sha256=")
    actual = file_sha256(Path(path))
    if expected and actual != expected:
        raise BenchError(f"{path} changed since this benchmark row was defined (sha256 {expected[:12]} -> "
                         f"{actual[:12]}); rerun bench run to benchmark the new file as a new row")
    return load_encoder(module, backbone, Path(path))


@functools.lru_cache(maxsize=32)
def check_encoder(path: str, sha256: str, backbone: str) -> MatchReport:
    """Read the checkpoint once per content and backbone (grid set-up): refuse it early, report what matched."""
    return read_encoder(Path(path), backbone)[1]


def backbone_for_init(name: str, init: str | None, output_stride: int | None = None) -> nn.Module:
    """A ``features_only`` backbone initialised as a finetune cell's ``init`` says: scratch, imagenet,
    an external encoder (``ckpt:...``) or a checkpoint file."""
    if init in (None, "scratch", "imagenet"):
        return create_backbone(name, init == "imagenet", output_stride)
    backbone = create_backbone(name, False, output_stride)
    if init.startswith(CKPT):
        load_init(backbone, name, init)
    else:
        load_encoder(backbone, name, Path(init))
    return backbone


def load_into(module: nn.Module, path: Path) -> MatchReport:
    """``load_encoder`` for a timm-built backbone, whose architecture name it carries (``--init FILE``)."""
    name = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise BenchError(f"cannot load {path}: the backbone does not say which timm architecture it is")
    return load_encoder(module, name, Path(path))
