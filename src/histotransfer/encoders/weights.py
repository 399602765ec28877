"""Which weights an encoder gets, and loading them from checkpoint files without ever running code in them.

``weights`` is ``None`` (the encoder's default), ``"random"`` (the architecture's initialisation drawn from a
fixed seed), one of the encoder's named options (``imagenet``, ``imagenet-v2``, ``pretrained``, ...; see the
registry) or a path to a checkpoint file.

``.safetensors`` files hold tensors only; ``.pth`` / ``.pt`` / ``.ckpt`` files are read with
``torch.load(weights_only=True)``, which refuses any pickled object other than tensors and plain containers.
Published checkpoints wrap a torchvision or timm state dict in different ways (nested under ``state_dict`` or
``model``, keys prefixed by the training wrapper, a classification or multi-task head): they are normalised
here to the library's own key names (a transformers ``Dinov2Model`` state dict is renamed to timm's
VisionTransformer names), and :func:`apply_state_dict` then refuses anything that does not fit the model
exactly, instead of a silent partial load.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .._io import file_sha256
from .._read import check_regular_file
from ..errors import HistotransferError
from .registry import RANDOM, EncoderSpec, WeightsOption, encoder_spec

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")

# Containers a state dict is nested under (PyTorch Lightning, common training scripts).
NESTING_KEYS = ("state_dict", "model_state_dict", "model")

# Top-level modules that are classification heads, not part of an encoder: torchvision's ``fc``
# (ResNet) and ``classifier`` (DenseNet, EfficientNet), timm's ``head`` (VisionTransformer) and the per-task
# ``heads`` of multi-task models.
HEAD_ROOTS = frozenset({"fc", "classifier", "head", "heads"})

# Top-level module names of the torchvision architectures in the registry. A prefix shared by every key is a
# training wrapper (``module.``, ``model.resnet.``, ...) to strip, unless it is one of these names, or
# stripping it leaves keys that start with these names (``features.features.*`` of a multi-task DenseNet).
TORCHVISION_ROOTS = frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "features", "fc", "classifier"})

# torchvision's pre-0.4 DenseNet checkpoints name layers ``norm.1`` instead of ``norm1``; torchvision's own
# loader renames them with this pattern, and so do we.
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)

# transformers' Dinov2Model (Phikon-v2's published layout) -> timm's VisionTransformer. The attention's
# separate query/key/value projections become timm's fused ``qkv`` (stacked in that order, as timm splits it);
# the mask token is only used in pre-training.
DINOV2_MARK = "embeddings.patch_embeddings.projection.weight"
_DINOV2_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_DINOV2_RENAMES = (
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$"), r"blocks.\1.ls\2.gamma"),
    (re.compile(r"^encoder\.layer\.(\d+)\.(norm[12]|mlp\.fc[12])\."), r"blocks.\1.\2."),
    (re.compile(r"^layernorm\."), "norm."),
)
_DINOV2_DROPPED = frozenset({"embeddings.mask_token"})


def weights_cache_dir() -> Path:
    """Where pre-trained checkpoint files are looked for: ``$HISTOTRANSFER_WEIGHTS`` or torch's hub cache."""
    env = os.environ.get("HISTOTRANSFER_WEIGHTS")
    return Path(env) if env else Path(torch.hub.get_dir()) / "checkpoints"


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def weights_file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, computed once per process for an unchanged file."""
    check_regular_file(path, "weights")
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _read_checkpoint(path: Path) -> object:
    """The raw object stored in a checkpoint file, never unpickling anything but tensors and containers."""
    check_regular_file(path, "weights")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise HistotransferError(
                f"{path}: not a readable safetensors file ({exc}); the file may be truncated: download it again."
            ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise HistotransferError(
                f"{path}: refused: the checkpoint stores Python objects, not only tensors "
                f"({_unpickler_reason(exc)}), and loading it could run code from the file. If you trust its "
                "source, load it once yourself and save its state dict with safetensors.torch.save_file, then "
                "pass the .safetensors file."
            ) from exc
        raise HistotransferError(
            f"{path}: not a readable PyTorch checkpoint ({' '.join(str(exc).split())[:160]}); the file may be "
            "truncated or corrupt: download it again."
        ) from exc


def _unpickler_reason(exc: BaseException) -> str:
    """The one paragraph of torch's weights_only error that says what was refused."""
    for para in str(exc).split("\n\n"):
        para = " ".join(para.replace("WeightsUnpickler error:", "").split())
        if para and not para.startswith(("Weights only load failed", "Check the documentation")):
            return para[:200]
    return type(exc).__name__


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint, descending through ``state_dict`` / ``model`` containers."""
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise HistotransferError(
                f"{path}: no state dict found (top-level keys: {keys}); expected tensors, optionally nested "
                f"under one of {', '.join(NESTING_KEYS)}."
            )
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise HistotransferError(f"{path}: holds no tensors; pass a state dict checkpoint.")
    return {str(k): v for k, v in obj.items()}


def _root(key: str) -> str:
    return key.split(".", 1)[0]


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip training-wrapper prefixes, drop classification heads, rename legacy DenseNet keys."""
    while True:
        state = {k: v for k, v in state.items() if _root(k) not in HEAD_ROOTS}
        roots = {_root(k) for k in state}
        if len(roots) != 1 or all("." not in k for k in state):
            break
        prefix = roots.pop()
        stripped = {k[len(prefix) + 1 :]: v for k, v in state.items()}
        if prefix in TORCHVISION_ROOTS and not {_root(k) for k in stripped} <= TORCHVISION_ROOTS:
            break
        state = stripped
    renamed = {}
    for key, value in state.items():
        m = _LEGACY_DENSENET.match(key)
        renamed[m.group(1) + m.group(2) if m else key] = value
    return dinov2_to_timm(renamed) if DINOV2_MARK in renamed else renamed


