"""``histotransfer finetune``: a thin wrapper over :func:`histotransfer.finetune.finetune`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .finetune import PRECISIONS, finetune


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a run's encoder end to end on its top-k attended patches",
        description="Build the run's encoder with its MIL head on top, train both end to end on each train/val "
                    "slide's top-k patches by attention score (Adam, BatchNorm in eval mode, selection on val "
                    "AUC), re-extract every slide with the fine-tuned encoder and evaluate at slide level. "
                    "Writes the run files of `train` plus encoder.pt, topk.csv and comparison.json (frozen vs "
                    "fine-tuned AUC). Re-running resumes. Under `torchrun --nproc-per-node G -m histotransfer "
                    "finetune --run-dir RUN ...` training is data-parallel.")
    p.add_argument("--run", "--run-dir", dest="run", required=True, type=Path,
                   help="run folder written by `histotransfer train` (spell it --run-dir under torchrun, whose "
                        "own parser takes --run for its --run-path)")
    p.add_argument("--out", required=True, type=Path, help="fine-tuned run folder to write")
    p.add_argument("--slides", nargs="+", default=None,
                   help="folder of the slide files, or the files, when they moved since tiling")
    p.add_argument("--top-k", type=int, default=64, help="patches per slide (default 64, the paper's)")
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (default 1e-5)")
    p.add_argument("--epochs", type=int, default=20, help="default 20")
    p.add_argument("--batch-slides", type=int, default=1, help="slides per optimizer step (default 1)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each stage in the backward pass: far less activation memory for one extra "
                        "forward pass per step")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16/fp16 autocast on GPU")
    p.add_argument("--freeze-stages", type=int, default=0,
                   help="keep the stem and the first K stages fixed (default 0: train everything)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="patch-reading processes (default 0: in this process)")
    p.set_defaults(func=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    slides = None
    if args.slides is not None:
        slides = args.slides[0] if len(args.slides) == 1 and Path(args.slides[0]).is_dir() else args.slides
    out = finetune(args.run, args.out, slides, args.top_k, args.lr, args.epochs, args.batch_slides,
                   args.grad_checkpointing, args.precision, args.device, args.seed, args.workers,
                   args.freeze_stages)
    if int(os.environ.get("RANK", "0")) == 0:
        comparison = json.loads((out / "comparison.json").read_text())
        print(f"slide-level AUC, frozen vs fine-tuned (epoch {comparison['selected_epoch']}):")
        for name, row in comparison["splits"].items():
            print(f"  {name:5}  frozen {_fmt(row['frozen_auc'])}  fine-tuned {_fmt(row['finetuned_auc'])}")
        print(f"fine-tuned run: {out}")
    return 0


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"
