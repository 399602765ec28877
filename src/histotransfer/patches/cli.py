"""``histotransfer tile``: tile slides into tissue patches at a target magnification."""

from __future__ import annotations

import argparse
import time

from ..settings import add_options, from_args
from .settings import TileSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tile",
        help="tissue mask + patch grid at a target magnification for each slide",
        description="Detect tissue (Otsu on saturation), cut a patch grid at --magnification and keep patches "
        "with tissue fraction >= --min-tissue. Writes OUT/<tiling>/ (named after the settings, e.g. "
        "20x_512px_0px_overlap) holding patches/<slide_id>.h5, masks/<slide_id>.png, "
        "thumbnails/<slide_id>.png, tiling.csv (one row per slide) and tiling.json (the settings). "
        "Re-running skips slides already tiled with the same settings; other settings go to "
        "another folder.",
    )
    p.add_argument("slides", nargs="+", metavar="SLIDES_OR_DIRS", help="slide files and/or folders of slides")
    p.add_argument("--out", required=True, help="output folder (the tiling goes to OUT/<tiling name>/)")
    add_options(p, TileSettings)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..batch import print_summary
    from .tiling import tile_slides

    t0 = time.perf_counter()
    run = tile_slides(args.slides, args.out, from_args(TileSettings, args))
    return print_summary(run.results, "tile", time.perf_counter() - t0, run.folder, run.folder / "tiling.csv")
