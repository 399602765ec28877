"""Memory and time of one end-to-end fine-tuning step: gradient checkpointing, and for a ViT-L/16 low-rank
adaptation, side by side.

Memory: the tensors autograd saves for the backward pass of 64 patches of 512 px through DenseNet121 + the MIL
head, counted exactly on the ``meta`` device (shapes only, no compute, no GPU needed), with and without
per-stage checkpointing. With checkpointing, the backward pass recomputes one stage at a time, so the peak is
the kept stage inputs plus the largest single stage's saved tensors plus weights, gradients and Adam moments.

The same estimate for a ViT-L/16 (UNI's network) at 64 patches of 224 px, five ways: full fine-tuning;
checkpointed per quarter stage (6 blocks recomputed at once) or per block (what fine-tuning does for
transformers); LoRA rank 8 on qkv, proj, fc1, fc2 (only its matrices and the head train), without and with
per-block checkpointing. The meta device runs attention by its math path, which keeps each block's
(B x heads, N, N) attention matrix; fused attention on a GPU keeps only q, k, v, the output and one float per
row, so those matrices are left out of the estimate (their total is printed). Trainable parameter counts are
exact. ``--vit-encoder prov-gigapath`` gives the same for a 1.1 B-parameter ViT-g.

Time: one training step (forward, backward, Adam) measured on this machine's CPU, both ways, side by side;
for transformers a ViT-S/16 (UNI's arguments, 12 blocks of width 384) at 4 patches of 224 px, all five ways.

With ``--cuda`` (a GPU machine), the estimates are checked against the real thing: the same DenseNet121 and
ViT-L/16 steps on the GPU, fp32 and bf16 autocast, each printing the peak of
``torch.cuda.max_memory_allocated`` and the median step time.

    python benchmarks/bench_finetune.py [--patches 64] [--size 512] [--vit-patches 64] [--cuda]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from histotransfer.encoders import Encoder, create_encoder, encoder_info
from histotransfer.encoders.vit import VIT_ENCODERS, token_pool, vit_stages
from histotransfer.finetune.model import EndToEndMIL, Lora, checkpoint_units
from histotransfer.mil import AttentionMIL
from histotransfer.runtime import precision_context

GiB = 2**30


def saved_bytes(fn, square: int | None = None) -> int:
    """Bytes of the distinct storages autograd saves while running ``fn``; with ``square``, leaving out
    (..., square, square) tensors (attention matrices over ``square`` tokens)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if square is None or t.dim() < 2 or t.shape[-2:] != (square, square):
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
        largest = max(largest, saved_bytes(functools.partial(stage, h)))
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
    print(
        f"  estimated peak: {peak_plain / GiB:.1f} GiB without, {peak_ckpt / GiB:.1f} GiB with checkpointing "
        f"({peak_plain / peak_ckpt:.1f}x less); a 24 GB GPU holds 22.3 GiB"
    )


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


