"""The encoder registry: every patch encoder of the study behind one name, optionally cut short.

An encoder maps an ImageNet-normalised RGB batch (B, 3, H, W) to (B, D) features: the global average of its
last kept stage's feature map, exactly as torchvision computes the pooled features before the classifier.

Stages (``truncate=k`` drops the last ``k`` of the four stages after the stem; D is the kept stage's width):

* ResNet: ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` .. ``layer4``.
* DenseNet: ``stem`` (conv0, norm0, relu0, pool0), ``denseblock1`` .. ``denseblock4``; stage i > 1 starts
  with ``transition{i-1}``, so a cut falls right after ``denseblock{4-k}``. The last stage ends with norm5 and
  ReLU, as in torchvision's forward.
* EfficientNet: grouped by output stride like ResNet's layers: ``stem`` = features[0] (stride 2),
  ``stage1`` = features[1:3] (stride 4), ``stage2`` = features[3] (stride 8), ``stage3`` = features[4:6]
  (stride 16), ``stage4`` = features[6:9] (stride 32, ending with the 1x1 head convolution).

Feature widths D for truncate 0/1/2/3: resnet18, resnet34 512/256/128/64; resnet50 2048/1024/512/256;
densenet121 1024/1024/512/256; densenet169 1664/1280/512/256; efficientnet_b0 and _b1 1280/112/40/24;
efficientnet_b2 1408/120/48/24; efficientnet_b3 1536/136/48/32.

New encoders are added with :func:`register` on a function returning the full torchvision-style model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from ..errors import HistotransferError
from .weights import (
    CHECKPOINT_SUFFIXES,
    apply_state_dict,
    load_state_dict_file,
    weights_cache_dir,
    weights_file_sha256,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RANDOM_INIT_SEED = 0


@contextmanager
def precision_context(device: torch.device, precision: str) -> Iterator[None]:
    """Run the enclosed forward passes at ``precision`` on ``device``.

    bf16/fp16: autocast (GPU only). fp32: true IEEE float32 on the GPU as well. PyTorch runs float32
    convolutions as TF32 on recent NVIDIA GPUs by default, whose 10-bit mantissa moves features by about 1e-3
    relative; fp32 here means the same numbers as on the CPU, to float32 rounding.
    """
    if device.type != "cuda":
        yield
        return
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None:
        with torch.autocast("cuda", dtype=dtype):
            yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@dataclass(frozen=True)
class Stage:
    """One stage of an encoder: its name, module and output channels."""

    name: str
    module: nn.Module
    channels: int


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint file that a histopathology encoder is loaded from."""

    filename: str
    url: str
    reference: str


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry: how to build the network, split it into stages and find its weights."""

    name: str
    build: Callable[[], nn.Module]
    stages: Callable[[nn.Module], list[Stage]]
    architecture: str
    family: str
    imagenet_weights: tvm.WeightsEnum | None = None
    checkpoint: Checkpoint | None = None


_REGISTRY: dict[str, EncoderSpec] = {}


def register(
    name: str,
    *,
    stages: Callable[[nn.Module], list[Stage]],
    architecture: str | None = None,
    family: str = "imagenet",
    imagenet_weights: tvm.WeightsEnum | None = None,
    checkpoint: Checkpoint | None = None,
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator adding an encoder to the registry under ``name`` (the function builds the untrained model)."""

    def add(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"encoder '{name}' is already registered")
        _REGISTRY[name] = EncoderSpec(
            name, build, stages, architecture or build.__name__, family, imagenet_weights, checkpoint
        )
        return build

    return add


def _out_channels(module: nn.Module) -> int:
    """Output channels of a torchvision block (ResNet block, MBConv, Conv2dNormActivation, Sequential)."""
    if hasattr(module, "out_channels"):
        return int(module.out_channels)
    if isinstance(module, tvm.resnet.Bottleneck):
        return module.bn3.num_features
    if isinstance(module, tvm.resnet.BasicBlock):
        return module.bn2.num_features
    if isinstance(module, nn.Sequential):
        return _out_channels(module[-1])
    raise TypeError(f"cannot tell the output channels of {type(module).__name__}")


def resnet_stages(m: tvm.ResNet) -> list[Stage]:
    """``stem``, ``layer1`` .. ``layer4`` of a torchvision ResNet."""
    stem = nn.Sequential(OrderedDict(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool))
    stages = [Stage("stem", stem, m.bn1.num_features)]
    for i in range(1, 5):
        layer = getattr(m, f"layer{i}")
        stages.append(Stage(f"layer{i}", layer, _out_channels(layer)))
    return stages


