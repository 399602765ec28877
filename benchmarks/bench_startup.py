"""Start-up time of the command line against a bare interpreter, measured side by side in one run.

Every `--help` and `--version` must answer without loading torch: the target is each within 0.5 s of
`python -c pass` (the nothing-to-do path of `train` is checked by the test suite). Prints, per command, the
median wall time over several interleaved runs, its excess over the bare interpreter, and whether torch was
imported.

    .venv/bin/python benchmarks/bench_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    ["--help"],
    ["--version"],
    ["tile", "--help"],
    ["extract", "--help"],
    ["train", "--help"],
    ["evaluate", "--help"],
    ["heatmap", "--help"],
    ["finetune", "--help"],
    ["cka", "--help"],
    ["cam", "--help"],
    ["study", "--help"],
    ["info", "--help"],
    ["demo", "--help"],
    ["encoders", "--help"],
]
TORCH_CHECK = (
    "import sys, runpy; sys.argv = ['histotransfer', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('histotransfer', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    "print('torch' in sys.modules, file=sys.stderr)"
)


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    bare = [sys.executable, "-c", "pass"]
    commands = [[sys.executable, "-m", "histotransfer", *c] for c in COMMANDS]
    times: dict[int, list[float]] = {i: [] for i in range(-1, len(commands))}
    for _ in range(args.runs):  # interleaved, so load on the machine hits every command alike
        times[-1].append(wall(bare))
        for i, cmd in enumerate(commands):
            times[i].append(wall(cmd))
    base = statistics.median(times[-1])
    print(f"python -c pass: {base:.3f} s (median of {args.runs})")
    print(f"{'command':32} {'median s':>9} {'over bare':>10} {'ratio':>7}  torch imported")
    worst = 0.0
    for i, extra in enumerate(COMMANDS):
        med = statistics.median(times[i])
        probe = subprocess.run([sys.executable, "-c", TORCH_CHECK, *extra], capture_output=True, text=True)
        torch_loaded = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "?"
        worst = max(worst, med - base)
        print(
            f"{'histotransfer ' + ' '.join(extra):32} {med:9.3f} {med - base:+10.3f} {med / base:7.1f}  {torch_loaded}"
        )
    print(f"largest excess over a bare interpreter: {worst:.3f} s (target: within 0.5 s)")


if __name__ == "__main__":
    main()
