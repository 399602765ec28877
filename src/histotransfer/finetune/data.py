"""Patch pixels for fine-tuning: where each slide is, and each slide's top-k patches as one batch.

Reading goes through extraction's loader (``features.loader.PatchBatches``): with a batch size of k, the k
top-attended patches of a slide are one dataset item, read in DataLoader worker processes that open their
slides themselves.
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..errors import one_line
from ..errors import HistotransferError
from ..features.encoders import IMAGENET_MEAN, IMAGENET_STD
from ..features.feature_file import read_feature_attrs
from ..features.loader import PatchBatch, PatchBatches, SlideJob
from ..patches import PatchReader, read_patch_file
from ..slide import SLIDE_SUFFIXES, open_slide, slide_id_of

SlidesArg = str | Path | Sequence[str | Path] | None


def normalise(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB to the ImageNet-normalised float (B, 3, H, W) batch that extraction feeds encoders."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)


def slide_index(slides: SlidesArg) -> dict[str, Path] | None:
    """``slide_id -> file`` for a folder of slides or a list of slide files (None: use recorded paths)."""
    if slides is None:
        return None
    if isinstance(slides, (str, Path)):
        folder = Path(slides)
        if not folder.is_dir():
            raise HistotransferError(f"{folder}: no such folder; pass the folder holding the slide files.")
        files = [p for p in sorted(folder.glob("*")) if p.suffix.lower() in SLIDE_SUFFIXES]
    else:
        files = [Path(p) for p in slides]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise HistotransferError(f"slide file(s) not found: {', '.join(missing[:5])}.")
    return {slide_id_of(p): p.absolute() for p in files}


def slides_folder(slides: SlidesArg) -> Path | None:
    """The one folder ``slides`` names or lies in (what extraction's ``slides_dir`` takes), if there is one."""
    if slides is None:
        return None
    if isinstance(slides, (str, Path)):
        return Path(slides)
    parents = {Path(p).resolve().parent for p in slides}
    return parents.pop() if len(parents) == 1 else None


def locate_slide(slide_id: str, recorded: str | None, index: dict[str, Path] | None, source: Path) -> str:
    """The slide file of ``slide_id``: from ``index`` when given and listed there, else its recorded path."""
    if index is not None and slide_id in index:
        return str(index[slide_id])
    if recorded and Path(recorded).is_file():
        return recorded
    where = f"recorded slide path {recorded} does not exist" if recorded else "no slide path is recorded"
    raise HistotransferError(f"{source}: {where}; pass --slides (a folder holding {glob.escape(slide_id)}.* "
                             "or the slide files).")


@dataclass
class TopKSlide:
    """One slide's top-k patches to read, with its label and the feature file the run used."""

    job: SlideJob
    label: int
    feature_file: Path


def _topk_slide(slide_id: str, rows: pd.DataFrame, label: int, features_dir: Path,
                index: dict[str, Path] | None) -> TopKSlide:
    feature_file = features_dir / f"{slide_id}.h5"
    if not feature_file.is_file():
        raise HistotransferError(f"{feature_file}: feature file of {slide_id} not found; the run's features "
                                 "folder must be where training found it.")
    attrs = read_feature_attrs(feature_file)
    patch_file = attrs.get("patch_file")
    if not patch_file or not Path(patch_file).is_file():
        raise HistotransferError(f"{feature_file}: names patch file {patch_file}, which does not exist; "
                                 "keep the tiling output where extraction read it.")
    spec = read_patch_file(patch_file).spec
    path = locate_slide(slide_id, attrs.get("slide_path") or spec.slide_path, index, feature_file)
    with open_slide(path, mpp=spec.mpp) as slide:
        PatchReader(slide, spec).close()  # opens the slide and resolves its levels: fails early if unreadable
    coords = rows.sort_values("rank")[["x", "y"]].to_numpy(dtype=np.int64)
    return TopKSlide(SlideJob(slide_id, path, Path(patch_file), coords, spec), label, feature_file)


def topk_slides(topk: pd.DataFrame, labels: dict[str, int], features_dir: Path,
                slides: SlidesArg = None) -> tuple[list[TopKSlide], dict[str, str]]:
    """Reading jobs for the slides of a top-k table, and the slides that cannot be read (id -> reason).

    The patch spec comes from the patch file named in each slide's feature attrs, the slide file from
    ``slides`` or the recorded path; each slide is opened once here so a broken one is reported up front."""
    index = slide_index(slides)
    out, broken = [], {}
    for slide_id, rows in topk.groupby("slide_id", sort=True):
        try:
            out.append(_topk_slide(str(slide_id), rows, int(labels[slide_id]), features_dir, index))
        except (HistotransferError, OSError) as exc:
            broken[str(slide_id)] = one_line(exc)
            warnings.warn(f"skipping slide {slide_id}: {broken[str(slide_id)]}", stacklevel=2)
    return out, broken


def _identity(item: PatchBatch) -> PatchBatch:
    return item


def bag_loader(slides: list[TopKSlide], order: Sequence[int], input_size: int | None, workers: int,
               pin_memory: bool) -> DataLoader:
    """Yields one PatchBatch per slide (all its top-k pixels) in ``order``, read ahead by ``workers``."""
    k = max(len(s.job.coords) for s in slides)
    dataset = PatchBatches([s.job for s in slides], k, input_size)
    extra = {"prefetch_factor": 2} if workers > 0 else {}
    return DataLoader(dataset, batch_size=None, sampler=list(order), num_workers=workers, collate_fn=_identity,
                      pin_memory=pin_memory, **extra)
