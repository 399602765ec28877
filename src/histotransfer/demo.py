"""``histotransfer demo``: the whole pipeline on generated demo slides, end to end.

Generates a small seeded set of synthetic pyramidal TIFF slides (half of them carry lesions), then runs every
stage on them, printing where each stage's results are. Everything runs on the CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .batch import summarize

DEMO_ENCODER = dict(encoder="resnet18", weights="random", truncate=2, input_size=64)


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(t0: float, where: Path) -> None:
    print(f"   done in {time.perf_counter() - t0:.1f} s -> {where}", flush=True)


def run_demo(out_dir: str | Path, n_slides: int = 16, seed: int = 0) -> Path:
    """Run the pipeline on demo slides under ``out_dir``; return the demo folder."""
    from .demo_slides import make_demo_slides
    from .patches import tile_slides

    out = Path(out_dir).resolve()
    t0 = _stage(f"1/2 demo slides: {n_slides} synthetic pyramidal TIFFs (seed {seed})")
    demo = make_demo_slides(out / "demo_slides", n_slides=n_slides, seed=seed)
    _done(t0, out / "demo_slides")

    t0 = _stage("2/2 tiling: Otsu tissue mask, 256 px patches at 20x, keep >= 50% tissue")
    results = tile_slides(demo.slides, out / "tiles", magnification=20.0, patch_size=256)
    print("   " + summarize(results, "tiling"))
    _done(t0, out / "tiles")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on generated demo slides")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--n-slides", type=int, default=16, help="number of demo slides (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo slides (default: 0)")
    p.set_defaults(func=lambda a: (run_demo(a.out, a.n_slides, a.seed), 0)[1])
