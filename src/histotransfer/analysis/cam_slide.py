"""One slide's Grad-CAM from a MIL run: the run loaded, the slide's inputs (attention, feature rows, patch
file, slide file) checked against it, its top-k patches by attention read as extraction prepared them, and the
maps computed and checked to come from an encoder that reproduces the run's stored features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..encoders import Encoder, Preprocessing, encoder_spec
from ..errors import HistotransferError, ProvenanceError
from ..features import FeatureBag, normalise_pixels, prepare_patch, read_feature_file
from ..finetune import run_encoder
from ..mil import (
    AttentionMIL,
    check_inputs,
    load_run_model,
    read_attention,
    read_checkpoint,
    read_config,
    run_fingerprint,
    run_splits,
)
from ..patches import PatchReader, PatchSet, read_patch_file
from ..provenance import canonical_json
from ..runtime import resolve_device
from ..slide import check_identity, locate_slide, open_slide, parse_identity
from ..stain import StainNormalizer, recorded_normalizer, recorded_source
from .cam import CamResult, grad_cam
from .settings import CamSettings

# Largest relative difference tolerated between the run's stored features of the top-k patches and the
# encoder's for the same pixels, by the precision the features were extracted at: float32 extraction (BatchNorm
# folded, IEEE float32 on GPUs too) agrees to about 1e-6; other weights, pixels or input sizes differ by order 1.
REPRODUCE_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}

HALF_STORAGE_TOLERANCE = 5e-2  # features stored as float16


class EncoderMismatch(HistotransferError):
    """The encoder does not reproduce the run's stored features: its CAMs would explain another function."""


@dataclass
class LoadedRun:
    """What every slide needs from the run folder."""

    run_dir: Path
    config: dict[str, Any]
    encoder: Encoder
    head: AttentionMIL
    classes: list[str]
    device: torch.device
    fingerprint: str
    labels: dict[str, int]
    splits: dict[str, str]
    stain: StainNormalizer | None = None  # the stain normalisation the run's features were made with

    @property
    def features_dir(self) -> Path:
        return Path(self.config["features_dir"])

    @property
    def input_size(self) -> int | None:
        size = (self.config.get("encoder") or {}).get("input_size")
        return None if size is None else int(size)


