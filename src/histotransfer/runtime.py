"""Where and how tensors are computed: the device, the numeric precision and this process's rank.

Every stage that runs a network (extraction, fine-tuning, CKA, CAMs) takes these from here, so "auto" means the
same device, "fp32" the same arithmetic and a torchrun rank the same GPU everywhere.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import HistotransferError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
# A rank that finishes early waits at the final barrier for the others: allow for long runs.
BARRIER_TIMEOUT = timedelta(days=7)


def torchrun_local_rank() -> int:
    """This process's GPU index on its node under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; under torchrun each rank takes GPU ``LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HistotransferError(f"device '{device}': choose auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HistotransferError("device cuda: no CUDA GPU is visible to PyTorch; use --device cpu.")
    if device == "cuda":
        return torch.device("cuda", torchrun_local_rank())
    return torch.device(device)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision this device cannot run (bf16/fp16 autocast is for GPUs: this CPU has no fast bf16)."""
    if precision not in PRECISIONS:
        raise HistotransferError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
    if precision in AUTOCAST_DTYPES and device.type != "cuda":
        raise HistotransferError(f"precision {precision} runs on a CUDA GPU only; use --precision fp32 on CPU.")


@contextmanager
def precision_context(device: torch.device, precision: str) -> Iterator[None]:
    """Run the enclosed forward passes at ``precision`` on ``device``.

    bf16/fp16: autocast (GPU only). fp32: true IEEE float32 on the GPU as well. PyTorch runs float32
    convolutions as TF32 on recent NVIDIA GPUs by default, whose 10-bit mantissa moves features by about 1e-3
    relative; fp32 here means the same numbers as on the CPU, to float32 rounding.
    """
    if device.type != "cuda":
        yield
        return
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None:
        with torch.autocast("cuda", dtype=dtype):
            yield
        return
    # cudnn.conv is set on torch's module subclass (CudnnModule); the stub of torch.backends.cudnn lacks it.
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul  # type: ignore[attr-defined]
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@dataclass
class Ranks:
    """This process's place in a torchrun job; ``owns_group`` when it started the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_ranks(device: torch.device) -> Ranks:
    """Join the process group that ``torchrun`` describes (env ``RANK``/``WORLD_SIZE``), if any.

    gloo for CPU, nccl for CUDA. A group already set up by the caller is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), torchrun_local_rank(), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return Ranks()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), torchrun_local_rank(), True)


def shard(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Split items across ``world`` ranks balancing their sizes (largest first to the least loaded rank).

    Deterministic: ties are broken by item id and rank number. Each rank's list is sorted by id.
    """
    heap = [(0, r) for r in range(world)]
    out: list[list[str]] = [[] for _ in range(world)]
    for item, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        load, r = heapq.heappop(heap)
        out[r].append(item)
        heapq.heappush(heap, (load + max(n, 1), r))
    return [sorted(ids) for ids in out]
