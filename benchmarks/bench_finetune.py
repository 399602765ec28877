"""Memory and time of one end-to-end fine-tuning step, with and without gradient checkpointing.

Memory: the tensors autograd saves for the backward pass of 64 patches of 512 px through DenseNet121 + the MIL
head, counted exactly on the ``meta`` device (shapes only, no compute, no GPU needed), with and without
per-stage checkpointing. With checkpointing, the backward pass recomputes one stage at a time, so the peak is
the kept stage inputs plus the largest single stage's saved tensors plus weights, gradients and Adam moments.

Time: one training step (forward, backward, Adam) measured on this machine's CPU, both ways, side by side.

    python benchmarks/bench_finetune.py [--patches 64] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from histotransfer.features import create_encoder
from histotransfer.finetune.model import EndToEndMIL
from histotransfer.mil import AttentionMIL

GiB = 2**30


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn``."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        saved[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def memory(patches: int, size: int) -> None:
    encoder = create_encoder("densenet121", "random", 0)
    model = EndToEndMIL(encoder, AttentionMIL(encoder.feature_dim)).to("meta").train()
    x = torch.empty(patches, 3, size, size, device="meta")
    plain = saved_bytes(lambda: model(x, [patches]))
    model.checkpointing = True
    kept = saved_bytes(lambda: model(x, [patches]))
    largest, h = 0, x
    for stage in encoder.body:
        largest = max(largest, saved_bytes(lambda: stage(h)))
        with torch.no_grad():
            h = stage(h)
    n_params = sum(p.numel() for p in model.parameters())
    state = 4 * n_params * 4  # weights, gradients, two Adam moments, float32
    print(f"densenet121 + attention MIL, {patches} patches of {size} px, fp32, {n_params / 1e6:.1f} M parameters")
    print(f"  saved activations, no checkpointing:     {plain / GiB:7.2f} GiB")
    print(f"  with per-stage checkpointing, kept:      {kept / GiB:7.2f} GiB")
    print(f"    + largest stage while recomputing:     {largest / GiB:7.2f} GiB")
    print(f"  weights + grads + Adam moments:          {state / GiB:7.2f} GiB")
    peak_plain, peak_ckpt = plain + state, kept + largest + state
    print(f"  estimated peak: {peak_plain / GiB:.1f} GiB without, {peak_ckpt / GiB:.1f} GiB with checkpointing "
          f"({peak_plain / peak_ckpt:.1f}x less); a 24 GB GPU holds 22.3 GiB")


def step_time(checkpointing: bool, patches: int, size: int, reps: int) -> float:
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", "random", 0)
    model = EndToEndMIL(encoder, AttentionMIL(encoder.feature_dim), checkpointing=checkpointing).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = torch.randn(patches, 3, size, size)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        logits, _ = model(x, [patches])
        loss = F.cross_entropy(logits, torch.tensor([1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpu-patches", type=int, default=8)
    parser.add_argument("--cpu-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    memory(args.patches, args.size)
    plain = step_time(False, args.cpu_patches, args.cpu_size, args.reps)
    ckpt = step_time(True, args.cpu_patches, args.cpu_size, args.reps)
    print(f"one step, resnet18, {args.cpu_patches} patches of {args.cpu_size} px on this CPU "
          f"(median of {args.reps}): {plain:.3f} s without, {ckpt:.3f} s with checkpointing "
          f"({ckpt / plain:.2f}x the time)")


if __name__ == "__main__":
    main()
