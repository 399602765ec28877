"""Sharding extraction across processes started by ``torchrun`` (one per GPU, any number of nodes).

Every rank sees the same patch files and computes the same assignment, so each slide is done by exactly one
rank without any coordination beyond a final barrier.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank that finishes early waits at the final barrier for the others: allow for long runs.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class Ranks:
    """This process's place in the job; ``owns_group`` when it started the process group."""

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


def torchrun_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


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
    """Split slides across ``world`` ranks balancing patch counts (largest first to the least loaded rank).

    Deterministic: ties are broken by slide id and rank number. Each rank's list is sorted by slide id.
    """
    heap = [(0, r) for r in range(world)]
    out: list[list[str]] = [[] for _ in range(world)]
    for slide_id, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        load, r = heapq.heappop(heap)
        out[r].append(slide_id)
        heapq.heappush(heap, (load + max(n, 1), r))
    return [sorted(ids) for ids in out]
