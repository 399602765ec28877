"""Patch pixels for fine-tuning: where each slide is, and each slide's top-k patches as one batch.

Reading goes through extraction's loader (``features.loader.PatchBatches``): with a batch size of k, the k
top-attended patches of a slide are one dataset item, read in DataLoader worker processes that open their
slides themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from ..encoders import Preprocessing
from ..errors import HistotransferError, ProvenanceError, one_line
from ..features import PatchBatch, PatchBatches, SlideJob, read_feature_attrs
from ..patches import PatchReader, read_patch_file
from ..slide import check_identity, locate_slide, open_slide, slide_index

SlidesArg = str | Path | Sequence[str | Path] | None


@dataclass
class TopKSlide:
    """One slide's top-k patches to read, with its label and the feature file the run used."""

    job: SlideJob
    label: int
    feature_file: Path


def _topk_slide(
    slide_id: str,
    rows: pd.DataFrame,
    label: int,
    features_dir: Path,
    index: dict[str, Path] | None,
    trained_on: dict[str, str],
) -> TopKSlide:
    """One slide's reading job, after checking that its feature file is the one the run was trained on, that
    its patch file is the one the features were made from, and that the slide file is the one tiled."""
    feature_file = features_dir / f"{slide_id}.h5"
    if not feature_file.is_file():
        raise HistotransferError(
            f"{feature_file}: feature file of {slide_id} not found; the run's features "
            "folder must be where training found it."
        )
    attrs = read_feature_attrs(feature_file)
    if trained_on.get(slide_id) and attrs.get("fingerprint") != trained_on[slide_id]:
        raise ProvenanceError(
            f"{feature_file}: not the feature file the run was trained on (it was re-extracted "
            "or replaced since); re-train the run first."
        )
    patch_file = attrs.get("patch_file")
    if not patch_file or not Path(patch_file).is_file():
        raise HistotransferError(
            f"{feature_file}: names patch file {patch_file}, which does not exist; "
            "keep the tiling output where extraction read it."
        )
    patches = read_patch_file(patch_file)
    if attrs.get("patches_fingerprint") and attrs["patches_fingerprint"] != patches.fingerprint:
        raise ProvenanceError(
            f"{patch_file}: the slide was re-tiled since its features were extracted; "
            "re-extract and re-train before fine-tuning."
        )
    spec = patches.spec
    path = locate_slide(slide_id, attrs.get("slide_path") or spec.slide_path, index, feature_file)
    with open_slide(path, mpp=spec.mpp) as slide:
        check_identity(slide, patches.identity, str(patch_file))
        PatchReader(slide, spec).close()  # resolves the slide's levels: fails early if unreadable
    coords = rows.sort_values("rank")[["x", "y"]].to_numpy(dtype=np.int64)
    job = SlideJob(slide_id, str(path), Path(patch_file), coords, spec, patches.fingerprint, patches.identity)
    return TopKSlide(job, label, feature_file)


def topk_slides(
    topk: pd.DataFrame,
    labels: dict[str, int],
    features_dir: Path,
    slides: SlidesArg = None,
    trained_on: dict[str, str] | None = None,
) -> tuple[list[TopKSlide], dict[str, str]]:
    """Reading jobs for the slides of a top-k table, and the slides that cannot be read (id -> reason).

    The patch spec comes from the patch file named in each slide's feature attrs, the slide file from
    ``slides`` or the recorded path; each slide is opened once here so a broken one is reported up front.
    ``trained_on`` (slide -> feature fingerprint, from the run's config) makes a replaced feature file an error
    for the whole call rather than a skipped slide: the run itself no longer matches its inputs."""
    index = slide_index(slides)
    out, broken = [], {}
    for slide_id, rows in topk.groupby("slide_id", sort=True):
        try:
            out.append(_topk_slide(str(slide_id), rows, int(labels[slide_id]), features_dir, index, trained_on or {}))
        except ProvenanceError:
            raise
        except (HistotransferError, OSError) as exc:
            broken[str(slide_id)] = one_line(exc)
            warnings.warn(f"skipping slide {slide_id}: {broken[str(slide_id)]}", stacklevel=2)
    return out, broken


def _identity(item: PatchBatch) -> PatchBatch:
    return item


def bag_loader(
    slides: list[TopKSlide],
    order: Sequence[int] | np.ndarray,
    input_size: Preprocessing,
    workers: int,
    pin_memory: bool,
) -> DataLoader:
    """Yields one PatchBatch per slide (all its top-k pixels, prepared as the encoder's ``input_size`` record
    says) in ``order``, read ahead by ``workers``."""
    k = max(len(s.job.coords) for s in slides)
    dataset = PatchBatches([s.job for s in slides], k, input_size)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=list(order),
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
    )
