"""Run a study: plan the grid of cells, run each one not already done, then write tables, figures and report.

Cells, in order: per dataset, demo slides (when asked) -> tiling -> one extraction per encoder configuration and
stain normalisation -> one MIL run per configuration, stain normalisation, MIL variant and seed -> fine-tuning of
the chosen configurations -> CKA. A failed cell is
recorded and the cells that need it are skipped with the reason; everything else still runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .._io import file_sha256, h5_files, output_folder, write_csv, write_json, write_text
from .._read import read_csv
from ..analysis.settings import CkaSettings
from ..errors import HistotransferError, one_line
from ..finetune.settings import FinetuneSettings
from ..mil.settings import SMALL_SPLIT
from ..runtime import Ranks, joined, resolve_device
from ..slide import slide_id_of
from .cells import FAILED, Cell, prepare_folder, read_done, settings_hash, write_done, write_failed
from .config import load_study
from .figures import draw_figures
from .grid import Dataset, EncoderConfig, Study, stain_suffix
from .report import write_report
from .tables import (
    build_tables,
    cka_stages,
    finetune_runs,
    localisation_runs,
    localisation_table,
    mil_runs,
    shortcut_table,
    write_tables,
)

CELL_COLUMNS = ["kind", "key", "dataset", "config", "recipe", "stain", "seed", "status", "seconds", "message",
                "folder"]


def _rel(path: str | Path, out_dir: Path) -> str:
    return Path(path).resolve().relative_to(out_dir.resolve()).as_posix()


def plan(study: Study) -> list[Cell]:
    """Every cell of the study, dependencies before dependents."""
    cells: list[Cell] = []
    for ds in study.datasets:
        demo = None
        if ds.demo is not None:
            demo = _resumable(Cell("demo", f"demo/{ds.name}", dict(ds.demo), dataset=ds.name))
            cells.append(demo)
        tiling = ds.tile.result_settings()
        # Tiling skips slides already tiled with the same settings and re-tiles the others by itself; a slide
        # file changed in place (another size or time) changes the cell.
        tile = Cell("tile", f"tile/{ds.name}", {"slides": [_file_id_cheap(p) for p in ds.slides], **tiling},
                    deps=(demo,) if demo else (), dataset=ds.name, resume_key=None)
        cells.append(tile)
        for stain in study.stains:
            cells += _stain_cells(study, ds, stain, tile, demo)
    return cells


def _stain_cells(study: Study, ds: Dataset, stain: str, tile: Cell, demo: Cell | None) -> list[Cell]:
    """The cells of one dataset and one value of the stain axis: extractions, MIL runs, CAMs, fine-tuning,
    CKA."""
    cells: list[Cell] = []
    tiling = ds.tile.result_settings()
    extract = {**study.extract_for(stain).result_settings(), **_reference_id(study, stain)}
    suffix = stain_suffix(stain)
    # One extraction cell per network and weights: every truncation of it comes from one pass over the patches.
    # It skips finished slides and truncations, so it resumes (and takes an added truncation) while the
    # network, weights and tiling settings stay. A configuration of an exact number of blocks is a cell of its own.
    extracts: dict[EncoderConfig, Cell] = {}
    for (name, weights, blocks), group in _by_network(study.encoders).items():
        if blocks is None:
            encoder: dict[str, Any] = {"name": name, "weights": weights,
                                       "truncate": sorted(e.truncate for e in group)}
            network = group[0].key.rsplit("-t", 1)[0]
        else:
            encoder, network = group[0].spec(), group[0].key
        settings = {"encoder": encoder, **extract}
        cell = Cell("extract", f"extract/{ds.name}/{network}{suffix}", settings,
                    deps=(tile,), dataset=ds.name, encoder=group[0], stain=stain,
                    resume_key=settings_hash([{k: v for k, v in settings.items() if k != "encoder"},
                                              name, weights, tiling]))
        extracts.update(dict.fromkeys(group, cell))
        cells.append(cell)
    labels = {"labels": _file_id(ds.labels), "split_file": _file_id(ds.split_file)}
    mils: dict[tuple[EncoderConfig, str, int], Cell] = {}
    for enc in study.encoders:
        for variant in study.mil:
            for seed in study.seeds:
                mil = ds.mil(variant.settings, seed).result_settings()
                # The run depends on its truncation's features only: adding a truncation to the network's
                # extraction cell must not retrain the others.
                features = settings_hash([{"encoder": enc.spec(), **extract}, tile.hash])
                mils[enc, variant.name, seed] = _resumable(Cell(
                    "mil", f"mil/{ds.name}/{enc.key}{suffix}/{variant.name}/seed{seed}",
                    {**labels, **mil, "features": features}, deps=(extracts[enc],) + ((demo,) if demo else ()),
                    dataset=ds.name, encoder=enc, seed=seed, variant=variant.name, stain=stain,
                    hashed=(demo,) if demo else ()))
                cells.append(mils[enc, variant.name, seed])
    if study.cam is not None and (ds.demo is not None or ds.annotations is not None):
        cam = study.cam.result_settings()
        for enc in study.encoders:
            for seed in study.seeds:
                cells.append(_resumable(Cell(
                    "cam", f"cam/{ds.name}/{enc.key}{suffix}/{study.mil[0].name}/seed{seed}", cam,
                    deps=(mils[enc, study.mil[0].name, seed], tile), dataset=ds.name, encoder=enc, seed=seed,
                    variant=study.mil[0].name, stain=stain)))
    finetunes: dict[tuple[EncoderConfig, int], Cell] = {}
    if study.finetune is not None:
        for enc in study.finetune_encoders:
            for seed in study.finetune_seeds:
                settings = FinetuneSettings.build(study.finetune, seed=seed).result_settings()
                finetunes[enc, seed] = _resumable(Cell(
                    "finetune", f"finetune/{ds.name}/{enc.key}{suffix}/{study.finetune_mil}/seed{seed}", settings,
                    deps=(mils[enc, study.finetune_mil, seed], tile), dataset=ds.name, encoder=enc, seed=seed,
                    variant=study.finetune_mil, stain=stain))
                cells.append(finetunes[enc, seed])
    if study.cka is not None:
        if study.cka_finetuned:
            for (enc, seed), ft_cell in finetunes.items():
                cka = _cka_settings(study, seed, stain).result_settings()
                cells.append(Cell("cka", f"cka/{ds.name}/{enc.key}{suffix}/seed{seed}", {
                    **cka, **_reference_id(study, stain), "comparison": "finetuned"},
                    deps=(ft_cell, tile), dataset=ds.name, encoder=enc, seed=seed, stain=stain))
        for a, b in study.cka_pairs:
            cka = _cka_settings(study, study.seeds[0], stain).result_settings()
            cells.append(Cell("cka", f"cka/{ds.name}/pair-{a.key}--{b.key}{suffix}", {
                **cka, **_reference_id(study, stain), "comparison": "pair", "a": a.spec(), "b": b.spec()},
                deps=(tile,), dataset=ds.name, encoder=a, seed=study.seeds[0], stain=stain))
    return cells


def _by_network(encoders: Sequence[EncoderConfig]) -> dict[tuple[str, str, int | None], list[EncoderConfig]]:
    """The grid's configurations grouped by network, weights and exact number of blocks (None: the network's
    truncations, extracted together), in the study's order."""
    groups: dict[tuple[str, str, int | None], list[EncoderConfig]] = {}
    for enc in encoders:
        groups.setdefault((enc.name, enc.weights, enc.blocks), []).append(enc)
    return groups


