"""One MIL training epoch against the FLOP bound of this machine, measured side by side.

Default: 300 slides x 5,000 patches x 512 features (about 3 GB in memory), the ``histotransfer`` model
(512 -> 256 -> 64, attention 64 -> 32 -> 1), one slide per step. The FLOP bound of an epoch is its necessary
GEMM work (forward, weight gradients, and input gradients of every layer but the first) divided by the best
matmul rate measured in this run (the epoch's two big GEMM shapes and a square GEMM, measured every few
steps in between the steps, so they see the same machine load). Prints, for
``histotransfer.mil.train.train_epoch`` and (unless ``--no-naive``) a straightforward loop on the same bags,
the two taking turns slide by slide:
each epoch's time, the best epoch against the bound, and the sum over slides of each slide's best step time
over the rounds against the bound (on a machine shared with other work, this filters out most of the time
stolen by other processes). The same is printed for the step's GEMMs alone (same shapes, nothing else), the
floor that this machine's BLAS sets for any implementation of the step.

Run: ``.venv/bin/python benchmarks/bench_mil.py [--slides 300 --patches 5000 --dim 512]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histotransfer.mil.bags import feature_stats
from histotransfer.mil.models import AttentionMIL
from histotransfer.mil.train import train_epoch


def gemm_gflops(m: int, k: int, n: int, transpose_a: bool = False, repeat: int = 5) -> float:
    """Best GFLOP/s of an (m, k) @ (k, n) float32 matmul (``transpose_a``: A stored as (k, m))."""
    a = torch.randn(k, m).t() if transpose_a else torch.randn(m, k)
    b = torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def epoch_flops(sizes: list[int], dim: int, hidden: int = 256, n_classes: int = 2) -> float:
    """GEMM FLOPs of one epoch of the histotransfer model, one slide per step."""
    later = hidden * 64 + 64 * 32 + 32  # layers after the first: fc2, attention V, attention w
    per_patch = 2 * dim * hidden + 2 * later  # forward
    per_patch += 2 * dim * hidden + 2 * later  # weight gradients
    per_patch += 2 * later  # input gradients (none for the first layer: features need no gradient)
    pooling = 2 * 2 * 64  # attention-weighted mean, forward + backward, per patch
    return float(sum(n * (per_patch + pooling) + 6 * 64 * n_classes for n in sizes))


class NaiveMIL(nn.Module):
    """The same network written the obvious way: explicit standardisation, nn.Sequential blocks."""

    def __init__(self, dim: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.fc = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.attention = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 1))
        self.classifier = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc((x - self.mean) / self.std)
        a = torch.softmax(self.attention(h).t(), dim=1)
        return self.classifier(a @ h)


def naive_step(model: NaiveMIL, opt: torch.optim.Optimizer, bag: torch.Tensor, label: int) -> None:
    opt.zero_grad()
    loss = F.cross_entropy(model(bag), torch.tensor([label]))
    loss.backward()
    opt.step()


class StepGemms:
    """The GEMMs of one training step of the ``histotransfer`` model alone, with the step's shapes and
    operand layouts (forward, weight gradients, input gradients but the first layer's), nothing else: a
    floor for any implementation of the step that uses this machine's BLAS."""

    def __init__(self, dim: int, hidden: int = 256):
        g = torch.Generator().manual_seed(0)
        self.w1, self.b1 = torch.randn(hidden, dim, generator=g), torch.randn(hidden, generator=g)
        self.w2, self.b2 = torch.randn(64, hidden, generator=g), torch.randn(64, generator=g)
        self.v, self.bv = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)

    def __call__(self, x: torch.Tensor) -> None:
        h1 = torch.addmm(self.b1, x, self.w1.t())  # forward
        h2 = torch.addmm(self.b2, h1, self.w2.t())
        t = torch.addmm(self.bv, h2, self.v.t())
        torch.mm(t.t(), h2)  # attention V weight gradient (dU^T H2), dU stands in as t
        dh2 = torch.mm(t, self.v)  # attention input gradient
        torch.mm(dh2.t(), h1)  # fc2 weight gradient
        dh1 = torch.mm(dh2, self.w2)  # fc2 input gradient
        torch.mm(dh1.t(), x)  # fc1 weight gradient