def densenet_stages(m: tvm.DenseNet) -> list[Stage]:
    """``stem``, ``denseblock1`` .. ``denseblock4`` of a torchvision DenseNet (transitions open stages 2-4)."""
    f = m.features
    stem = nn.Sequential(OrderedDict(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0))
    stages = [Stage("stem", stem, f.norm0.num_features)]
    channels = f.norm0.num_features
    for i in range(1, 5):
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if i > 1:
            transition = getattr(f, f"transition{i - 1}")
            parts[f"transition{i - 1}"] = transition
            channels = transition.conv.out_channels
        block = getattr(f, f"denseblock{i}")
        parts[f"denseblock{i}"] = block
        channels += sum(layer.conv2.out_channels for layer in block.values())
        if i == 4:
            parts["norm5"] = f.norm5
            parts["relu5"] = nn.ReLU(inplace=True)
            channels = f.norm5.num_features
        stages.append(Stage(f"denseblock{i}", nn.Sequential(parts), channels))
    return stages


def efficientnet_stages(m: tvm.EfficientNet) -> list[Stage]:
    """``stem``, ``stage1`` .. ``stage4`` of a torchvision EfficientNet, split at strides 4, 8, 16, 32."""
    f = m.features
    groups = {"stem": [0], "stage1": [1, 2], "stage2": [3], "stage3": [4, 5], "stage4": [6, 7, 8]}
    stages = []
    for name, idx in groups.items():
        module = nn.Sequential(OrderedDict((f"features{i}", f[i]) for i in idx))
        stages.append(Stage(name, module, _out_channels(f[idx[-1]])))
    return stages


CIGA = Checkpoint(
    "tenpercent_resnet18.ckpt",
    "https://github.com/ozanciga/self-supervised-histopathology/releases/tag/tenpercent",
    "Ciga et al., Self supervised contrastive learning for digital histopathology, MLWA 2022",
)
MORMONT_RESNET50 = Checkpoint(
    "resnet50-mh-best-191205-141200.pth",
    "https://github.com/waliens/multitask-dipath (README, 'Raw model files': "
    "https://dox.uliege.be/index.php/s/kvABLtVuMxW8iJy/download)",
    "Mormont et al., Multi-task pre-training of deep neural networks for digital pathology, JBHI 2021",
)
MORMONT_DENSENET121 = Checkpoint(
    "densenet121-mh-best-191205-141200.pth",
    "https://github.com/waliens/multitask-dipath (README, 'Raw model files': "
    "https://dox.uliege.be/index.php/s/G72InP4xmJvOrVp/download)",
    "Mormont et al., Multi-task pre-training of deep neural networks for digital pathology, JBHI 2021",
)


@register("resnet18", stages=resnet_stages, imagenet_weights=tvm.ResNet18_Weights.DEFAULT)
def resnet18() -> nn.Module:
    return tvm.resnet18()


@register("resnet34", stages=resnet_stages, imagenet_weights=tvm.ResNet34_Weights.DEFAULT)
def resnet34() -> nn.Module:
    return tvm.resnet34()


@register("resnet50", stages=resnet_stages, imagenet_weights=tvm.ResNet50_Weights.DEFAULT)
def resnet50() -> nn.Module:
    return tvm.resnet50()


@register("densenet121", stages=densenet_stages, imagenet_weights=tvm.DenseNet121_Weights.DEFAULT)
def densenet121() -> nn.Module:
    return tvm.densenet121()


@register("densenet169", stages=densenet_stages, imagenet_weights=tvm.DenseNet169_Weights.DEFAULT)
def densenet169() -> nn.Module:
    return tvm.densenet169()


@register("efficientnet_b0", stages=efficientnet_stages, imagenet_weights=tvm.EfficientNet_B0_Weights.DEFAULT)
def efficientnet_b0() -> nn.Module:
    return tvm.efficientnet_b0()


@register("efficientnet_b1", stages=efficientnet_stages, imagenet_weights=tvm.EfficientNet_B1_Weights.DEFAULT)
def efficientnet_b1() -> nn.Module:
    return tvm.efficientnet_b1()


@register("efficientnet_b2", stages=efficientnet_stages, imagenet_weights=tvm.EfficientNet_B2_Weights.DEFAULT)
def efficientnet_b2() -> nn.Module:
    return tvm.efficientnet_b2()


