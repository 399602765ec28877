"""A study's wall time with one process vs several torchrun ranks, side by side, and whether their tables agree.

Runs the same study file from scratch twice, in fresh folders: `histotransfer study FILE` and
`torchrun --standalone --nproc-per-node N -m histotransfer study FILE` (gloo on CPU, nccl on GPUs), each with
OMP_NUM_THREADS = cores / N so both use the machine's cores. Prints both wall times, their ratio, and for each
table CSV whether the two runs wrote the same bytes.

    .venv/bin/python benchmarks/bench_study.py [--study examples/demo_study.yaml] [--ranks 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=ROOT / "examples" / "demo_study.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        single = run([sys.executable, "-m", "histotransfer", "study", str(args.study), "--out", str(one)], cores)
        ranked = run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(args.ranks),
                "-m",
                "histotransfer",
                "study",
                str(args.study),
                "--out",
                str(many),
            ],
            max(1, cores // args.ranks),
        )
        print(f"study {args.study.name} on {cores} cores")
        print(f"  1 process:           {single:7.1f} s")
        print(f"  {args.ranks} torchrun ranks:    {ranked:7.1f} s   ({single / ranked:.2f}x the speed of 1 process)")
        for csv in sorted((one / "tables").glob("*.csv")):
            other = many / "tables" / csv.name
            if other.is_file() and other.read_bytes() == csv.read_bytes():
                print(f"  tables/{csv.name}: identical")
                continue
            a, b = pd.read_csv(csv), pd.read_csv(other)
            numeric = a.select_dtypes("number").columns
            gap = float((a[numeric] - b[numeric]).abs().max().max()) if a.shape == b.shape else float("nan")
            print(
                f"  tables/{csv.name}: differs, largest numeric difference {gap:.2e} (threads per process "
                "differ, so float sums run in another order)"
            )


if __name__ == "__main__":
    main()