def _dinov2_key(key: str) -> str:
    for pattern, replacement in _DINOV2_RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def dinov2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model`` state dict under timm's VisionTransformer key names.

    Keys it does not know are kept as they are and a layer without all of query, key and value gets no ``qkv``,
    so that the strict load names what does not fit.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _DINOV2_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif key not in _DINOV2_DROPPED:
            out[_dinov2_key(key)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint as a torchvision- or timm-style state dict: heads dropped, wrapper prefixes stripped.

    Accepts ``.safetensors`` and ``.pth`` / ``.pt`` / ``.ckpt`` / ``.bin`` (loaded with ``weights_only=True``);
    a file whose pickle would construct anything but tensors is refused with a HistotransferError.
    """
    path = Path(path)
    if not path.is_file():
        raise HistotransferError(f"{path}: weights file not found; pass an existing .safetensors/.pth file.")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise HistotransferError(
            f"{path}: unknown weights file type '{path.suffix}'; expected one of {', '.join(CHECKPOINT_SUFFIXES)}."
        )
    state = _unwrap(_read_checkpoint(path), path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise HistotransferError(f"{path}: entries that are not tensors: {', '.join(bad[:5])}.")
    return normalize_keys(state)


def _preview(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _library(model: nn.Module) -> str:
    """The library whose key names ``model`` has (for error messages)."""
    return "timm" if type(model).__module__.startswith("timm.") else "torchvision"


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, architecture: str) -> None:
    """Load ``state`` into a full torchvision or timm ``model``; any key mismatch outside the head is an error."""
    own = model.state_dict()
    # BatchNorm's num_batches_tracked only matters for training with momentum=None; files converted from
    # other frameworks lack it.
    missing = [
        k for k in own if k not in state and _root(k) not in HEAD_ROOTS and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_preview(shapes, 2)}")
        lib = _library(model)
        raise HistotransferError(
            f"{source}: does not fit a {lib} {architecture}: {'; '.join(parts)}. "
            f"Pass weights of a {architecture} (a {lib} state dict, optionally nested or prefixed)."
        )
    model.load_state_dict(state, strict=False)


# How encoder ids name weights loaded from a file: "w" + the first 12 hex digits of its sha256.
FILE_LABEL = re.compile(r"w[0-9a-f]{12}")


def is_file_label(label: str) -> bool:
    """Whether a weights label names a checkpoint file (rather than a named option or random weights)."""
    return FILE_LABEL.fullmatch(label) is not None


@dataclass(frozen=True)
class WeightsChoice:
    """Resolved weights: ``kind`` is random, named (an option of the registry) or file (a user's checkpoint)."""

    kind: str
    option: WeightsOption | None
    path: Path | None
    source: str

    @property
    def label(self) -> str:
        """How encoder ids name these weights: the option's name (weights a library publishes), or ``w`` + 12
        hex of a file's sha256 (user-supplied checkpoints)."""
        if self.kind == RANDOM:
            return RANDOM
        if self.option is not None and self.option.checkpoint is None:
            return self.option.name
        assert self.path is not None
        return f"w{weights_file_sha256(self.path)[:12]}"


def _published_checkpoint(spec: EncoderSpec, option: WeightsOption) -> Path:
    ckpt = option.checkpoint
    assert ckpt is not None
    path = weights_cache_dir() / ckpt.filename
    if not path.is_file():
        access = f" {ckpt.access}" if ckpt.access else ""
        raise HistotransferError(
            f"{spec.name} needs its published checkpoint '{ckpt.filename}' ({ckpt.reference}), not found at "
            f"{path}. Download it from {ckpt.url}{access} and pass its path as the weights (--weights PATH; "
            f"for cka --weights-a or --weights-b), or put it in {weights_cache_dir()} (set HISTOTRANSFER_WEIGHTS to "
            "use another folder)."
        )
    return path


def torchvision_file(spec: EncoderSpec, option: WeightsOption) -> Path:
    """The torchvision checkpoint of ``option``, downloaded into the weights folder when absent."""
    url = option.torchvision.url
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
            f"download that file elsewhere and pass its path as the weights (--weights PATH; for cka --weights-a "
            f"or --weights-b), or copy it to {path}."
        ) from exc
    return path


def hub_path(option: WeightsOption) -> Path:
    """Where a hub option's file lives in the weights folder: ``<repo_id>/<filename>``."""
    assert option.hub is not None
    return weights_cache_dir() / option.hub.repo_id / option.hub.filename


def hub_file(spec: EncoderSpec, option: WeightsOption) -> Path:
    """The Hugging Face Hub file of ``option``, downloaded into the weights folder when absent."""
    hub = option.hub
    assert hub is not None
    path = hub_path(option)
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub.repo_id, hub.filename, local_dir=path.parent))
    except Exception as exc:
        raise HistotransferError(
            f"could not download ImageNet weights for {spec.name} from {hub.url} ({exc}); without internet, "
            f"download that file elsewhere and pass its path as the weights (--weights PATH; for cka --weights-a "
            f"or --weights-b), or copy it to {path}."
        ) from exc