def cuda_step_result(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, precision: str, reps: int
) -> str:
    """Peak GPU memory and median step time of ``reps`` end-to-end steps on one bag (after one warm-up)."""
    device = x.device
    target = torch.tensor([1], device=device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with precision_context(device, precision):
            logits, _ = model(x, [len(x)])
        loss = F.cross_entropy(logits.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return (
        f"peak {torch.cuda.max_memory_allocated(device) / GiB:6.2f} GiB allocated, step "
        f"{statistics.median(times[1:]):.3f} s (median of {reps})"
    )


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
            result = cuda_step_result(model, optimizer, x, precision, reps)
            print(f"  {precision}, checkpointing {'on ' if checkpointing else 'off'}: {result}", flush=True)
            del model, optimizer, x
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Way:
    """One way of fine-tuning a transformer: a label, LoRA or not, and what is recomputed ("none", "stage"
    for quarter stages, "block")."""

    label: str
    lora: bool
    recompute: str


def ways(rank: int) -> list[Way]:
    return [
        Way("full fine-tuning", False, "none"),
        Way("full, per-stage checkpointing (quarters)", False, "stage"),
        Way("full, per-block checkpointing", False, "block"),
        Way(f"LoRA rank {rank}", True, "none"),
        Way(f"LoRA rank {rank}, per-block checkpointing", True, "block"),
    ]


def vit_model(encoder: Encoder, way: Way, rank: int) -> EndToEndMIL:
    model = EndToEndMIL(
        encoder,
        AttentionMIL(encoder.feature_dim),
        checkpointing=way.recompute != "none",
        lora=Lora(rank) if way.lora else None,
    )
    return model.train()


def activation_bytes(model: EndToEndMIL, x: torch.Tensor, recompute: str, tokens: int) -> tuple[int, int]:
    """Saved activations of one step at their peak, without attention matrices: all of them without
    checkpointing, else the inputs kept for each recomputed unit plus the largest unit's saved tensors while
    it is recomputed (and the pool and head's). Also returns the attention matrices' bytes left out."""
    if recompute == "none":
        without = saved_bytes(lambda: model(x, [len(x)]), tokens)
        return without, saved_bytes(lambda: model(x, [len(x)])) - without
    kept, largest, h = 0, 0, x
    for stage in model.encoder.body:
        units = checkpoint_units(stage, h) if recompute == "block" else [stage]
        for unit in units:
            kept += h.untyped_storage().nbytes()
            largest = max(largest, saved_bytes(lambda: unit(h), tokens))  # noqa: B023
            with torch.no_grad():
                h = unit(h)
    tail = saved_bytes(lambda: model.head(model.encoder.pool(h.requires_grad_()).float()))
    return kept + largest + tail, 0


def vit_memory(name: str, patches: int, size: int, rank: int) -> None:
    """Estimated peak memory and exact trainable parameters of one fp32 step, every way, side by side."""
    x = torch.empty(patches, 3, size, size, device="meta")
    rows = []
    for way in ways(rank):
        with torch.device("meta"):
            encoder = create_encoder(name, "random")
        model = vit_model(encoder, way, rank).to("meta")
        tokens = encoder.body.stem(x[:1]).shape[1]
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        acts, attention = activation_bytes(model, x, way.recompute, tokens)
        state = 4 * n_all + 3 * 4 * n_train  # float32 weights; gradients and two Adam moments of trained ones
        rows.append((way.label, n_train, n_all, acts, state, attention))
    print(
        f"{name} ({encoder_info(name)['architecture']}) + attention MIL, {patches} patches of {size} px ({tokens} "
        f"tokens), fp32; memory estimated on the meta device, parameters exact:"
    )
    widths = (21, 13, 17, 12, 9)
    header = ("trainable", "activations", "weights, grads,", "est. peak", "vs full")
    print(f"  {'':44}" + "".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    print(
        f"  {'':44}" + "".join(f"{h:>{w}}" for h, w in zip(("parameters", "(saved)", "Adam moments", "", ""), widths))
    )
    full_peak = rows[0][3] + rows[0][4]
    for label, n_train, n_all, acts, state, _ in rows:
        peak = acts + state
        cells = (
            f"{n_train / 1e6:.2f} M ({100 * n_train / n_all:.1f}%)",
            f"{acts / GiB:.2f} GiB",
            f"{state / GiB:.2f} GiB",
            f"{peak / GiB:.2f} GiB",
            f"{full_peak / peak:.1f}x",
        )
        print(f"  {label:44}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print(
        f"  (left out: {rows[0][5] / GiB:.2f} GiB of attention matrices the meta device's math attention keeps "
        "and fused GPU attention does not)"
    )


def small_vit() -> Encoder:
    """A ViT-S/16 with UNI's arguments (12 blocks of width 384, 6 heads), seeded random weights."""
    torch.manual_seed(0)
    network = VIT_ENCODERS["uni"].build(embed_dim=384, depth=12, num_heads=6)
    stages = vit_stages(network)
    return Encoder("vit-s16", stages, 0, "random", None, pool=token_pool("token")(network, stages)).eval()


def vit_step_times(patches: int, size: int, rank: int, reps: int) -> None:
    """One training step of a ViT-S/16 on this CPU, every way, interleaved, median of ``reps``."""
    x = torch.randn(patches, 3, size, size)
    target = torch.tensor([1])
    runs = {}
    for way in ways(rank):
        model = vit_model(small_vit(), way, rank)
        runs[way.label] = (model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5))
    times: dict[str, list[float]] = {label: [] for label in runs}
    for rep in range(reps + 1):
        for label, (model, optimizer) in runs.items():
            t0 = time.perf_counter()
            logits, _ = model(x, [patches])
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if rep:
                times[label].append(time.perf_counter() - t0)
    full = statistics.median(times[ways(rank)[0].label])
    print(f"one step, ViT-S/16 + attention MIL, {patches} patches of {size} px on this CPU (median of {reps}):")
    for label, t in times.items():
        print(f"  {label:44}{statistics.median(t):7.3f} s  {statistics.median(t) / full:5.2f}x full fine-tuning")


def vit_cuda_steps(name: str, patches: int, size: int, rank: int, reps: int) -> None:
    """Peak GPU memory and step time of ViT end-to-end steps, every way, fp32 and bf16, measured on the GPU."""
    device = torch.device("cuda")
    print(f"{name} on {torch.cuda.get_device_name(device)}, {patches} patches of {size} px, torch {torch.__version__}:")
    for precision in ("fp32", "bf16"):
        for way in ways(rank):
            torch.manual_seed(0)
            model = vit_model(create_encoder(name, "random"), way, rank).to(device)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            x = torch.randn(patches, 3, size, size, device=device)
            try:
                result = cuda_step_result(model, optimizer, x, precision, reps)
            except torch.OutOfMemoryError:
                result = "out of memory"
            print(f"  {precision}, {way.label:44} {result}", flush=True)
            del model, optimizer, x
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpu-patches", type=int, default=8)
    parser.add_argument("--cpu-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vit-encoder", default="uni", help="transformer encoder of the ViT rows")
    parser.add_argument("--vit-patches", type=int, default=64)
    parser.add_argument("--vit-size", type=int, default=224)
    parser.add_argument("--vit-cpu-patches", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--cuda", action="store_true", help="also measure the steps on the GPU")
    args = parser.parse_args()
    memory(args.patches, args.size)
    vit_memory(args.vit_encoder, args.vit_patches, args.vit_size, args.lora_rank)
    if args.cuda:
        cuda_steps(args.patches, args.size, args.reps)
        vit_cuda_steps(args.vit_encoder, args.vit_patches, args.vit_size, args.lora_rank, args.reps)
    plain = step_time(False, args.cpu_patches, args.cpu_size, args.reps)
    ckpt = step_time(True, args.cpu_patches, args.cpu_size, args.reps)
    print(
        f"one step, resnet18, {args.cpu_patches} patches of {args.cpu_size} px on this CPU "
        f"(median of {args.reps}): {plain:.3f} s without, {ckpt:.3f} s with checkpointing "
        f"({ckpt / plain:.2f}x the time)"
    )
    vit_step_times(args.vit_cpu_patches, args.vit_size, args.lora_rank, args.reps)


if __name__ == "__main__":
    main()
