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

Several truncations of one encoder (``truncate=[0, 1, 2, 3]``) are extracted in one pass over the patches: the
network runs once per batch up to the deepest truncation a slide still needs, and each truncation pools the
output of its own last stage, with the same modules as a pass of it alone (so the same bytes on a CPU in fp32).
Each truncation keeps its own folder, ``features.json``, ``extract.csv``, locks and skips.

With ``stain_norm`` the reference is fitted once per extraction (or its fitted target loaded) and every batch is
normalised on the encoder's device before the encoder's preprocessing; the target is recorded in each file and
its tag names the folder (``<encoder_id>`` ends in e.g. ``-macenko-1a2b3c4d``). With ``stain_scope="slide"`` (the
default) each slide's source stain is estimated once, by a loader item ahead of its batches, and all its
batches are mapped with it; each file records that estimate (``stain_source``), which later stages apply.

This does not use ``batch.run_batch`` (one slide after the other): batches of consecutive slides flow through
one loader without a pause between slides, and per-slide results are reported with the same rows.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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
from .._io import LOCK_SUFFIX, ItemLock, output_folder, remove_stale_temps, write_csv, write_json
from ..batch import BatchReport, SlideResult, error_result
from ..encoders import Encoder, Preprocessing, create_encoders, describe_encoder, encoder_id
from ..errors import FormatError, HistotransferError, ProvenanceError
from ..patches import TilingFolder, find_tiling, read_patch_file
from ..provenance import canonical_json, json_fingerprint
from ..runtime import Ranks, check_precision, joined, precision_context, resolve_device, shard
from ..slide import check_identity, locate_slide, open_slide, slide_index
from ..stain import SlideStain, StainNormalizer, source_sample, stain_normalizer
from .batches import PatchBatch
from .densenet_inference import DenseNetInference, is_densenet_encoder
from .feature_file import FeatureWriter, first_non_finite, read_feature_attrs
from .gpu_decode import DecodedBatches, TileDecoder, resolve_decode
from .loader import SOURCE_ITEM, PatchBatches, SlideJob, default_workers, patch_loader
from .settings import EncoderChoice, ExtractSettings

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
    """What one process did for one truncation: the feature folder and its slides' report rows."""

    folder: Path
    results: list[SlideResult]
    rank: int = 0
    world: int = 1


@dataclass
class _Output:
    """One truncation's feature folder as it is being filled: its encoder, what identifies its files (the
    settings fingerprint, the attrs every file records), its report and this process's rows."""

    encoder: Encoder
    folder: Path
    settings_fp: str
    attrs: dict[str, Any]
    record: dict[str, Any]
    report: BatchReport
    results: list[SlideResult] = field(default_factory=list)

    @property
    def truncate(self) -> int:
        return self.encoder.truncate

    def add(self, result: SlideResult) -> None:
        """A slide's row, kept and written to the report."""
        self.results.append(result)
        self.report.update(result)

    def done(self, sid: str, patches_fp: str) -> bool:
        """Whether this folder holds slide ``sid``'s finished file of these patches and settings."""
        return _done(self.folder / f"{sid}.h5", self.settings_fp, patches_fp, self.attrs["weights_sha256"])


def _n_rows(path: Path) -> int:
    """Number of patches in a patch file, for balancing ranks (0 when unreadable: its error comes later)."""
    try:
        with h5py.File(path, "r") as f:
            return int(f["coords"].shape[-2])
    except Exception:  # reported with the slide's row when it is processed
        return 0


def _versions() -> str:
    return json.dumps(
        {
            "histotransfer": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "h5py": h5py.__version__,
        }
    )


def inference_stages(model: Encoder) -> nn.Sequential:
    """The encoder's stages in their fastest exact inference form, one module per stage: a DenseNet's
    rearranged (``densenet_inference``), other networks' with their BatchNorms folded."""
    if is_densenet_encoder(model):
        return DenseNetInference(model).stages
    return nn.Sequential(*(fold_batchnorm(stage) for stage in model.body))