def _reference_id(study: Study, stain: str) -> dict[str, Any]:
    """The stain reference's contents as a cache key (editing the reference redoes the cells that use it)."""
    if stain == "none" or study.stain_ref is None:
        return {}
    path = Path(study.stain_ref)
    if path.is_file():
        return {"stain_ref_id": file_sha256(path)}
    if path.is_dir():
        return {"stain_ref_id": [[p.name, file_sha256(p)] for p in sorted(path.iterdir()) if p.is_file()]}
    return {"stain_ref_id": _file_id_cheap(Path(study.stain_ref.rsplit("@", 1)[0]))}  # a slide region


def _cka_settings(study: Study, seed: int, stain: str) -> CkaSettings:
    """The study's CKA settings for one seed, on patches prepared (resized, stain-normalised) as the study
    extracted them."""
    assert study.cka is not None
    ex = study.extract_for(stain)
    shared = {"batch_size": ex.batch_size, "device": ex.device, "workers": ex.workers or 0,
              "input_size": ex.input_size}
    overrides = {k: v for k, v in shared.items() if k not in study.cka.model_fields_set}
    return CkaSettings.build(study.cka, seed=seed, stain_norm=ex.stain_norm, stain_ref=ex.stain_ref,
                             stain_scope=ex.stain_scope, **overrides)


