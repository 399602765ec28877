"""``histotransfer cka`` and ``cam``: thin wrappers over :func:`histotransfer.analysis.compare_encoders` and
:func:`histotransfer.analysis.write_cams`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..settings import add_options, from_args
from .settings import CamSettings, CkaSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cka",
        help="linear CKA between the stages of two encoders on the same patches",
        description="Compare the same stages of two encoders (e.g. a train run's frozen encoder and a finetune "
        "run's fine-tuned one) on patches sampled from a tiling: the spatial mean (or the "
        "flattened map) of each stage's output, linear CKA in float64. Writes cka.csv, cka.png, "
        "patches.csv, cka.json and, with --full-matrix, cka_matrix.csv/.png.",
    )
    for side in ("a", "b"):
        p.add_argument(
            f"--encoder-{side}",
            required=True,
            metavar="SPEC",
            help="a run folder (train: frozen encoder; finetune: fine-tuned encoder), a fine-tuned "
            f"encoder.pt, or an encoder name (with --weights-{side}/--truncate-{side} or "
            f"--blocks-{side})",
        )
        p.add_argument(
            f"--weights-{side}",
            default=None,
            help="weights for an encoder name: a named option (default: the encoder's), random or a file",
        )
        p.add_argument(f"--truncate-{side}", type=int, default=0, help="truncation for an encoder name")
        p.add_argument(
            f"--blocks-{side}",
            type=int,
            default=None,
            metavar="N",
            help=f"for a transformer encoder name: keep exactly its first N blocks (instead of --truncate-{side})",
        )
    p.add_argument(
        "--patches",
        required=True,
        type=Path,
        help="a tiling folder from `histotransfer tile` (or its patches folder, or an output folder "
        "holding one tiling, or a CLAM/TRIDENT folder of patch files)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_options(p, CkaSettings)
    p.add_argument("--slides", nargs="+", default=None, help="folder(s) or files of the slides, if they moved")
    p.set_defaults(func=_cka)

    p = subparsers.add_parser(
        "cam",
        help="Grad-CAM inside the most-attended patches of a run's slides",
        description="For each slide of a train or finetune run, its top-k patches by attention: Grad-CAM of the "
        "slide's logit with respect to the encoder's last kept stage, through the run's own MIL head "
        "over all the slide's patches. Writes <slide_id>.h5 (maps, patches, microns per CAM cell), "
        "<slide_id>_cam.png (the patches with their maps), <slide_id>_slide.png (the CAM cells over "
        "the slide thumbnail), cams.csv and cam.json. With --annotations, the pointing game and the "
        "CAM mass on the lesion of each positive annotated slide. Re-running skips slides done.",
    )
    p.add_argument(
        "--run",
        required=True,
        type=Path,
        help="run folder written by `histotransfer train` or `finetune` (its fine-tuned encoder)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_options(p, CamSettings)
    p.add_argument("--slides", nargs="+", default=None, help="folder(s) or files of the slides, if they moved")
    p.add_argument(
        "--annotations",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of lesion annotations, <slide_id>.geojson (QuPath, level-0 pixels) or a "
        '<slide_id>.png mask with <slide_id>.png.json holding {"downsample": D}: positive '
        "slides that have one are scored",
    )
    p.add_argument(
        "--slide-ids",
        nargs="+",
        default=None,
        metavar="ID",
        help="only these of the run's slides (default: all of them)",
    )
    p.set_defaults(func=_cam)


def _cka(args: argparse.Namespace) -> int:
    from ..stain import stain_normalizer
    from .cka_encoders import resolve_encoder
    from .compare import cka_summary, compare_encoders

    t0 = time.perf_counter()

    settings = from_args(CkaSettings, args)
    stain = stain_normalizer(settings.stain_norm, settings.stain_ref, settings.stain_scope)
    a = resolve_encoder(args.encoder_a, args.weights_a, args.truncate_a, stain, args.blocks_a)
    b = resolve_encoder(args.encoder_b, args.weights_b, args.truncate_b, stain, args.blocks_b)
    df = compare_encoders(a, b, args.patches, args.out, settings, slides=args.slides)
    if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 reports for the job
        return 0
    print(f"linear CKA per stage, {a.label} vs {b.label}:")
    print(cka_summary(df))
    print(f"cka: done in {time.perf_counter() - t0:.1f} s; outputs in {args.out} (cka.csv, cka.png, cka.json)")
    return 0


def _cam(args: argparse.Namespace) -> int:
    import sys

    from .cam_run import cam_summary_text, write_cams

    settings = from_args(CamSettings, args)
    run = write_cams(
        args.run, args.out, settings, slides=args.slides, annotations_dir=args.annotations, slide_ids=args.slide_ids
    )
    failed = any(r.status == "error" for r in run.results)
    print(cam_summary_text(run), file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