@register("efficientnet_b3", stages=efficientnet_stages, imagenet_weights=tvm.EfficientNet_B3_Weights.DEFAULT)
def efficientnet_b3() -> nn.Module:
    return tvm.efficientnet_b3()


@register("ciga-simclr-resnet18", stages=resnet_stages, architecture="resnet18", family="histopathology",
          checkpoint=CIGA)
def ciga_simclr_resnet18() -> nn.Module:
    return tvm.resnet18()


@register("mormont-mtl-resnet50", stages=resnet_stages, architecture="resnet50", family="histopathology",
          checkpoint=MORMONT_RESNET50)
def mormont_mtl_resnet50() -> nn.Module:
    return tvm.resnet50()


@register("mormont-mtl-densenet121", stages=densenet_stages, architecture="densenet121",
          family="histopathology", checkpoint=MORMONT_DENSENET121)
def mormont_mtl_densenet121() -> nn.Module:
    return tvm.densenet121()


class Encoder(nn.Module):
    """A patch encoder: kept stages of a network followed by global average pooling.

    ``forward(x)`` gives (B, feature_dim); ``forward_stages(x)`` gives each kept stage's un-pooled output
    (what CKA compares), the pooled last one being ``forward(x)``.
    """

    def __init__(self, name: str, stages: list[Stage], truncate: int, weights_source: str,
                 weights_sha256: str | None):
        super().__init__()
        self.body = nn.Sequential(OrderedDict((s.name, s.module) for s in stages))
        self.name = name
        self.truncate = truncate
        self.stage_names = [s.name for s in stages]
        self.feature_dim = stages[-1].channels
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised RGB -> (B, feature_dim) globally average-pooled features."""
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The un-pooled (B, C, h, w) output of every kept stage, in ``stage_names`` order."""
        outs = []
        for stage in self.body:
            x = stage(x)
            outs.append(x)
        return outs

    def extra_repr(self) -> str:
        return f"name={self.name}, truncate={self.truncate}, feature_dim={self.feature_dim}"


def list_encoders() -> list[str]:
    """Names of all registered encoders."""
    return list(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry of ``name`` (its builder and stage split), for code that rebuilds the network."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise HistotransferError(
            f"unknown encoder '{name}'; choose one of: {', '.join(_REGISTRY)}."
        ) from None


def _check_truncate(spec: EncoderSpec, truncate: int, n_stages: int) -> None:
    if not isinstance(truncate, int) or not 0 <= truncate < n_stages:
        raise HistotransferError(
            f"truncate={truncate!r} is out of range for {spec.name}: it has {n_stages} stages after the stem, "
            f"so truncate must be 0..{n_stages - 1}."
        )


def _meta_stages(spec: EncoderSpec) -> list[Stage]:
    """The stages of an encoder built without allocating weights (for shapes and counts only)."""
    with torch.device("meta"):
        return spec.stages(spec.build())


def encoder_info(name: str) -> dict[str, Any]:
    """What the registry knows about an encoder, without loading weights (for tables and ``--help``)."""
    spec = encoder_spec(name)
    stages = _meta_stages(spec)
    n = len(stages) - 1
    top1 = None
    if spec.imagenet_weights is not None:
        top1 = spec.imagenet_weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    return {
        "name": spec.name,
        "architecture": spec.architecture,
        "family": spec.family,
        "n_stages": n,
        "stage_names": [s.name for s in stages],
        "feature_dims": [stages[n - k].channels for k in range(n)],
        "n_params": sum(p.numel() for s in stages for p in s.module.parameters()),
        "imagenet_top1": top1,
        "imagenet_weights": str(spec.imagenet_weights) if spec.imagenet_weights is not None else None,
        "checkpoint": spec.checkpoint.filename if spec.checkpoint else None,
        "checkpoint_url": spec.checkpoint.url if spec.checkpoint else None,
        "reference": spec.checkpoint.reference if spec.checkpoint else None,
    }


@dataclass(frozen=True)
class WeightsChoice:
    """Where an encoder's weights come from: ``kind`` is random, imagenet or file."""

    kind: str
    path: Path | None
    source: str


