"""``histotransfer tile``: tile slides into tissue patches at a target magnification."""

from __future__ import annotations

import argparse
import sys

from ..batch import summarize
from .tiling import tile_slides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tile", help="tissue mask + patch grid at a target magnification for each slide",
        description="Detect tissue (Otsu on saturation), cut a patch grid at --magnification and keep patches "
                    "with tissue fraction >= --min-tissue. Writes OUT/patches/<slide_id>.h5, "
                    "OUT/masks/<slide_id>.png, OUT/thumbnails/<slide_id>.png and OUT/tiling.csv. "
                    "Re-running skips slides already tiled with the same settings.")
    p.add_argument("slides", nargs="+", metavar="SLIDES_OR_DIRS", help="slide files and/or folders of slides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--magnification", type=float, default=20.0,
                   help="target magnification; 20x = 0.5 um/px (default 20)")
    p.add_argument("--patch-size", type=int, default=512, help="patch side in pixels at the target (default 512)")
    p.add_argument("--stride", type=int, default=None,
                   help="grid step in pixels at the target (default: the patch size, no overlap)")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="keep patches whose tissue fraction is at least this (default 0.5)")
    p.add_argument("--mpp", type=float, default=None,
                   help="level-0 microns per pixel, overriding the slides' (needed for plain images)")
    p.add_argument("--workers", type=int, default=1, help="slides tiled in parallel processes (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = tile_slides(args.slides, args.out, magnification=args.magnification, patch_size=args.patch_size,
                          stride=args.stride, min_tissue=args.min_tissue, mpp=args.mpp, workers=args.workers)
    failed = any(r.status == "error" for r in results)
    print(summarize(results, "tile"), file=sys.stderr if failed else sys.stdout)
    print(f"outputs in {args.out} (report: {args.out}/tiling.csv)")
    return 1 if failed else 0
