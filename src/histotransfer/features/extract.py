"""Feature extraction: every patch of every slide through a frozen encoder, one HDF5 file per slide.

Patch pixels are read in DataLoader worker processes while the encoder runs (``loader``); each slide's rows
stream into its feature file under a temporary name that is renamed when the slide is complete. A re-run skips
finished slides and deletes what a killed run left behind, so a killed run resumed gives the same files as
an uninterrupted one. Under ``torchrun`` the slides are sharded across ranks (``distributed``).

This does not use ``batch.run_batch`` (one slide after the other): batches of consecutive slides flow through
one loader without a pause between slides, and per-slide results are reported with the same rows.
"""

from __future__ import annotations

import glob
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from tqdm.auto import tqdm

from .. import __version__
from .._io import TMP_MARK, h5_files, write_csv
from ..batch import BatchReport, SlideResult, one_line
from ..errors import HistotransferError
from ..patches import read_patch_file
from ..slide import SLIDE_SUFFIXES, slide_id_of
from .densenet_inference import DenseNetInference, is_densenet_encoder
from .distributed import Ranks, init_ranks, shard, torchrun_local_rank
from .encoders import (
    AUTOCAST_DTYPES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    create_encoder,
    encoder_id,
    precision_context,
)
from .feature_file import FeatureWriter, read_feature_attrs
from .loader import PatchBatches, SlideJob, default_workers, patch_loader

REPORT_NAME = "extract.csv"


@dataclass
class ExtractionRun:
    """What one process did: the feature folder and its slides' report rows."""

    folder: Path
    results: list[SlideResult]
    rank: int = 0
    world: int = 1


