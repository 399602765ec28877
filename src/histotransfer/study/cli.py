"""``histotransfer study FILE [--out DIR] [--check]``."""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study",
        help="run a whole study (grid of encoders x truncations x datasets x seeds) from a YAML file",
        description="Run every cell of the study not already done (tiling, extraction, MIL per seed, "
        "fine-tuning, CKA), then write tables/, figures/ and report.html. Re-running resumes.",
    )
    p.add_argument("study_file", metavar="FILE", help="study file (YAML); see examples/paper_study.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the file's 'out' key, else ./<FILE stem>_out)")
    p.add_argument(
        "--check", action="store_true", help="validate the file and list the cells to do, without running anything"
    )
    p.set_defaults(func=_study)


def _study(args: argparse.Namespace) -> int:
    from .cells import read_done
    from .config import load_study
    from .planner import plan
    from .runner import default_out_dir, execute

    study = load_study(args.study_file)
    if args.check:
        out = default_out_dir(study) if args.out is None else Path(args.out).expanduser().resolve()
        cells = plan(study)
        todo = [c for c in cells if read_done(c, out) is None]
        print(f"{study.path}: valid; {len(cells)} cells in {out}, {len(todo)} to do")
        total = Counter(c.kind for c in cells)
        left = Counter(c.kind for c in todo)
        for kind, n in total.items():
            print(f"  {kind:9s} {n:5d} cells, {left.get(kind, 0)} to do")
        for c in todo:
            print(f"  to do: {c.key}")
        return 0
    t0 = time.perf_counter()
    report, records = execute(study, args.out)
    counts = Counter(r["status"] for r in records)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank has the same records: rank 0 reports
        return 1 if counts.get("failed") or counts.get("blocked") else 0
    print("cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in records:
        if r["status"] == "failed":
            print(f"  failed {r['key']}: {r['message']}")
    print(f"tables:  {report.parent / 'tables'}")
    print(f"figures: {report.parent / 'figures'}")
    print(f"report:  {report}")
    print(f"study: done in {time.perf_counter() - t0:.1f} s; report in {report}")
    return 1 if counts.get("failed") or counts.get("blocked") else 0
