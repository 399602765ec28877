"""Block-wise CKA between two encoders on the same patches (the paper's Fig. 2).

**Which activations are compared.** For each stage that :meth:`Encoder.forward_stages` returns (``stem``
and then ResNet ``layer1..4``, DenseNet ``denseblock1..4`` (each opened by its transition; the last one
ends with norm5 + ReLU), EfficientNet ``stage1..4``, a transformer's quarter stages or blocks), the stage's
output in eval mode (BatchNorm running statistics), a CNN's feature map (B, C, H, W) or a transformer's tokens
(B, N, C), for patches prepared as each encoder's registry record says.

* ``pooling="classifier"`` (default): the stage output through the encoder's own pooling, the representation
  attention MIL sees when the encoder is cut after that stage, for every architecture: a CNN's global average
  (n, C); a transformer's final norm then its token pooling (the class token, or for Virchow2 the class token
  concatenated with the mean patch token). The d x d cross-products are accumulated in float64 over batches
  (:class:`StreamingCKA`), so memory is O(d^2) however many patches are used.
* ``pooling="mean"``: the mean over the spatial positions of the map, or over all of a transformer's un-normed
  tokens (class and register tokens included); the same as ``classifier`` for a CNN.
* ``pooling="flatten"``: the whole map flattened, (n, C*H*W), as in Kornblith et al. Each stage's maps are
  written to a temporary float32 file (``n * C*H*W * 4`` bytes of disk per stage and encoder; e.g. 2000
  patches of 224 px through resnet18's ``layer1`` take 1.6 GB) and reduced to an n x n centred Gram matrix
  in column chunks (``n^2 * 8`` bytes of memory per stage and encoder). Use fewer patches or a smaller input
  size when that does not fit.

**Baseline.** CKA of encoder A with random initialisations of its architecture (seeds 1..``baseline_draws``),
cut as A is, on the same patches: ``baseline`` and ``baseline_sd`` in ``cka.csv`` are their mean and standard
deviation, what shared architecture and inputs alone give. A LayerScale ViT's draws have their LayerScale gains
set to 1 (:func:`baseline_encoder` says why).

**Pixels.** Each encoder sees the patches as its features were made: a run folder (or its ``encoder.pt``) with
the stain normalisation its features were extracted with, an encoder given by name with the settings'
``stain_norm`` / ``stain_ref`` / ``stain_scope`` (as an extraction with those options); the random baseline as
encoder A. A per-slide normalisation estimates each sampled slide's source stain as extraction does (on the
same patches of the slide) from the patches as CKA reads them. Each encoder's pixels are prepared by its
registry record (resize method, crop; ``features.loader.prepare_patch``) at the settings' ``input_size``, else its
run's, else the record's own (the tiled size for a CNN); where the two encoders' records agree the loader prepares
the pixels once and the stain estimate is made on them, otherwise on the tiled size. At another size than the
extraction's the estimate, and so the pixels, can differ from the extraction's. Both encoders of a comparison
with the same record and normalisation see the very same pixels.

Stage i of encoder A is compared with stage i of encoder B (``cka.csv``); with ``full_matrix`` every stage
of A with every stage of B (``cka_matrix.csv`` and a heatmap). With ``per_block`` a transformer's stages are its
single blocks (``block1``, ``block2``, ...) instead of its quarters, for the table and the matrix alike; the
``mean`` pooling then keeps one d x d float64 sum per pair compared, so a full matrix of a 24-block ViT-L with
its baseline holds about 700 of them (6 GB).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from timm.layers import LayerScale
from tqdm.auto import tqdm

from .._io import atomic_path, output_folder, remove_stale_temp_folders, temp_folder, write_csv, write_json
from ..encoders import Encoder, Preprocessing, create_encoder, is_file_label
from ..errors import HistotransferError, one_line
from ..features import PatchBatches, SlideJob, normalise_pixels, patch_loader, prepare_patch
from ..finetune import ENCODER_FILE, encoder_from_attrs, run_encoder_attrs
from ..patches import find_tiling, read_patch_file
from ..runtime import Ranks, joined, precision_context, resolve_device, shard
from ..slide import check_identity, locate_slide, open_slide, slide_index
from ..stain import SlideStain, StainNormalizer, recorded_normalizer, source_sample, stain_normalizer, stain_tag
from .cka import StreamingCKA, centred_gram, gram_cka
from .settings import CkaSettings

BASELINE_SEED = 1  # the first random initialisation CKA baselines draw (the "random" weights are seed 0)
MAPS_PREFIX = "cka-maps"  # the scratch folder of --pooling flatten: .cka-maps-<host>-<pid>-<random>


@dataclass
class ResolvedEncoder:
    """An encoder to compare, a label for tables and figures, the input size its run used (if any) and the
    stain normalisation of the pixels it sees."""

    encoder: Encoder
    label: str
    input_size: int | None = None
    stain: StainNormalizer | None = None


EncoderLike: TypeAlias = ResolvedEncoder | Encoder | str | Path | Mapping[str, Any]


def resolve_encoder(spec: EncoderLike, weights: str | None = None, truncate: int = 0,
                    stain: StainNormalizer | None = None, blocks: int | None = None) -> ResolvedEncoder:
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
                "compare encoders given by name.")
        return ResolvedEncoder(encoder, f"{run_dir.name} ({encoder.name}, {encoder.depth_tag})",
                               int(size) if size else None, recorded)
    name = str(spec)
    enc = create_encoder(name, weights, truncate, blocks=blocks)
    return ResolvedEncoder(enc, f"{name} ({_weights_name(enc)}, {enc.depth_tag})", stain=stain)


def _preprocessing(r: ResolvedEncoder, size: int | None) -> Preprocessing:
    """How an encoder's pixels are prepared for CKA: its record at ``size`` (the settings' input size), else at
    its run's input size, else its record's own (the tiled size for a CNN)."""
    return r.encoder.preprocessing.at(size or r.input_size or r.encoder.preprocessing.input_size)


def _weights_name(encoder: Encoder) -> str:
    """A short name of an encoder's weights for labels: the option's name, or the weights file's name."""
    label = encoder.weights_label
    return Path(encoder.weights_source).name if is_file_label(label) else label


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
            jobs.append(SlideJob(ps.slide_id, str(slide_path), path, ps.coords[rows], ps.spec, ps.fingerprint,
                                 ps.identity, source_sample(ps.coords)))
    return jobs


