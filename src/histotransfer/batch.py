"""Per-slide batch runner shared by tiling and extraction.

One slide that fails is reported (status ``error`` with a one-line reason naming the file) and skipped;
the others go on. The report CSV is rewritten atomically after every slide, so a killed run keeps what it did.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ._io import write_csv

REPORT_COLUMNS = ["slide_id", "slide_path", "status", "n_patches", "seconds", "message"]


@dataclass
class SlideResult:
    """One row of a stage report (``tiling.csv``, ``extract.csv``)."""

    slide_id: str
    slide_path: str
    status: str  # "ok", "skipped" (already done), "no_tissue" or "error"
    n_patches: int = 0
    seconds: float = 0.0
    message: str = ""


def one_line(exc: BaseException) -> str:
    """A single-line description of an exception."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


class BatchReport:
    """Rows of a stage report keyed by slide id, persisted to ``path`` after each update."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, SlideResult] = {}
        if self.path.exists():
            df = pd.read_csv(self.path, dtype={"slide_id": str}, keep_default_na=False)
            for rec in df.to_dict("records"):
                self.rows[rec["slide_id"]] = SlideResult(**{k: rec[k] for k in REPORT_COLUMNS})

    def update(self, result: SlideResult) -> None:
        self.rows[result.slide_id] = result
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
            result = SlideResult(slide_id, slide_path, "error", 0, time.perf_counter() - t0,
                                 f"{slide_path}: {one_line(exc)}")
            tqdm.write(f"error: {result.message}")
            if "HISTOTRANSFER_DEBUG" in os.environ:
                traceback.print_exc()
        report.update(result)
        results.append(result)
    return results


def summarize(results: list[SlideResult], stage: str) -> str:
    """A short summary of a batch: counts per status and the failed slides."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"{stage}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    lines += [f"  failed {r.slide_id}: {r.message}" for r in results if r.status == "error"]
    return "\n".join(lines)
