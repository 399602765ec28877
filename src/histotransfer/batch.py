"""Per-slide batch runner shared by tiling and extraction.

One slide that fails is reported (status ``error`` with a one-line reason naming the file) and skipped;
the others go on. The report CSV is rewritten atomically after every slide, so a killed run keeps what it did.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ._io import LOCK_SUFFIX, ItemLock, disk_full, write_csv
from ._read import read_csv
from .errors import HistotransferError, one_line

REPORT_LOCK_WAIT = 120.0  # seconds a process waits for another to finish its (millisecond) report update
REPORT_COLUMNS = ["slide_id", "slide_path", "status", "n_patches", "seconds", "message"]


@dataclass
class SlideResult:
    """One row of a stage report (``tiling.csv``, ``extract.csv``)."""

    slide_id: str
    slide_path: str
    status: str  # "ok", "skipped" (already done), "no_tissue", "duplicate", "busy" (another process) or "error"
    n_patches: int = 0
    seconds: float = 0.0
    message: str = ""


def error_result(slide_id: str, slide_path: str, exc: BaseException, started: float) -> SlideResult:
    """The report row of a slide whose work raised ``exc``: the message names the file, then says what failed.

    A full disk is not a property of the slide: it is re-raised, so the whole run stops (and resumes once
    space is freed) instead of marking every following slide as failed.
    """
    if disk_full(exc):
        raise exc
    text = one_line(exc)
    if not isinstance(exc, HistotransferError) or slide_path not in text:
        text = f"{slide_path}: {text}"
    if "HISTOTRANSFER_DEBUG" in os.environ:
        traceback.print_exception(exc)
    return SlideResult(slide_id, slide_path, "error", 0, round(time.perf_counter() - started, 3), text)


class BatchReport:
    """Rows of a stage report keyed by slide id, persisted to ``path`` after each update.

    ``shared``: several processes (on one machine or several, sharing the folder) update the same report;
    each update then re-reads the file under a lock file and changes only its own row, so no process's rows
    are lost to another's write.
    """

    def __init__(self, path: str | Path, shared: bool = False):
        self.path = Path(path)
        self.shared = shared
        self.rows: dict[str, SlideResult] = self._read()

    def _read(self) -> dict[str, SlideResult]:
        if not self.path.exists():
            return {}
        df = read_csv(self.path, missing=False)
        return {rec["slide_id"]: SlideResult(**{k: rec[k] for k in REPORT_COLUMNS}) for rec in df.to_dict("records")}

    def update(self, result: SlideResult) -> None:
        if not self.shared:
            self.rows[result.slide_id] = result
            self._write()
            return
        lock = ItemLock(self.path.with_name(f".{self.path.name}{LOCK_SUFFIX}"))
        deadline = time.monotonic() + REPORT_LOCK_WAIT
        while not lock.acquire():
            if time.monotonic() > deadline:
                raise HistotransferError(
                    f"{self.path}: locked by {lock.owner} for over {REPORT_LOCK_WAIT:.0f} s; "
                    f"if no process is writing it, delete {lock.path}."
                )
            time.sleep(0.02)
        try:
            self.rows = {**self._read(), result.slide_id: result}
            self._write()
        finally:
            lock.release()

    def _write(self) -> None:
        write_csv(pd.DataFrame([asdict(r) for r in self.rows.values()], columns=REPORT_COLUMNS), self.path)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.rows.values()], columns=REPORT_COLUMNS)


def run_batch(
    items: Iterable[tuple[str, str]],
    work: Callable[[str, str], SlideResult],
    report: BatchReport,
    desc: str,
    unit: str = "slide",
) -> list[SlideResult]:
    """Run ``work(slide_id, slide_path)`` for each item, catching per-slide errors, with a progress bar."""
    items = list(items)
    results = []
    for slide_id, slide_path in tqdm(items, desc=desc, unit=unit, dynamic_ncols=True):
        t0 = time.perf_counter()
        try:
            result = work(slide_id, slide_path)
        except Exception as exc:  # one broken slide must not stop the batch
            result = error_result(slide_id, slide_path, exc, t0)
            tqdm.write(f"error: {result.message}")
        report.update(result)
        results.append(result)
    return results


STATUS_ORDER = ("ok", "skipped", "no_tissue", "duplicate", "busy", "error")


def summarize(
    results: list[SlideResult], stage: str, seconds: float | None = None, outputs: str | os.PathLike[str] | None = None
) -> str:
    """A batch in one line (counts per status, wall time, where the outputs are), then one line per failure."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    order = sorted(counts, key=lambda s: (STATUS_ORDER.index(s) if s in STATUS_ORDER else 99, s))
    names = {"ok": "done", "skipped": "skipped (done before)", "error": "failed"}
    line = f"{stage}: " + (", ".join(f"{counts[s]} {names.get(s, s)}" for s in order) or "nothing to do")
    if seconds is not None:
        line += f" in {seconds:.1f} s"
    if outputs is not None:
        line += f"; outputs in {outputs}"
    lines = [line] + [f"  failed {r.slide_id}: {r.message}" for r in results if r.status == "error"]
    lines += [f"  busy {r.slide_id}: {r.message}" for r in results if r.status == "busy"]
    return "\n".join(lines)


def print_summary(
    results: list[SlideResult],
    stage: str,
    seconds: float,
    outputs: str | os.PathLike[str],
    report: str | os.PathLike[str] | None = None,
    prefix: str = "",
) -> int:
    """Print :func:`summarize` (to stderr when a slide failed) and return the command's exit code."""
    failed = any(r.status == "error" for r in results)
    text = prefix + summarize(results, stage, seconds, outputs)
    if report is not None:
        text += f"\n  report: {report}"
    print(text, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
