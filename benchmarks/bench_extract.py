"""Feature extraction speed, measured side by side in one run on one slide. Prints rates and ratios.

On the same patches of the same slide, with the same encoder and threads:

1. ``extract``: our whole ``extract_features`` (patch reading by direct tile decoding, in loader worker
   processes on machines with 8 or more cores; channels_last, BatchNorm folding, DenseNets rearranged
   (``histotransfer.features.densenet_inference``), inference mode, streaming HDF5 writes), in patches/s.
2. ``clam-style``: the usual baseline: one process, OpenSlide ``read_region`` per patch, PIL image,
   ``ToTensor`` + ``Normalize``, the encoder in NCHW, reading and encoding never overlapping.
   Target: extract >= 2x clam-style.
3. ``encoder``: the encoder alone on pixels already in memory (its ceiling), and its achieved GFLOP/s
   (FLOPs of the network as it runs, counted by ``torch.utils.flop_counter``) as a fraction of this
   machine's fp32 matmul peak, measured here with a large ``torch.mm``.
4. ``loader``: our loader alone (the same worker processes, no encoder), patches/s.
   Target: loader >= 3x encoder, so reading is never the bottleneck.

5. ``clam-style reading``: the baseline's reading alone (OpenSlide, PIL, ToTensor, Normalize).
6. ``loader, gpu decode``: the loader when the worker processes only read the compressed JPEG tiles and this
   process decodes them with nvJPEG and assembles and resizes the patches on the GPU
   (``histotransfer.features.gpu_decode``), beside the CPU-decoding loader of 4. Target on a GPU: >= 1.5x the
   encoder (CPU decoding in 8 loader processes reached 0.9x for ResNet18-t2 on an H200). With ``--device cpu``
   the same code path decodes with torchvision's libjpeg-turbo in this process: a check that it runs and gives
   the CPU loader's pixels (printed: largest and mean difference), and its rate.
7. ``extract, gpu decode``: ``extract_features(..., decode="gpu")`` end to end (skipped, saying so, without
   CUDA).

Then every truncation of one network (``--multi``, default DenseNet121, truncate 0 1 2 3), end to end:

8. one ``extract_features`` pass per truncation vs one pass for all of them (``truncate=[0, 1, 2, 3]``), in
   patches/s, and the ratios "one pass for all four" / "the full network alone" (target <= 1.15) and "one pass
   for all four" / "the four passes". The same on pixels already in memory (the encoder alone), and whether
   the one pass wrote the same bytes as the four.

Then stain normalisation at extraction (``--stain``, default ResNet18 cut after layer2), end to end:

9. ``extract_features`` without normalisation, with Reinhard and with Macenko (each slide's source stain
   estimated once, the default scope), on the same ``--stain-slides`` demo slides (several small slides: the
   per-slide estimate is paid once per slide), the reference being each slide's fullest patch; patches/s and
   the ratio plain / normalised. Target: within 1.3x of plain.

Each measurement is repeated ``--repeats`` times, interleaved, and the median kept: the machine may be shared.
Defaults: the real Aperio slide from ../shared when present (else a synthetic one), tiled at 20x into 224 px
patches with a 112 px stride (so that a small slide gives enough patches), first 128 patches; two encoders:
DenseNet121 with the real ImageNet weights from ../shared (else random) and ResNet18 cut after layer2.

On a GPU machine, ``--device cuda`` runs both encoders (ours and the baseline's) on the GPU; the matmul peak is
then the GPU's true-fp32 rate; ``--precision bf16`` runs our encoder in bf16 autocast and compares its GFLOP/s
with the GPU's bf16 matmul rate (e.g. DenseNet121 at 512 px: ``--configs densenet121:0 --patch-size 512``).
``--decode-only`` times only 3, 4, 6, extract with CPU decoding and 7 (CPU vs GPU
decoding side by side) and leaves 8 out.

``--quick`` measures 32 patches (and 2 stain slides) once (about a minute on 2 cores) instead of the median of
three runs of 128.

Run: ``.venv/bin/python benchmarks/bench_extract.py [--configs resnet18:1 --weights random] [--device cuda]``
(``--configs none`` or ``--multi none`` leaves a part out).
GPU decoding vs CPU decoding on a GPU machine: ``.venv/bin/python benchmarks/bench_extract.py`` with
``--device cuda --configs resnet18:2 --decode-only --stride 24 --max-patches 4096``
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import torch
import torchvision.transforms as T
from torch.utils.flop_counter import FlopCounterMode

from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder, create_encoders
from histotransfer.errors import HistotransferError
from histotransfer.features import extract_features, read_feature_file
from histotransfer.features.extract import BatchEncoder, inference_model
from histotransfer.features.gpu_decode import DecodedBatches, TileDecoder
from histotransfer.features.loader import PatchBatches, SlideJob, default_workers, patch_loader
from histotransfer.patches import read_patch_file, write_patch_file
from histotransfer.patches.tiling import tile_slides
from histotransfer.runtime import check_precision, precision_context
from histotransfer.stain import write_reference_patches

SHARED = Path(__file__).resolve().parents[2] / "shared"
CMU = SHARED / "data" / "CMU-1-Small-Region.svs"
DENSENET = SHARED / "weights" / "densenet121_imagenet_from_keras.safetensors"


def elapsed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak_gflops(device: torch.device, reps: int = 5, precision: str = "fp32") -> float:
    """GFLOP/s of a large square matmul on ``device`` at ``precision`` (best of ``reps``; fp32: true fp32 on a
    GPU, no TF32; bf16/fp16: matrices of that type, the rate the encoder's autocast convolutions can reach)."""
    n = 2048 if device.type == "cpu" else 8192
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def mm() -> None:
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with precision_context(device, "fp32"):
        mm()
        best = min(elapsed(mm) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"


def flops_per_patch(model: torch.nn.Module, size: int) -> float:
    x = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_batches(job: SlideJob, batch_size: int, workers: int, device: torch.device, decode: str):
    """The loader's batches of one slide: pixels decoded by the worker processes ("cpu"), or compressed tiles
    decoded on ``device`` by this process ("gpu")."""
    loader = patch_loader(PatchBatches([job], batch_size, decode=decode), workers, pin_memory=False)
    return DecodedBatches(loader, TileDecoder(device)) if decode == "gpu" else loader


def decode_agreement(job: SlideJob, batch_size: int, device: torch.device) -> str:
    """How the GPU-decoding path's pixels differ from the CPU loader's, and where its tiles were decoded."""
    cpu = torch.cat([b.pixels for b in loader_batches(job, batch_size, 0, device, "cpu")])
    items = list(loader_batches(job, batch_size, 0, device, "gpu"))
    errors = [b.error for b in items if b.error]
    if errors:
        return f"failed: {errors[0]}"
    gpu = torch.cat([b.pixels.cpu() for b in items])
    diff = (gpu.int() - cpu.int()).abs().float()
    return (
        f"max difference {diff.max().item():.0f} levels, mean {diff.mean().item():.4f}; tiles decoded on "
        f"{', '.join(sorted({b.decode for b in items}))}"
    )


def clam_style(
    slide_path: str,
    coords: np.ndarray,
    level: int,
    read_size: int,
    input_size: int,
    model: torch.nn.Module,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """The baseline: read a patch, make it a tensor, batch, encode; one step after the other."""
    transform = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    out = []
    with openslide.OpenSlide(slide_path) as slide, torch.inference_mode():
        for start in range(0, len(coords), batch_size):
            batch = []
            for x, y in coords[start : start + batch_size]:
                img = slide.read_region((int(x), int(y)), level, (read_size, read_size)).convert("RGB")
                if read_size != input_size:
                    img = img.resize((input_size, input_size))
                batch.append(transform(img))
            with precision_context(device, "fp32"):
                out.append(model(torch.stack(batch).to(device)).cpu().numpy())
    return np.concatenate(out)


def bench_config(
    slide: str,
    patches: Path,
    patch_file: Path,
    encoder: str,
    weights: str,
    truncate: int,
    batch_size: int,
    workers: int,
    repeats: int,
    tmp: Path,
    device: torch.device,
    decode_only: bool = False,
    precision: str = "fp32",
) -> None:
    """Time extract (CPU and GPU decoding), the CLAM-style baseline, the encoder alone, the loader alone (CPU
    and GPU decoding) and the baseline's reading alone, interleaved (``decode_only``: no baseline). Ours runs
    at ``precision``; the baseline stays fp32, as CLAM's loop runs."""
    ps = read_patch_file(patch_file)
    spec, coords, n = ps.spec, ps.coords, len(ps.coords)
    size = spec.patch_size
    with openslide.OpenSlide(slide) as osr:
        read_size = round(spec.patch_size_level0 / osr.level_downsamples[spec.patch_level])

    model = create_encoder(encoder, weights, truncate)
    encode = BatchEncoder(model, device, precision)
    pixels = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    with torch.inference_mode():  # build both memory formats' kernels once before any timing
        encode(pixels)
        create_encoder(encoder, weights, truncate).to(device)(torch.zeros(batch_size, 3, size, size, device=device))

    def run_encoder() -> None:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                encode(pixels[: min(batch_size, n - start)])

    job = SlideJob(ps.slide_id, slide, patch_file, coords, spec)

    def run_loader(decode: str) -> None:
        for _ in loader_batches(job, batch_size, workers, device, decode):
            pass
        synchronize(device)

    outs: list[Path] = []

    def run_extract(n_workers: int, decode: str = "cpu") -> None:  # end to end, building the encoder included
        out = tmp / f"out{len(outs)}"
        outs.append(
            extract_features(
                patches,
                out,
                encoder,
                weights,
                truncate,
                batch_size=batch_size,
                workers=n_workers,
                device=device.type,
                decode=decode,
                precision=precision,
            )
        )

    baseline: list[np.ndarray] = []

    def run_baseline() -> None:  # end to end, building the encoder included
        base_model = create_encoder(encoder, weights, truncate).to(device)
        baseline.append(clam_style(slide, coords, spec.patch_level, read_size, size, base_model, batch_size, device))

    def run_baseline_reading() -> None:
        clam_style(
            slide, coords, spec.patch_level, read_size, size, lambda x: x[:, :1, 0, 0], batch_size, torch.device("cpu")
        )

    extract_key = f"extract, {workers} worker(s)"
    steps = {
        extract_key: lambda: run_extract(workers),
        "clam-style": run_baseline,
        "encoder": run_encoder,
        "loader": lambda: run_loader("cpu"),
        "clam-style reading": run_baseline_reading,
        "loader, gpu decode": lambda: run_loader("gpu"),
    }
    skipped = []
    if device.type == "cuda":
        steps[f"{extract_key}, gpu decode"] = lambda: run_extract(workers, "gpu")
    else:
        skipped.append("extract with GPU decoding (needs --device cuda)")
    if decode_only:
        steps = {k: v for k, v in steps.items() if not k.startswith("clam-style")}
        skipped.append("the CLAM-style baseline (--decode-only)")
    timings: dict[str, list[float]] = {k: [] for k in steps}
    peaks = []
    for _ in range(repeats):
        for key, fn in steps.items():
            timings[key].append(elapsed(fn))
        if not decode_only:
            peaks.append(matmul_peak_gflops(device, precision=precision))
    rate = {k: n / statistics.median(v) for k, v in timings.items()}
    ours = rate[extract_key]

    print(
        f"\n{encoder} truncate {truncate} ({Path(weights).name} weights): {n} patches of {size} px from "
        f"{Path(slide).name} level {spec.patch_level}; batch {batch_size}, {torch.get_num_threads()} torch "
        f"threads, {os.cpu_count()} cores, encoder on {device_name(device)} in {precision}; median of {repeats}"
    )
    for key in steps:
        if key.startswith("extract"):
            print(f"  {key + ' (ours)':32} {rate[key]:8.1f} patches/s")
    print(f"  {f'loader alone, {workers} worker(s)':32} {rate['loader']:8.1f} patches/s  (CPU decoding)")
    print(
        f"  {'loader alone, gpu decode':32} {rate['loader, gpu decode']:8.1f} patches/s  (tiles decoded on "
        f"{device_name(device)})"
    )
    print(f"  gpu-decode pixels vs the CPU loader's: {decode_agreement(job, batch_size, device)}")
    print(f"  {'encoder alone':32} {rate['encoder']:8.1f} patches/s")
    print(f"  ratio loader / encoder             {rate['loader'] / rate['encoder']:6.2f}x  (CPU decoding; target >= 3)")
    print(
        f"  ratio loader gpu decode / encoder  {rate['loader, gpu decode'] / rate['encoder']:6.2f}x  "
        f"(target >= 1.5 on a GPU)"
    )
    print(f"  ratio loader gpu / cpu decode      {rate['loader, gpu decode'] / rate['loader']:6.2f}x")
    if f"{extract_key}, gpu decode" in rate:
        print(f"  ratio extract gpu / cpu decode     {rate[f'{extract_key}, gpu decode'] / ours:6.2f}x")
    for what in skipped:
        print(f"  skipped: {what}")
    if decode_only:
        return
    peak = statistics.median(peaks)
    gflop_network = flops_per_patch(model.cpu(), size) / 1e9
    gflop = flops_per_patch(inference_model(model), size) / 1e9  # what the encoder runs (DenseNets: fewer)
    feats = read_feature_file(outs[0] / f"{ps.slide_id}.h5").features
    agree = float(np.abs(feats - baseline[-1]).max() / max(np.abs(baseline[-1]).max(), 1e-12))
    print(f"  {'clam-style baseline':32} {rate['clam-style']:8.1f} patches/s")
    print(
        f"  encoder: {gflop:.2f} GFLOP/patch run, {gflop * rate['encoder']:.1f} GFLOP/s; the torchvision "
        f"network: {gflop_network:.2f} GFLOP/patch"
    )
    print(f"  {'clam-style reading alone':32} {rate['clam-style reading']:8.1f} patches/s")
    print(f"  {precision + ' matmul peak':32} {peak:8.1f} GFLOP/s")
    print(f"  features ours vs baseline: max difference {agree:.1e} of the largest value")
    print(f"  ratio extract / clam-style         {ours / rate['clam-style']:6.2f}x  (target >= 2)")
    print(f"  ratio loader / clam-style reading  {rate['loader'] / rate['clam-style reading']:6.2f}x")
    print(f"  ratio encoder GFLOP/s / peak       {gflop * rate['encoder'] / peak:6.2f}")
    print(f"  ratio extract / encoder            {ours / rate['encoder']:6.2f}   (1.0: reading costs nothing)")
    ceiling = max(peaks) / gflop / rate["clam-style"]
    print(f"  ceiling of extract / clam-style    {ceiling:6.2f}x  (the encoder at the best matmul peak, reading free)")


def default_weights(encoder: str, weights: str | None) -> str:
    """``weights`` if given and they fit ``encoder``, else the ../shared DenseNet121 ImageNet weights for
    densenet121, else random. A weights file of another architecture (DenseNet weights with ``--configs`` naming
    ResNet18 too) is used only for the configs it fits; the others are said to fall back to their default."""
    fallback = str(DENSENET) if DENSENET.exists() and encoder == "densenet121" else "random"
    if weights is None:
        return fallback
    try:
        create_encoder(encoder, weights, 0)
    except HistotransferError as exc:
        if not Path(weights).is_file():
            raise SystemExit(f"--weights {weights}: {exc}") from None
        print(
            f"--weights {weights} does not fit {encoder} ({' '.join(str(exc).split())[:160]}); "
            f"{encoder} runs with {Path(fallback).name} weights"
        )
        return fallback
    return weights


def median_rates(
    steps: dict[str, Callable[[], object]], n: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Patches/s of each step (``n`` patches a run) by wall time and by this process's CPU time (all its
    threads), each the median of ``repeats`` interleaved runs.

    The CPU time hardly changes when other programs share the machine; on a CPU with in-process reading (the
    default on small machines) it is the whole cost of a pass."""
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, fn in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    return (
        {k: n / statistics.median(v) for k, v in wall.items()},
        {k: n / statistics.median(v) for k, v in cpu.items()},
    )


def bench_truncations(
    patches: Path,
    patch_file: Path,
    encoder: str,
    weights: str,
    truncations: list[int],
    batch_size: int,
    workers: int,
    repeats: int,
    tmp: Path,
    device: torch.device,
) -> None:
    """One extraction pass per truncation vs one pass for all of them, end to end and encoder alone."""
    ps = read_patch_file(patch_file)
    n, size = len(ps.coords), ps.spec.patch_size
    runs = 0
    last: dict[int, Path] = {}  # the folder each truncation's last separate pass wrote
    together: dict[int, Path] = {}  # the folders of the last one pass for all

    def run_extract(truncate: int | list[int]) -> None:  # end to end, building the encoders included
        nonlocal runs
        runs += 1
        out = extract_features(
            patches,
            tmp / f"out{runs}",
            encoder,
            weights,
            truncate,
            batch_size=batch_size,
            workers=workers,
            device=device.type,
        )
        if isinstance(out, dict):
            together.update(out)
        else:
            last[truncate] = out

    encoders = list(create_encoders(encoder, weights, truncations).values())
    encode = {t: BatchEncoder(e, device, "fp32") for t, e in zip(truncations, encoders)}
    encode_all = BatchEncoder(encoders, device, "fp32")
    pixels = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)

    def run_encoder(fn: Callable[[torch.Tensor], object]) -> None:
        for start in range(0, n, batch_size):
            fn(pixels[: min(batch_size, n - start)])

    run_extract(truncations)  # warm-up: builds every stage's kernels once before any timing
    separate = {f"t{t} alone": functools.partial(run_extract, t) for t in truncations}
    steps = {**separate, "one pass, all": functools.partial(run_extract, truncations)}
    rates: dict[str, dict[str, float]] = {}
    rates["extract"], rates["extract CPU"] = median_rates(steps, n, repeats)
    enc_steps = {
        **{f"t{t} alone": functools.partial(run_encoder, encode[t]) for t in truncations},
        "one pass, all": functools.partial(run_encoder, encode_all.features),
    }
    rates["encoder"], rates["encoder CPU"] = median_rates(enc_steps, n, repeats)
    same = all(
        together[t].name == last[t].name
        and [p.read_bytes() for p in sorted(together[t].glob("*.h5"))]
        == [p.read_bytes() for p in sorted(last[t].glob("*.h5"))]
        for t in truncations
    )

    names = ", ".join(map(str, truncations))
    print(
        f"\n{encoder} truncations {names} ({Path(weights).name} weights): {n} patches of {size} px; batch "
        f"{batch_size}, {torch.get_num_threads()} torch threads, encoder on {device_name(device)}; median of "
        f"{repeats}"
    )
    print(f"  {'patches/s (wall or CPU time)':32}" + "".join(f"{k:>13}" for k in rates))
    for key in steps:
        print(f"  {key:32}" + "".join(f"{r[key]:13.1f}" for r in rates.values()))
    full, t_sum = [], []
    for r in rates.values():
        t_one = 1 / r["one pass, all"]
        full.append(t_one * r[f"t{truncations[0]} alone"])
        t_sum.append(t_one / sum(1 / r[k] for k in separate))
    print(
        f"  {f'ratio one pass / t{truncations[0]} alone':32}"
        + "".join(f"{x:12.2f}x" for x in full)
        + "  (time; target <= 1.15)"
    )
    print(f"  {f'ratio one pass / the {len(truncations)} passes':32}" + "".join(f"{x:12.2f}x" for x in t_sum))
    print(f"  one pass wrote the same bytes as the {len(truncations)} passes: {'yes' if same else 'NO'}")


def bench_stain(
    n_slides: int,
    patch_size: int,
    magnification: float,
    encoder: str,
    weights: str,
    truncate: int,
    batch_size: int,
    workers: int,
    repeats: int,
    tmp: Path,
    device: torch.device,
) -> None:
    """Extraction without stain normalisation, with Reinhard and with Macenko (per-slide source estimates) on
    the same demo slides, interleaved; patches/s and the ratios to plain extraction."""
    demo = make_demo_slides(tmp / "demo", n_slides, seed=0, size=2048, mpp=0.5)
    tiled = tile_slides(
        demo.slides, tmp / "tiles", magnification=magnification, patch_size=patch_size, stride=patch_size
    )
    n = sum(len(read_patch_file(p).coords) for p in tiled.patches.glob("*.h5"))
    reference = write_reference_patches(tiled.patches, tmp / "reference")
    options = {
        "plain": {},
        "reinhard": {"stain_norm": "reinhard", "stain_ref": str(reference)},
        "macenko": {"stain_norm": "macenko", "stain_ref": str(reference)},
    }
    runs = iter(range(1 << 30))

    def step(kw: dict[str, str]) -> Callable[[], object]:
        return lambda: extract_features(
            tiled.patches,
            tmp / f"out{next(runs)}",
            encoder,
            weights,
            truncate,
            batch_size=batch_size,
            workers=workers,
            device=device.type,
            **kw,
        )

    wall, cpu = median_rates({k: step(kw) for k, kw in options.items()}, n, repeats)
    print(
        f"\nstain normalisation at extraction: {encoder} t{truncate}, {n_slides} slides, {n} patches of "
        f"{patch_size} px, {workers} loader worker(s), {torch.get_num_threads()} threads, median of {repeats}"
    )
    for key in options:
        print(
            f"  {key:9} {wall[key]:7.1f} patches/s (cpu {cpu[key]:7.1f})   plain / {key}: "
            f"{wall['plain'] / wall[key]:.2f}x (cpu {cpu['plain'] / cpu[key]:.2f}x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default=str(CMU) if CMU.exists() else None)
    ap.add_argument(
        "--configs",
        default="densenet121:0,resnet18:2",
        help="comma-separated ENCODER:TRUNCATE (default densenet121:0,resnet18:2; none: skip)",
    )
    ap.add_argument(
        "--multi",
        default="densenet121:0,1,2,3",
        help="ENCODER:T,T,..: separate passes per truncation vs one pass for all (default "
        "densenet121:0,1,2,3; none: skip)",
    )
    ap.add_argument(
        "--stain",
        default="resnet18:2",
        help="ENCODER:TRUNCATE of the stain normalisation comparison (default resnet18:2; none: skip)",
    )
    ap.add_argument("--stain-slides", type=int, default=4, help="demo slides of the stain comparison (default 4)")
    ap.add_argument("--quick", action="store_true", help="32 patches, measured once")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 gives steadier ratios on a machine shared with "
        "other programs, where threads waiting for each other make wall and CPU time erratic",
    )
    ap.add_argument(
        "--weights",
        default=None,
        help="weights for every config they fit: a name (random, imagenet) for all, a file for the "
        "configs of its architecture, the others keeping their default (../shared DenseNet121 "
        "weights for densenet121, else random)",
    )
    ap.add_argument("--patch-size", type=int, default=224)
    ap.add_argument("--magnification", type=float, default=20.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="loader processes (default: extract's default)")
    ap.add_argument("--max-patches", type=int, default=128)
    ap.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tiling stride in px (default: half the patch size); a small stride gives a small slide "
        "enough (overlapping) patches to time a GPU",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the encoders run, ours and the baseline's: cpu or cuda")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="our encoder's precision (bf16/fp16: CUDA only), and the matmul peak it is compared with",
    )
    ap.add_argument(
        "--decode-only",
        action="store_true",
        help="time only the encoder, the loader and extract with CPU and with GPU decoding",
    )
    args = ap.parse_args()
    if args.quick:
        args.max_patches, args.repeats, args.stain_slides = 32, 1, 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        check_precision(args.precision, device)
    except HistotransferError as exc:
        raise SystemExit(str(exc)) from None

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        slide = args.slide or str(make_demo_slides(tmp / "demo", 1, seed=0, size=4096, mpp=0.5).slides[0])
        tiled = tile_slides(
            [slide],
            tmp / "tiles",
            magnification=args.magnification,
            patch_size=args.patch_size,
            stride=args.stride or args.patch_size // 2,
        )
        if tiled.results[0].status != "ok":
            raise SystemExit(f"tiling {slide} gave no patches: {tiled.results[0].message}")
        tiled_file = next(tiled.patches.glob("*.h5"))
        ps = read_patch_file(tiled_file)
        patches = tmp / "patches"
        patch_file = patches / tiled_file.name
        keep = slice(0, args.max_patches)
        write_patch_file(patch_file, ps.coords[keep], ps.tissue_fraction[keep], ps.spec)
        workers = default_workers(device) if args.workers is None else args.workers
        for config in [] if args.configs == "none" else args.configs.split(","):
            encoder, truncate = config.split(":")
            bench_config(
                slide,
                patches,
                patch_file,
                encoder,
                default_weights(encoder, args.weights),
                int(truncate),
                args.batch_size,
                workers,
                args.repeats,
                tmp / config.replace(":", "-"),
                device,
                args.decode_only,
                args.precision,
            )
        if args.multi != "none" and not args.decode_only:
            encoder, truncations = args.multi.split(":")
            bench_truncations(
                patches,
                patch_file,
                encoder,
                default_weights(encoder, args.weights),
                [int(t) for t in truncations.split(",")],
                args.batch_size,
                workers,
                args.repeats,
                tmp / "multi",
                device,
            )
        if args.stain != "none" and not args.decode_only:
            encoder, truncate = args.stain.split(":")
            bench_stain(
                args.stain_slides,
                args.patch_size,
                args.magnification,
                encoder,
                default_weights(encoder, args.weights),
                int(truncate),
                args.batch_size,
                workers,
                args.repeats,
                tmp / "stain",
                device,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
