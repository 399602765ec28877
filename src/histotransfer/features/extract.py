"""Feature extraction: every patch of every slide through a frozen encoder, one HDF5 file per slide.

Patch pixels are read in DataLoader worker processes while the encoder runs (``loader``); each slide's rows
stream into its feature file under a temporary name that is renamed when the slide is complete. Features live
with their tiling (``<tiling folder>/features/<encoder_id>/``, or ``OUT/features/<encoder_id>/``), and a feature
folder belongs to one tiling (``features.json``).

A slide is skipped only when its feature file was made from the very patches that are there now (the patch
file's fingerprint), with the same encoder weights and settings; otherwise it is redone. Before its pixels are
read, each slide file is checked against the identity its patch file recorded. Several processes (``torchrun``
ranks, or separate ``extract`` commands on machines sharing the folder) split the slides: each takes a slide's
lock file before working on it, so no slide is done twice, and temporary files are removed only when the
process that wrote them is gone.

With ``stain_norm`` the reference is fitted once per extraction (or its fitted target loaded) and every batch is
normalised on the encoder's device before the encoder's preprocessing; the target is recorded in each file and
its tag names the folder (``<encoder_id>`` ends in e.g. ``-macenko-1a2b3c4d``).

This does not use ``batch.run_batch`` (one slide after the other): batches of consecutive slides flow through
one loader without a pause between slides, and per-slide results are reported with the same rows.
"""

from __future__ import annotations

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
from .._io import LOCK_SUFFIX, ItemLock, h5_files, output_folder, remove_stale_temps, write_csv, write_json
from ..batch import BatchReport, SlideResult, error_result
from ..errors import FormatError, HistotransferError, ProvenanceError
from ..patches import find_tiling, read_patch_file
from ..patches import TilingFolder
from ..provenance import canonical_json, json_fingerprint
from ..runtime import Ranks, check_precision, init_ranks, precision_context, resolve_device, shard
from ..slide import check_identity, locate_slide, open_slide, slide_index
from .densenet_inference import DenseNetInference, is_densenet_encoder
from .encoders import Encoder, create_encoder, describe_encoder, encoder_id
from .feature_file import FeatureWriter, first_non_finite, read_feature_attrs
from .loader import PatchBatches, SlideJob, default_workers, patch_loader
from .settings import EncoderChoice, ExtractSettings
from .stain import StainNormalizer, stain_normalizer

REPORT_NAME = "extract.csv"
FOLDER_RECORD = "features.json"
# Slides locked and read per loader pass: a few, so that processes sharing a folder interleave finely.
LOCK_WINDOW = 8
# On a CPU the encoder runs a batch in calls of about this many pixels (4 patches of 224 px, 1 of 512 px):
# smaller activations stay in cache and reuse freed memory instead of faulting in fresh pages. Measured
# (bench_extract.py, 2 cores): DenseNet121 at 224 px +12%, ResNet18-t2 +22%, DenseNet121-t1 at 512 px +30%.
CPU_PIXELS_PER_CALL = 4 * 224 * 224
DONE_MESSAGE = "already done with these settings"


@dataclass
class ExtractionRun:
    """What one process did: the feature folder and its slides' report rows."""

    folder: Path
    results: list[SlideResult]
    rank: int = 0
    world: int = 1


def _n_rows(path: Path) -> int:
    """Number of patches in a patch file, for balancing ranks (0 when unreadable: its error comes later)."""
    try:
        with h5py.File(path, "r") as f:
            return int(f["coords"].shape[-2])
    except Exception:  # reported with the slide's row when it is processed
        return 0


def _versions() -> str:
    return json.dumps({"histotransfer": __version__, "python": platform.python_version(),
                       "torch": torch.__version__, "torchvision": torchvision.__version__,
                       "numpy": np.__version__, "h5py": h5py.__version__})


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