def measure_peak(n: int, d: int, h: int) -> float:
    """Best GFLOP/s, measured now, of the epoch's two big GEMM shapes and of a square GEMM."""
    return max(
        gemm_gflops(n, d, h, repeat=3),
        gemm_gflops(h, n, d, transpose_a=True, repeat=3),
        gemm_gflops(1024, 1024, 1024, repeat=3),
    )


def timed_epochs(
    steps: dict[str, Callable[[int], None]],
    n_slides: int,
    rounds: int,
    peak_every: int,
    shape: tuple[int, int, int],
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Per-step times (rounds, n_slides) of each ``steps[name](i)`` over shuffled epochs, the loops taking
    turns slide by slide, and matmul peaks measured every ``peak_every`` slides in between (so all of them
    see the same machine load)."""
    times = {name: np.zeros((rounds, n_slides)) for name in steps}
    peaks = []
    for r in range(rounds):
        for k, i in enumerate(rng.permutation(n_slides)):
            if k % peak_every == 0:
                peaks.append(measure_peak(*shape))
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(i)
                times[name][r, i] = time.perf_counter() - t0
    return times, peaks


def report(name: str, times: np.ndarray, peaks: list[float], flops: float) -> None:
    bound = flops / (max(peaks) * 1e9)
    epochs = times.sum(axis=1)
    filtered = times.min(axis=0).sum()
    print(
        f"{name}: epochs {', '.join(f'{t:.2f}' for t in epochs)} s; best epoch {epochs.min():.2f} s = "
        f"{epochs.min() / bound:.2f}x the bound; per-slide best over rounds {filtered:.2f} s = "
        f"{filtered / bound:.2f}x",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=300)
    ap.add_argument("--patches", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs of each loop")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-naive", action="store_true", help="skip the straightforward loop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"making {args.slides} bags of {args.patches} x {args.dim} float32 ...", flush=True)
    bags = [torch.randn(args.patches, args.dim) * 2 + 1 for _ in range(args.slides)]
    labels = np.arange(args.slides) % 2
    shape = (args.patches, args.dim, 256)
    flops = epoch_flops([len(b) for b in bags], args.dim, 256)
    print(f"epoch GEMM work: {flops / 1e12:.3f} TFLOP")
    rng = np.random.default_rng(0)
    peak_every = max(1, args.slides // 10)

    model = AttentionMIL(args.dim)
    model.set_standardization(*feature_stats(bags[:20]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    targets = [torch.tensor([int(y)]) for y in labels]
    train_epoch(model, bags, targets, rng.permutation(len(bags))[:5], opt)  # warm-up
    # train_epoch over one slide is one training step; summed over a shuffled epoch it is train_epoch.
    gemms = StepGemms(args.dim)
    steps = {
        "histotransfer train_epoch": lambda i: train_epoch(model, bags, targets, [i], opt),
        "the step's GEMMs alone   ": lambda i: gemms(bags[i]),
    }
    if not args.no_naive:
        naive = NaiveMIL(args.dim, model.feature_mean.clone(), model.feature_std.clone())
        naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-3)
        for i in range(5):
            naive_step(naive, naive_opt, bags[i], int(labels[i]))
        steps["straightforward loop     "] = lambda i: naive_step(naive, naive_opt, bags[i], int(labels[i]))
    times, peaks = timed_epochs(steps, args.slides, args.rounds, peak_every, shape, rng)
    bound = flops / (max(peaks) * 1e9)
    print(
        f"matmul peak: best {max(peaks):.1f} GFLOP/s, median {float(np.median(peaks)):.1f} over {len(peaks)} "
        f"measurements -> FLOP-bound epoch {bound:.2f} s"
    )
    for name, t in times.items():
        report(name, t, peaks, flops)
    if not args.no_naive:
        ours, _, naive_t = times.values()
        print(
            f"speed-up of train_epoch over the straightforward loop: best epoch "
            f"{naive_t.sum(axis=1).min() / ours.sum(axis=1).min():.2f}x, per-slide best "
            f"{naive_t.min(axis=0).sum() / ours.min(axis=0).sum():.2f}x"
        )
    print(
        "The GEMMs-alone row is a floor for any implementation on this BLAS: the tall-skinny and small-K shapes "
        "of the step run below the square-matrix peak."
    )
    print(
        f"goal: train_epoch within 1.25x of the bound. Load average at the end {os.getloadavg()[0]:.1f}: other "
        "work on the machine inflates every time (the per-slide best over rounds filters most of it)."
    )


if __name__ == "__main__":
    main()
