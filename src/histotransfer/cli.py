"""The ``histotransfer`` command: a thin layer over the Python API.

Each pipeline stage registers its sub-commands from its own ``cli`` module (``register(subparsers)``), each
setting ``func(args) -> int`` as the handler. Only the module of the command being run is imported, so a
command does not pay for importing every stage (torch, torchvision) it does not use.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from ._io import disk_full, error_message
from .errors import HistotransferError, RankFailure, error_line, set_command

COMMANDS = {
    "tile": "histotransfer.patches.cli",
    "encoders": "histotransfer.features.cli",
    "extract": "histotransfer.features.cli",
    "stain-fit": "histotransfer.features.cli",
    "train": "histotransfer.mil.cli",
    "evaluate": "histotransfer.mil.cli",
    "heatmap": "histotransfer.mil.cli",
    "finetune": "histotransfer.finetune.cli",
    "cka": "histotransfer.analysis.cli",
    "cam": "histotransfer.analysis.cli",
    "study": "histotransfer.study.cli",
    "demo": "histotransfer.demo",
    "info": "histotransfer.info_cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s stage registered, or every stage when ``command`` is None or unknown."""
    parser = argparse.ArgumentParser(
        prog="histotransfer",
        description="Transfer learning for histopathology whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"histotransfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(module).register(sub)
    return parser


def _hdf5_release_failure(exc: BaseException | None) -> bool:
    """When a disk fills up, HDF5 cannot release the identifiers of the file it failed to write, and h5py
    prints each one as a traceback ("Exception ignored ... ObjectID.__dealloc__"); the command reports the
    full disk once itself, so these repeats are dropped."""
    return isinstance(exc, RuntimeError) and "decrement id ref count" in str(exc) and "No space left" in str(exc)


def _quiet_excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    if not _hdf5_release_failure(exc):
        sys.__excepthook__(kind, exc, tb)


def _quiet_unraisablehook(unraisable: Any) -> None:
    if not _hdf5_release_failure(unraisable.exc_value) and "ObjectID" not in str(unraisable.object):
        sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; ``argv`` None means this process's command line (the ``histotransfer`` program)."""
    argv_is_process = argv is None
    sys.excepthook, sys.unraisablehook = _quiet_excepthook, _quiet_unraisablehook
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None and not argv:
        argv = ["--help"]
    args = build_parser(command).parse_args(argv)
    set_command(args.command)
    try:
        return int(args.func(args) or 0)
    except RankFailure:  # printed by the job's every process already
        if os.environ.get("HISTOTRANSFER_DEBUG"):
            raise
        return 2
    except (HistotransferError, OSError) as exc:
        if os.environ.get("HISTOTRANSFER_DEBUG"):
            raise
        print(error_line(error_message(exc)), file=sys.stderr)
        if isinstance(exc, OSError) and disk_full(exc) and argv_is_process:
            # A file HDF5 failed to write keeps handles it cannot release, and tearing the interpreter down
            # over them can crash; everything is written or deleted already, so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