def resolve_weights(name: str, weights: str | Path | None) -> WeightsChoice:
    """Interpret ``weights`` for encoder ``name`` (see the module docstring); nothing is downloaded here."""
    spec = encoder_spec(name)
    text = spec.default_weights if weights is None else str(weights)
    if text == RANDOM:
        return WeightsChoice(RANDOM, None, None, RANDOM)
    if text in spec.weights:
        option = spec.weights[text]
        if option.checkpoint is not None:
            path = _published_checkpoint(spec, option)
            return WeightsChoice("named", option, path, str(path))
        if option.hub is not None:
            return WeightsChoice("named", option, None, f"{option.name} (hf-hub:{option.hub.repo_id})")
        return WeightsChoice("named", option, None, f"{option.name} ({option.torchvision})")
    path = Path(text).expanduser()
    if path.suffix not in CHECKPOINT_SUFFIXES:
        names = ", ".join([*spec.weights, RANDOM])
        raise HistotransferError(
            f"weights '{text}' for {name}: expected one of {names} or a path to a {'/'.join(CHECKPOINT_SUFFIXES)} file."
        )
    if not path.is_file():
        raise HistotransferError(f"weights file {path} not found; pass an existing checkpoint file.")
    return WeightsChoice("file", None, path.resolve(), str(path.resolve()))


def weights_file(spec: EncoderSpec, choice: WeightsChoice) -> Path | None:
    """The file to load for ``choice`` (a torchvision or hub option's file is fetched now), None for random
    weights."""
    if choice.option is not None and choice.option.torchvision is not None:
        return torchvision_file(spec, choice.option)
    if choice.option is not None and choice.option.hub is not None:
        return hub_file(spec, choice.option)
    return choice.path