def normalise_pixels(pixels: torch.Tensor, stain: StainNormalizer | None, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) pixels on ``device``, stain-normalised there when ``stain`` is given. The
    normalisation runs in IEEE float32 on every device (no TF32, no autocast), as on the CPU."""
    pixels = pixels.to(device, non_blocking=True)
    if stain is None:
        return pixels
    with precision_context(device, "fp32"):
        return stain(pixels)


class BatchEncoder:
    """The encoder side: uint8 NHWC pixels in, float features out, in inference mode and channels_last.

    With ``stain``, each batch is stain-normalised on the encoder's device before the encoder's own
    preprocessing."""

    def __init__(self, model: Encoder, device: torch.device, precision: str, stain: StainNormalizer | None = None):
        self.feature_dim = model.feature_dim
        self.preprocess = model.preprocess
        self.model = inference_model(model).to(device, memory_format=torch.channels_last)
        self.device = device
        self.precision = precision
        self.stain = stain

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        step = len(pixels)
        if self.device.type == "cpu":
            step = max(1, CPU_PIXELS_PER_CALL // (pixels.shape[1] * pixels.shape[2]))
        y = torch.cat([self._encode(pixels[i:i + step]) for i in range(0, len(pixels), step)])
        return y.float().cpu().numpy()

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(normalise_pixels(pixels, self.stain, self.device), self.device)
        with precision_context(self.device, self.precision):
            return self.model(x)


def _encode_jobs(jobs: list[SlideJob], encode: BatchEncoder, folder: Path, attrs: dict[str, Any], dtype: str,
                 batch_size: int, input_size: int | None, workers: int, report: BatchReport,
                 bar: tqdm) -> list[SlideResult]:
    """Run every patch of ``jobs`` through the encoder, streaming each slide into its file.

    A slide whose features come out NaN or inf is an error for that slide (nothing is written for it)."""
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
                rows = encode(item.pixels)
                bad = first_non_finite(rows)
                if bad is not None:
                    x, y = job.coords[item.start + bad]
                    finish(j, "error", f"{job.slide_path}: the encoder gave NaN or inf features for patch row "
                                       f"{item.start + bad} at ({x}, {y}); nothing was written for this slide "
                                       "(check the weights file and --precision)")
                    continue
                if j not in writers:
                    slide_attrs = dict(attrs, slide_path=job.slide_path, patch_file=str(job.patch_file.resolve()),
                                       patch_size=int(job.spec.patch_size), patches_fingerprint=job.fingerprint,
                                       slide_identity=canonical_json(job.identity),
                                       input_size=int(input_size or job.spec.patch_size))
                    if job.spec.patch_size_level0 is not None:
                        slide_attrs["patch_size_level0"] = int(job.spec.patch_size_level0)
                    writers[j] = FeatureWriter(folder / f"{job.slide_id}.h5", job.coords, dim, dtype,
                                               slide_attrs).open()
                writers[j].write(rows)
                bar.update(len(item.pixels))
                if writers[j].complete:
                    finish(j, "ok")
    except BaseException:
        for writer in writers.values():  # delete the temporary files of unfinished slides
            writer.discard()
        raise
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


def _claim_folder(folder: Path, record: dict[str, Any]) -> None:
    """Record which tiling and settings a feature folder holds; refuse one made for another tiling."""
    path = folder / FOLDER_RECORD
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("tiling") != record["tiling"]:
            raise ProvenanceError(
                f"{folder}: holds features of tiling {old.get('tiling')!r}, not of {record['tiling']!r} "
                f"({record['patches']}); leave out --out to extract into the tiling's own folder, or choose "
                "another --out."
            )
        if old == record:
            return
    write_json(record, path)


def _done(out: Path, settings_fp: str, patches_fp: str, weights_sha: str) -> bool:
    """Whether ``out`` is a complete feature file of these patches made with these settings and weights."""
    if not out.exists():
        return False
    try:
        done = read_feature_attrs(out)
    except (FormatError, OSError):
        return False
    return (done.get("settings_fingerprint") == settings_fp and done.get("patches_fingerprint") == patches_fp
            and str(done.get("weights_sha256", "")) == weights_sha and bool(done.get("fingerprint")))


def _job(sid: str, patch_file: Path, index: dict[str, Path] | None) -> SlideJob:
    """The slide's reading job, after checking that the slide file is the one its patches were cut from."""
    patches = read_patch_file(patch_file)
    path = locate_slide(sid, patches.spec.slide_path, index, patch_file)
    with open_slide(path, mpp=patches.spec.mpp) as slide:
        check_identity(slide, patches.identity, str(patch_file))
    return SlideJob(sid, str(path), patch_file, patches.coords, patches.spec, patches.fingerprint, patches.identity)


def features_root(tiling: TilingFolder, out_dir: str | Path | None) -> Path:
    """Where feature folders go: ``out_dir/features``, else the tiling folder's ``features``."""
    if out_dir is not None:
        return output_folder(out_dir) / "features"
    if tiling.root is None:
        raise HistotransferError(f"{tiling.patches}: a folder of patch files without its tiling folder; pass --out "
                                 "to say where the features go.")
    return output_folder(tiling.root) / "features"


