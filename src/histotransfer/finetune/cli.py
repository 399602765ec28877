"""``histotransfer finetune``: a thin wrapper over :func:`histotransfer.finetune.run.finetune`."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..settings import add_options, from_args
from .settings import FinetuneSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a run's encoder end to end on its top-k attended patches",
        description="Build the run's encoder with its MIL head on top, train both end to end on each train/val "
        "slide's top-k patches by attention score (Adam, BatchNorm in eval mode, selection on val "
        "AUC), re-extract every slide with the fine-tuned encoder and evaluate at slide level. "
        "Writes the run files of `train` plus encoder.pt, topk.csv and comparison.json (frozen vs "
        "fine-tuned AUC). Re-running resumes. Under `torchrun --nproc-per-node G -m histotransfer "
        "finetune --run-dir RUN ...` training is data-parallel.",
    )
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        type=Path,
        help="run folder written by `histotransfer train` (spell it --run-dir under torchrun, whose "
        "own parser takes --run for its --run-path)",
    )
    p.add_argument("--out", required=True, type=Path, help="fine-tuned run folder to write")
    p.add_argument(
        "--slides",
        nargs="+",
        default=None,
        help="folder of the slide files, or the files, when they moved since tiling",
    )
    add_options(p, FinetuneSettings)
    p.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from .run import finetune
    from .train import describe_selection

    t0 = time.perf_counter()
    out = finetune(args.run, args.out, args.slides, from_args(FinetuneSettings, args))
    if int(os.environ.get("RANK", "0")) == 0:
        comparison = json.loads((out / "comparison.json").read_text())
        print(
            f"slide-level AUC of class {comparison['positive_class']!r}, frozen vs fine-tuned "
            f"(epoch {comparison['selected_epoch']}):"
        )
        for name, row in comparison["splits"].items():
            print(f"  {name:5}  frozen {_fmt(row['frozen_auc'])}  fine-tuned {_fmt(row['finetuned_auc'])}")
        if comparison.get("selection"):
            print(f"selection: {describe_selection(comparison['selection'])}")
        print(f"finetune: done in {time.perf_counter() - t0:.1f} s; fine-tuned run in {out}")
    return 0


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"