def _file_id_cheap(path: Path) -> list[Any]:
    """A slide file's identity for cache keys without reading it: path, size and modification time."""
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _resumable(cell: Cell) -> Cell:
    """A cell whose stage resumes its own partial work when re-run with the very same settings."""
    cell.resume_key = cell.hash
    return cell


def _file_id(path: Path | None) -> str | None:
    """A file's identity for cache keys: its content hash, so editing labels retrains."""
    return None if path is None else file_sha256(path)


class _Context:
    """What a cell's work needs: the study, the output folder and finished dependencies' results."""

    def __init__(self, study: Study, out_dir: Path):
        self.study = study
        self.out = out_dir
        self.results: dict[str, dict[str, Any]] = {}
        self.together = False  # the running cell is run by every rank of a torchrun job together

    @property
    def ranks(self) -> Ranks | None:
        """What a stage that can use several processes is given: the job's ranks (None: join them) when the
        cell runs on all of them, else this process alone."""
        return None if self.together else Ranks()

    def dataset(self, cell: Cell) -> Dataset:
        return next(d for d in self.study.datasets if d.name == cell.dataset)

    def dep(self, cell: Cell, kind: str) -> dict[str, Any]:
        """The result of the cell's dependency of ``kind`` (the grid gives each cell those its stage reads)."""
        for d in cell.deps:
            if d.kind == kind:
                return self.results[d.key]
        raise KeyError(f"{cell.key} has no {kind} dependency")

    def path(self, rel: str) -> Path:
        return self.out / rel

    def demo(self, cell: Cell) -> dict[str, Any] | None:
        """The result of the demo cell a cell depends on, directly or through its dependencies."""
        for d in cell.deps:
            found = self.results[d.key] if d.kind == "demo" else self.demo(d)
            if found is not None:
                return found
        return None

    def annotations(self, cell: Cell) -> Path | None:
        """The dataset's lesion annotations (a demo dataset's lesion masks), None when it has none."""
        demo = self.demo(cell)
        return self.path(demo["annotations"]) if demo is not None else self.dataset(cell).annotations

    def slides_and_labels(self, cell: Cell) -> tuple[list[Path], Path | None]:
        ds = self.dataset(cell)
        demo = self.demo(cell)
        if demo is not None:
            return [self.path(p) for p in demo["slides"]], self.path(demo["labels"])
        return list(ds.slides), ds.labels