def run_extraction(patches: str | Path, out_dir: str | Path | None, encoder: str | EncoderChoice,
                   weights: str | None = None, truncate: int = 0, settings: ExtractSettings | None = None,
                   slides: Any = None, ranks: Ranks | None = None, **overrides: Any) -> ExtractionRun:
    """:func:`extract_features`, also returning this process's per-slide results (for the CLI). ``ranks``: the
    processes sharing the work (default: the torchrun job this process is in; ``Ranks()``: this one alone)."""
    choice = encoder if isinstance(encoder, EncoderChoice) else EncoderChoice.build(
        encoder=encoder, weights=weights, truncate=truncate)
    s = ExtractSettings.build(settings, **overrides)
    dev = resolve_device(s.device)
    check_precision(s.precision, dev)
    tiling = find_tiling(patches)
    files = {p.stem: p for p in tiling.files}
    if not files:
        raise HistotransferError(f"{tiling.patches}: holds no patch files (*.h5); run `histotransfer tile` first.")
    model = create_encoder(choice.encoder, choice.weights, choice.truncate)  # fails early, before any output
    stain = stain_normalizer(s.stain_norm, s.stain_ref)  # fitted once, before any output
    input_size = s.input_size if s.input_size is not None else model.preprocessing.input_size
    eid = encoder_id(choice.encoder, choice.weights, choice.truncate, input_size, s.precision, s.dtype,
                     extra=(stain.tag(),) if stain is not None else ())
    index = slide_index(slides)
    folder = features_root(tiling, out_dir) / eid
    folder.mkdir(parents=True, exist_ok=True)
    described = describe_encoder(model)
    settings_fp = settings_fingerprint(choice, s, input_size, described["weights_sha256"], stain)
    given = ranks is not None
    ranks = ranks or init_ranks(dev)
    try:
        if ranks.rank == 0:
            _claim_folder(folder, {"encoder_id": eid, "tiling": tiling.name, "patches": str(tiling.patches.resolve()),
                                   "encoder": described, "settings": s.record(), "input_size": input_size,
                                   **({"stain": stain.to_dict()} if stain is not None else {})})
        ranks.barrier()
        mine = shard({sid: _n_rows(p) for sid, p in files.items()}, ranks.world)[ranks.rank]
        report = BatchReport(folder / (REPORT_NAME if not ranks.distributed else f"extract.rank{ranks.rank}.csv"),
                             shared=not ranks.distributed)
        results: list[SlideResult] = []
        todo: list[str] = []
        for sid in mine:
            remove_stale_temps(folder, prefix=f"{sid}.h5")
            ItemLock(folder / f".{sid}{LOCK_SUFFIX}").clear_if_stale()
            t0 = time.perf_counter()
            try:
                fp = read_patch_file(files[sid]).fingerprint
                if _done(folder / f"{sid}.h5", settings_fp, fp, described["weights_sha256"]):
                    results.append(SlideResult(sid, str(files[sid]), "skipped", _n_rows(files[sid]), 0.0,
                                               DONE_MESSAGE))
                else:
                    todo.append(sid)
            except Exception as exc:  # a broken patch file is reported, the others go on
                results.append(error_result(sid, str(files[sid]), exc, t0))
        for r in results:
            report.update(r)
        attrs = {"encoder_id": eid, **described, "settings": canonical_json(s.result_settings()),
                 "settings_fingerprint": settings_fp, "precision": s.precision, "dtype": s.dtype,
                 "tiling": tiling.name or "", "preprocessing": canonical_json(model.preprocessing.describe()),
                 "versions": _versions(), **stain_attrs(stain)}
        if todo:
            results += _extract_todo(todo, files, index, folder, model, s, input_size, attrs, settings_fp,
                                     report, ranks, dev, eid, stain)
        ranks.barrier()
        if ranks.distributed and ranks.rank == 0:
            _merge_reports(folder, ranks.world)
        return ExtractionRun(folder, results, ranks.rank, ranks.world)
    finally:
        if not given:  # a caller's process group stays open for the caller
            ranks.close()


def settings_fingerprint(choice: EncoderChoice, s: ExtractSettings, input_size: int | None, weights_sha256: str,
                         stain: StainNormalizer | None) -> str:
    """What a finished feature file must have been made with to be kept. The stain reference counts by the
    target fitted on it, not by its path (the same target from a moved file is the same extraction); without
    normalisation the fingerprint is the one of before stain options existed."""
    extract = {k: v for k, v in s.result_settings().items() if k != "stain_ref"}
    record = {"encoder": choice.result_settings(), "extract": extract, "input_size": input_size,
              "weights_sha256": weights_sha256}
    if stain is not None:
        record["stain"] = stain.to_dict()
    return json_fingerprint(record)