# On a CPU the encoder runs a batch in calls of about this many pixels (4 patches of 224 px, 1 of 512 px):
# smaller activations stay in cache and reuse freed memory instead of faulting in fresh pages. Measured
# (bench_extract.py, 2 cores): DenseNet121 at 224 px +12%, ResNet18-t2 +22%, DenseNet121-t1 at 512 px +30%.
CPU_PIXELS_PER_CALL = 4 * 224 * 224


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; under torchrun each rank takes GPU ``LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HistotransferError(f"device '{device}': choose auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HistotransferError("device cuda: no CUDA GPU is visible to PyTorch; use --device cpu.")
    if device == "cuda":
        return torch.device("cuda", torchrun_local_rank())
    return torch.device(device)


def find_patch_files(patches_dir: str | Path) -> list[Path]:
    """The ``<slide_id>.h5`` patch files in ``patches_dir`` (or in its ``patches/`` subfolder)."""
    folder = Path(patches_dir)
    if not folder.is_dir():
        raise HistotransferError(f"{folder}: no such folder; pass the 'patches' folder that tiling wrote.")
    files = h5_files(folder)
    if not files and (folder / "patches").is_dir():
        files = h5_files(folder / "patches")
    if not files:
        raise HistotransferError(f"{folder}: holds no patch files (*.h5); run `histotransfer tile` first.")
    return files


def _n_rows(path: Path) -> int:
    """Number of patches in a patch file, for balancing ranks (0 when unreadable: its error comes later)."""
    try:
        with h5py.File(path, "r") as f:
            return int(f["coords"].shape[-2])
    except Exception:  # reported with the slide's row when it is processed
        return 0


def _slide_path(spec_path: str | None, slide_id: str, slides_dir: Path | None, patch_file: Path) -> str:
    """The slide file a patch file was cut from: its recorded path, or ``<slide_id>.*`` in ``slides_dir``."""
    if slides_dir is not None:
        matches = [p for p in slides_dir.glob(f"{glob.escape(slide_id)}.*")
                   if slide_id_of(p) == slide_id and p.suffix.lower() in SLIDE_SUFFIXES]
        if matches:
            return str(sorted(matches)[0].resolve())
    if spec_path and Path(spec_path).exists():
        return spec_path
    where = f"recorded path {spec_path} does not exist" if spec_path else "the patch file records no slide path"
    raise HistotransferError(f"{patch_file}: {where}; pass --slides DIR (the folder holding {slide_id}.*).")


def _versions() -> str:
    return json.dumps({"histotransfer": __version__, "python": platform.python_version(),
                       "torch": torch.__version__, "torchvision": torchvision.__version__,
                       "numpy": np.__version__, "h5py": h5py.__version__})


def _remove_stale(folder: Path, slide_id: str) -> None:
    """Delete temporary files a killed run left for this slide (only this rank's slides: others may be busy)."""
    for p in folder.glob(f".{glob.escape(slide_id)}.h5{TMP_MARK}*"):
        p.unlink(missing_ok=True)


def inference_model(model: Encoder) -> nn.Module:
    """The fastest exact inference form of ``model``: DenseNets rearranged (``densenet_inference``), other
    networks with their BatchNorms folded."""
    return DenseNetInference(model).eval() if is_densenet_encoder(model) else fold_batchnorm(model)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm that follows a convolution folded into its weights.

    Same function up to float32 rounding (about 1e-7 relative), 5-15% faster on CPU (bench_extract.py).
    torch.fx's pass works on a traced graph; a model it cannot trace is used as it is.
    """
    try:
        return fx_fuse(model)
    except Exception:  # tracing fails on data-dependent control flow: keep the model unfused
        return model


class BatchEncoder:
    """The encoder side: uint8 NHWC pixels in, float features out, in inference mode and channels_last."""

    def __init__(self, model: Encoder, device: torch.device, precision: str):
        self.feature_dim = model.feature_dim
        self.model = inference_model(model).to(device, memory_format=torch.channels_last)
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        # NHWC permuted to NCHW is channels_last in memory already; the elementwise ops keep that layout.
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.div_(255).sub_(self.mean).div_(self.std)
        step = len(x)
        if self.device.type == "cpu":
            step = max(1, CPU_PIXELS_PER_CALL // (x.shape[2] * x.shape[3]))
        with precision_context(self.device, self.precision):
            y = torch.cat([self.model(x[i:i + step]) for i in range(0, len(x), step)])
        return y.float().cpu().numpy()


def _encode_jobs(jobs: list[SlideJob], encode: BatchEncoder, folder: Path, attrs: dict[str, Any], dtype: str,
                 batch_size: int, input_size: int | None, workers: int, report: BatchReport,
                 desc: str) -> list[SlideResult]:
    """Run every patch of ``jobs`` through the encoder, streaming each slide into its file."""
    dataset = PatchBatches(jobs, batch_size, input_size)
    loader = patch_loader(dataset, workers, pin_memory=encode.device.type == "cuda")
    dim = encode.feature_dim
    writers: dict[int, FeatureWriter] = {}
    started: dict[int, float] = {}
    finished: set[int] = set()
    results = []

    def finish(j: int, status: str, message: str = "") -> None:
        job = jobs[j]
        writer = writers.pop(j, None)
        if writer is not None and status == "ok":
            writer.close()
        elif writer is not None:
            writer.discard()
        finished.add(j)
        result = SlideResult(job.slide_id, job.slide_path, status, len(job.coords) if status == "ok" else 0,
                             round(time.perf_counter() - started.get(j, time.perf_counter()), 3), message)
        if status == "error":
            tqdm.write(f"error: {message}")
        report.update(result)
        results.append(result)

    total = sum(len(job.coords) for job in jobs)
    bar = tqdm(total=total, desc=desc, unit="patch", dynamic_ncols=True, smoothing=0.1)
    try:
        with torch.inference_mode():
            for item in loader:
                j = item.job
                if j in finished:
                    continue
                started.setdefault(j, time.perf_counter())
                if item.error:
                    finish(j, "error", item.error)
                    continue
                job = jobs[j]
                if j not in writers:
                    slide_attrs = dict(attrs, slide_path=job.slide_path, patch_file=str(job.patch_file.resolve()),
                                       patch_size=int(job.spec.patch_size),
                                       input_size=int(input_size or job.spec.patch_size))
                    writers[j] = FeatureWriter(folder / f"{job.slide_id}.h5", job.coords, dim, dtype,
                                               slide_attrs).open()
                writers[j].write(encode(item.pixels))
                bar.update(len(item.pixels))
                if writers[j].complete:
                    finish(j, "ok")
                    bar.set_postfix_str(f"{len(finished)}/{len(jobs)} slides", refresh=False)
    except BaseException:
        for writer in writers.values():  # delete the temporary files of unfinished slides
            writer.discard()
        raise
    finally:
        bar.close()
    return results


def _merge_reports(folder: Path, world: int) -> None:
    """Rank 0, after the barrier: fold each rank's report into ``extract.csv`` (this run's rows win)."""
    final = BatchReport(folder / REPORT_NAME)
    parts = sorted(folder.glob("extract.rank*.csv"),
                   key=lambda p: (int(p.stem.removeprefix("extract.rank")) < world,
                                  int(p.stem.removeprefix("extract.rank"))))
    for part in parts:
        final.rows.update(BatchReport(part).rows)
    write_csv(final.frame(), final.path)
    for part in parts:
        part.unlink()


def _check_options(batch_size: int, workers: int | None, precision: str, device: torch.device) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise HistotransferError(f"batch size {batch_size!r}: pass a positive integer.")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise HistotransferError(f"workers {workers!r}: pass 0 (read in this process) or more.")
    if precision in AUTOCAST_DTYPES and device.type != "cuda":
        raise HistotransferError(f"precision {precision} runs on a CUDA GPU only; use --precision fp32 on CPU.")


def run_extraction(patches_dir: str | Path, out_dir: str | Path, encoder: str, weights: str = "imagenet",
                   truncate: int = 0, input_size: int | None = None, batch_size: int = 64,
                   workers: int | None = None, device: str = "auto", precision: str = "fp32",
                   dtype: str = "float32", slides_dir: str | Path | None = None) -> ExtractionRun:
    """:func:`extract_features`, also returning this process's per-slide results (for the CLI)."""
    dev = resolve_device(device)
    _check_options(batch_size, workers, precision, dev)
    eid = encoder_id(encoder, weights, truncate, input_size, precision, dtype)
    patch_files = {p.stem: p for p in find_patch_files(patches_dir)}
    model = create_encoder(encoder, weights, truncate)  # fails early (e.g. weights missing) before any output
    slides = Path(slides_dir) if slides_dir is not None else None
    folder = Path(out_dir) / "features" / eid
    folder.mkdir(parents=True, exist_ok=True)
    ranks: Ranks = init_ranks(dev)
    try:
        mine = shard({sid: _n_rows(p) for sid, p in patch_files.items()}, ranks.world)[ranks.rank]
        report = BatchReport(folder / (REPORT_NAME if not ranks.distributed else f"extract.rank{ranks.rank}.csv"))
        results: list[SlideResult] = []
        jobs: list[SlideJob] = []
        for sid in mine:
            _remove_stale(folder, sid)
            out = folder / f"{sid}.h5"
            try:
                if out.exists():
                    done = read_feature_attrs(out)
                    results.append(SlideResult(sid, str(done.get("slide_path", "")), "skipped",
                                               _n_rows(out), 0.0, "already extracted"))
                    continue
                patches = read_patch_file(patch_files[sid])
                path = _slide_path(patches.spec.slide_path, sid, slides, patch_files[sid])
                if len(patches) == 0:
                    results.append(SlideResult(sid, path, "no_tissue", 0, 0.0, "patch file holds no patches"))
                    continue
                jobs.append(SlideJob(sid, path, patch_files[sid], patches.coords, patches.spec))
            except Exception as exc:  # a broken slide is reported, the others go on
                results.append(SlideResult(sid, str(patch_files[sid]), "error", 0, 0.0, one_line(exc)))
                tqdm.write(f"error: {results[-1].message}")
        for r in results:
            report.update(r)
        if jobs:
            attrs = {"encoder": encoder, "encoder_id": eid, "truncate": truncate,
                     "weights": model.weights_source, "weights_sha256": model.weights_sha256 or "",
                     "feature_dim": model.feature_dim, "stage": model.stage_names[-1], "precision": precision,
                     "normalization": json.dumps({"scale": "rgb / 255", "mean": IMAGENET_MEAN,
                                                  "std": IMAGENET_STD}),
                     "versions": _versions()}
            n_workers = default_workers(dev) if workers is None else workers
            desc = f"extract {eid}" + (f" [rank {ranks.rank}/{ranks.world}]" if ranks.distributed else "")
            results += _encode_jobs(jobs, BatchEncoder(model, dev, precision), folder, attrs, dtype, batch_size,
                                    input_size, n_workers, report, desc)
        ranks.barrier()
        if ranks.distributed and ranks.rank == 0:
            _merge_reports(folder, ranks.world)
        return ExtractionRun(folder, results, ranks.rank, ranks.world)
    finally:
        ranks.close()


def extract_features(patches_dir: str | Path, out_dir: str | Path, encoder: str, weights: str = "imagenet",
                     truncate: int = 0, input_size: int | None = None, batch_size: int = 64,
                     workers: int | None = None, device: str = "auto", precision: str = "fp32",
                     dtype: str = "float32", slides_dir: str | Path | None = None) -> Path:
    """Extract features of every slide in ``patches_dir`` into ``out_dir/features/<encoder_id>/``.

    Writes ``<slide_id>.h5`` (``features`` (N, D) ``dtype``, ``coords`` in patch-file order, attrs saying how
    they were made) and ``extract.csv`` (one row per slide). ``input_size`` resizes patches (None: their
    tiled size); ``workers`` loader processes (None: automatic, 0: read in this process); ``precision``
    bf16/fp16 autocasts on a GPU. ``slides_dir`` locates slides whose patch file records no (valid) path.
    Finished slides are skipped, so an interrupted run resumes. Returns the feature folder.
    """
    return run_extraction(patches_dir, out_dir, encoder, weights, truncate, input_size, batch_size, workers,
                          device, precision, dtype, slides_dir).folder
