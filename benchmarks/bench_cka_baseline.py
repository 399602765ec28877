"""Why a LayerScale ViT's CKA baseline is drawn without LayerScale: how far a random network's blocks move its tokens.

For a random initialisation of ``--encoder`` (default UNI's ViT-L/16, LayerScale ``init_values=1e-5``), as drawn
(gains 1e-5) and as the CKA baseline draws it (``analysis.cka_encoders.baseline_encoder``: gains 1, timm's
initialisation of the architecture without LayerScale), prints linear CKA of the stem's tokens with each
stage's (each patch's tokens averaged, and flattened), on the demo's patches prepared by the encoder's record.
As drawn, every stage equals the stem (1.000000): a baseline of such draws is a random patch embedding at every
stage. Measured on UNI (ViT-L/16), 16 demo patches, CPU: as drawn 1.000000 at every stage in both views;
without LayerScale, flattened tokens 0.9908, 0.9809, 0.9716, 0.9622 and token mean 0.9992, 0.9990, 0.9987,
0.9985, falling with depth as an untrained network's blocks transform the tokens.

Run: ``.venv/bin/python benchmarks/bench_cka_baseline.py [--encoder uni] [--n-patches 24] [--device cuda]``
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from histotransfer.analysis import linear_cka
from histotransfer.analysis.cka_encoders import BASELINE_SEED, baseline_encoder
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder
from histotransfer.features import prepare_patch
from histotransfer.slide import open_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="uni")
    parser.add_argument("--n-patches", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    demo = make_demo_slides(tempfile.mkdtemp(prefix="cka-baseline-"), n_slides=1, seed=0, size=2048)
    rng = np.random.default_rng(0)
    with open_slide(demo.slides[0]) as slide:
        patches = [
            slide.read_region((int(x), int(y)), 0, (256, 256))
            for x, y in rng.integers(256, 1536, size=(args.n_patches, 2))
        ]
    drawn = create_encoder(args.encoder, "random", random_seed=BASELINE_SEED)
    control, rescaled = baseline_encoder(drawn, BASELINE_SEED)
    prep = drawn.preprocessing
    x = prep.normalise(torch.from_numpy(np.stack([prepare_patch(p, prep) for p in patches])), dev)
    print(f"{args.encoder}, {len(patches)} demo patches; LayerScale found: {rescaled}")
    for label, enc in [("as drawn", drawn), ("baseline control", control)]:
        with torch.inference_mode():
            maps = enc.to(dev).eval().forward_stages(x)
        mean = [linear_cka(maps[0].mean(dim=1), m.mean(dim=1)) for m in maps[1:]]
        flat = [linear_cka(maps[0].flatten(1), m.flatten(1)) for m in maps[1:]]
        print(f"  {label:17} CKA(stem, stage k), token mean: {', '.join(f'{v:.6f}' for v in mean)}")
        print(f"  {label:17} CKA(stem, stage k), flattened:  {', '.join(f'{v:.6f}' for v in flat)}")


if __name__ == "__main__":
    main()
