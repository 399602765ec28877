"""The encoder registry: what every patch encoder is, behind one name.

An entry (:class:`EncoderSpec`) says how to build the untrained network, how to split it into a stem and
stages (what truncation cuts and CKA compares), how its pixels are prepared (:class:`Preprocessing`, as timm's
pretrained config does), how its last kept stage becomes one vector (``pool``) and which named weights it has
(:class:`WeightsOption`); a transformer's entry also says how it is cut by blocks (:class:`BlockCuts`). Entries
are added with :func:`register`. This module imports no catalogue: the catalogue modules (``cnn``, ``vit``) register
their encoders into it when imported, and the package's front door looks encoders up through ``zoo``, which imports
them all first, as timm's ``_registry`` is filled by its model modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import HistotransferError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"


RESIZE_METHODS = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """How patch pixels become the network's input, as the model card's transform makes them: resized, centre
    cropped, then RGB in [0, 1] normalised by ``mean`` / ``std``. One record per encoder, applied by
    ``features.loader.prepare_patch`` wherever pixels reach an encoder (extraction, fine-tuning, CKA, CAMs).

    ``input_size`` is the side the network gets (None: any size, patches are fed at their tiled size unless the
    user resizes). ``interpolation`` is how patches are resized: "bilinear" or "bicubic" as PIL resizes them
    (what torchvision's and timm's transforms do on PIL images), or "area", OpenCV's area averaging when
    shrinking (bilinear when growing), the CNN records'. ``resize_size``, where the card crops, is the side
    patches are resized to before a centre crop to ``input_size`` (Prov-GigaPath: Resize(256) then
    CenterCrop(224)); None resizes straight to ``input_size``.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int | None = None
    interpolation: str = "area"
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in RESIZE_METHODS:
            raise ValueError(f"interpolation '{self.interpolation}': choose one of {', '.join(RESIZE_METHODS)}")
        if self.resize_size is not None and (self.input_size is None or self.resize_size < self.input_size):
            raise ValueError("resize_size needs an input_size no larger than itself (it is cropped to input_size)")

    def at(self, size: int | None) -> Preprocessing:
        """This record for input side ``size`` (None: patches at their tiled size, no resize nor crop); a crop
        keeps the card's ratio of crop to resize (Resize(256) + CenterCrop(224) at 448 px: 512 then 448)."""
        if size is None:
            return replace(self, input_size=None, resize_size=None)
        if size == self.input_size:
            return self
        resize = (
            None
            if self.resize_size is None or self.input_size is None
            else round(size * self.resize_size / self.input_size)
        )
        return replace(self, input_size=size, resize_size=resize)

    def normalise(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB (already resized and cropped) -> the normalised float (B, 3, H, W) batch, on
        ``device``: ``ToTensor`` then ``Normalize``, the same float32 operations in the same order.

        NHWC permuted to NCHW is channels_last in memory already; the elementwise ops keep that layout.
        """
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        return x.div_(255).sub_(mean).div_(std)

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, recorded in every feature file (``crop`` is the centre crop's side)."""
        return {
            "scale": "rgb / 255",
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "resize_size": self.resize_size or self.input_size,
            "crop": self.input_size if self.resize_size is not None else None,
        }

    def summary(self) -> str:
        """One line, as a transform reads: e.g. ``Resize(256, bicubic) -> CenterCrop(224) -> Normalize(...)``."""
        steps = []
        if self.input_size is not None:
            steps.append(f"Resize({self.resize_size or self.input_size}, {self.interpolation})")
            if self.resize_size is not None:
                steps.append(f"CenterCrop({self.input_size})")
        else:
            steps.append(
                "tiled size (OpenCV area when an input size is given)"
                if self.interpolation == "area"
                else f"tiled size ({self.interpolation} when an input size is given)"
            )
        rgb = ", ".join(f"{v:.4g}" for v in self.mean), ", ".join(f"{v:.4g}" for v in self.std)
        steps.append(f"Normalize(mean=({rgb[0]}), std=({rgb[1]}))")
        return " -> ".join(steps)


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint file an encoder's weights are loaded from (never downloaded by histotransfer)."""

    filename: str
    url: str
    reference: str
    access: str = ""  # e.g. a licence that requires accepting terms and logging in before downloading


@dataclass(frozen=True)
class HubFile:
    """A file of a public Hugging Face Hub repository (timm's ImageNet weights), fetched on first use."""

    repo_id: str
    filename: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"


@dataclass(frozen=True)
class WeightsOption:
    """A named set of pre-trained weights of an encoder.

    ``torchvision`` weights and ``hub`` files are fetched into the weights folder on first use (the library's
    published file); a ``checkpoint`` must be put there (or given as a path) by the user. ``imagenet_top1`` is
    the ImageNet accuracy of exactly these weights; ``paper_top1`` is the figure the HistoTransfer paper's
    Table I lists for the weights it used, when these are the nearest available ones rather than the same.
    """

    name: str
    description: str
    torchvision: Any = None  # a torchvision.models.WeightsEnum member
    checkpoint: Checkpoint | None = None
    hub: HubFile | None = None
    imagenet_top1: float | None = None
    paper_top1: float | None = None
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.torchvision, self.checkpoint, self.hub)) != 1:
            raise ValueError(f"weights '{self.name}': give exactly one of torchvision, checkpoint or hub")


