"""Tiling speed, measured side by side in one run.

1. Tissue mask + patch coordinates for a 40,000 x 40,000 px slide at 0.25 um/px tiled at 20x with 512 px
   patches (target < 0.1 s). Only its low-resolution level (8 um/px, 1250 x 1250) is generated: that is all
   tiling reads.
2. Patch read rate, one core, 512 px patches read in grid order from the same slide: our PatchReader,
   OpenSlide ``read_region`` (converted to an RGB array), tiffslide ``read_region``, and decoding each tile
   the patches touch exactly once with imagecodecs (the floor any reader pays). Target: ours >= 3x OpenSlide.
   Rates are per core: single-threaded loops timed in process CPU time, so other work on the machine does
   not skew the ratios.
   Slides: a synthetic 20x tiled JPEG TIFF (256 px tiles, aligned with the patches) and, when present, the
   real Aperio SVS in ../shared (240 px tiles, not aligned).

Run: ``.venv/bin/python benchmarks/bench_tiling.py``
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import openslide
import tifffile
import tiffslide

from histotransfer.demo_slides import render_tissue, write_pyramidal_tiff
from histotransfer.patches import PatchReader
from histotransfer.patches.geometry import tiling_spec
from histotransfer.patches.patch_file import PatchSpec
from histotransfer.patches.tiling import grid_coords, patch_coords
from histotransfer.patches.tissue import tissue_mask
from histotransfer.slide import open_slide

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"


def bench_mask_and_coords(repeats: int = 7) -> None:
    side, mpp, mask_mpp = 40_000, 0.25, 8.0
    n = int(side * mpp / mask_mpp)
    shape = np.zeros((n, n), np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(6):
        cx, cy, ax, ay = rng.uniform(0.2, 0.8, 2).tolist() + rng.uniform(0.08, 0.25, 2).tolist()
        cv2.ellipse(
            shape, (int(cx * n), int(cy * n)), (int(ax * n), int(ay * n)), float(rng.uniform(0, 180)), 0, 360, 1, -1
        )
    lowres = render_tissue(shape.astype(bool), None, rng)
    spec = PatchSpec(
        patch_size=512,
        patch_size_level0=1024,
        patch_level=1,
        downsample=2.0,
        target_magnification=20.0,
        mpp=mpp,
        min_tissue=0.5,
        stride=512,
    )
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mask = tissue_mask(lowres, mpp=mask_mpp)
        coords, _ = patch_coords(mask, (side, side), spec)
        times.append(time.perf_counter() - t0)
    print(
        f"mask + coords, {side} x {side} px slide ({n} x {n} px mask, {len(coords)} of "
        f"{len(grid_coords((side, side), 1024, 1024))} patches kept): median {statistics.median(times):.4f} s "
        f"(target < 0.1 s)"
    )


def _rate(fn, coords: np.ndarray) -> float:
    t0 = time.process_time()
    for x, y in coords.tolist():
        fn(x, y)
    return len(coords) / (time.process_time() - t0)


def _raw_decode_rate(path: Path, coords: np.ndarray, size: int) -> float:
    """Patches per second if each needed tile is read and decoded exactly once (no assembly, no cache)."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        needed = sorted(
            {
                ty * across + tx
                for x, y in coords.tolist()
                for ty in range(y // th, (y + size - 1) // th + 1)
                for tx in range(x // tw, (x + size - 1) // tw + 1)
            }
        )
        offsets, counts, tables = page.dataoffsets, page.databytecounts, page.jpegtables
        colorspace = "RGB" if page.photometric == 2 else None
    fd = os.open(path, os.O_RDONLY)
    t0 = time.process_time()
    for i in needed:
        imagecodecs.jpeg8_decode(os.pread(fd, counts[i], offsets[i]), tables=tables, colorspace=colorspace)
    elapsed = time.process_time() - t0
    os.close(fd)
    return len(coords) / elapsed


def bench_patch_reads(path: Path, label: str, passes: int = 3) -> None:
    with open_slide(path) as slide:
        spec = tiling_spec(slide, 20.0, 512)
        level, size = spec.patch_level, spec.patch_size
        coords = grid_coords(slide.dimensions, spec.patch_size_level0, spec.patch_size_level0)
        rates: dict[str, list[float]] = {"ours": [], "openslide": [], "tiffslide": [], "raw decode": []}
        for _ in range(passes):  # fresh readers each pass: no warm tile cache carried over
            with PatchReader(slide, spec) as reader:
                assert reader.direct and reader.native
                rates["ours"].append(_rate(reader.read, coords))
            osr = openslide.OpenSlide(str(path))
            rates["openslide"].append(
                _rate(lambda x, y, osr=osr: np.asarray(osr.read_region((x, y), level, (size, size)))[..., :3], coords)
            )
            osr.close()
            ts = tiffslide.TiffSlide(str(path))
            rates["tiffslide"].append(
                _rate(lambda x, y, ts=ts: ts.read_region((x, y), level, (size, size), as_array=True), coords)
            )
            ts.close()
            rates["raw decode"].append(_raw_decode_rate(path, coords, size))
    best = {k: max(v) for k, v in rates.items()}
    print(
        f"{label}: {len(coords)} patches of {size} px, patches/s (best of {passes}): "
        + ", ".join(f"{k} {v:.0f}" for k, v in best.items())
    )
    print(
        f"  ratios: ours / openslide = {best['ours'] / best['openslide']:.2f}x (target >= 3x), "
        f"ours / tiffslide = {best['ours'] / best['tiffslide']:.2f}x, "
        f"ours / raw decode = {best['ours'] / best['raw decode']:.2f}"
    )


def main() -> None:
    cv2.setNumThreads(1)
    bench_mask_and_coords()
    with tempfile.TemporaryDirectory() as tmp:
        side = 8192
        shape = np.zeros((side, side), np.uint8)
        cv2.circle(shape, (side // 2, side // 2), int(side * 0.48), 1, -1)
        path = write_pyramidal_tiff(
            Path(tmp) / "synthetic.tif", render_tissue(shape.astype(bool), None, np.random.default_rng(1)), mpp=0.5
        )
        bench_patch_reads(path, f"synthetic 20x tiled TIFF {side} x {side}")
    if CMU.exists():
        bench_patch_reads(CMU, "Aperio SVS CMU-1-Small-Region (20x, 240 px tiles)", passes=6)
    else:
        print(f"skipped the real slide: {CMU} is absent")


if __name__ == "__main__":
    main()
