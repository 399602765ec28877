"""Patch encoders built from the registry: a network's kept stages and its pooling, with named weights.

An encoder maps a batch of patches prepared as its registry entry says (resized and cropped by the patch
loader's ``prepare_patch``, then :meth:`Encoder.preprocess`: RGB in [0, 1] normalised by the entry's mean and
std) to (B, D) features: the pooled output of its last kept stage (for CNNs the global average of the stage's
map, exactly as torchvision computes the pooled features before the classifier). ``truncate=k`` keeps all but
the last ``k`` stages after the stem; for transformer encoders ``blocks=n`` keeps exactly their first ``n``
blocks (the entry's :class:`~.registry.BlockCuts`, which its catalogue gives).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HistotransferError
from ..runtime import PRECISIONS
from .registry import Preprocessing, Stage, block_cuts, check_truncate, encoder_spec, meta_stages, pooled_width
from .weights import apply_state_dict, load_state_dict_file, resolve_weights, weights_file, weights_file_sha256

RANDOM_INIT_SEED = 0
FEATURE_DTYPES = ("float32", "float16")


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): the spatial mean, as torchvision's networks pool before their classifier."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class Encoder(nn.Module):
    """A patch encoder: kept stages of a network followed by its pooling.

    ``forward(x)`` gives (B, feature_dim); ``forward_stages(x)`` gives each kept stage's un-pooled output
    (what CKA compares and CAMs are computed on), the pooled last one being ``forward(x)``. ``truncate`` counts
    the stages left out entirely; ``blocks`` (transformers only, else None) the exact number of blocks kept.
    """

    def __init__(
        self,
        name: str,
        stages: list[Stage],
        truncate: int,
        weights_source: str,
        weights_sha256: str | None,
        preprocessing: Preprocessing | None = None,
        pool: nn.Module | None = None,
        weights_label: str = "",
        blocks: int | None = None,
    ):
        super().__init__()
        self.body = nn.Sequential(OrderedDict((s.name, s.module) for s in stages))
        self.pool = pool if pool is not None else GlobalAvgPool()
        self.name = name
        self.truncate = truncate
        self.blocks = blocks
        self.stage_names = [s.name for s in stages]
        self.feature_dim = pooled_width(self.pool, stages[-1].channels)
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256
        self.weights_label = weights_label
        self.preprocessing = preprocessing or Preprocessing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed RGB -> (B, feature_dim) pooled features."""
        return self.pool(self.body(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The un-pooled output of every kept stage, in ``stage_names`` order."""
        outs = []
        for stage in self.body:
            x = stage(x)
            outs.append(x)
        return outs

    def preprocess(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB, resized and cropped as ``features.loader.prepare_patch`` does with this
        encoder's record -> the normalised float (B, 3, H, W) batch this encoder takes, on ``device``
        (:meth:`Preprocessing.normalise`)."""
        return self.preprocessing.normalise(pixels, device)

    @property
    def depth_tag(self) -> str:
        """How deep the encoder is cut, as ids and labels name it: ``t<truncate>``, or ``b<blocks>``."""
        return _depth_tag(self.truncate, self.blocks)

    def with_blocks(self, blocks: int | None) -> Encoder:
        """This transformer encoder cut after exactly its first ``blocks`` blocks, sharing its modules and
        weights (itself when ``blocks`` is None): how a run's recorded ``blocks`` is applied to the encoder
        rebuilt from its ``truncate``."""
        if blocks is None:
            return self
        return block_cuts(encoder_spec(self.name), f"blocks={blocks!r}", "use truncate for it").keep(self, blocks)

    def per_block(self) -> Encoder:
        """This transformer encoder with every block a stage of its own, sharing its modules (CKA per block)."""
        cuts = block_cuts(encoder_spec(self.name), "comparing block by block", "drop per_block to compare its stages")
        return cuts.per_block(self)

    def extra_repr(self) -> str:
        depth = "" if self.blocks is None else f", blocks={self.blocks}"
        return f"name={self.name}, truncate={self.truncate}{depth}, feature_dim={self.feature_dim}"


def _depth_tag(truncate: int, blocks: int | None) -> str:
    return f"t{truncate}" if blocks is None else f"b{blocks}"


def check_blocks(name: str, truncate: int | Sequence[int], blocks: int) -> int:
    """Refuse ``blocks`` for a CNN, out of range, or with a truncation other than 0 or the one ``blocks``
    implies; returns that truncation (the quarter stages left out entirely)."""
    cuts = block_cuts(encoder_spec(name), f"blocks={blocks!r}", "use truncate for it")
    implied = cuts.truncation(name, blocks)
    for t in [truncate] if isinstance(truncate, int) else truncate:
        if t not in (0, implied):
            raise HistotransferError(
                f"truncate={t!r} with blocks={blocks}: blocks sets the depth of {name} by itself; pass blocks alone."
            )
    return implied


def create_encoder(
    name: str,
    weights: str | None = None,
    truncate: int = 0,
    random_seed: int = RANDOM_INIT_SEED,
    blocks: int | None = None,
) -> Encoder:
    """Build encoder ``name`` with ``weights`` (None: its default; a named option, "random" or a checkpoint
    path), cut by ``truncate``, or for a transformer after exactly its first ``blocks`` blocks.

    "random" is the architecture's initialisation drawn with a fixed seed (``random_seed``), identical in every
    process. The returned module is on the CPU in eval mode; the weights file's sha256 is in ``weights_sha256``.
    With ``blocks``, ``truncate`` may only be 0 or the truncation ``blocks`` implies (what the encoder records),
    so an encoder's own ``truncate`` and ``blocks`` rebuild it.
    """
    return create_encoders(name, weights, [truncate], random_seed, blocks)[truncate]


def create_encoders(
    name: str,
    weights: str | None = None,
    truncations: Sequence[int] = (0,),
    random_seed: int = RANDOM_INIT_SEED,
    blocks: int | None = None,
) -> dict[int, Encoder]:
    """Encoder ``name`` with ``weights`` cut by each of ``truncations``, as :func:`create_encoder` builds it.

    The network is built and its weights loaded once: the encoders share its modules (each keeps its own
    pooling), so one forward pass through the deepest serves them all and a large network is held once.
    With ``blocks``, every encoder keeps exactly the first ``blocks`` blocks (see :func:`check_blocks`).
    """
    spec = encoder_spec(name)
    if blocks is not None:
        check_blocks(name, list(truncations), blocks)  # before any weights are read
    choice = resolve_weights(name, weights)
    with torch.random.fork_rng(devices=[]):
        # "random" weights are the same in every process and run (resume and sharding rely on that).
        torch.manual_seed(random_seed)
        model = spec.build()
    stages = spec.stages(model)
    for truncate in truncations:
        check_truncate(spec, truncate, len(stages) - 1)
    sha = None
    path = weights_file(spec, choice)
    if path is not None:
        state = load_state_dict_file(path)
        if choice.option is not None and choice.option.convert is not None:
            state = choice.option.convert(state)
        apply_state_dict(model, state, str(path), spec.architecture)
        sha = weights_file_sha256(path)
    encoders = {}
    for truncate in truncations:
        cut = 0 if blocks is not None else truncate  # blocks are cut from the whole network
        kept = stages[: len(stages) - cut]
        pool = spec.pool(model, kept) if spec.pool is not None else None
        encoder = Encoder(name, kept, cut, choice.source, sha, spec.preprocessing, pool, choice.label).eval()
        encoders[truncate] = encoder.with_blocks(blocks)
    return encoders


def check_extraction_settings(precision: str, dtype: str, input_size: int | None) -> None:
    """Refuse extraction settings outside what the feature files can record."""
    if precision not in PRECISIONS:
        raise HistotransferError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
    if dtype not in FEATURE_DTYPES:
        raise HistotransferError(f"dtype '{dtype}': choose float32 or float16.")
    if input_size is not None and (not isinstance(input_size, int) or input_size < 16):
        raise HistotransferError(f"input size {input_size!r}: pass an integer of at least 16 pixels (or none).")


def encoder_id(
    name: str,
    weights: str | None,
    truncate: int,
    input_size: int | None,
    precision: str,
    dtype: str = "float32",
    extra: tuple[str, ...] = (),
    blocks: int | None = None,
) -> str:
    """Folder name for features made with these settings; different settings never share one.

    Weights are named by their option (``imagenet``, ``imagenet-v2``, ``random``) or, for a checkpoint file,
    by ``w`` + the first 12 hex digits of its sha256, so renaming the file keeps the id and replacing its
    contents changes it. The depth is ``t<truncate>``, or ``b<blocks>`` for an exact number of transformer
    blocks (so two depths never share a folder, even where they give the same features). ``extra`` appends
    further settings' tags (e.g. a stain normalisation).
    """
    spec = encoder_spec(name)
    if blocks is None:
        check_truncate(spec, truncate, len(meta_stages(spec)) - 1)
    else:
        check_blocks(name, truncate, blocks)
    check_extraction_settings(precision, dtype, input_size)
    label = resolve_weights(name, weights).label
    parts = [name, label, _depth_tag(truncate, blocks), f"s{input_size}" if input_size else "native", precision, *extra]
    if dtype != "float32":
        parts.append("f16")
    return "-".join(parts)


def describe_encoder(encoder: Encoder) -> dict[str, Any]:
    """How an encoder's features are made, as recorded in feature files and run configs (``blocks`` only for
    an exact number of transformer blocks, so that other records read as before it existed)."""
    described = {
        "encoder": encoder.name,
        "truncate": encoder.truncate,
        "weights": encoder.weights_source,
        "weights_label": encoder.weights_label,
        "weights_sha256": encoder.weights_sha256 or "",
        "feature_dim": encoder.feature_dim,
        "stage": encoder.stage_names[-1],
    }
    if encoder.blocks is not None:
        described["blocks"] = encoder.blocks
    return described