def _pool(maps: list[torch.Tensor], pooling: str, model: Encoder) -> list[np.ndarray]:
    """Each stage output as one row per patch: through the encoder's own pooling (``classifier``: the global
    average of a CNN's map; a transformer's final norm and token pooling, e.g. the class token), the mean over
    its spatial positions or all its un-normed tokens (``mean``), or the whole output flattened."""
    if pooling == "flatten":
        return [m.float().flatten(1).cpu().numpy() for m in maps]
    if pooling == "classifier":
        return [model.pool(m).double().cpu().numpy() for m in maps]
    return [(m.float().mean(dim=(2, 3)) if m.dim() == 4 else m.float().mean(dim=1)).double().cpu().numpy()
            for m in maps]


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


class _FlattenStore:
    """Flattened stage maps of all patches in temporary float32 files, reduced to centred Gram matrices."""

    def __init__(self, folder: Path, n: int, pairs: list[tuple[str, str]], debiased: bool = False):
        self.folder, self.n, self.pairs, self.debiased = folder, n, pairs, debiased
        self.arrays: dict[str, np.memmap] = {}
        self.row = 0

    def update(self, batch: dict[str, np.ndarray]) -> None:
        for key, rows in batch.items():
            if key not in self.arrays:
                self.arrays[key] = np.lib.format.open_memmap(
                    self.folder / f"{len(self.arrays)}.npy", mode="w+", dtype=np.float32,
                    shape=(self.n, rows.shape[1]))
            self.arrays[key][self.row:self.row + len(rows)] = rows
        self.row += len(next(iter(batch.values())))

    def result(self) -> dict[tuple[str, str], float]:
        grams = {k: centred_gram(a[: self.row]) for k, a in tqdm(self.arrays.items(), desc="Gram matrices",
                                                                  unit="map", dynamic_ncols=True)}
        return gram_cka(grams, self.pairs, debiased=self.debiased)


@dataclass
class _Batch:
    """One batch's pooled rows of every compared representation, and where its patches are in the sample."""

    job: int
    start: int
    n: int
    rows: dict[str, np.ndarray]
    widths: dict[str, int]


_Model: TypeAlias = tuple[Encoder, list[str], StainNormalizer | None, Preprocessing]


