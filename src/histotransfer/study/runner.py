"""Run a study: run each planned cell not already done (one process or every rank of a torchrun job), keep the
bookkeeping (done and failed markers, cells.csv, the folder's lock), then write tables, figures and report.

The grid comes from :mod:`.planner`, each cell's work from :mod:`.work`. A failed cell is recorded and the cells
that need it are skipped with the reason; everything else still runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .._io import output_folder, write_csv, write_text
from ..errors import HistotransferError, one_line
from ..mil.settings import SMALL_SPLIT
from ..runtime import Ranks, joined, resolve_device
from .cells import FAILED, Cell, prepare_folder, read_done, write_done, write_failed
from .config import load_study
from .figures import draw_figures
from .grid import Study
from .planner import plan
from .report import write_report
from .runs import cka_stages, finetune_runs, localisation_runs, mil_runs
from .tables import build_tables, localisation_table, shortcut_table, write_tables
from .work import WORK, Context

CELL_COLUMNS = ["kind", "key", "dataset", "config", "recipe", "stain", "seed", "status", "seconds", "message", "folder"]


OUTPUT_KEYS = (
    "slides",
    "labels",
    "patches",
    "features",
    "run",
    "frozen_run",
    "encoder",
    "csv",
    "localisation",
    "cams",
    "annotations",
)


def _outputs_exist(result: dict[str, Any], out_dir: Path) -> bool:
    """False when a finished cell's outputs were deleted since, or a run among them no longer loads: the cell is
    then redone."""
    from ..mil import run_finished

    for key in OUTPUT_KEYS:
        value = result.get(key)
        value = list(value.values()) if isinstance(value, dict) else value
        for rel in value if isinstance(value, list) else [value] if value else []:
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
            raise HistotransferError(
                f"{out_dir}: another study is running in this folder; wait for it to finish or choose another --out"
            ) from None
        yield


def _write_cells(records: list[dict[str, Any]], out_dir: Path) -> None:
    df = pd.DataFrame(records, columns=CELL_COLUMNS)
    write_csv(df.astype({"seed": "Int64", "seconds": float}).round({"seconds": 2}), out_dir / "cells.csv")


# How a cell's work is shared under torchrun: "all" ranks run it together (extraction and CKA shard slides,
# fine-tuning is data-parallel), "spread" cells (independent: MIL runs, CAMs) are dealt to the ranks, each
# computed as one process would, "one" runs on rank 0.
MODES = {
    "demo": "one",
    "tile": "one",
    "extract": "all",
    "mil": "spread",
    "cam": "spread",
    "finetune": "all",
    "cka": "all",
}


def _mode(cell: Cell, study: Study, ranks: Ranks) -> str:
    """``MODES``, except that fine-tuning runs data-parallel only when the ranks can share its steps evenly
    (``batch_slides`` a multiple of the ranks, so the result is the one process would give), else on rank 0."""
    if not ranks.distributed:
        return "one"
    if cell.kind == "finetune" and study.finetune is not None and study.finetune.batch_slides % ranks.world:
        return "one"
    return MODES[cell.kind]


def _run_cell(cell: Cell, ctx: Context, out_dir: Path) -> tuple[dict[str, Any] | None, float, str, Exception | None]:
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


def _run_together(cell: Cell, ctx: Context, out_dir: Path, ranks: Ranks) -> None:
    """Run a cell on every rank; rank 0 marks it failed when it failed on any rank (with the first failing rank's
    message), so that every rank goes on knowing the same. A rank left waiting in a collective for a failed one
    stops the job instead (see :meth:`Ranks.agree`)."""
    outcome = _run_cell(cell, ctx, out_dir)
    failure = ranks.agree(cell.key, None if outcome[0] is not None else outcome[2])
    if ranks.rank == 0:
        _mark(cell, out_dir, outcome if failure is None or outcome[0] is None else (None, outcome[1], failure, None))


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


def run_cells(
    study: Study, cells: list[Cell], out_dir: Path, progress: bool = True, ranks: Ranks | None = None
) -> list[dict[str, Any]]:
    """Run every cell not already done; return one record per cell (status done/cached/failed/blocked).

    Under torchrun every rank calls this with the same cells: each cell runs as ``MODES`` says, and after it
    every rank reads its status from the cell's markers, so all ranks agree on what is done.
    """
    ranks = ranks or Ranks()
    lead = ranks.rank == 0
    ctx = Context(study, out_dir)
    records: dict[str, dict[str, Any]] = {}
    status: dict[str, str] = {}
    cached = {
        c.key: m for c in cells if (m := read_done(c, out_dir)) is not None and _outputs_exist(m["result"], out_dir)
    }
    ranks.barrier()  # every rank has read the same markers before any cell runs
    bar = tqdm(
        total=len(cells),
        initial=len(cached),
        desc=f"study {study.name}",
        unit="cell",
        dynamic_ncols=True,
        disable=not progress or not lead,
    )

    def settle(cell: Cell, state: str, marker: dict[str, Any]) -> None:
        status[cell.key] = state
        if state in ("done", "cached"):
            ctx.results[cell.key] = marker["result"]
        records[cell.key] = cell.record(state, marker.get("seconds"), marker.get("message", ""), marker.get("result"))
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
    tables = build_tables(
        mil,
        ft,
        study.encoders,
        study.finetune_encoders,
        datasets,
        info,
        [v.name for v in study.mil],
        study.finetune_mil,
        study.stains,
    )
    if len(loc):
        tables["table5_localisation"] = localisation_table(loc, datasets)
    shown = write_tables(
        out_dir / "tables",
        tables,
        datasets,
        {"runs_mil": mil, "runs_finetune": ft, "cka_stages": cka, "runs_localisation": loc},
    )
    figures = draw_figures(out_dir / "figures", mil, cka)
    return write_report(
        out_dir / "report.html",
        study.name,
        study.path,
        study.text,
        shown,
        figures,
        records,
        report_notes(mil, cka),
        shortcut_table(mil),
    )


def report_notes(mil: pd.DataFrame, cka: pd.DataFrame) -> list[str]:
    """What a reader must know before reading the tables: test splits too small for a stable AUC, runs whose
    AUC the shortcut check says may be group membership (centre, staining batch) or colour, and CKA computed on
    fewer patches than dimensions."""
    notes = []
    warned = mil[mil["shortcut_warning"].fillna(False).astype(bool)] if len(mil) else mil
    if len(warned):
        runs = ", ".join(warned["run"].head(3)) + (", ..." if len(warned) > 3 else "")
        notes.append(
            f"In {len(warned)} of {len(mil)} MIL runs the shortcut check warns that the AUC may come from "
            f"group membership or colour rather than the tissue (see the shortcut check; {runs}): "
            f"{warned['shortcut_verdict'].iloc[0]}"
        )
    small = mil[mil["n_slides"] < SMALL_SPLIT] if len(mil) else mil
    if len(small):
        sizes = ", ".join(sorted({f"{d}: {n}" for d, n in zip(small["dataset"], small["n_slides"])}))
        notes.append(
            f"{len(small)} of {len(mil)} MIL runs were tested on fewer than {SMALL_SPLIT} slides "
            f"(test slides per dataset: {sizes}); their AUCs and intervals are too unstable to rank "
            "encoders, whatever the table's digits suggest."
        )
    if len(cka):
        estimators = ", ".join(sorted(set(cka["estimator"].dropna())))
        notes.append(
            f"CKA uses the {estimators} estimator; every comparison is drawn against its baseline, the "
            "CKA of the first encoder with a random initialisation of its architecture on the same patches."
        )
        notes += sorted({w for w in cka["warning"].dropna() if w})
    return notes


def default_out_dir(study: Study) -> Path:
    """The study file's ``out`` key, else ``<study file stem>_out`` in the current folder."""
    return study.out if study.out is not None else Path.cwd() / f"{study.path.stem}_out"


def execute(study: Study, out_dir: str | Path | None = None, progress: bool = True) -> tuple[Path, list[dict]]:
    """Run a loaded study; return (report path, cell records). Under torchrun every rank takes part (see
    :func:`run_cells`); rank 0 holds the folder's lock and writes cells.csv, the tables and the report."""
    out = output_folder(Path(out_dir).expanduser().resolve() if out_dir is not None else default_out_dir(study))
    with joined(None, resolve_device(study.extract.device)) as ranks, _lock(out) if ranks.rank == 0 else nullcontext():
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
