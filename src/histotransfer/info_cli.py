"""``histotransfer info PATH``: a thin wrapper over :func:`histotransfer.info.describe`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a slide, patch or feature file, tiling, feature folder, run or study folder",
        description="Say what PATH is and what it holds: a slide (backend, levels, mpp, identity), a patch file "
        "(spec, tiling, slide, fingerprint), a feature file (encoder, weights, dimension, NaN/inf "
        "rows, stale or not), a tiling or feature folder (slides, patches, statuses, stale files), "
        "a run folder (settings, split, AUC per split, inputs) or a study folder (cells by status).",
    )
    p.add_argument("path", metavar="PATH", help="file or folder to describe")
    p.add_argument(
        "--check",
        action="store_true",
        help="also check a patch file's slide against the identity it recorded, and a run's feature "
        "files against the fingerprints it was trained on; exit status 1 when a check fails",
    )
    p.add_argument("--json", action="store_true", help="print the description as JSON (for scripts)")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from .info import describe, failed_checks, render

    description = describe(args.path, check=args.check)
    print(json.dumps(description, indent=2) if args.json else render(description))
    failed = failed_checks(description) if args.check else []
    for line in failed:
        print(f"check failed: {line}", file=sys.stderr)
    return 1 if failed else 0