@dataclass(frozen=True)
class Stage:
    """One stage of an encoder: its name, module and output width."""

    name: str
    module: nn.Module
    channels: int


@dataclass(frozen=True)
class BlockCuts:
    """How a transformer's catalogue cuts it by blocks rather than by stages.

    ``truncation(name, blocks)`` is the number of stages that keeping the first ``blocks`` blocks leaves out
    entirely (after checking ``blocks``); ``keep(encoder, blocks)`` is a built encoder cut after exactly its
    first ``blocks`` blocks; ``per_block(encoder)`` is the encoder with each block a stage of its own.
    """

    truncation: Callable[[str, int], int]
    keep: Callable[[Any, int], Any]
    per_block: Callable[[Any], Any]


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry (see the module docstring)."""

    name: str
    build: Callable[[], nn.Module]
    stages: Callable[[nn.Module], list[Stage]]
    architecture: str
    family: str
    weights: dict[str, WeightsOption]
    default_weights: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    pool: Callable[[nn.Module, list[Stage]], nn.Module] | None = None
    reference: str = ""
    cuts: BlockCuts | None = None

    def weights_option(self, name: str) -> WeightsOption:
        """The named weights of this encoder (an error listing the names it has otherwise)."""
        try:
            return self.weights[name]
        except KeyError:
            names = ", ".join([*self.weights, RANDOM])
            raise HistotransferError(
                f"encoder {self.name} has no weights named '{name}'; choose one of {names} or a checkpoint file."
            ) from None


_REGISTRY: dict[str, EncoderSpec] = {}


def register(
    name: str,
    *,
    stages: Callable[[nn.Module], list[Stage]],
    weights: list[WeightsOption],
    architecture: str | None = None,
    family: str = "imagenet",
    default_weights: str | None = None,
    preprocessing: Preprocessing | None = None,
    pool: Callable[[nn.Module, list[Stage]], nn.Module] | None = None,
    reference: str = "",
    cuts: BlockCuts | None = None,
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator adding an encoder under ``name``; the decorated function builds the untrained network.

    ``default_weights`` is what ``weights=None`` (and the CLI default) means: the first option unless given.
    ``pool`` turns the last kept stage's output into (B, D) features (default: global average pooling).
    ``cuts`` (transformers only) says how the network is cut by blocks.
    """

    def add(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"encoder '{name}' is already registered")
        options = {w.name: w for w in weights}
        default = default_weights or (weights[0].name if weights else RANDOM)
        if default != RANDOM and default not in options:
            raise ValueError(f"encoder '{name}': default weights '{default}' are not among its weights")
        _REGISTRY[name] = EncoderSpec(
            name,
            build,
            stages,
            architecture or build.__name__,
            family,
            options,
            default,
            preprocessing or Preprocessing(),
            pool,
            reference,
            cuts,
        )
        return build

    return add


