"""The encoders a CKA compares: a spec (name, run folder, fine-tuned ``encoder.pt``, Encoder) resolved to an
encoder, its label and the stain normalisation of its pixels; how its pixels are prepared; and the random
initialisations the baseline draws.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from timm.layers import LayerScale

from ..encoders import Encoder, Preprocessing, create_encoder, is_file_label
from ..errors import HistotransferError
from ..finetune import ENCODER_FILE, encoder_from_attrs, run_encoder_attrs
from ..stain import StainNormalizer, recorded_normalizer, stain_tag

BASELINE_SEED = 1  # the first random initialisation CKA baselines draw (the "random" weights are seed 0)


@dataclass
class ResolvedEncoder:
    """An encoder to compare, a label for tables and figures, the input size its run used (if any) and the
    stain normalisation of the pixels it sees."""

    encoder: Encoder
    label: str
    input_size: int | None = None
    stain: StainNormalizer | None = None


EncoderLike: TypeAlias = ResolvedEncoder | Encoder | str | Path | Mapping[str, Any]


def resolve_encoder(
    spec: EncoderLike,
    weights: str | None = None,
    truncate: int = 0,
    stain: StainNormalizer | None = None,
    blocks: int | None = None,
) -> ResolvedEncoder:
    """Turn an encoder spec into an :class:`Encoder` and the stain normalisation of its pixels.

    ``spec`` is an Encoder; a mapping ``{"name", "weights", "truncate"}`` (and ``"blocks"`` for an exact number
    of transformer blocks); a run folder (``train`` run: its frozen encoder; ``finetune`` run: its fine-tuned
    one, at the depth its features record); a fine-tuned ``encoder.pt`` (its run folder's ``config.json`` names
    the architecture); or a registry name, built with ``weights`` and ``truncate`` (or ``blocks``).
    A run folder or ``encoder.pt`` brings the normalisation its features were made with (``stain``, when
    given, must be the same); the others take ``stain``.
    """
    if isinstance(spec, ResolvedEncoder):
        return spec
    if isinstance(spec, Encoder):
        return ResolvedEncoder(spec, f"{spec.name} ({spec.depth_tag})", stain=stain)
    if isinstance(spec, Mapping):
        name = spec.get("name") or spec.get("encoder")
        if not name:
            raise HistotransferError(f"encoder spec {dict(spec)}: needs a 'name'.")
        w, t, b = spec.get("weights", weights), int(spec.get("truncate", truncate)), spec.get("blocks", blocks)
        enc = create_encoder(str(name), None if w is None else str(w), t, blocks=b)
        return ResolvedEncoder(enc, f"{name} ({_weights_name(enc)}, {enc.depth_tag})", stain=stain)
    path = Path(spec)
    if path.is_dir() or path.is_file():
        run_dir = path if path.is_dir() else path.parent
        attrs = run_encoder_attrs(run_dir)
        if path.is_file():
            if path.name != ENCODER_FILE:
                raise HistotransferError(
                    f"{path}: pass a registry name with --weights FILE for a plain weights file; a file given "
                    f"alone must be a fine-tuned run's {ENCODER_FILE}."
                )
            attrs = {**attrs, "weights": str(path.resolve()), "weights_sha256": ""}
        encoder = encoder_from_attrs(attrs, run_dir / "config.json", local_dir=run_dir)
        encoder = encoder.with_blocks(attrs.get("blocks"))  # rebuilt by its truncation, then cut to its blocks
        size = attrs.get("input_size")
        recorded = recorded_normalizer(attrs, run_dir / "config.json")
        if stain is not None and stain_tag(stain) != stain_tag(recorded):
            raise HistotransferError(
                f"{run_dir}: its features were made with stain normalisation {stain_tag(recorded)}, not "
                f"{stain_tag(stain)}; a run folder brings its own normalisation: drop --stain-norm/--stain-ref, or "
                "compare encoders given by name."
            )
        return ResolvedEncoder(
            encoder, f"{run_dir.name} ({encoder.name}, {encoder.depth_tag})", int(size) if size else None, recorded
        )
    name = str(spec)
    enc = create_encoder(name, weights, truncate, blocks=blocks)
    return ResolvedEncoder(enc, f"{name} ({_weights_name(enc)}, {enc.depth_tag})", stain=stain)


def cka_preprocessing(r: ResolvedEncoder, size: int | None) -> Preprocessing:
    """How an encoder's pixels are prepared for CKA: its record at ``size`` (the settings' input size), else at
    its run's input size, else its record's own (the tiled size for a CNN)."""
    return r.encoder.preprocessing.at(size or r.input_size or r.encoder.preprocessing.input_size)


def _weights_name(encoder: Encoder) -> str:
    """A short name of an encoder's weights for labels: the option's name, or the weights file's name."""
    label = encoder.weights_label
    return Path(encoder.weights_source).name if is_file_label(label) else label


def baseline_encoder(encoder: Encoder, seed: int) -> tuple[Encoder, bool]:
    """A random initialisation (drawn with ``seed``) of ``encoder``'s architecture, cut as it is, and whether
    its LayerScale gains were set to 1.

    A LayerScale ViT (UNI, UNI2-h, Virchow2, H-optimus-0, Prov-GigaPath, Phikon-v2: ``init_values=1e-5``) scales
    every block's residual branches by 1e-5 at initialisation, so a random draw passes its patch embedding through
    all blocks almost unchanged (CKA of the stem with any block 1.000000) and would make every stage's baseline
    that of a random patch embedding. Its control is the same architecture with timm's initialisation of it
    without LayerScale (gains 1, all other weights as drawn), where the blocks transform the tokens as an untrained
    ViT's do (``benchmarks/bench_cka_baseline.py`` measures both)."""
    rand = create_encoder(encoder.name, "random", encoder.truncate, random_seed=seed, blocks=encoder.blocks)
    scales = [m for m in rand.modules() if isinstance(m, LayerScale)]
    with torch.no_grad():
        for m in scales:
            m.gamma.fill_(1.0)
    return rand, bool(scales)