def stain_attrs(stain: StainNormalizer | None) -> dict[str, str]:
    """The feature-file attrs of a stain normalisation: ``stain_tag`` and ``stain_target`` (the JSON of
    ``to_dict``); none at all without one, so such files read as before stain options existed."""
    if stain is None:
        return {}
    return {"stain_tag": stain.tag(), "stain_target": canonical_json(stain.to_dict())}


def _extract_todo(todo: list[str], files: dict[str, Path], index: dict[str, Path] | None, folder: Path,
                  model: Encoder, s: ExtractSettings, input_size: int | None, attrs: dict[str, Any],
                  settings_fp: str, report: BatchReport, ranks: Ranks, dev: torch.device,
                  eid: str, stain: StainNormalizer | None = None) -> list[SlideResult]:
    """Extract the slides in ``todo``, a window of locked slides at a time. A slide another process holds is
    ``busy`` in the returned rows but not in the shared report, where that process records its own row."""
    encode = BatchEncoder(model, dev, s.precision, stain)
    workers = default_workers(dev) if s.workers is None else s.workers
    desc = f"extract {eid}" + (f" [rank {ranks.rank}/{ranks.world}]" if ranks.distributed else "")
    bar = tqdm(total=sum(_n_rows(files[sid]) for sid in todo), desc=desc, unit="patch", dynamic_ncols=True,
               smoothing=0.1)
    results: list[SlideResult] = []
    try:
        for start in range(0, len(todo), LOCK_WINDOW):
            locks, jobs = [], []
            for sid in todo[start:start + LOCK_WINDOW]:
                lock = ItemLock(folder / f".{sid}{LOCK_SUFFIX}")
                if not lock.acquire():
                    results.append(SlideResult(sid, str(files[sid]), "busy", 0, 0.0,
                                               f"being extracted by {lock.owner} (lock {lock.path})"))
                    bar.update(_n_rows(files[sid]))
                    continue
                locks.append(lock)
                t0 = time.perf_counter()
                try:
                    job = _job(sid, files[sid], index)
                    if _done(folder / f"{sid}.h5", settings_fp, job.fingerprint, attrs["weights_sha256"]):
                        results.append(SlideResult(sid, job.slide_path, "skipped", len(job.coords), 0.0,
                                                   "done by another process meanwhile"))
                    elif len(job.coords) == 0:
                        results.append(SlideResult(sid, job.slide_path, "no_tissue", 0, 0.0,
                                                   "patch file holds no patches"))
                    else:
                        jobs.append(job)
                        continue
                except Exception as exc:  # a broken slide is reported, the others go on
                    results.append(error_result(sid, str(files[sid]), exc, t0))
                    tqdm.write(f"error: {results[-1].message}")
                bar.update(_n_rows(files[sid]))
                report.update(results[-1])
            try:
                if jobs:
                    results += _encode_jobs(jobs, encode, folder, attrs, s.dtype, s.batch_size, input_size,
                                            workers, report, bar)
            finally:
                for lock in locks:
                    lock.release()
            bar.set_postfix_str(f"{min(start + LOCK_WINDOW, len(todo))}/{len(todo)} slides", refresh=False)
    finally:
        bar.close()
    return results


def extract_features(patches: str | Path, out_dir: str | Path | None, encoder: str | EncoderChoice,
                     weights: str | None = None, truncate: int = 0, settings: ExtractSettings | None = None,
                     slides: Any = None, ranks: Ranks | None = None, **overrides: Any) -> Path:
    """Extract features of every slide of a tiling into ``<features root>/<encoder_id>/``; return that folder.

    ``patches`` is a tiling folder, its ``patches`` folder, an output folder holding one tiling, or a folder of
    CLAM/TRIDENT patch files. Features go to ``out_dir/features/`` (default: the tiling folder's ``features/``).
    ``encoder``/``weights``/``truncate`` choose the encoder (or pass an :class:`EncoderChoice`); ``settings``
    (or keyword overrides such as ``input_size=224, batch_size=32, workers=0, device="cpu"``) say how it runs.
    ``slides`` (a folder or list of slide files) says where slides are when they moved since tiling. Writes
    ``<slide_id>.h5`` (``features`` (N, D), ``coords`` in patch-file order, attrs recording how and from what
    they were made), ``extract.csv`` (one row per slide) and ``features.json``. Finished slides are skipped
    (unless their patches or the settings changed), so an interrupted run resumes.
    """
    return run_extraction(patches, out_dir, encoder, weights, truncate, settings, slides, ranks, **overrides).folder
