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
set to 1 (:func:`~.cka_encoders.baseline_encoder` says why).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch.distributed as dist

from .._io import atomic_path, output_folder, remove_stale_temp_folders, temp_folder, write_csv, write_json
from ..errors import HistotransferError, one_line
from ..runtime import Ranks, joined, resolve_device, shard
from ..stain import stain_normalizer, stain_tag
from .cka import StreamingCKA
from .cka_activations import FlattenStore, PooledBatch, as_float32, encode_patches, sample_patches
from .cka_encoders import (
    BASELINE_SEED,
    EncoderLike,
    ResolvedEncoder,
    baseline_encoder,
    cka_preprocessing,
    resolve_encoder,
)
from .cka_figures import plot_bars, plot_matrix
from .settings import CkaSettings

MAPS_PREFIX = "cka-maps"  # the scratch folder of --pooling flatten: .cka-maps-<host>-<pid>-<random>


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


def compare_encoders(
    encoder_a: EncoderLike,
    encoder_b: EncoderLike,
    patches_dir: str | Path,
    out_dir: str | Path,
    settings: CkaSettings | None = None,
    slides: Any = None,
    ranks: Ranks | None = None,
    **overrides: Any,
) -> pd.DataFrame:
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
    prep_a, prep_b = cka_preprocessing(a, s.input_size), cka_preprocessing(b, s.input_size)
    input_size = prep_a.input_size if prep_a.input_size == prep_b.input_size else None
    dev = resolve_device(s.device)
    jobs = sample_patches(patches_dir, s.n_patches, s.seed, slides)  # checks the slides before any file is made
    out = output_folder(out_dir)
    n_total = sum(len(j.coords) for j in jobs)
    shortfall = (
        [
            f"{patches_dir}: asked for {s.n_patches} patches, the tiling holds only {n_total}; CKA uses "
            f"{n_total} (see cka.json)"
        ]
        if n_total < s.n_patches
        else []
    )
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
        gathered: list[PooledBatch] = []
        failures: list[str] = []
        if sharded:  # each rank encodes its share of the slides; rank 0 sums the pooled rows in one process's order
            sizes = {str(j): len(job.coords) for j, job in enumerate(jobs)}
            mine = [int(j) for j in shard(sizes, ranks.world)[ranks.rank]]
            local: list[PooledBatch] | str = []
            try:
                batches: list[PooledBatch] = []
                encode_patches(
                    models,
                    jobs,
                    sorted(mine),
                    s,
                    dev,
                    lambda b: batches.append(as_float32(b)),
                    progress=ranks.rank == 0,
                )
                local = batches
            except Exception as exc:  # every rank still joins the gather, so that none is left waiting
                local = f"rank {ranks.rank}: {one_line(exc)}"
            parts: list[Any] = [None] * ranks.world if ranks.rank == 0 else []
            dist.gather_object(local, parts if ranks.rank == 0 else None, dst=0)
            failures = [p for p in parts if isinstance(p, str)]
            gathered = sorted(
                (
                    replace(b, rows={k: v.astype(np.float64) for k, v in b.rows.items()})
                    for part in parts
                    if not isinstance(part, str)
                    for b in part
                ),
                key=lambda b: (b.job, b.start),
            )
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
                acc = (
                    StreamingCKA(pairs, debiased=debiased)
                    if s.pooling != "flatten"
                    else FlattenStore(tmp, n_total, pairs, debiased)
                )

                def add(batch: PooledBatch) -> None:
                    acc.update(batch.rows)
                    widths.update(batch.widths)
                    job = jobs[batch.job]
                    coords = job.coords[batch.start : batch.start + batch.n]
                    used.extend((job.slide_id, int(cx), int(cy)) for cx, cy in coords)

                if sharded:
                    for batch in gathered:
                        add(batch)
                else:
                    encode_patches(models, jobs, list(range(len(jobs))), s, dev, add)
                if len(used) < 2:
                    raise HistotransferError(f"{patches_dir}: fewer than 2 patches could be read; see the warnings.")
                values = acc.result()
            df = pd.DataFrame(
                {
                    "stage": [
                        sa if sa == sb else f"{sa} | {sb}"
                        for sa, sb in zip(a.encoder.stage_names, b.encoder.stage_names)
                    ],
                    "cka": [values[p] for p in zip(names_a, names_b)],
                }
            )
            if s.baseline:
                # the stages the table has (an encoder B of fewer stages than A shortens it)
                draws = np.array([[values[p] for p in zip(names_a, names)][: len(df)] for names in names_r])
                df["baseline"] = draws.mean(axis=0)
                df["baseline_sd"] = draws.std(axis=0, ddof=1) if len(draws) > 1 else np.nan
            warnings_ = few_patches_warnings(
                len(used), {n.split(":", 1)[1]: w for n, w in widths.items() if n.startswith(("a:", "b:"))}, s.estimator
            )
            for text in warnings_:
                warnings.warn(text, stacklevel=2)
            write_csv(df, out / "cka.csv")
            write_csv(pd.DataFrame(used, columns=["slide_id", "x", "y"]), out / "patches.csv")
            title = f"{a.label} vs {b.label}\n{len(used)} patches, {s.pooling} pooling, {s.estimator} estimator"
            plot_bars(df, out / "cka.png", title)
            baseline = None
            if s.baseline:
                seeds = f"seeds {BASELINE_SEED}-{BASELINE_SEED + s.baseline_draws - 1}"
                baseline = (
                    f"random initialisation of encoder A, mean and sd over {s.baseline_draws} draws ({seeds})"
                    + (", LayerScale gains set to 1 (timm's initialisation without LayerScale)" if layerscale else "")
                )
            record = {
                "encoder_a": a.label,
                "encoder_b": b.label,
                "settings": s.record(),
                "input_size": input_size,
                "estimator": s.estimator,
                "baseline": baseline,
                "warnings": shortfall + warnings_,
                "n_patches_requested": s.n_patches,
                "n_patches": len(used),
                "patches_dir": str(Path(patches_dir).resolve()),
                "patches": {j.slide_id: j.fingerprint for j in jobs},
                "weights_sha256_a": a.encoder.weights_sha256,
                "weights_sha256_b": b.encoder.weights_sha256,
                "stain_a": stain_tag(a.stain),
                "stain_b": stain_tag(b.stain),
                "preprocessing_a": prep_a.describe(),
                "preprocessing_b": prep_b.describe(),
            }
            if s.full_matrix:
                matrix = pd.DataFrame(
                    [[values[(x, y)] for y in names_b] for x in names_a],
                    index=a.encoder.stage_names,
                    columns=b.encoder.stage_names,
                )
                with atomic_path(out / "cka_matrix.csv") as tmp_csv:
                    matrix.rename_axis("stage").to_csv(tmp_csv)
                plot_matrix(matrix, out / "cka_matrix.png", a.label, b.label)
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
        return [
            f"CKA on {n} patches, fewer than the dimensions of {len(thin)} stage representation(s): {shown}; "
            "the debiased estimator is not inflated by this, but it is noisy with few patches per dimension: "
            "use more patches, and read CKA against the random-initialisation baseline."
        ]
    return [
        f"CKA on {n} patches, fewer than the dimensions of {len(thin)} stage representation(s): {shown}; "
        "with few patches per dimension CKA is inflated for any pair of representations: use estimator "
        "debiased, or more patches, and read CKA against the baseline."
    ]


def cka_summary(df: pd.DataFrame) -> str:
    """The cka.csv table as aligned text lines (with the random-initialisation baseline, mean ± sd over its draws,
    when computed)."""
    width = max(len(s) for s in df["stage"])
    base = "baseline" in df
    head = f"  {'stage':<{width}}  cka     " + ("baseline (random init, mean ± sd)" if base else "")
    sds = df["baseline_sd"] if base else df["cka"]
    rows = [
        f"  {s:<{width}}  {v:.4f}" + (f"  {b:.4f} ± {sd:.4f}" if base else "")
        for s, v, b, sd in zip(df["stage"], df["cka"], df["baseline"] if base else df["cka"], sds)
    ]
    return "\n".join([head, *rows])
