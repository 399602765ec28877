"""What a slide's identity costs to read, before and with the sparse content sample, side by side in one run.

The identity (``histotransfer.slide.identity``) is read every time a slide is opened for its pixels. It used to
hash the first and last 1 MiB (``head_sha256``); it now also hashes 64 blocks of 64 KiB spread over the file
(``sample_sha256``), which catches an edit in the middle with the size unchanged. On one file of random content
(default 2 GB, written to a temporary folder and deleted at the end):

1. ``old``: file size + ``edge_sha256`` (2 reads, 2 MiB).
2. ``new``: file size + ``edge_sha256`` + ``sample_sha256`` (66 reads, 6 MiB).

Each is timed cold (the file's pages dropped from the page cache with ``posix_fadvise(DONTNEED)`` before every
read; the file is fsynced first so that its pages are clean and can be dropped; the device's own cache is not)
and warm (pages cached), ``--repeats`` times, interleaved, median kept. Prints milliseconds, bytes read and the
ratio new / old.

    PYTHONPATH=src python benchmarks/bench_identity.py [--size-gb 2] [--dir /tmp] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from histotransfer.slide.identity import HEAD_BYTES, SAMPLE_BLOCKS, SAMPLE_BYTES, edge_sha256, sample_sha256


def write_random_file(path: Path, size: int, chunk: int = 64 << 20) -> None:
    """``size`` bytes of random content (incompressible, as JPEG tiles are), fsynced so the pages can be dropped."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def old_identity(path: Path) -> tuple[int, str]:
    return os.path.getsize(path), edge_sha256(path)


def new_identity(path: Path) -> tuple[int, str, str]:
    return os.path.getsize(path), edge_sha256(path), sample_sha256(path)


def timed(fn: Callable[[Path], object], path: Path, cold: bool) -> float:
    if cold:
        drop_cache(path)
    t0 = time.perf_counter()
    fn(path)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the test file in GB (1e9 bytes)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write it (default: the temporary folder)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    size = int(args.size_gb * 1e9)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-identity-") as tmp:
        path = Path(tmp) / "slide.bin"
        t0 = time.perf_counter()
        write_random_file(path, size)
        print(
            f"file: {size / 1e9:.2f} GB of random content in {path.parent} (written in "
            f"{time.perf_counter() - t0:.1f} s)"
        )
        sample = SAMPLE_BLOCKS * SAMPLE_BYTES
        variants = {"old": (old_identity, 2 * HEAD_BYTES), "new": (new_identity, 2 * HEAD_BYTES + sample)}
        times: dict[tuple[str, bool], list[float]] = {(v, c): [] for v in variants for c in (True, False)}
        for fn, _ in variants.values():  # warm-up: imports, first open
            fn(path)
        for _ in range(args.repeats):
            for cold in (True, False):
                for name, (fn, _) in variants.items():
                    times[name, cold].append(timed(fn, path, cold))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{'identity':10} {'bytes read':>11} {'cold ms':>9} {'warm ms':>9}")
        for name, (_, nbytes) in variants.items():
            print(f"{name:10} {nbytes / (1 << 20):>7.0f} MiB {med[name, True]:>9.2f} {med[name, False]:>9.2f}")
        print(
            f"{'new / old':10} {'':>11} {med['new', True] / med['old', True]:>8.2f}x "
            f"{med['new', False] / med['old', False]:>8.2f}x"
        )
        print(f"median of {args.repeats}, interleaved; cold = this file's pages dropped with posix_fadvise(DONTNEED)")


if __name__ == "__main__":
    main()
