"""The activations a CKA compares: patches sampled from a tiling, read and prepared as each encoder's features
were made, passed through the encoders, and each stage's output pooled to one row per patch (kept on disk for
``flatten`` pooling).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from tqdm.auto import tqdm

from ..encoders import Encoder, Preprocessing
from ..errors import HistotransferError
from ..features import PatchBatches, SlideJob, normalise_pixels, patch_loader, prepare_patch
from ..patches import find_tiling, read_patch_file
from ..runtime import precision_context
from ..slide import check_identity, locate_slide, open_slide, slide_index
from ..stain import SlideStain, StainNormalizer, source_sample, stain_tag
from .cka import centred_gram, gram_cka
from .settings import CkaSettings


def sample_patches(patches_dir: str | Path, n_patches: int, seed: int = 0, slides: Any = None) -> list[SlideJob]:
    """``n_patches`` patches drawn uniformly without replacement from all slides (seeded), grouped by slide.

    Slide files are found at the paths the patch files record, or in ``slides`` (a folder or a list); each is
    checked to be the slide its patch file was cut from."""
    index = slide_index(slides)
    files = find_tiling(patches_dir).files
    sets = [read_patch_file(p) for p in files]
    sizes = np.array([len(s) for s in sets])
    total = int(sizes.sum())
    if total < 2:
        raise HistotransferError(f"{patches_dir}: holds {total} patch(es); CKA needs at least 2.")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(n_patches, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    jobs = []
    for i, (path, ps) in enumerate(zip(files, sets)):
        rows = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(rows):
            slide_path = locate_slide(ps.slide_id, ps.spec.slide_path, index, path)
            with open_slide(slide_path, mpp=ps.spec.mpp) as slide:
                check_identity(slide, ps.identity, str(path))
            jobs.append(
                SlideJob(
                    ps.slide_id,
                    str(slide_path),
                    path,
                    ps.coords[rows],
                    ps.spec,
                    ps.fingerprint,
                    ps.identity,
                    source_sample(ps.coords),
                )
            )
    return jobs


def _pool(maps: list[torch.Tensor], pooling: str, model: Encoder) -> list[np.ndarray]:
    """Each stage output as one row per patch: through the encoder's own pooling (``classifier``: the global
    average of a CNN's map; a transformer's final norm and token pooling, e.g. the class token), the mean over
    its spatial positions or all its un-normed tokens (``mean``), or the whole output flattened."""
    if pooling == "flatten":
        return [m.float().flatten(1).cpu().numpy() for m in maps]
    if pooling == "classifier":
        return [model.pool(m).double().cpu().numpy() for m in maps]
    return [
        (m.float().mean(dim=(2, 3)) if m.dim() == 4 else m.float().mean(dim=1)).double().cpu().numpy() for m in maps
    ]


class FlattenStore:
    """Flattened stage maps of all patches in temporary float32 files, reduced to centred Gram matrices."""

    def __init__(self, folder: Path, n: int, pairs: list[tuple[str, str]], debiased: bool = False):
        self.folder, self.n, self.pairs, self.debiased = folder, n, pairs, debiased
        self.arrays: dict[str, np.memmap] = {}
        self.row = 0

    def update(self, batch: dict[str, np.ndarray]) -> None:
        for key, rows in batch.items():
            if key not in self.arrays:
                self.arrays[key] = np.lib.format.open_memmap(
                    self.folder / f"{len(self.arrays)}.npy", mode="w+", dtype=np.float32, shape=(self.n, rows.shape[1])
                )
            self.arrays[key][self.row : self.row + len(rows)] = rows
        self.row += len(next(iter(batch.values())))

    def result(self) -> dict[tuple[str, str], float]:
        grams = {
            k: centred_gram(a[: self.row])
            for k, a in tqdm(self.arrays.items(), desc="Gram matrices", unit="map", dynamic_ncols=True)
        }
        return gram_cka(grams, self.pairs, debiased=self.debiased)


@dataclass
class PooledBatch:
    """One batch's pooled rows of every compared representation, and where its patches are in the sample."""

    job: int
    start: int
    n: int
    rows: dict[str, np.ndarray]
    widths: dict[str, int]


CkaModel: TypeAlias = tuple[Encoder, list[str], StainNormalizer | None, Preprocessing]


def _prepared(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """A batch of tiled-size pixels prepared as ``prep`` says (``prepare_patch``, patch by patch)."""
    return torch.from_numpy(np.stack([prepare_patch(p, prep) for p in pixels.numpy()]))


def encode_patches(
    models: list[CkaModel],
    jobs: list[SlideJob],
    job_ids: list[int],
    s: CkaSettings,
    dev: torch.device,
    add: Callable[[PooledBatch], None],
    progress: bool = True,
) -> None:
    """Run every encoder on the patches of ``jobs[job_ids]`` (each with its own preprocessing record and stain
    normalisation) and hand each batch's pooled rows to ``add``, in reading order; a slide that cannot be read
    is warned about and skipped. Encoders of one record share pixels prepared by the loader; otherwise the
    loader reads the tiled size and each record is applied here."""
    chosen = [jobs[j] for j in job_ids]
    preps = {prep for *_, prep in models}
    shared = next(iter(preps)) if len(preps) == 1 else None
    dataset = PatchBatches(chosen, s.batch_size, shared, stains=[norm for _, _, norm, _ in models])
    loader = patch_loader(dataset, s.workers, pin_memory=dev.type == "cuda")
    failed: set[int] = set()
    sources: dict[int, dict[str, SlideStain]] = {}  # per slide, its source estimates by normaliser tag
    bar = tqdm(
        total=sum(len(j.coords) for j in chosen), desc="CKA", unit="patch", dynamic_ncols=True, disable=not progress
    )
    with torch.inference_mode(), precision_context(dev, "fp32"), bar:
        for item in loader:
            if item.error:
                if item.job not in failed:
                    warnings.warn(f"skipping slide: {item.error}", stacklevel=3)
                    failed.add(item.job)
                continue
            if item.job in failed:  # a loader process failed this slide (its stain estimate, say) after another
                continue  # had read some of its batches
            if item.sources is not None:
                sources[item.job] = item.sources
                continue
            rows: dict[str, np.ndarray] = {}
            widths: dict[str, int] = {}
            pixels: dict[tuple[Preprocessing, str], torch.Tensor] = {}  # the batch as each record and stain give it
            for model, names, norm, prep in models:
                tag = stain_tag(norm)
                if (prep, tag) not in pixels:
                    source = sources[item.job][tag] if norm is not None and norm.per_slide else None
                    raw = item.pixels if shared is not None else _prepared(item.pixels, prep)
                    pixels[(prep, tag)] = normalise_pixels(raw, norm, dev, source)
                x = pixels[(prep, tag)]
                pooled = _pool(model.forward_stages(model.preprocess(x, dev)), s.pooling, model)
                widths.update({n: int(p.shape[1]) for n, p in zip(names, pooled)})
                rows.update(zip(names, pooled))
            add(PooledBatch(job_ids[item.job], item.start, len(item.pixels), rows, widths))
            bar.update(len(item.pixels))


def as_float32(batch: PooledBatch) -> PooledBatch:
    """A batch to send to rank 0 at half the size: pooled rows are float32 means held as float64, so the
    round trip through float32 is exact."""
    return replace(batch, rows={k: v.astype(np.float32) for k, v in batch.rows.items()})
