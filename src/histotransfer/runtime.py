"""Where and how tensors are computed: the device, the numeric precision and this process's rank.

Every stage that runs a network (extraction, fine-tuning, CKA, CAMs) takes these from here, so "auto" means the
same device, "fp32" the same arithmetic and a torchrun rank the same GPU everywhere.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ._io import error_message
from .errors import HistotransferError, RankFailure, error_line

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
# A rank that finishes early waits at the final barrier for the others: allow for long runs.
BARRIER_TIMEOUT = timedelta(days=7)
POLL_SECONDS = 0.05
# How long a rank whose step failed waits for the others to end the step too (then they go on together); a rank
# not done by then waits in a collective for the failed one, and the job stops.
STEP_GRACE_SECONDS = 10.0
# How long a stopping rank waits for the others to print the job's error before it exits.
REPORT_SECONDS = 15.0
_jobs = itertools.count()


def torchrun_local_rank() -> int:
    """This process's GPU index on its node under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str) -> torch.device:
    """ "auto" is CUDA when available, else CPU; under torchrun each rank takes GPU ``LOCAL_RANK``."""
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


class FailureWatch:
    """A torchrun job's record of its first failure, in the job's key-value store (which every rank reaches even
    while a collective hangs).

    The first rank to fail writes its one-line message; a thread on every rank watches for it, prints it as this
    process's error and, once every rank has printed it, ends the process. A rank waiting in a collective for
    the failed one (which would else wait for the timeout or die with "Connection closed by peer") stops at once.
    """

    def __init__(self, store: Any, rank: int, world: int, name: str) -> None:
        self.store, self.rank, self.world, self.name = store, rank, world, name
        self.claim = threading.Lock()  # held by the thread that reports the failure in this process
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="histotransfer-failure-watch", daemon=True)
        self.thread.start()

    def _key(self, *parts: object) -> str:
        return "/".join([self.name, *map(str, parts)])

    def _watch(self) -> None:
        key = self._key("failure")
        try:
            while not self.stopped.wait(POLL_SECONDS):
                if self.store.check([key]) and self.claim.acquire(blocking=False):
                    self._report(self.store.get(key).decode())
                    os._exit(2)
        except Exception:  # the store went away with the job: nothing left to watch
            return

    def _report(self, message: str) -> None:
        print(error_line(message), file=sys.stderr, flush=True)
        sys.stdout.flush()
        reported = self._key("reported")
        self.store.add(reported, 1)
        deadline = time.monotonic() + REPORT_SECONDS
        while self.store.add(reported, 0) < self.world and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)

    def fail(self, message: str) -> str:
        """Record ``message`` as the job's failure unless another rank failed first; print the job's failure once
        every rank is told; return it."""
        if not self.claim.acquire(blocking=False):
            threading.Event().wait()  # the watch thread is reporting a failure and ends this process
        shared = self.store.compare_set(self._key("failure"), "", message).decode()
        self._report(shared)
        return shared

    def agree(self, step: str, message: str | None) -> str | None:
        """The first failing rank's message for ``step`` (one all ranks run), None when it failed nowhere, once
        every rank has ended it. A rank whose step failed waits :data:`STEP_GRACE_SECONDS` for the others, then
        stops the job (:class:`RankFailure`): they wait in a collective for it."""
        mine = self._key("step", step, self.rank)
        self.store.set(mine, "ok" if message is None else f"failed:{message}")
        keys = [self._key("step", step, r) for r in range(self.world)]
        deadline = time.monotonic() + STEP_GRACE_SECONDS if message is not None else float("inf")
        while not self.store.check(keys):  # should a rank fail meanwhile, the watch thread ends this process
            if time.monotonic() > deadline:
                raise RankFailure(self.fail(f"rank {self.rank}: {message}"))
            time.sleep(POLL_SECONDS)
        outcomes = [self.store.get(k).decode() for k in keys]
        return next((o.split(":", 1)[1] for o in outcomes if o != "ok"), None)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


@dataclass
class Ranks:
    """This process's place in a torchrun job; ``owns_group`` when it started the process group (and then
    ``watch`` shares a failure of any rank with every rank)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    watch: FailureWatch | None = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, step: str, message: str | None) -> str | None:
        """After ``step``, which every rank runs: the first failing rank's message (``message`` is this rank's,
        None when it succeeded), None when no rank failed. Every rank gets the same answer."""
        if not self.distributed:
            return message
        if self.watch is not None:
            return self.watch.agree(step, message)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, message)
        return next((p for p in parts if p is not None), None)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
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
    rank = dist.get_rank()
    name = f"histotransfer/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_jobs)}"
    watch = FailureWatch(dist.distributed_c10d._get_default_store(), rank, world, name)
    return Ranks(rank, world, torchrun_local_rank(), True, watch)


@contextmanager
def joined(ranks: Ranks | None, device: torch.device) -> Iterator[Ranks]:
    """The ranks of the enclosed work: ``ranks`` (the caller's, left open), else the torchrun job this process is
    in, closed after. When the work fails on a rank of a job opened here, every rank stops with that rank's
    one-line error (:class:`RankFailure`, printed by each) rather than hang or die on a lost connection; a rank
    whose work succeeds returns only once every rank has."""
    if ranks is not None:
        yield ranks
        return
    ranks = init_ranks(device)
    try:
        yield ranks
        if ranks.watch is not None:
            ranks.watch.agree("end", None)
    except RankFailure:
        raise
    except Exception as exc:
        if ranks.watch is None:
            raise
        raise RankFailure(ranks.watch.fail(f"rank {ranks.rank}: {error_message(exc)}")) from exc
    finally:
        ranks.close()


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