def _run_demo(cell: Cell, ctx: _Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..demo_slides import make_demo_slides

    demo = make_demo_slides(folder, n_slides=cell.settings["n_slides"], seed=cell.settings["seed"],
                            size=cell.settings["size"])
    return {"slides": [_rel(p, ctx.out) for p in demo.slides], "labels": _rel(demo.labels_csv, ctx.out),
            "annotations": _rel(folder / "lesion_masks", ctx.out)}, f"{len(demo.slides)} demo slides"


def _run_tile(cell: Cell, ctx: _Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..patches import tile_slides

    ds = ctx.dataset(cell)
    slides, _ = ctx.slides_and_labels(cell)
    run = tile_slides(slides, folder, ds.tile)
    keep = {slide_id_of(p) for p in slides}
    for stale in h5_files(run.patches):  # slides no longer in the dataset
        if stale.stem not in keep:
            stale.unlink()
    bad = [r for r in run.results if r.status == "error"]
    ok = [r for r in run.results if r.status in ("ok", "skipped") and r.n_patches > 0]
    if not ok:
        first = bad[0].message if bad else "no tissue found in any slide"
        raise HistotransferError(f"no slide of dataset '{ds.name}' was tiled ({first}); see "
                                 f"{run.folder / 'tiling.csv'}")
    message = f"{len(ok)} slides tiled, {sum(r.n_patches for r in ok)} patches"
    if len(ok) < len(run.results):
        message += f"; {len(run.results) - len(ok)} slide(s) without patches or failed (see tiling.csv)"
    return {"patches": _rel(run.patches, ctx.out)}, message


def _run_extract(cell: Cell, ctx: _Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..features import extract_features

    enc = cell.settings["encoder"]
    patches = ctx.path(ctx.dep(cell, "tile")["patches"])
    blocks = enc.get("blocks")
    done = extract_features(patches, folder, enc["name"], enc["weights"],
                            enc["truncate"] if blocks is not None else list(enc["truncate"]),
                            ctx.study.extract_for(cell.stain), ranks=ctx.ranks, blocks=blocks)
    folders = done if isinstance(done, dict) else {enc["truncate"]: done}  # blocks: one folder, truncate 0
    tiled = {p.stem for p in h5_files(patches)}
    counts = {}
    for truncate, features in folders.items():
        for stale in h5_files(features):  # slides no longer tiled
            if stale.stem not in tiled:
                stale.unlink()
        counts[truncate] = len(h5_files(features))
        if counts[truncate] == 0:
            raise HistotransferError(f"no slide's features were extracted; see {features / 'extract.csv'}")
    names = {t: f"t{t}" if blocks is None else f"b{blocks}" for t in counts}
    shown = ", ".join(f"{names[t]}: {n}" for t, n in counts.items())
    return {"features": {str(t): _rel(f, ctx.out) for t, f in folders.items()}}, f"slides per truncation: {shown}"


def _labels_with_features(labels: Path, features: Path, folder: Path) -> tuple[Path, str]:
    """The labels restricted to slides that have features, so one slide lost upstream is skipped, not fatal."""
    df = read_csv(labels, text=True, kind="label")
    have = {p.stem for p in h5_files(features)}
    missing = sorted(set(df["slide_id"].str.strip()) - have)
    if not missing:
        return labels, ""
    kept = folder / "labels_used.csv"
    write_csv(df[df["slide_id"].str.strip().isin(have)], kept)
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return kept, f"{len(missing)} labelled slide(s) without features skipped: {shown}"


def _run_mil(cell: Cell, ctx: _Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..mil import train_mil

    ds = ctx.dataset(cell)
    assert cell.encoder is not None
    features = ctx.path(ctx.dep(cell, "extract")["features"][str(cell.encoder.truncate)])
    _, labels = ctx.slides_and_labels(cell)
    assert labels is not None and cell.seed is not None
    labels_used, note = _labels_with_features(labels, features, folder)
    variant = next(v for v in ctx.study.mil if v.name == cell.variant)
    run = Path(train_mil(features, labels_used, folder / "run", ds.mil(variant.settings, cell.seed),
                         split_file=ds.split_file))
    result = {"run": _rel(run, ctx.out)}
    folds = json.loads((run / "metrics.json").read_text()).get("protocol")
    if folds is not None:
        note = "; ".join(filter(None, [f"{folds['folds']}-fold cross-validation", note]))
    annotations = ctx.annotations(cell)
    if annotations is not None:
        from ..mil import localisation_of_run

        write_json(localisation_of_run(run, annotations), folder / LOCALISATION_FILE)
        result["localisation"] = _rel(folder / LOCALISATION_FILE, ctx.out)
    return result, note


def _run_cam(cell: Cell, ctx: _Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..analysis import CamSettings, write_cams
    from ..mil import model_run, run_splits

    run = model_run(ctx.path(ctx.dep(cell, "mil")["run"]))  # a cross-validation: its fold 0
    annotations = ctx.annotations(cell)
    splits = run_splits(run)
    # The slides CAMs are scored on: the run's positive test slides (the attention localisation's too).
    ids = sorted(splits.loc[(splits["split"] == "test") & (splits["label"].astype(int) == 1), "slide_id"])
    slides, _ = ctx.slides_and_labels(cell)
    assert ctx.study.cam is not None
    cams = write_cams(run, folder / "cam", CamSettings.build(ctx.study.cam, device=ctx.study.extract.device),
                      slides=slides, annotations_dir=annotations, slide_ids=ids)
    return {"cams": _rel(cams.folder / "cam.json", ctx.out)}, f"{len(ids)} positive test slide(s)"


def _run_finetune(cell: Cell, ctx: _Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..finetune import finetune
    from ..mil import model_run

    assert ctx.study.finetune is not None and cell.seed is not None
    frozen = _rel(model_run(ctx.path(ctx.dep(cell, "mil")["run"])), ctx.out)  # a cross-validation: its fold 0
    slides, _ = ctx.slides_and_labels(cell)
    settings = FinetuneSettings.build(ctx.study.finetune, seed=cell.seed,
                                      extract_batch_size=ctx.study.extract.batch_size)
    run = Path(finetune(ctx.path(frozen), folder / "run", slides, settings, ranks=ctx.ranks))
    return {"run": _rel(run, ctx.out), "frozen_run": frozen, "encoder": _rel(run / "encoder.pt", ctx.out)}, ""


def _run_cka(cell: Cell, ctx: _Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..analysis import compare_encoders

    assert cell.encoder is not None and cell.seed is not None
    patches = ctx.path(ctx.dep(cell, "tile")["patches"])
    if cell.settings["comparison"] == "finetuned":
        a: Any = cell.encoder.spec()
        b: Any = ctx.path(ctx.dep(cell, "finetune")["run"])
        comparison = f"{cell.encoder.label}: frozen vs fine-tuned"
    else:
        a, b = cell.settings["a"], cell.settings["b"]
        comparison = (f"{EncoderConfig(**cell.settings['a']).label} vs "
                      f"{EncoderConfig(**cell.settings['b']).label}")
    compare_encoders(a, b, patches, folder / "cka", _cka_settings(ctx.study, cell.seed, cell.stain),
                     ranks=ctx.ranks)
    return {"csv": _rel(folder / "cka" / "cka.csv", ctx.out), "comparison": comparison}, ""


WORK = {"demo": _run_demo, "tile": _run_tile, "extract": _run_extract, "mil": _run_mil, "cam": _run_cam,
        "finetune": _run_finetune, "cka": _run_cka}


OUTPUT_KEYS = ("slides", "labels", "patches", "features", "run", "frozen_run", "encoder", "csv", "localisation",
               "cams", "annotations")
LOCALISATION_FILE = "localisation.json"


def _outputs_exist(result: dict[str, Any], out_dir: Path) -> bool:
    """False when a finished cell's outputs were deleted since, or a run among them no longer loads: the cell is
    then redone."""
    from ..mil import run_finished

    for key in OUTPUT_KEYS:
        value = result.get(key)
        value = list(value.values()) if isinstance(value, dict) else value
        for rel in (value if isinstance(value, list) else [value] if value else []):
            if not (out_dir / rel).exists():
                return False
    return all(run_finished(out_dir / result[key]) for key in ("run", "frozen_run") if result.get(key))


@contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """Refuse two studies writing into one folder at once (the lock dies with its process, even on kill -9)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".study.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HistotransferError(f"{out_dir}: another study is running in this folder; wait for it to "
                                     "finish or choose another --out") from None
        yield


def _write_cells(records: list[dict[str, Any]], out_dir: Path) -> None:
    df = pd.DataFrame(records, columns=CELL_COLUMNS)
    write_csv(df.astype({"seed": "Int64", "seconds": float}).round({"seconds": 2}), out_dir / "cells.csv")


# How a cell's work is shared under torchrun: "all" ranks run it together (extraction and CKA shard slides,
# fine-tuning is data-parallel), "spread" cells (independent: MIL runs, CAMs) are dealt to the ranks, each
# computed as one process would, "one" runs on rank 0.
MODES = {"demo": "one", "tile": "one", "extract": "all", "mil": "spread", "cam": "spread", "finetune": "all",
         "cka": "all"}


def _mode(cell: Cell, study: Study, ranks: Ranks) -> str:
    """``MODES``, except that fine-tuning runs data-parallel only when the ranks can share its steps evenly
    (``batch_slides`` a multiple of the ranks, so the result is the one process would give), else on rank 0."""
    if not ranks.distributed:
        return "one"
    if cell.kind == "finetune" and study.finetune is not None and study.finetune.batch_slides % ranks.world:
        return "one"
    return MODES[cell.kind]


def _run_cell(cell: Cell, ctx: _Context, out_dir: Path) -> tuple[dict[str, Any] | None, float, str,
                                                               Exception | None]:
    """Do one cell's work in its folder. Returns (result, seconds, message, error): result None and error set
    when it failed."""
    t0 = time.perf_counter()
    try:
        result, message = WORK[cell.kind](cell, ctx, cell.folder(out_dir))
    except Exception as exc:  # one failed cell is recorded; the rest of the grid goes on
        reason = one_line(exc)
        tqdm.write(f"failed {cell.key}: {reason}")
        if "HISTOTRANSFER_DEBUG" in os.environ:
            raise
        return None, time.perf_counter() - t0, reason, exc
    return result, time.perf_counter() - t0, message, None


def _mark(cell: Cell, out_dir: Path, outcome: tuple[dict[str, Any] | None, float, str, Exception | None]) -> None:
    """Write the cell's done or failed marker."""
    result, seconds, message, error = outcome
    if result is None:
        write_failed(cell, out_dir, message, error or HistotransferError(message))
    else:
        write_done(cell, out_dir, result, seconds, message)


def _run_together(cell: Cell, ctx: _Context, out_dir: Path, ranks: Ranks) -> None:
    """Run a cell on every rank; rank 0 marks it failed when it failed on any rank (with the first failing rank's
    message), so that every rank goes on knowing the same. A rank left waiting in a collective for a failed one
    stops the job instead (see :meth:`Ranks.agree`)."""
    outcome = _run_cell(cell, ctx, out_dir)
    failure = ranks.agree(cell.key, None if outcome[0] is not None else outcome[2])
    if ranks.rank == 0:
        _mark(cell, out_dir, outcome if failure is None or outcome[0] is None else
              (None, outcome[1], failure, None))


def _from_markers(cell: Cell, out_dir: Path) -> tuple[str, dict[str, Any]]:
    """A cell's status as its folder records it (what every rank reads once the rank that ran it is done)."""
    marker = read_done(cell, out_dir)
    if marker is not None:
        return "done", marker
    try:
        failed = json.loads((cell.folder(out_dir) / FAILED).read_text())
    except (OSError, ValueError):
        failed = {}
    return "failed", {"message": failed.get("reason", "did not finish"), "result": {}, "seconds": None}


def run_cells(study: Study, cells: list[Cell], out_dir: Path, progress: bool = True,
              ranks: Ranks | None = None) -> list[dict[str, Any]]:
    """Run every cell not already done; return one record per cell (status done/cached/failed/blocked).

    Under torchrun every rank calls this with the same cells: each cell runs as ``MODES`` says, and after it
    every rank reads its status from the cell's markers, so all ranks agree on what is done.
    """
    ranks = ranks or Ranks()
    lead = ranks.rank == 0
    ctx = _Context(study, out_dir)
    records: dict[str, dict[str, Any]] = {}
    status: dict[str, str] = {}
    cached = {c.key: m for c in cells
              if (m := read_done(c, out_dir)) is not None and _outputs_exist(m["result"], out_dir)}
    ranks.barrier()  # every rank has read the same markers before any cell runs
    bar = tqdm(total=len(cells), initial=len(cached), desc=f"study {study.name}", unit="cell",
               dynamic_ncols=True, disable=not progress or not lead)

    def settle(cell: Cell, state: str, marker: dict[str, Any]) -> None:
        status[cell.key] = state
        if state in ("done", "cached"):
            ctx.results[cell.key] = marker["result"]
        records[cell.key] = cell.record(state, marker.get("seconds"), marker.get("message", ""),
                                        marker.get("result"))
        bar.update(1)

    i = 0
    while i < len(cells):
        cell = cells[i]
        if cell.key in cached:
            settle(cell, "cached", cached[cell.key])
            i += 1
            continue
        mode = _mode(cell, study, ranks)
        block = [cell]
        if mode == "spread":
            while i + len(block) < len(cells) and cells[i + len(block)].kind == cell.kind:
                block.append(cells[i + len(block)])
        runnable = []
        for c in block:
            broken = [d for d in c.deps if status.get(d.key) not in ("done", "cached")]
            if c.key in cached:
                settle(c, "cached", cached[c.key])
            elif broken:
                settle(c, "blocked", {"message": f"needs {broken[0].key}, which {status[broken[0].key]}"})
            else:
                runnable.append(c)
        for j, c in enumerate(runnable):
            mine = j % ranks.world == ranks.rank if mode == "spread" else (mode == "all" or lead)
            if lead or (mode == "spread" and mine):
                prepare_folder(c, out_dir)
            if mode == "all":
                ranks.barrier()  # the folder is ready before every rank writes into it
            if mine:
                bar.set_postfix_str(c.key, refresh=True)
                ctx.together = mode == "all"
                if mode == "all":
                    _run_together(c, ctx, out_dir, ranks)
                else:
                    _mark(c, out_dir, _run_cell(c, ctx, out_dir))
            if mode != "spread":
                ranks.barrier()
                settle(c, *_from_markers(c, out_dir))
        if mode == "spread":
            ranks.barrier()
            for c in runnable:
                settle(c, *_from_markers(c, out_dir))
        if lead:
            _write_cells([records[c.key] for c in cells if c.key in records], out_dir)
        i += len(block)
    bar.close()
    if lead:
        _write_cells([records[c.key] for c in cells], out_dir)
    return [records[c.key] for c in cells]


def write_outputs(study: Study, out_dir: Path, records: list[dict[str, Any]]) -> Path:
    """Tables, figures and report.html from the finished cells."""
    finished = [r for r in records if r["status"] in ("done", "cached")]
    info = study.encoder_info
    datasets = [d.name for d in study.datasets]
    mil = mil_runs(out_dir, finished, info)
    ft = finetune_runs(out_dir, finished, info)
    cka = cka_stages(out_dir, finished)
    loc = localisation_runs(out_dir, finished, info)
    tables = build_tables(mil, ft, study.encoders, study.finetune_encoders, datasets, info,
                          [v.name for v in study.mil], study.finetune_mil, study.stains)
    if len(loc):
        tables["table5_localisation"] = localisation_table(loc, datasets)
    shown = write_tables(out_dir / "tables", tables, datasets,
                         {"runs_mil": mil, "runs_finetune": ft, "cka_stages": cka, "runs_localisation": loc})
    figures = draw_figures(out_dir / "figures", mil, cka)
    return write_report(out_dir / "report.html", study.name, study.path, study.text, shown, figures, records,
                        report_notes(mil, cka), shortcut_table(mil))


def report_notes(mil: pd.DataFrame, cka: pd.DataFrame) -> list[str]:
    """What a reader must know before reading the tables: test splits too small for a stable AUC, runs whose
    AUC the shortcut check says may be group membership (centre, staining batch) or colour, and CKA computed on
    fewer patches than dimensions."""
    notes = []
    warned = mil[mil["shortcut_warning"].fillna(False).astype(bool)] if len(mil) else mil
    if len(warned):
        runs = ", ".join(warned["run"].head(3)) + (", ..." if len(warned) > 3 else "")
        notes.append(f"In {len(warned)} of {len(mil)} MIL runs the shortcut check warns that the AUC may come from "
                     f"group membership or colour rather than the tissue (see the shortcut check; {runs}): "
                     f"{warned['shortcut_verdict'].iloc[0]}")
    small = mil[mil["n_slides"] < SMALL_SPLIT] if len(mil) else mil
    if len(small):
        sizes = ", ".join(sorted({f"{d}: {n}" for d, n in zip(small["dataset"], small["n_slides"])}))
        notes.append(f"{len(small)} of {len(mil)} MIL runs were tested on fewer than {SMALL_SPLIT} slides "
                     f"(test slides per dataset: {sizes}); their AUCs and intervals are too unstable to rank "
                     "encoders, whatever the table's digits suggest.")
    if len(cka):
        estimators = ", ".join(sorted(set(cka["estimator"].dropna())))
        notes.append(f"CKA uses the {estimators} estimator; every comparison is drawn against its baseline, the "
                     "CKA of the first encoder with a random initialisation of its architecture on the same patches.")
        notes += sorted({w for w in cka["warning"].dropna() if w})
    return notes


def default_out_dir(study: Study) -> Path:
    """The study file's ``out`` key, else ``<study file stem>_out`` in the current folder."""
    return study.out if study.out is not None else Path.cwd() / f"{study.path.stem}_out"


def execute(study: Study, out_dir: str | Path | None = None, progress: bool = True) -> tuple[Path, list[dict]]:
    """Run a loaded study; return (report path, cell records). Under torchrun every rank takes part (see
    :func:`run_cells`); rank 0 holds the folder's lock and writes cells.csv, the tables and the report."""
    out = output_folder(Path(out_dir).expanduser().resolve() if out_dir is not None else default_out_dir(study))
    with joined(None, resolve_device(study.extract.device)) as ranks, \
            _lock(out) if ranks.rank == 0 else nullcontext():
        ranks.barrier()
        if ranks.rank == 0:
            write_text(study.text, out / "study.yaml")
        records = run_cells(study, plan(study), out, progress=progress, ranks=ranks)
        report = write_outputs(study, out, records) if ranks.rank == 0 else out / "report.html"
        ranks.barrier()
    return report, records


def run_study(study_file: str | Path, out_dir: str | Path | None = None) -> Path:
    """Run (or resume) the study described by ``study_file``; return the path of its ``report.html``.

    Finished cells are reused; failed cells are listed in the report and in ``cells.csv``.
    """
    report, _ = execute(load_study(study_file), out_dir)
    return report