def _prepared(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """A batch of tiled-size pixels prepared as ``prep`` says (``prepare_patch``, patch by patch)."""
    return torch.from_numpy(np.stack([prepare_patch(p, prep) for p in pixels.numpy()]))


def _encode(models: list[_Model], jobs: list[SlideJob], job_ids: list[int], s: CkaSettings, dev: torch.device,
            add: Callable[[_Batch], None], progress: bool = True) -> None:
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
    bar = tqdm(total=sum(len(j.coords) for j in chosen), desc="CKA", unit="patch", dynamic_ncols=True,
               disable=not progress)
    with torch.inference_mode(), precision_context(dev, "fp32"), bar:
        for item in loader:
            if item.error:
                if item.job not in failed:
                    warnings.warn(f"skipping slide: {item.error}", stacklevel=3)
                    failed.add(item.job)
                continue
            if item.job in failed:  # a loader process failed this slide (its stain estimate, say) after another
                continue            # had read some of its batches
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
            add(_Batch(job_ids[item.job], item.start, len(item.pixels), rows, widths))
            bar.update(len(item.pixels))


@dataclass(frozen=True)
class _Failure:
    """Why a CKA under torchrun failed, as rank 0 tells every rank."""

    message: str


def _from_lead() -> pd.DataFrame:
    """On a rank other than 0: the table rank 0 made, or the error it failed with (a :class:`_Failure`)."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], _Failure):
        raise HistotransferError(f"CKA failed: {box[0].message}")
    return box[0]


def _as_float32(batch: _Batch) -> _Batch:
    """A batch to send to rank 0 at half the size: pooled rows are float32 means held as float64, so the
    round trip through float32 is exact."""
    return replace(batch, rows={k: v.astype(np.float32) for k, v in batch.rows.items()})


def _plot_bars(df: pd.DataFrame, path: Path, title: str) -> None:
    fig = Figure(figsize=(max(4.0, 1.1 * len(df) + 1.5), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(df)), df["cka"], color="#4C72B0")
    for bar, value in zip(bars, df["cka"]):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center", va="bottom",
                fontsize=8)
    low = float(df["cka"].min())
    if "baseline" in df:
        sd = df["baseline_sd"].fillna(0.0)
        ax.fill_between(range(len(df)), df["baseline"] - sd, df["baseline"] + sd, color="0.6", alpha=0.35, lw=0,
                        label="baseline: mean ± sd")
        ax.plot(range(len(df)), df["baseline"], color="0.4", linestyle="--", marker="x",
                label="A vs random init (baseline)")
        ax.legend(fontsize=7, loc="lower left")
        low = min(low, float((df["baseline"] - sd).min()))
    ax.set_xticks(range(len(df)), df["stage"], rotation=20, ha="right")
    ax.set(ylim=(min(0.0, low), 1.1),
           ylabel="linear CKA", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plot_matrix(matrix: pd.DataFrame, path: Path, label_a: str, label_b: str) -> None:
    fig = Figure(figsize=(1.0 * matrix.shape[1] + 2.5, 0.8 * matrix.shape[0] + 1.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="magma", origin="lower")
    for (i, j), value in np.ndenumerate(matrix.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    ax.set(xlabel=label_b, ylabel=label_a, title="linear CKA, stage by stage")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def compare_encoders(encoder_a: EncoderLike, encoder_b: EncoderLike, patches_dir: str | Path, out_dir: str | Path,
                     settings: CkaSettings | None = None, slides: Any = None, ranks: Ranks | None = None,
                     **overrides: Any) -> pd.DataFrame:
    """Linear CKA between the same stages of two encoders on patches sampled from ``patches_dir``.

    Encoders are given as :class:`Encoder` objects or specs (see :func:`resolve_encoder`; a
    :class:`ResolvedEncoder` keeps the stain normalisation it was resolved with). ``settings`` (or
    keyword overrides such as ``n_patches=2000, pooling="mean"``) say how (:class:`CkaSettings`). Writes
    ``cka.csv`` (stage, cka), ``cka.png``, ``patches.csv`` (the patches used), ``cka.json`` (settings, the
    encoders' weights and the patches' fingerprints, the number of patches asked for and used) and, with
    ``full_matrix``, ``cka_matrix.csv`` / ``cka_matrix.png``. Returns the cka.csv table.

    Under torchrun (``ranks``, default: the job this process is in) the ranks share the sampled slides, and
    rank 0 sums their pooled rows in the order one process reads them and writes the files: the numbers are
    those of one process. ``pooling="flatten"`` keeps its maps on rank 0's disk, so rank 0 compares alone.
    Every rank returns the table.
    """
    s = CkaSettings.build(settings, **overrides)
    resolved = all(isinstance(e, ResolvedEncoder) for e in (encoder_a, encoder_b))
    stain = None if resolved else stain_normalizer(s.stain_norm, s.stain_ref, s.stain_scope)  # resolved: theirs
    a, b = resolve_encoder(encoder_a, stain=stain), resolve_encoder(encoder_b, stain=stain)
    if s.per_block:
        a = replace(a, encoder=a.encoder.per_block())
        b = replace(b, encoder=b.encoder.per_block())
    prep_a, prep_b = _preprocessing(a, s.input_size), _preprocessing(b, s.input_size)
    input_size = prep_a.input_size if prep_a.input_size == prep_b.input_size else None
    dev = resolve_device(s.device)
    jobs = sample_patches(patches_dir, s.n_patches, s.seed, slides)  # checks the slides before any file is made
    out = output_folder(out_dir)
    n_total = sum(len(j.coords) for j in jobs)
    shortfall = ([f"{patches_dir}: asked for {s.n_patches} patches, the tiling holds only {n_total}; CKA uses "
                  f"{n_total} (see cka.json)"] if n_total < s.n_patches else [])
    for text in shortfall:  # said before the encoding starts, and kept with the other warnings in cka.json
        warnings.warn(text, stacklevel=2)

    names_a = [f"a:{st}" for st in a.encoder.stage_names]
    names_b = [f"b:{st}" for st in b.encoder.stage_names]
    pairs = list(zip(names_a, names_b))
    if s.full_matrix:
        pairs += [(x, y) for x in names_a for y in names_b]
    encoders = [(a.encoder, names_a, a.stain, prep_a), (b.encoder, names_b, b.stain, prep_b)]
    names_r: list[list[str]] = []
    layerscale = False
    for draw in range(s.baseline_draws if s.baseline else 0):
        # Other draws than the "random" weights (seed 0), so the baseline is never encoder A itself.
        rand, layerscale = baseline_encoder(a.encoder, BASELINE_SEED + draw)
        rand = rand.per_block() if s.per_block else rand
        names_r.append([f"r{draw}:{st}" for st in rand.stage_names])
        encoders.append((rand, names_r[-1], a.stain, prep_a))
        pairs += list(zip(names_a, names_r[-1]))
    pairs = list(dict.fromkeys(pairs))

    models = [(enc.to(dev).eval(), names, norm, prep) for enc, names, norm, prep in encoders]
    with joined(ranks, dev) as ranks:
        sharded = ranks.distributed and s.pooling != "flatten"
        gathered: list[_Batch] = []
        failures: list[str] = []
        if sharded:  # each rank encodes its share of the slides; rank 0 sums the pooled rows in one process's order
            sizes = {str(j): len(job.coords) for j, job in enumerate(jobs)}
            mine = [int(j) for j in shard(sizes, ranks.world)[ranks.rank]]
            local: list[_Batch] | str = []
            try:
                batches: list[_Batch] = []
                _encode(models, jobs, sorted(mine), s, dev, lambda b: batches.append(_as_float32(b)),
                        progress=ranks.rank == 0)
                local = batches
            except Exception as exc:  # every rank still joins the gather, so that none is left waiting
                local = f"rank {ranks.rank}: {one_line(exc)}"
            parts: list[Any] = [None] * ranks.world if ranks.rank == 0 else []
            dist.gather_object(local, parts if ranks.rank == 0 else None, dst=0)
            failures = [p for p in parts if isinstance(p, str)]
            gathered = sorted((replace(b, rows={k: v.astype(np.float64) for k, v in b.rows.items()})
                               for part in parts if not isinstance(part, str) for b in part),
                              key=lambda b: (b.job, b.start))
        if ranks.rank != 0:  # flatten pooling keeps its maps on disk: rank 0 compares alone
            return _from_lead()
        try:
            if failures:
                raise HistotransferError(failures[0])
            widths: dict[str, int] = {}
            used: list[tuple[str, int, int]] = []
            remove_stale_temp_folders(out, MAPS_PREFIX)
            with temp_folder(out, MAPS_PREFIX) as tmp:
                debiased = s.estimator == "debiased"
                acc = (StreamingCKA(pairs, debiased=debiased) if s.pooling != "flatten"
                       else _FlattenStore(tmp, n_total, pairs, debiased))

                def add(batch: _Batch) -> None:
                    acc.update(batch.rows)
                    widths.update(batch.widths)
                    job = jobs[batch.job]
                    coords = job.coords[batch.start:batch.start + batch.n]
                    used.extend((job.slide_id, int(cx), int(cy)) for cx, cy in coords)

                if sharded:
                    for batch in gathered:
                        add(batch)
                else:
                    _encode(models, jobs, list(range(len(jobs))), s, dev, add)
                if len(used) < 2:
                    raise HistotransferError(f"{patches_dir}: fewer than 2 patches could be read; see the warnings.")
                values = acc.result()
            df = pd.DataFrame({
                "stage": [sa if sa == sb else f"{sa} | {sb}"
                          for sa, sb in zip(a.encoder.stage_names, b.encoder.stage_names)],
                "cka": [values[p] for p in zip(names_a, names_b)],
            })
            if s.baseline:
                # the stages the table has (an encoder B of fewer stages than A shortens it)
                draws = np.array([[values[p] for p in zip(names_a, names)][: len(df)] for names in names_r])
                df["baseline"] = draws.mean(axis=0)
                df["baseline_sd"] = draws.std(axis=0, ddof=1) if len(draws) > 1 else np.nan
            warnings_ = few_patches_warnings(len(used), {n.split(":", 1)[1]: w for n, w in widths.items()
                                                         if n.startswith(("a:", "b:"))}, s.estimator)
            for text in warnings_:
                warnings.warn(text, stacklevel=2)
            write_csv(df, out / "cka.csv")
            write_csv(pd.DataFrame(used, columns=["slide_id", "x", "y"]), out / "patches.csv")
            title = f"{a.label} vs {b.label}\n{len(used)} patches, {s.pooling} pooling, {s.estimator} estimator"
            _plot_bars(df, out / "cka.png", title)
            baseline = None
            if s.baseline:
                seeds = f"seeds {BASELINE_SEED}-{BASELINE_SEED + s.baseline_draws - 1}"
                baseline = (f"random initialisation of encoder A, mean and sd over {s.baseline_draws} draws ({seeds})"
                            + (", LayerScale gains set to 1 (timm's initialisation without LayerScale)"
                               if layerscale else ""))
            record = {"encoder_a": a.label, "encoder_b": b.label, "settings": s.record(), "input_size": input_size,
                      "estimator": s.estimator, "baseline": baseline,
                      "warnings": shortfall + warnings_,
                      "n_patches_requested": s.n_patches, "n_patches": len(used),
                      "patches_dir": str(Path(patches_dir).resolve()),
                      "patches": {j.slide_id: j.fingerprint for j in jobs},
                      "weights_sha256_a": a.encoder.weights_sha256, "weights_sha256_b": b.encoder.weights_sha256,
                      "stain_a": stain_tag(a.stain), "stain_b": stain_tag(b.stain),
                      "preprocessing_a": prep_a.describe(), "preprocessing_b": prep_b.describe()}
            if s.full_matrix:
                matrix = pd.DataFrame([[values[(x, y)] for y in names_b] for x in names_a],
                                      index=a.encoder.stage_names, columns=b.encoder.stage_names)
                with atomic_path(out / "cka_matrix.csv") as tmp_csv:
                    matrix.rename_axis("stage").to_csv(tmp_csv)
                _plot_matrix(matrix, out / "cka_matrix.png", a.label, b.label)
            write_json(record, out / "cka.json")
        except Exception as exc:
            if ranks.distributed:  # the other ranks raise the same error
                dist.broadcast_object_list([_Failure(one_line(exc))], src=0)
            raise
        if ranks.distributed:
            dist.broadcast_object_list([df], src=0)
        return df


def few_patches_warnings(n: int, widths: dict[str, int], estimator: str) -> list[str]:
    """A warning for each stage compared on fewer patches than its representation has dimensions, where the
    biased estimator scores even unrelated representations high."""
    thin = {stage: d for stage, d in widths.items() if n < d}
    if not thin:
        return []
    shown = ", ".join(f"{stage} ({d})" for stage, d in list(thin.items())[:4])
    if estimator == "debiased":
        return [f"CKA on {n} patches, fewer than the dimensions of {len(thin)} stage representation(s): {shown}; "
                "the debiased estimator is not inflated by this, but it is noisy with few patches per dimension: "
                "use more patches, and read CKA against the random-initialisation baseline."]
    return [f"CKA on {n} patches, fewer than the dimensions of {len(thin)} stage representation(s): {shown}; "
            "with few patches per dimension CKA is inflated for any pair of representations: use estimator "
            "debiased, or more patches, and read CKA against the baseline."]


def cka_summary(df: pd.DataFrame) -> str:
    """The cka.csv table as aligned text lines (with the random-initialisation baseline, mean ± sd over its draws,
    when computed)."""
    width = max(len(s) for s in df["stage"])
    base = "baseline" in df
    head = f"  {'stage':<{width}}  cka     " + ("baseline (random init, mean ± sd)" if base else "")
    sds = df["baseline_sd"] if base else df["cka"]
    rows = [f"  {s:<{width}}  {v:.4f}" + (f"  {b:.4f} ± {sd:.4f}" if base else "")
            for s, v, b, sd in zip(df["stage"], df["cka"], df["baseline"] if base else df["cka"], sds)]
    return "\n".join([head, *rows])