def inference_model(model: Encoder) -> nn.Module:
    """``model.forward`` in that inference form (what extraction runs for one truncation)."""
    if is_densenet_encoder(model):
        return DenseNetInference(model).eval()
    return nn.Sequential(inference_stages(model), model.pool).eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm that follows a convolution folded into its weights.

    Same function up to float32 rounding (about 1e-7 relative), 5-15% faster on CPU (bench_extract.py).
    torch.fx's pass works on a traced graph; a model it cannot trace, or without a BatchNorm, is used as it is.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        return fx_fuse(model)
    except Exception:  # tracing fails on data-dependent control flow: keep the model unfused
        return model


class StageTaps(nn.Module):
    """Stages run in order up to the deepest one asked for, pooling the output of each one asked for
    (``pools[k]`` pools stage ``k``) before the next stage runs."""

    def __init__(self, stages: nn.Sequential, pools: dict[int, nn.Module]):
        super().__init__()
        self.stages = stages
        self.pools = nn.ModuleDict({str(k): pool for k, pool in pools.items()})

    def forward(self, x: torch.Tensor, taps: Sequence[int]) -> dict[int, torch.Tensor]:
        out = {}
        for k in range(max(taps) + 1):
            x = self.stages[k](x)
            if k in taps:
                out[k] = self.pools[str(k)](x)
        return out


def normalise_pixels(
    pixels: torch.Tensor, stain: StainNormalizer | None, device: torch.device, source: SlideStain | None = None
) -> torch.Tensor:
    """uint8 (B, H, W, 3) pixels of one slide on ``device``, stain-normalised there when ``stain`` is given
    (a per-slide ``stain`` with the slide's ``source`` estimate). The normalisation runs in IEEE float32 on
    every device (no TF32, no autocast), as on the CPU."""
    pixels = pixels.to(device, non_blocking=True)
    if stain is None:
        return pixels
    with precision_context(device, "fp32"):
        return stain(pixels, source)


