"""Lesion annotations as instance labels for the attention (``MilSettings.annotations``).

On a confounded cohort (one centre holds most positive slides, and its stain tells them apart) attention MIL can
learn the centre instead of the lesion. Where positive training slides have lesion annotations, each patch's
raw attention score is also trained, by a binary cross-entropy, towards whether the patch touches the lesion (its
lesion share, :meth:`~histotransfer.annotations.Annotation.patch_overlap`, above 0). Negative slides and slides
without an annotation get the slide loss only. This module finds the annotations a run uses and turns them into
per-patch targets, once per slide; the loss itself is :func:`histotransfer.mil.train.attention_loss`.

Torch-free: the plan calls it to check and fingerprint the annotations before anything is trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import file_sha256
from ..annotations import MASK_SUFFIXES, SIDECAR_SUFFIX, load_annotation
from ..errors import HistotransferError
from ..provenance import json_fingerprint
from .labels import LabelTable
from .localisation import annotation_files


def supervised_slides(annotations_dir: Path, table: LabelTable, splits: Sequence[pd.DataFrame]) -> dict[str, Path]:
    """``slide_id -> annotation file`` of the positive labelled slides that have one in ``annotations_dir``.

    A missing or empty folder, or one of which no annotation belongs to a positive slide that some split trains
    on, is refused in one line; annotations of slides not in ``table`` are left out with one warning."""
    files = annotation_files(annotations_dir)
    labelled = set(table.frame["slide_id"])
    unknown = sorted(set(files) - labelled)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        warnings.warn(
            f"{annotations_dir}: {len(unknown)} annotation(s) match no labelled slide with features and "
            f"are not used: {shown}",
            stacklevel=2,
        )
    positive = table.mapping[table.positive_class]
    training = set().union(
        *(set(s.loc[(s["split"] == "train") & (s["label"] == positive), "slide_id"]) for s in splits)
    )
    if not training & set(files):
        raise HistotransferError(
            f"--annotations {annotations_dir}: none of its {len(files)} annotation(s) is of a positive training "
            f"slide (label {table.positive_class!r}); name them <slide_id>.geojson or <slide_id>.png after the "
            "slides of the label file."
        )
    frame = table.frame
    return {s: files[s] for s in frame.loc[frame["label"] == positive, "slide_id"] if s in files}


def annotation_fingerprints(files: Mapping[str, Path]) -> dict[str, str]:
    """Each annotation's sha256 (a mask's together with its sidecar, which gives its scale), by slide id: what a
    run records, so that a run trained on other annotations is not taken for this one."""
    out = {}
    for sid, path in files.items():
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        if path.suffix.lower() in MASK_SUFFIXES and sidecar.is_file():
            out[sid] = json_fingerprint({"mask": file_sha256(path), "sidecar": file_sha256(sidecar)})
        else:
            out[sid] = file_sha256(path)
    return out


def lesion_targets(
    files: Mapping[str, Path],
    slide_ids: Sequence[str],
    coords: Sequence[np.ndarray],
    patch_sizes: Sequence[int | None],
    where: Path,
) -> dict[str, np.ndarray]:
    """The attention target of each patch, float32 1 where it touches the lesion and 0 elsewhere, of every slide
    of ``slide_ids`` that ``files`` annotates (``coords``: level-0 top-left corners, ``patch_sizes``: the patch
    side in level-0 pixels, None where the feature file records none, which is refused naming ``where``)."""
    out = {}
    for sid, xy, size in zip(slide_ids, coords, patch_sizes, strict=True):
        if sid not in files:
            continue
        if size is None:
            raise HistotransferError(
                f"{where}: the feature file of {sid} records no patch side (patch_size_level0), "
                "so its patches cannot be laid on its annotation; extract it with histotransfer."
            )
        out[sid] = (load_annotation(files[sid]).patch_overlap(xy, float(size)) > 0).astype(np.float32)
    return out
