"""Memory and time of one end-to-end fine-tuning step, with and without gradient checkpointing.

Memory: the tensors autograd saves for the backward pass of 64 patches of 512 px through DenseNet121 + the MIL
head, counted exactly on the ``meta`` device (shapes only, no compute, no GPU needed), with and without
per-stage checkpointing. With checkpointing, the backward pass recomputes one stage at a time, so the peak is
the kept stage inputs plus the largest single stage's saved tensors plus weights, gradients and Adam moments.

Time: one training step (forward, backward, Adam) measured on this machine's CPU, both ways, side by side.

With ``--cuda`` (a GPU machine), the estimate is checked against the real thing: the same DenseNet121 steps on
the GPU, fp32 and bf16 autocast, with and without checkpointing, each printing the peak of
``torch.cuda.max_memory_allocated`` and the median step time.

    python benchmarks/bench_finetune.py [--patches 64] [--size 512] [--cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from histotransfer.features import create_encoder
from histotransfer.runtime import precision_context
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


def cuda_steps(patches: int, size: int, reps: int) -> None:
    """Peak GPU memory and step time of DenseNet121 end-to-end steps, measured on the GPU."""
    device = torch.device("cuda")
    print(f"on {torch.cuda.get_device_name(device)}, torch {torch.__version__}:")
    for precision in ("fp32", "bf16"):
        for checkpointing in (False, True):
            torch.manual_seed(0)
            encoder = create_encoder("densenet121", "random", 0)
            model = EndToEndMIL(encoder, AttentionMIL(encoder.feature_dim), checkpointing=checkpointing)
            model = model.to(device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
            x = torch.randn(patches, 3, size, size, device=device)
            target = torch.tensor([1], device=device)
            torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(reps + 1):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with precision_context(device, precision):
                    logits, _ = model(x, [patches])
                loss = F.cross_entropy(logits.float(), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated(device)
            print(f"  {precision}, checkpointing {'on ' if checkpointing else 'off'}: peak "
                  f"{peak / GiB:6.2f} GiB allocated, step {statistics.median(times[1:]):.3f} s (median of {reps})",
                  flush=True)
            del model, optimizer, x
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpu-patches", type=int, default=8)
    parser.add_argument("--cpu-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="also measure the steps on the GPU")
    args = parser.parse_args()
    memory(args.patches, args.size)
    if args.cuda:
        cuda_steps(args.patches, args.size, args.reps)
    plain = step_time(False, args.cpu_patches, args.cpu_size, args.reps)
    ckpt = step_time(True, args.cpu_patches, args.cpu_size, args.reps)
    print(f"one step, resnet18, {args.cpu_patches} patches of {args.cpu_size} px on this CPU "
          f"(median of {args.reps}): {plain:.3f} s without, {ckpt:.3f} s with checkpointing "
          f"({ckpt / plain:.2f}x the time)")


if __name__ == "__main__":
    main()
