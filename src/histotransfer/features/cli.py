"""``histotransfer extract`` and ``histotransfer encoders``: thin wrappers over the features API."""

from __future__ import annotations

import argparse
import time

from ..settings import add_options, from_args
from .settings import STAIN_REF_HELP, EncoderChoice, ExtractSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract patch features with a (truncated) encoder",
        description="Run every patch of every slide of a tiling through an encoder; writes "
        "<tiling>/features/<encoder_id>/<slide_id>.h5 (or OUT/features/<encoder_id>/ with --out), "
        "extract.csv (one row per slide) and features.json in that folder. Re-running skips "
        "finished slides and redoes those whose patches changed. Under `torchrun --nproc-per-node G "
        "-m histotransfer extract ...`, or as several commands on one shared folder, the slides are "
        "split between the processes. Several truncations (--truncate 0 1 2 3) are extracted in one "
        "pass over the patches, each into its own folder.",
    )
    p.add_argument(
        "--patches",
        required=True,
        help="a tiling folder from `histotransfer tile` (or its patches folder, or an output folder "
        "holding one tiling, or a CLAM/TRIDENT folder of patch files)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder; features go to OUT/features/<encoder_id>/ (default: the tiling folder)",
    )
    add_options(p, EncoderChoice, required=("encoder",), skip=("truncate",))
    p.add_argument(
        "--truncate",
        nargs="+",
        type=int,
        default=[0],
        metavar="K",
        help=f"{EncoderChoice.model_fields['truncate'].description} (default: 0)",
    )
    add_options(p, ExtractSettings)
    p.add_argument(
        "--slides", nargs="+", default=None, help="folder(s) or files of the slides, when they moved since tiling"
    )
    p.set_defaults(func=_extract)

    f = subparsers.add_parser(
        "stain-fit",
        help="fit a stain normalisation target once, to reuse with --stain-ref",
        description="Fit a Macenko or Reinhard stain target to a reference and write it as JSON; extract "
        "--stain-ref TARGET.json (and the study's extract.stain_ref) then use these very numbers.",
    )
    f.add_argument("--method", required=True, choices=("macenko", "reinhard"), help="normalisation method")
    f.add_argument("--ref", required=True, help=STAIN_REF_HELP)
    f.add_argument("--out", required=True, help="JSON file to write")
    f.set_defaults(func=_stain_fit)

    e = subparsers.add_parser(
        "encoders",
        help="list the available encoders",
        description="List the registered encoders: family, feature size per truncation, "
        "default weights and their ImageNet top-1, the checkpoint file a "
        "histopathology encoder expects, and how its pixels are prepared "
        "(resize method, crop, mean and std).",
    )
    e.set_defaults(func=_encoders)


def _extract(args: argparse.Namespace) -> int:
    from ..batch import print_summary
    from .extract import run_extraction

    t0 = time.perf_counter()
    # One --truncate value is one truncation (so that --blocks may go with --truncate 0); several, a list.
    given = args.truncate[0] if len(args.truncate) == 1 else args.truncate
    choice = from_args(EncoderChoice, args, truncate=given)
    done = run_extraction(args.patches, args.out, choice, settings=from_args(ExtractSettings, args), slides=args.slides)
    runs = done if isinstance(done, dict) else {choice.truncations[0]: done}
    seconds = time.perf_counter() - t0
    codes = []
    for truncate, run in runs.items():  # one summary per truncation, each with its own folder and report
        prefix = f"[rank {run.rank}/{run.world}] " if run.world > 1 else ""
        stage = "extract" if len(runs) == 1 else f"extract truncate {truncate}"
        codes.append(
            print_summary(
                run.results, stage, seconds, run.folder, run.folder / "extract.csv" if run.rank == 0 else None, prefix
            )
        )
    return max(codes)


def _stain_fit(args: argparse.Namespace) -> int:
    from ..stain import fit_reference, write_stain_target

    normalizer = fit_reference(args.method, args.ref)
    path = write_stain_target(normalizer, args.out)
    print(f"{normalizer.method} target {normalizer.tag()} written to {path}")
    return 0


def _encoders(args: argparse.Namespace) -> int:
    from ..encoders import encoder_info, list_encoders

    print(f"{'name':26} {'family':15} {'dims (truncate 0/1/2/3)':24} {'weights':12} {'top-1':>6}  notes")
    for name in list_encoders():
        info = encoder_info(name)
        dims = "/".join(map(str, info["feature_dims"]))
        for i, w in enumerate(info["weights"].values()):
            top1 = f"{w['imagenet_top1']:.2f}" if w["imagenet_top1"] is not None else "-"
            notes = []
            if w["name"] == info["default_weights"]:
                notes.append("default")
            if w["paper_top1"] is not None:
                notes.append(f"paper used {w['paper_top1']:.1f} ({w['imagenet_top1'] - w['paper_top1']:+.2f})")
            if w["checkpoint"]:
                notes.append(f"file {w['checkpoint']} from {w['checkpoint_url']}")
            if w["access"]:
                notes.append(w["access"])
            lead = f"{name:26} {info['family']:15} {dims:24}" if i == 0 else " " * 67
            print(f"{lead} {w['name']:12} {top1:>6}  {'; '.join(notes)}")
        print(f"{'':26} pixels: {info['pixels']}")
    print("Every encoder also takes weights 'random' (seeded initialisation) or a checkpoint file (--weights PATH).")
    return 0
