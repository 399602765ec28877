"""Patch pixels for extraction, read in DataLoader worker processes.

One dataset item is one batch of one slide (batches never span slides), so the encoder side can stream each
slide's rows straight into its feature file. Each worker opens the slides it reads itself (native handles are
never shared across processes) and keeps the last two open. A slide that cannot be read gives an item with an
error message instead of pixels: the extractor reports that slide and goes on with the others.

With ``decode="gpu"``, the batches of JPEG-tiled slides hold their compressed tiles instead of pixels, which the
main process decodes on the GPU (``gpu_decode``); other slides' batches hold pixels as before.

Given per-slide stain normalisers, each slide's batches are preceded by one item holding the slide's source
stain estimates (``sources``, no pixels), fitted in the worker on the patches ``SlideJob.stain_sample`` names,
read through the slide's :class:`PatchReader` and resized as the batches are (decoded on the CPU even where the
batches' tiles go to the GPU: the estimate is a statistic of a million pixels, which a few grey levels of
decoder difference do not move), so every stage that reads a slide this way gets the same estimate.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..encoders import Preprocessing
from ..errors import one_line
from ..patches import PatchReader, PatchSpec
from ..slide import Slide, open_slide
from ..stain import StainNormalizer
from .batches import PatchBatch
from .gpu_decode import TileSource

OPEN_SLIDES_PER_WORKER = 2


@dataclass
class SlideJob:
    """One slide to read: its patch coords (level-0 top-left), how to cut them, the fingerprint and slide
    identity of the patch file they come from (recorded in the outputs), and the coords of the patches its
    source stain is estimated on (``stain.source_sample`` of the patch file's coords; needed with a
    per-slide stain normaliser)."""

    slide_id: str
    slide_path: str
    patch_file: Path
    coords: np.ndarray
    spec: PatchSpec
    fingerprint: str = ""
    identity: dict[str, Any] | None = None
    stain_sample: np.ndarray | None = None


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """Resize a patch to ``size`` pixels: area averaging when shrinking (no aliasing), bilinear when growing."""
    interp = cv2.INTER_AREA if size < patch.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


_PIL_METHODS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def prepare_patch(patch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """A uint8 (S, S, 3) patch as the encoder's card transform gives it before ``ToTensor``: resized with the
    record's method and centre cropped (``Preprocessing``); unchanged when the record has no ``input_size``.

    "bilinear" and "bicubic" resize the PIL image with PIL, as torchvision's ``Resize`` and ``CenterCrop`` do on
    PIL images (so the pixels are the card's, exactly); "area" is OpenCV's (:func:`resize_patch`)."""
    size = prep.input_size
    if size is None:
        return patch
    side = prep.resize_size or size
    if prep.interpolation == "area":
        out = patch if patch.shape[0] == side else resize_patch(patch, side)
    else:
        out = np.array(Image.fromarray(patch).resize((side, side), _PIL_METHODS[prep.interpolation]))
    if side != size:  # torchvision's CenterCrop offsets
        top = round((side - size) / 2.0)
        out = out[top : top + size, top : top + size]
    return np.ascontiguousarray(out)


def as_preprocessing(resize: Preprocessing | int | None) -> Preprocessing:
    """What a reader of patches is told to do: a record, or a side to area-resize to (None: the tiled size)."""
    return resize if isinstance(resize, Preprocessing) else Preprocessing(input_size=resize)


def read_patches(reader: PatchReader, coords: np.ndarray, resize: Preprocessing | int | None) -> np.ndarray:
    """uint8 (B, S, S, 3) pixels of the patches at ``coords``, prepared as ``resize`` says (see
    :func:`as_preprocessing` and :func:`prepare_patch`)."""
    prep = as_preprocessing(resize)
    return np.stack([prepare_patch(reader.read(int(x), int(y)), prep) for x, y in coords])


SOURCE_ITEM = -1  # the ``start`` of the item holding a slide's source stain estimates


class PatchBatches(Dataset):
    """Batches of patch pixels of a list of slides, in order: slide by slide, rows in patch-file order.

    ``decode``: "cpu" decodes every slide here; "gpu" gives the compressed tiles of slides whose patch level
    is JPEG-tiled on the direct tile path (:class:`~.gpu_decode.TileSource`), pixels for the others.
    ``stains``: the normalisers the batches will go through; those that work per slide get each slide's
    source estimate in an item before the slide's batches (see the module doc). ``input_size``: how patches
    are resized, an encoder's :class:`Preprocessing` (size, method and crop, :func:`prepare_patch`) or a side to
    area-resize to; GPU decoding resizes as OpenCV's area does, so a record of another method or with a crop
    decodes on the CPU.
    """

    def __init__(
        self,
        jobs: list[SlideJob],
        batch_size: int,
        input_size: Preprocessing | int | None = None,
        decode: str = "cpu",
        stains: Sequence[StainNormalizer | None] = (),
    ):
        self.jobs = jobs
        self.prep = as_preprocessing(input_size)
        self.input_size = self.prep.input_size
        self.decode = decode
        self.stains = list({n.tag(): n for n in stains if n is not None and n.per_slide}.values())
        if self.stains and any(job.stain_sample is None for job in jobs):
            raise ValueError("per-slide stain normalisation needs each SlideJob's stain_sample")
        self.items: list[tuple[int, int, int]] = []
        for j, job in enumerate(jobs):
            if self.stains and len(job.coords):
                self.items.append((j, SOURCE_ITEM, 0))
            self.items += [(j, s, min(s + batch_size, len(job.coords))) for s in range(0, len(job.coords), batch_size)]
        self._open: OrderedDict[int, tuple[Slide, PatchReader, TileSource | None]] = OrderedDict()
        self._failed: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _source(self, j: int) -> tuple[PatchReader, TileSource | None]:
        """The slide's patch reader and, for GPU decoding of a JPEG-tiled slide, its tile source."""
        if j in self._open:
            return self._open[j][1:]
        job = self.jobs[j]
        slide = open_slide(job.slide_path, mpp=job.spec.mpp)
        try:
            reader = PatchReader(slide, job.spec)
            on_gpu = self.decode == "gpu" and self.prep.interpolation == "area" and self.prep.resize_size is None
            tiles = TileSource.open(slide, reader.spec) if on_gpu else None
        except BaseException:
            slide.close()
            raise
        self._open[j] = (slide, reader, tiles)
        while len(self._open) > OPEN_SLIDES_PER_WORKER:
            _, (old_slide, old_reader, old_tiles) = self._open.popitem(last=False)
            if old_tiles is not None:
                old_tiles.close()
            old_reader.close()
            old_slide.close()
        return reader, tiles

    def __getitem__(self, i: int) -> PatchBatch:
        j, start, stop = self.items[i]
        if j in self._failed:
            return PatchBatch(j, start, None, self._failed[j])
        try:
            reader, tiles = self._source(j)
            job = self.jobs[j]
            if start == SOURCE_ITEM:
                sample = read_patches(reader, job.stain_sample, self.prep)  # type: ignore[arg-type]
                return PatchBatch(j, start, None, sources={n.tag(): n.fit_source(sample) for n in self.stains})
            coords = job.coords[start:stop]
            if tiles is not None:
                return PatchBatch(j, start, None, tiles=tiles.batch(coords, self.input_size))
            return PatchBatch(j, start, torch.from_numpy(read_patches(reader, coords, self.prep)))
        except Exception as exc:  # reported per slide by the extractor; the other slides go on
            self._failed[j] = f"{self.jobs[j].slide_path}: {one_line(exc)}"
            return PatchBatch(j, start, None, self._failed[j])


def _identity(item: PatchBatch) -> PatchBatch:
    return item


def default_workers(device: torch.device) -> int:
    """Loader processes when none are asked for, from this rank's share of the cores (the cores divided by
    torchrun's ``LOCAL_WORLD_SIZE``): beside a GPU encoder all but one, up to 8; beside a CPU encoder none on
    small machines (reading in-process), one per 8 cores (up to 4) on large ones.

    Beside a GPU (``benchmarks/bench_extract.py --device cuda``, 16 cores): 8 loader processes read ~10,000
    patches/s of 224 px; 15 read no more, and ResNet18-t2 extraction ran slower with them. A CPU encoder already
    keeps every core busy with its intra-op threads, so a loader process competes with it: on 2 cores, ResNet18-t2
    extraction ran at 0.66 of the encoder's own rate with one loader process and 0.93 reading in-process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cpu":
        return min(4, cores // 8)
    return max(1, min(8, cores - 1))


def patch_loader(dataset: PatchBatches, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader yielding the dataset's batches in order, read ahead by ``workers`` processes."""
    # With batch_size=None collate_fn gets one item at a time; torch's stub types it as taking a list.
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,  # type: ignore[arg-type]
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