def load_run(run_dir: Path, s: CamSettings) -> LoadedRun:
    """The run's config, encoder (checked against its recorded weights), head, labels and fingerprint."""
    config = read_config(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise HistotransferError(
            f"{run_dir}: not a finished run (no metrics.json); pass a folder `histotransfer "
            "train` or `finetune` completed."
        )
    head = load_run_model(run_dir)
    if s.target_class >= head.n_classes:
        raise HistotransferError(
            f"--target-class {s.target_class}: the run's model has {head.n_classes} classes; "
            f"pass 0..{head.n_classes - 1}."
        )
    encoder = run_encoder(run_dir).with_blocks((config.get("encoder") or {}).get("blocks"))
    if encoder_spec(encoder.name).pool is not None:
        raise HistotransferError(
            f"{run_dir}: its encoder {encoder.name} pools its last stage otherwise than by a "
            "global average (e.g. a class token); Grad-CAM here needs a CNN encoder."
        )
    splits = run_splits(run_dir)
    device = resolve_device(s.device)
    fingerprint = run_fingerprint(run_dir)
    return LoadedRun(
        run_dir,
        config,
        encoder.to(device).eval(),
        head.to(device).eval(),
        list(read_checkpoint(run_dir)["classes"]),
        device,
        fingerprint,
        dict(zip(splits["slide_id"], splits["label"].astype(int))),
        dict(zip(splits["slide_id"], splits["split"])),
        recorded_normalizer(config.get("encoder") or {}, run_dir / "config.json"),
    )


def _tolerance(attrs: dict[str, Any]) -> float:
    tol = REPRODUCE_TOLERANCE.get(str(attrs.get("precision", "fp32")), HALF_STORAGE_TOLERANCE)
    return max(tol, HALF_STORAGE_TOLERANCE) if attrs.get("dtype") == "float16" else tol


@dataclass
class _SlideInputs:
    """One slide's checked inputs: its attention, its feature rows, its patch file and its slide file."""

    attention: dict[str, Any]
    bag: FeatureBag
    patches: PatchSet
    patch_file: str
    slide_path: Path


def _slide_inputs(run: LoadedRun, slide_id: str, index: dict[str, Path] | None) -> _SlideInputs:
    """A slide's inputs, checked: the feature file is the one the run was trained on, its rows are the
    attention file's patches, and the patch file is the one the features were made from."""
    att = read_attention(run.run_dir / "attention" / f"{slide_id}.h5", run.fingerprint, own=True)
    feature_file = run.features_dir / f"{slide_id}.h5"
    bag = read_feature_file(feature_file)
    check_inputs(run.config, {slide_id: bag.fingerprint}, run.features_dir)
    if not np.array_equal(att["coords"], bag.coords):
        raise ProvenanceError(
            f"{feature_file}: its patches are not those of the run's attention file; re-train the run."
        )
    patch_file = bag.attrs.get("patch_file")
    if not patch_file or not Path(patch_file).is_file():
        raise HistotransferError(
            f"{feature_file}: names patch file {patch_file!r}, which does not exist; keep the "
            "tiling output where extraction read it."
        )
    patches = read_patch_file(patch_file)
    if bag.attrs.get("patches_fingerprint") and bag.attrs["patches_fingerprint"] != patches.fingerprint:
        raise ProvenanceError(
            f"{patch_file}: the slide was re-tiled since its features were extracted; re-extract "
            "and re-train before computing CAMs."
        )
    if patches.spec.patch_size_level0 is None:
        raise HistotransferError(f"{patch_file}: records no patch side in level-0 pixels; re-tile the slide.")
    slide_path = locate_slide(slide_id, bag.attrs.get("slide_path") or patches.spec.slide_path, index, feature_file)
    return _SlideInputs(att, bag, patches, str(patch_file), slide_path)


def _read_slide(
    inputs: _SlideInputs, rows: np.ndarray, prep: Preprocessing, max_side: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The patches of ``rows`` as the encoder takes them (uint8 (k, S, S, 3), resized and cropped as extraction
    prepares them: ``prepare_patch``; the feature-gap check confirms the pixels match), the slide's thumbnail
    and its level-0 dimensions, read only once the slide file is checked to be the slide tiled."""
    spec = inputs.patches.spec
    with open_slide(inputs.slide_path, mpp=spec.mpp) as slide:
        recorded = parse_identity(inputs.attention["attrs"].get("slide_identity")) or inputs.patches.identity
        check_identity(slide, recorded, inputs.patch_file)
        with PatchReader(slide, spec) as reader:
            pixels = np.stack([prepare_patch(reader.read(int(x), int(y)), prep) for x, y in inputs.bag.coords[rows]])
        return pixels, slide.thumbnail(max_side), slide.dimensions


def _checked_gap(run: LoadedRun, inputs: _SlideInputs, result: CamResult, rows: np.ndarray) -> float:
    """The feature gap relative to the stored rows' largest magnitude; an error beyond float rounding."""
    gap = (result.feature_gap or 0.0) / max(float(np.abs(inputs.bag.features[rows]).max()), 1e-6)
    if gap > _tolerance(inputs.bag.attrs):
        raise EncoderMismatch(
            f"{run.features_dir / (inputs.bag.slide_id + '.h5')}: the encoder ({run.encoder.name}, "
            f"{run.encoder.depth_tag}) does not reproduce the run's features of the same patches (relative "
            f"difference {gap:.3g}), so its CAMs would not explain the run's predictions; the weights, input size, "
            "stain normalisation or slides (--slides) differ from those the run used."
        )
    return gap


def slide_cam(
    run: LoadedRun, s: CamSettings, slide_id: str, index: dict[str, Path] | None
) -> tuple[CamResult, dict[str, Any], np.ndarray]:
    """Grad-CAM of one slide's top-k patches, the record written with it and the slide's thumbnail."""
    inputs = _slide_inputs(run, slide_id, index)
    att, bag, spec = inputs.attention, inputs.bag, inputs.patches.spec
    top = np.argsort(-att["score"], kind="stable")[: s.top_k]
    raw, thumb, dimensions = _read_slide(inputs, top, run.encoder.preprocessing.at(run.input_size), s.max_side)
    # A per-slide normalisation maps the patches with the slide's source estimate extraction recorded.
    source = (
        recorded_source(bag.attrs, run.features_dir / f"{slide_id}.h5")
        if run.stain is not None and run.stain.per_slide
        else None
    )
    normalised = normalise_pixels(torch.from_numpy(raw), run.stain, run.device, source)
    pixels = normalised.cpu().numpy()  # what the encoder sees, and the figure shows
    x = run.encoder.preprocess(normalised, run.device)
    result = grad_cam(
        run.encoder,
        run.head,
        x,
        slide_features=torch.from_numpy(bag.features).to(run.device),
        rows=top,
        target_class=s.target_class,
        batch_size=s.batch_size,
    )
    gap = _checked_gap(run, inputs, result, top)
    side = int(spec.patch_size_level0)
    record = {
        "slide_id": slide_id,
        "stage": result.stage,
        "grid": list(result.grid),
        "patch_size_level0": side,
        "mpp": spec.mpp,
        "um_per_cell": None if spec.mpp is None else side * float(spec.mpp) / result.grid[1],
        "input_size": int(pixels.shape[1]),
        "target_class": result.target_class,
        "target_class_name": run.classes[result.target_class],
        "logit": result.logit,
        "feature_gap": gap,
        "n_patches": len(bag.coords),
        "slide_identity": att["attrs"].get("slide_identity", ""),
        "features_fingerprint": bag.fingerprint,
        "run": str(run.run_dir.resolve()),
        "run_fingerprint": run.fingerprint,
        "settings": canonical_json(s.record()),
        "coords": bag.coords[top],
        "rows": top,
        "score": att["score"][top],
        "pixels": pixels,
        "dimensions": dimensions,
    }
    return result, record, thumb
