"""``histotransfer cka``: a thin wrapper over :func:`histotransfer.analysis.compare_encoders`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import add_options, from_args
from .settings import CkaSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cka", help="linear CKA between the stages of two encoders on the same patches",
        description="Compare the same stages of two encoders (e.g. a train run's frozen encoder and a finetune "
                    "run's fine-tuned one) on patches sampled from a tiling: the spatial mean (or the "
                    "flattened map) of each stage's output, linear CKA in float64. Writes cka.csv, cka.png, "
                    "patches.csv, cka.json and, with --full-matrix, cka_matrix.csv/.png.")
    for side in ("a", "b"):
        p.add_argument(f"--encoder-{side}", required=True, metavar="SPEC",
                       help="a run folder (train: frozen encoder; finetune: fine-tuned encoder), a fine-tuned "
                            f"encoder.pt, or an encoder name (with --weights-{side}/--truncate-{side})")
        p.add_argument(f"--weights-{side}", default=None,
                       help="weights for an encoder name: a named option (default: the encoder's), random or a "
                            "file")
        p.add_argument(f"--truncate-{side}", type=int, default=0, help="truncation for an encoder name")
    p.add_argument("--patches", required=True, type=Path, help="a tiling folder (or its patches folder)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_options(p, CkaSettings)
    p.add_argument("--slides", nargs="+", default=None, help="folder(s) or files of the slides, if they moved")
    p.set_defaults(func=_cka)


def _cka(args: argparse.Namespace) -> int:
    from .compare import cka_summary, compare_encoders, resolve_encoder

    settings = from_args(CkaSettings, args)
    a = resolve_encoder(args.encoder_a, args.weights_a, args.truncate_a)
    b = resolve_encoder(args.encoder_b, args.weights_b, args.truncate_b)
    df = compare_encoders(a, b, args.patches, args.out, settings, slides=args.slides)
    print(f"linear CKA per stage, {a.label} vs {b.label}:")
    print(cka_summary(df))
    print(f"written: {args.out / 'cka.csv'}, {args.out / 'cka.png'}")
    return 0
