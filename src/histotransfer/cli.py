"""The ``histotransfer`` command: a thin layer over the Python API.

Each pipeline stage registers its sub-commands from its own ``cli`` module (``register(subparsers)``), each
setting ``func(args) -> int`` as the handler.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import HistotransferError

STAGE_CLIS = [
    "histotransfer.patches.cli",
    "histotransfer.features.cli",
    "histotransfer.mil.cli",
    "histotransfer.finetune.cli",
    "histotransfer.analysis.cli",
    "histotransfer.study.cli",
    "histotransfer.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histotransfer",
        description="Transfer learning for histopathology whole-slide images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in STAGE_CLIS:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HistotransferError as exc:
        if os.environ.get("HISTOTRANSFER_DEBUG"):
            raise
        print(f"histotransfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
