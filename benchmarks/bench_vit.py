"""Encoder throughput of a ViT-L/16 against DenseNet121, both at 224 px, measured side by side in one run.

Both encoders come from the registry with seeded random weights (speed does not depend on the values), as
``create_encoder`` builds them (no BatchNorm folding or other inference rewrites), run in eval mode under
``torch.inference_mode`` on the same batch of 224 x 224 patches already in memory (no reading, no resizing).
Each is timed ``--repeats`` times, interleaved, after one warm-up batch, and the median kept (the machine may
be shared). Prints patches/s, the network's GFLOPs per patch (counted by ``torch.utils.flop_counter``,
a multiply-add counting as 2) and the ratio.

Run: ``.venv/bin/python benchmarks/bench_vit.py [--batch 8] [--repeats 3] [--device cuda]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from histotransfer.encoders import create_encoder

ENCODERS = ("vit_large_patch16_224", "densenet121")


def gflops_per_patch(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of ``model`` on one patch of ``x``'s shape, in GFLOP."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return counter.get_total_flops() / 1e9


def seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Wall time of one forward pass of the batch ``x``."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="patches per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per encoder (median kept)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    models = {name: create_encoder(name, weights="random").to(device) for name in ENCODERS}
    flops = {name: gflops_per_patch(m, x) for name, m in models.items()}
    for m in models.values():
        seconds(m, x)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ENCODERS}
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name].append(seconds(m, x))

    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch} x 224 px, median of {args.repeats}")
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    for name in ENCODERS:
        print(
            f"{name:24} {rate[name]:9.2f} patches/s   {flops[name]:6.2f} GFLOP/patch   "
            f"feature dim {models[name].feature_dim}"
        )
    vit, cnn = ENCODERS
    print(
        f"ratio {cnn} / {vit}: {rate[cnn] / rate[vit]:.1f}x faster "
        f"({flops[vit] / flops[cnn]:.1f}x fewer FLOPs per patch)"
    )


if __name__ == "__main__":
    main()