def list_encoders() -> list[str]:
    """Names of all registered encoders, in registration order."""
    return list(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise HistotransferError(f"unknown encoder '{name}'; choose one of: {', '.join(_REGISTRY)}.") from None


def block_cuts(spec: EncoderSpec, what: str, instead: str) -> BlockCuts:
    """How entry ``spec`` is cut by blocks; for an encoder that is not a transformer, an error saying that ``what``
    applies to transformers only and what to do ``instead``."""
    if spec.cuts is None:
        names = ", ".join(name for name, entry in _REGISTRY.items() if entry.cuts is not None)
        raise HistotransferError(f"{what} applies to transformer encoders ({names}), not {spec.name}; {instead}.")
    return spec.cuts


def meta_stages(spec: EncoderSpec) -> list[Stage]:
    """The stages of an encoder built without allocating weights (for shapes and counts only)."""
    with torch.device("meta"):
        return spec.stages(spec.build())


def pooled_width(pool: nn.Module | None, channels: int) -> int:
    """Width of the pooled features: a pool's ``out_features`` where it has one (e.g. class token
    concatenated with the mean patch token), else the last kept stage's ``channels``."""
    return int(getattr(pool, "out_features", channels))


def check_truncate(spec: EncoderSpec, truncate: int, n_stages: int | None = None) -> None:
    """Refuse a truncation that would remove every stage after the stem."""
    n = len(meta_stages(spec)) - 1 if n_stages is None else n_stages
    if not isinstance(truncate, int) or isinstance(truncate, bool) or not 0 <= truncate < n:
        raise HistotransferError(
            f"truncate={truncate!r} is out of range for {spec.name}: it has {n} stages after the stem, "
            f"so truncate must be 0..{n - 1}."
        )


def encoder_info(name: str) -> dict[str, Any]:
    """What the registry knows about an encoder, without loading weights (for tables and listings);
    ``transformer_blocks`` is a transformer's depth (what ``blocks`` may keep), None for a CNN."""
    spec = encoder_spec(name)
    with torch.device("meta"):
        model = spec.build()
        stages = spec.stages(model)
        n = len(stages) - 1
        pools = [spec.pool(model, stages[: n + 1 - k]) if spec.pool is not None else None for k in range(n)]
    default = spec.weights.get(spec.default_weights)
    return {
        "name": spec.name,
        "architecture": spec.architecture,
        "family": spec.family,
        "n_stages": n,
        "stage_names": [s.name for s in stages],
        "feature_dims": [pooled_width(pools[k], stages[n - k].channels) for k in range(n)],
        "n_params": sum(p.numel() for s in stages for p in s.module.parameters()),
        "transformer_blocks": sum(1 for s in stages[1:] for _ in s.module.children())
        if spec.cuts is not None
        else None,
        "default_weights": spec.default_weights,
        "weights": {w.name: weights_info(w) for w in spec.weights.values()},
        "imagenet_top1": default.imagenet_top1 if default is not None else None,
        "preprocessing": spec.preprocessing.describe(),
        "pixels": spec.preprocessing.summary(),
        "reference": spec.reference,
    }


def weights_info(option: WeightsOption) -> dict[str, Any]:
    """One weights option as plain values."""
    ckpt, hub = option.checkpoint, option.hub
    source = str(option.torchvision) if option.torchvision is not None else None
    return {
        "name": option.name,
        "description": option.description,
        "source": f"hf-hub:{hub.repo_id}" if hub else source,
        "imagenet_top1": option.imagenet_top1,
        "paper_top1": option.paper_top1,
        "checkpoint": ckpt.filename if ckpt else (f"{hub.repo_id}/{hub.filename}" if hub else None),
        "checkpoint_url": ckpt.url if ckpt else (hub.url if hub else None),
        "reference": ckpt.reference if ckpt else None,
        "access": ckpt.access if ckpt else None,
    }


def weights_top1(name: str, weights: str | None) -> float | None:
    """The ImageNet top-1 of an encoder's named ``weights`` (None for random, files and non-ImageNet weights)."""
    spec = encoder_spec(name)
    option = spec.weights.get(spec.default_weights if weights is None else str(weights))
    return option.imagenet_top1 if option is not None else None
