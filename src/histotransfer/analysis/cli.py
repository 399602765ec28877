"""``histotransfer cka``: a thin wrapper over :func:`histotransfer.analysis.compare_encoders`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .compare import POOLINGS, cka_summary, compare_encoders, resolve_encoder


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cka", help="linear CKA between the stages of two encoders on the same patches",
        description="Compare the same stages of two encoders (e.g. a train run's frozen encoder and a finetune "
                    "run's fine-tuned one) on patches sampled from a patch folder: the spatial mean (or the "
                    "flattened map) of each stage's output, linear CKA in float64. Writes cka.csv, cka.png, "
                    "patches.csv, cka.json and, with --full-matrix, cka_matrix.csv/.png.")
    for side in ("a", "b"):
        p.add_argument(f"--encoder-{side}", required=True, metavar="SPEC",
                       help="a run folder (train: frozen encoder; finetune: fine-tuned encoder), a fine-tuned "
                            "encoder.pt, or an encoder name (with --weights/--truncate)")
        p.add_argument(f"--weights-{side}", default="imagenet",
                       help="weights for an encoder name: imagenet (default), random or a file")
        p.add_argument(f"--truncate-{side}", type=int, default=0, help="truncation for an encoder name")
    p.add_argument("--patches", required=True, type=Path, help="patch folder (OUT/patches from `histotransfer tile`)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n-patches", type=int, default=2000, help="patches sampled across slides (default 2000)")
    p.add_argument("--pooling", default="mean", choices=POOLINGS,
                   help="mean: spatial mean of each stage's map (default); flatten: the whole map (disk-hungry)")
    p.add_argument("--full-matrix", action="store_true", help="also every stage of A against every stage of B")
    p.add_argument("--seed", type=int, default=0, help="seeds the patch sample (default 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=None,
                   help="resize patches (default: the runs' input size when both agree, else the tiled size)")
    p.add_argument("--workers", type=int, default=0, help="patch-reading processes (default 0: in this process)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--slides", type=Path, default=None, help="folder of the slide files, if they moved")
    p.set_defaults(func=_cka)


def _cka(args: argparse.Namespace) -> int:
    a = resolve_encoder(args.encoder_a, args.weights_a, args.truncate_a)
    b = resolve_encoder(args.encoder_b, args.weights_b, args.truncate_b)
    df = compare_encoders(a, b, args.patches, args.out, args.n_patches, args.pooling,
                          args.full_matrix, args.seed, args.batch_size, args.input_size, args.workers,
                          args.device, args.slides)
    print(f"linear CKA per stage, {a.label} vs {b.label}:")
    print(cka_summary(df))
    print(f"written: {args.out / 'cka.csv'}, {args.out / 'cka.png'}")
    return 0