class BatchEncoder:
    """The encoder side: uint8 NHWC pixels in, float features out, in inference mode and channels_last.

    Built from one encoder, or from several truncations of one network (:func:`create_encoders`): the network
    then runs once per batch, up to the deepest truncation asked for, and each truncation pools the output of
    its own last stage, with the same modules and operations as a pass of that truncation alone. With
    ``stain``, each batch is stain-normalised on the encoder's device before the encoder's own preprocessing.
    """

    def __init__(
        self,
        encoders: Encoder | Sequence[Encoder],
        device: torch.device,
        precision: str,
        stain: StainNormalizer | None = None,
    ):
        encoders = [encoders] if isinstance(encoders, Encoder) else sorted(encoders, key=lambda e: e.truncate)
        deepest = encoders[0]
        self.truncations = [e.truncate for e in encoders]
        self.last_stage = {e.truncate: len(e.body) - 1 for e in encoders}
        self.preprocess = deepest.preprocess
        pools = {len(e.body) - 1: e.pool for e in encoders}
        # Module.to takes memory_format (it parses Tensor.to's arguments); torch's overloads leave it out.
        self.model = (
            StageTaps(inference_stages(deepest), pools)
            .eval()
            .to(
                device,  # type: ignore[call-overload]
                memory_format=torch.channels_last,
            )
        )
        self.device = device
        self.precision = precision
        self.stain = stain

    def _step(self, height: int, width: int, n: int) -> int:
        """Images per call: on a CPU, as many as keep a call within ``CPU_PIXELS_PER_CALL`` pixels."""
        return max(1, CPU_PIXELS_PER_CALL // (height * width)) if self.device.type == "cpu" else n

    def _normalised(self, pixels: torch.Tensor, source: SlideStain | None) -> torch.Tensor:
        if self.stain is None:
            return pixels
        step = self._step(pixels.shape[1], pixels.shape[2], len(pixels))
        return torch.cat(
            [
                normalise_pixels(pixels[i : i + step], self.stain, self.device, source)
                for i in range(0, len(pixels), step)
            ]
        )

    @torch.inference_mode()
    def features(
        self, pixels: torch.Tensor, truncations: Sequence[int] | None = None, source: SlideStain | None = None
    ) -> dict[int, np.ndarray]:
        """The features of ``truncations`` (default: every one this encoder was built with) of one slide's
        pixels (``source``: the slide's stain estimate, for a per-slide normalisation)."""
        truncations = self.truncations if truncations is None else truncations
        taps = [self.last_stage[t] for t in truncations]
        x = self.preprocess(self._normalised(pixels, source), self.device)
        step = self._step(x.shape[2], x.shape[3], len(x))
        with precision_context(self.device, self.precision):
            parts = [self.model(x[i : i + step], taps) for i in range(0, len(x), step)]
        return {t: torch.cat([part[k] for part in parts]).float().cpu().numpy() for t, k in zip(truncations, taps)}

    def __call__(self, pixels: torch.Tensor, source: SlideStain | None = None) -> np.ndarray:
        """The features of the deepest truncation (the encoder's, when built from one)."""
        return self.features(pixels, self.truncations[:1], source)[self.truncations[0]]


def _slide_attrs(
    base: dict[str, Any], job: SlideJob, input_size: int | None, decode: str, source: SlideStain | None
) -> dict[str, Any]:
    """The attrs of one slide's feature file: the output's, plus where its patches come from, where its
    tiles were decoded and, under per-slide normalisation, the slide's source stain estimate."""
    attrs = dict(
        base,
        slide_path=job.slide_path,
        patch_file=str(job.patch_file.resolve()),
        patch_size=int(job.spec.patch_size),
        patches_fingerprint=job.fingerprint,
        slide_identity=canonical_json(job.identity),
        input_size=int(input_size or job.spec.patch_size),
        decode=decode,
    )
    if job.spec.patch_size_level0 is not None:
        attrs["patch_size_level0"] = int(job.spec.patch_size_level0)
    if source is not None:
        attrs["stain_source"] = canonical_json(source.to_dict())
    return attrs


def _batches(
    jobs: list[SlideJob],
    device: torch.device,
    decode: str,
    batch_size: int,
    prep: Preprocessing,
    workers: int,
    stain: StainNormalizer | None,
) -> Iterable[PatchBatch]:
    """The slides' batches, read by ``workers`` processes (each slide's source stain estimate first, under a
    per-slide ``stain``); with ``decode`` "gpu", JPEG tiles are decoded on ``device`` in this process, a batch
    ahead of the encoder."""
    dataset = PatchBatches(jobs, batch_size, prep, decode, [stain])
    loader = patch_loader(dataset, workers, pin_memory=device.type == "cuda")
    return DecodedBatches(loader, TileDecoder(device)) if decode == "gpu" else loader


def _encode_jobs(
    jobs: list[SlideJob],
    wanted: list[list[_Output]],
    encode: BatchEncoder,
    dtype: str,
    batch_size: int,
    prep: Preprocessing,
    workers: int,
    decode: str,
    bar: tqdm,
) -> None:
    """Run every patch of ``jobs`` through the encoder, streaming each slide into the files of the outputs
    (truncations) it is ``wanted`` for; the network runs only as deep as the slide's deepest wanted output.

    An output whose features come out NaN or inf is an error for that slide and output (nothing is written
    for it); the slide's other outputs go on. Each slide's files and report rows record where its tiles were
    decoded (``decode``); under per-slide normalisation, its files record the slide's source estimate and a
    slide whose estimate is degenerate (left unchanged) says so in its row."""
    loader = _batches(jobs, encode.device, decode, batch_size, prep, workers, encode.stain)
    writers: dict[tuple[int, int], FeatureWriter] = {}
    pending = [list(w) for w in wanted]  # per slide, the outputs not finished yet
    started: dict[int, float] = {}
    sources: dict[int, SlideStain] = {}  # per slide, its source stain estimate (per-slide normalisation)

    def finish(j: int, out: _Output, status: str, message: str = "") -> None:
        job = jobs[j]
        writer = writers.pop((j, out.truncate), None)
        if writer is not None and status == "ok":
            writer.close()
        elif writer is not None:
            writer.discard()
        pending[j].remove(out)
        out.add(
            SlideResult(
                job.slide_id,
                job.slide_path,
                status,
                len(job.coords) if status == "ok" else 0,
                round(time.perf_counter() - started.get(j, time.perf_counter()), 3),
                message,
            )
        )

    try:
        with torch.inference_mode():
            for item in loader:
                j = item.job
                if not pending[j]:
                    continue
                started.setdefault(j, time.perf_counter())
                if item.error:
                    tqdm.write(f"error: {item.error}")
                    for out in list(pending[j]):
                        finish(j, out, "error", item.error)
                    continue
                job = jobs[j]
                if item.start == SOURCE_ITEM:
                    assert item.sources is not None and encode.stain is not None
                    sources[j] = item.sources[encode.stain.tag()]
                    if sources[j].estimate is None:
                        tqdm.write(f"{job.slide_id}: {_unchanged(sources[j])}")
                    continue
                assert item.pixels is not None  # a batch read without error holds its (decoded) pixels
                features = encode.features(item.pixels, [out.truncate for out in pending[j]], sources.get(j))
                for out in list(pending[j]):
                    rows = features[out.truncate]
                    bad = first_non_finite(rows)
                    if bad is not None:
                        x, y = job.coords[item.start + bad]
                        message = (
                            f"{job.slide_path}: the encoder gave NaN or inf features for patch row "
                            f"{item.start + bad} at ({x}, {y}); nothing was written for this slide "
                            "(check the weights file and --precision)"
                        )
                        tqdm.write(f"error: {message}")
                        finish(j, out, "error", message)
                        continue
                    key = (j, out.truncate)
                    if key not in writers:
                        writers[key] = FeatureWriter(
                            out.folder / f"{job.slide_id}.h5",
                            job.coords,
                            out.encoder.feature_dim,
                            dtype,
                            _slide_attrs(out.attrs, job, prep.input_size, item.decode, sources.get(j)),
                        ).open()
                    writers[key].write(rows)
                    if writers[key].complete:
                        source = sources.get(j)
                        note = "" if source is None or source.estimate is not None else f"; {_unchanged(source)}"
                        finish(j, out, "ok", f"decode {writers[key].attrs['decode']}{note}")
                bar.update(len(item.pixels))
    except BaseException:
        for writer in writers.values():  # delete the temporary files of unfinished slides
            writer.discard()
        raise


def _unchanged(source: SlideStain) -> str:
    """What a report says of a slide whose source stain estimate is degenerate."""
    return f"stain left unchanged: {source.reason}"


def _merge_reports(folder: Path, world: int) -> None:
    """Rank 0, after the barrier: fold each rank's report into ``extract.csv`` (this run's rows win)."""
    final = BatchReport(folder / REPORT_NAME)
    parts = sorted(
        folder.glob("extract.rank*.csv"),
        key=lambda p: (int(p.stem.removeprefix("extract.rank")) < world, int(p.stem.removeprefix("extract.rank"))),
    )
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
    return (
        done.get("settings_fingerprint") == settings_fp
        and done.get("patches_fingerprint") == patches_fp
        and str(done.get("weights_sha256", "")) == weights_sha
        and bool(done.get("fingerprint"))
    )


def _job(sid: str, patch_file: Path, index: dict[str, Path] | None) -> SlideJob:
    """The slide's reading job, after checking that the slide file is the one its patches were cut from."""
    patches = read_patch_file(patch_file)
    path = locate_slide(sid, patches.spec.slide_path, index, patch_file)
    with open_slide(path, mpp=patches.spec.mpp) as slide:
        check_identity(slide, patches.identity, str(patch_file))
    return SlideJob(
        sid,
        str(path),
        patch_file,
        patches.coords,
        patches.spec,
        patches.fingerprint,
        patches.identity,
        source_sample(patches.coords),
    )


def features_root(tiling: TilingFolder, out_dir: str | Path | None) -> Path:
    """Where feature folders go: ``out_dir/features``, else the tiling folder's ``features``."""
    if out_dir is not None:
        return output_folder(out_dir) / "features"
    if tiling.root is None:
        raise HistotransferError(
            f"{tiling.patches}: a folder of patch files without its tiling folder; pass --out "
            "to say where the features go."
        )
    return output_folder(tiling.root) / "features"


def run_extraction(
    patches: str | Path,
    out_dir: str | Path | None,
    encoder: str | EncoderChoice,
    weights: str | None = None,
    truncate: int | list[int] = 0,
    settings: ExtractSettings | None = None,
    slides: Any = None,
    ranks: Ranks | None = None,
    blocks: int | None = None,
    **overrides: Any,
) -> ExtractionRun | dict[int, ExtractionRun]:
    """:func:`extract_features`, returning this process's per-slide results (for the CLI): one
    :class:`ExtractionRun`, or for a list of truncations one per truncation, by truncation. ``ranks``: the
    processes sharing the work (default: the torchrun job this process is in; ``Ranks()``: this one alone)."""
    choice = (
        encoder
        if isinstance(encoder, EncoderChoice)
        else EncoderChoice.build(encoder=encoder, weights=weights, truncate=truncate, blocks=blocks)
    )
    s = ExtractSettings.build(settings, **overrides)
    dev = resolve_device(s.device)
    with joined(ranks, dev) as ranks:
        check_precision(s.precision, dev)
        decode = resolve_decode(s.decode, dev)
        tiling = find_tiling(patches)
        files = {p.stem: p for p in tiling.files}
        if not files:
            raise HistotransferError(f"{tiling.patches}: holds no patch files (*.h5); run `histotransfer tile` first.")
        encoders = create_encoders(
            choice.encoder,
            choice.weights,
            choice.truncations,  # fails before any output
            blocks=choice.blocks,
        )
        stain = stain_normalizer(s.stain_norm, s.stain_ref, s.stain_scope)  # fitted once, before any output
        first = encoders[choice.truncations[0]]
        input_size = s.input_size if s.input_size is not None else first.preprocessing.input_size
        index = slide_index(slides)
        root = features_root(tiling, out_dir)
        report_name = REPORT_NAME if not ranks.distributed else f"extract.rank{ranks.rank}.csv"
        outputs = [
            _output(root, one, encoders[t], s, input_size, tiling, report_name, stain)
            for t, one in zip(choice.truncations, choice.each())
        ]
        if ranks.rank == 0:
            for out in outputs:
                _claim_folder(out.folder, out.record)
        ranks.barrier()
        mine = shard({sid: _n_rows(p) for sid, p in files.items()}, ranks.world)[ranks.rank]
        todo = _plan(mine, files, outputs)
        if todo:
            _extract_todo(todo, files, index, outputs, s, first.preprocessing.at(input_size), ranks, dev, decode, stain)
        ranks.barrier()
        if ranks.distributed and ranks.rank == 0:
            for out in outputs:
                _merge_reports(out.folder, ranks.world)
        runs = {out.truncate: ExtractionRun(out.folder, out.results, ranks.rank, ranks.world) for out in outputs}
        return runs if isinstance(choice.truncate, list) else runs[outputs[0].truncate]


def _output(
    root: Path,
    choice: EncoderChoice,
    encoder: Encoder,
    s: ExtractSettings,
    input_size: int | None,
    tiling: TilingFolder,
    report_name: str,
    stain: StainNormalizer | None,
) -> _Output:
    """The feature folder of one truncation (``choice`` of that truncation alone, ``encoder`` its encoder),
    created, with what identifies it and its report."""
    eid = encoder_id(
        choice.encoder,
        choice.weights,
        encoder.truncate,
        input_size,
        s.precision,
        s.dtype,
        extra=(stain.tag(),) if stain is not None else (),
        blocks=encoder.blocks,
    )
    folder = root / eid
    folder.mkdir(parents=True, exist_ok=True)
    described = describe_encoder(encoder)
    prep = encoder.preprocessing.at(input_size)
    settings_fp = settings_fingerprint(choice, s, input_size, described, stain, prep)
    attrs = {
        "encoder_id": eid,
        **described,
        "settings": canonical_json(s.result_settings()),
        "settings_fingerprint": settings_fp,
        "precision": s.precision,
        "dtype": s.dtype,
        "tiling": tiling.name or "",
        "preprocessing": canonical_json(prep.describe()),
        "versions": _versions(),
        **stain_attrs(stain),
    }
    record = {
        "encoder_id": eid,
        "tiling": tiling.name,
        "patches": str(tiling.patches.resolve()),
        "encoder": described,
        "settings": s.record(),
        "input_size": input_size,
        **({"stain": stain.to_dict()} if stain is not None else {}),
    }
    return _Output(
        encoder,
        folder,
        settings_fp,
        attrs,
        record,
        BatchReport(folder / report_name, shared=report_name == REPORT_NAME),
    )


def settings_fingerprint(
    choice: EncoderChoice,
    s: ExtractSettings,
    input_size: int | None,
    described: dict[str, Any],
    stain: StainNormalizer | None,
    prep: Preprocessing | None = None,
) -> str:
    """What a finished feature file must have been made with to be kept. Weights count by what was loaded
    (their label and sha256), not by how they were spelled (the default, ``imagenet``, a relative or absolute
    path); the stain reference counts by the target fitted on it (and the scope it is applied with), not by its
    path. Without normalisation the fingerprint is the one of before stain options existed, and per-patch
    normalisation's the one of before ``stain_scope`` existed. The encoder's preprocessing record (``prep``, at the
    input size) counts where it resizes otherwise than OpenCV's area averaging or crops: such pixels differ from
    those of before per-model preprocessing existed, while area-resized ones (the CNN records) are the same, so
    their fingerprint is the one of before."""
    extract = {k: v for k, v in s.result_settings().items() if k != "stain_ref"}
    encoder = {**choice.result_settings(), "weights": described["weights_label"]}
    record = {
        "encoder": encoder,
        "extract": extract,
        "input_size": input_size,
        "weights_sha256": described["weights_sha256"],
    }
    if stain is not None:
        record["stain"] = stain.to_dict()
    if prep is not None and (prep.interpolation != "area" or prep.resize_size is not None):
        record["preprocessing"] = prep.describe()
    return json_fingerprint(record)


def stain_attrs(stain: StainNormalizer | None) -> dict[str, str]:
    """The feature-file attrs of a stain normalisation: ``stain_tag`` and ``stain_target`` (the JSON of
    ``to_dict``); none at all without one, so such files read as before stain options existed."""
    if stain is None:
        return {}
    return {"stain_tag": stain.tag(), "stain_target": canonical_json(stain.to_dict())}


def _plan(mine: list[str], files: dict[str, Path], outputs: list[_Output]) -> dict[str, list[_Output]]:
    """The outputs each of this process's slides still needs; a slide already done for an output gets a
    ``skipped`` row there, a broken patch file an ``error`` row in every output."""
    todo: dict[str, list[_Output]] = {}
    for sid in mine:
        for out in outputs:
            remove_stale_temps(out.folder, prefix=f"{sid}.h5")
            ItemLock(out.folder / f".{sid}{LOCK_SUFFIX}").clear_if_stale()
        t0 = time.perf_counter()
        try:
            patches = read_patch_file(files[sid])
            needed = [out for out in outputs if not out.done(sid, patches.fingerprint)]
        except Exception as exc:  # a broken patch file is reported, the others go on
            for out in outputs:
                out.add(error_result(sid, str(files[sid]), exc, t0))
            continue
        for out in outputs:
            if out not in needed:
                out.add(
                    SlideResult(
                        sid,
                        patches.spec.slide_path or str(files[sid]),
                        "skipped",
                        len(patches.coords),
                        0.0,
                        DONE_MESSAGE,
                    )
                )
        if needed:
            todo[sid] = needed
    return todo


def _lock_outputs(sid: str, files: dict[str, Path], needed: list[_Output], locks: list[ItemLock]) -> list[_Output]:
    """Take the slide's lock in each needed output's folder; the outputs whose lock another process holds get
    a ``busy`` row in this process's results (not in the shared report, where the other process records its
    own row). Returns the outputs locked."""
    locked = []
    for out in needed:
        lock = ItemLock(out.folder / f".{sid}{LOCK_SUFFIX}")
        if lock.acquire():
            locks.append(lock)
            locked.append(out)
        else:
            out.results.append(
                SlideResult(sid, str(files[sid]), "busy", 0, 0.0, f"being extracted by {lock.owner} (lock {lock.path})")
            )
    return locked


def _extract_todo(
    todo: dict[str, list[_Output]],
    files: dict[str, Path],
    index: dict[str, Path] | None,
    outputs: list[_Output],
    s: ExtractSettings,
    prep: Preprocessing,
    ranks: Ranks,
    dev: torch.device,
    decode: str,
    stain: StainNormalizer | None = None,
) -> None:
    """Extract the slides in ``todo`` for the outputs each needs, a window of locked slides at a time;
    ``decode`` says where JPEG tiles are decoded."""
    needed = {out.truncate for outs in todo.values() for out in outs}
    encode = BatchEncoder([out.encoder for out in outputs if out.truncate in needed], dev, s.precision, stain)
    workers = default_workers(dev) if s.workers is None else s.workers
    names = [out.folder.name for out in outputs if out.truncate in needed]
    desc = f"extract {names[0]}" + (f" +{len(names) - 1} truncations" if len(names) > 1 else "")
    desc += f" [rank {ranks.rank}/{ranks.world}]" if ranks.distributed else ""
    sids = list(todo)
    bar = tqdm(
        total=sum(_n_rows(files[sid]) for sid in sids), desc=desc, unit="patch", dynamic_ncols=True, smoothing=0.1
    )
    try:
        for start in range(0, len(sids), LOCK_WINDOW):
            locks: list[ItemLock] = []
            jobs: list[SlideJob] = []
            wanted: list[list[_Output]] = []
            for sid in sids[start : start + LOCK_WINDOW]:
                locked = _lock_outputs(sid, files, todo[sid], locks)
                checked = _checked_job(sid, files, index, locked) if locked else None
                if checked is None:
                    bar.update(_n_rows(files[sid]))
                else:
                    jobs.append(checked[0])
                    wanted.append(checked[1])
            try:
                if jobs:
                    _encode_jobs(jobs, wanted, encode, s.dtype, s.batch_size, prep, workers, decode, bar)
            finally:
                for lock in locks:
                    lock.release()
            bar.set_postfix_str(f"{min(start + LOCK_WINDOW, len(sids))}/{len(sids)} slides", refresh=False)
    finally:
        bar.close()


def _checked_job(
    sid: str, files: dict[str, Path], index: dict[str, Path] | None, locked: list[_Output]
) -> tuple[SlideJob, list[_Output]] | None:
    """The slide's reading job and the locked outputs still to fill, or None (rows given) when there is
    nothing to read: every output done by another process meanwhile, no patches, or a broken slide."""
    t0 = time.perf_counter()
    try:
        job = _job(sid, files[sid], index)
    except Exception as exc:  # a broken slide is reported, the others go on
        for out in locked:
            out.add(error_result(sid, str(files[sid]), exc, t0))
        tqdm.write(f"error: {locked[0].results[-1].message}")
        return None
    left = []
    for out in locked:
        if out.done(sid, job.fingerprint):
            out.add(
                SlideResult(sid, job.slide_path, "skipped", len(job.coords), 0.0, "done by another process meanwhile")
            )
        elif len(job.coords) == 0:
            out.add(SlideResult(sid, job.slide_path, "no_tissue", 0, 0.0, "patch file holds no patches"))
        else:
            left.append(out)
    return (job, left) if left else None


def extract_features(
    patches: str | Path,
    out_dir: str | Path | None,
    encoder: str | EncoderChoice,
    weights: str | None = None,
    truncate: int | list[int] = 0,
    settings: ExtractSettings | None = None,
    slides: Any = None,
    ranks: Ranks | None = None,
    blocks: int | None = None,
    **overrides: Any,
) -> Path | dict[int, Path]:
    """Extract features of every slide of a tiling into ``<features root>/<encoder_id>/``; return that folder.

    ``patches`` is a tiling folder, its ``patches`` folder, an output folder holding one tiling, or a folder of
    CLAM/TRIDENT patch files. Features go to ``out_dir/features/`` (default: the tiling folder's ``features/``).
    ``encoder``/``weights``/``truncate`` choose the encoder (or pass an :class:`EncoderChoice`); ``settings``
    (or keyword overrides such as ``input_size=224, batch_size=32, workers=0, device="cpu"``) say how it runs.
    ``slides`` (a folder or list of slide files) says where slides are when they moved since tiling. Writes
    ``<slide_id>.h5`` (``features`` (N, D), ``coords`` in patch-file order, attrs recording how and from what
    they were made), ``extract.csv`` (one row per slide) and ``features.json``. Finished slides are skipped
    (unless their patches or the settings changed), so an interrupted run resumes.

    ``truncate`` a list (e.g. ``[0, 1, 2, 3]``) extracts each of these truncations in one pass over the
    patches: the network runs once per batch, up to the deepest one, and every truncation gets its own folder
    with the files a separate extraction of it writes (the same bytes on a CPU in fp32). Returns then the
    folders by truncation. A slide already done for some of them is run only for the others.

    ``blocks`` (transformer encoders, instead of ``truncate``) keeps exactly the encoder's first ``blocks``
    blocks; its folder names the depth ``b<blocks>`` (``t<truncate>`` otherwise).
    """
    runs = run_extraction(patches, out_dir, encoder, weights, truncate, settings, slides, ranks, blocks, **overrides)
    if isinstance(runs, dict):
        return {t: run.folder for t, run in runs.items()}
    return runs.folder