def _published_checkpoint(spec: EncoderSpec) -> Path:
    ckpt = spec.checkpoint
    assert ckpt is not None
    path = weights_cache_dir() / ckpt.filename
    if not path.is_file():
        raise HistotransferError(
            f"{spec.name} needs its published checkpoint '{ckpt.filename}' ({ckpt.reference}), not found at "
            f"{path}. Download it from {ckpt.url} and pass its path as weights (--weights PATH), or put it in "
            f"{weights_cache_dir()} (set HISTOTRANSFER_WEIGHTS to use another folder)."
        )
    return path


def _imagenet_file(spec: EncoderSpec) -> Path:
    """The torchvision ImageNet checkpoint for ``spec``, downloading it into the cache when absent."""
    assert spec.imagenet_weights is not None
    url = spec.imagenet_weights.url
    path = weights_cache_dir() / Path(url).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(url, str(path), prefix.group(1) if prefix else None, progress=True)
    except Exception as exc:
        raise HistotransferError(
            f"could not download ImageNet weights for {spec.name} from {url} ({exc}); without internet, "
            f"download that file elsewhere and pass its path as weights (--weights PATH), or copy it to {path}."
        ) from exc
    return path


def resolve_weights(name: str, weights: str | Path) -> WeightsChoice:
    """Interpret ``weights``: "random", "imagenet" (each encoder's published pre-training) or a local file.

    For histopathology encoders "imagenet" (the default) and "pretrained" mean their published checkpoint,
    looked up by file name in :func:`weights_cache_dir`; nothing is downloaded at this point.
    """
    spec = encoder_spec(name)
    text = str(weights)
    if text == "random":
        return WeightsChoice("random", None, "random")
    if text in ("imagenet", "pretrained"):
        if spec.checkpoint is not None:
            path = _published_checkpoint(spec)
            return WeightsChoice("file", path, str(path))
        assert spec.imagenet_weights is not None
        return WeightsChoice("imagenet", None, f"imagenet ({spec.imagenet_weights})")
    path = Path(text).expanduser()
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise HistotransferError(
            f"weights '{text}': expected 'imagenet', 'random' or a path to a "
            f"{'/'.join(CHECKPOINT_SUFFIXES)} file."
        )
    if not path.is_file():
        raise HistotransferError(f"weights file {path} not found; pass an existing checkpoint file.")
    return WeightsChoice("file", path.resolve(), str(path.resolve()))


def create_encoder(name: str, weights: str = "imagenet", truncate: int = 0) -> Encoder:
    """Build encoder ``name`` with ``weights`` ("imagenet", "random" or a checkpoint path), cut by ``truncate``.

    "random" is torchvision's initialisation drawn with a fixed seed, identical in every process. The returned
    module is on the CPU in eval mode; the weights file's sha256 is in ``weights_sha256``.
    """
    spec = encoder_spec(name)
    choice = resolve_weights(name, weights)
    with torch.random.fork_rng(devices=[]):
        # "random" weights are the same in every process and run (resume and sharding rely on that).
        torch.manual_seed(RANDOM_INIT_SEED)
        model = spec.build()
    stages = spec.stages(model)
    _check_truncate(spec, truncate, len(stages) - 1)
    sha = None
    path = choice.path
    if choice.kind == "imagenet":
        path = _imagenet_file(spec)
    if path is not None:
        apply_state_dict(model, load_state_dict_file(path), str(path), spec.architecture)
        sha = weights_file_sha256(path)
    encoder = Encoder(name, stages[: len(stages) - truncate], truncate, choice.source, sha)
    return encoder.eval()


def encoder_id(name: str, weights: str | Path, truncate: int, input_size: int | None, precision: str,
               dtype: str = "float32") -> str:
    """Folder name for features made with these settings; different settings never share one.

    A local weights file is named by the first 12 hex digits of its sha256, so renaming the file keeps the id
    and replacing its contents changes it.
    """
    spec = encoder_spec(name)
    _check_truncate(spec, truncate, len(_meta_stages(spec)) - 1)
    if precision not in PRECISIONS:
        raise HistotransferError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
    if dtype not in ("float32", "float16"):
        raise HistotransferError(f"dtype '{dtype}': choose float32 or float16.")
    if input_size is not None and (not isinstance(input_size, int) or input_size < 16):
        raise HistotransferError(f"input size {input_size!r}: pass an integer of at least 16 pixels (or none).")
    choice = resolve_weights(name, weights)
    label = choice.kind if choice.path is None else f"w{weights_file_sha256(choice.path)[:12]}"
    parts = [name, label, f"t{truncate}", f"s{input_size}" if input_size else "native", precision]
    if dtype != "float32":
        parts.append("f16")
    return "-".join(parts)
