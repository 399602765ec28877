"""A real study on tiny demo slides, killed midway (SIGKILL) and re-run: finished cells are not recomputed,
the rest completes, and the tables match the runs' metrics.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histotransfer.study import run_study

STUDY = """
name: tiny e2e
datasets:
  - name: demo
    demo: {n_slides: 8, seed: 0, size: 2048}
    magnification: 20
    patch_size: 256
encoders:
  - {name: resnet18, weights: random, truncations: [2, 3]}
seeds: [0, 1]
extract: {input_size: 32, batch_size: 64, workers: 0, device: cpu}
mil: {epochs: 2}
finetune:
  encoders: [{name: resnet18, weights: random, truncation: 3}]
  seeds: [0]
  top_k: 4
  epochs: 1
  device: cpu
cka: {n_patches: 16}
"""


def finished_files(out: Path) -> dict[str, int]:
    """mtime of every file inside each finished cell's folder, keyed by path."""
    files = {}
    for marker in out.rglob("done.json"):
        for p in marker.parent.rglob("*"):
            if p.is_file():
                files[str(p.relative_to(out))] = p.stat().st_mtime_ns
    return files


@pytest.mark.slow
def test_killed_study_resumes_without_recomputing_finished_cells(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = tmp_path / "first_run.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "histotransfer", "study", str(study), "--out", str(out)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("mil/demo/*/*/seed*/done.json")):
            assert proc.poll() is None, f"study ended before it could be killed: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no MIL cell finished within 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = finished_files(out)
    done_before = {str(p.parent.relative_to(out)) for p in out.rglob("done.json")}
    assert {"demo/demo", "tile/demo"} <= done_before and len(done_before) < 10

    report = run_study(study, out)

    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 1 + 1 + 1 + 4 + 1 + 1  # both truncations come from one extraction cell
    assert set(cells.loc[cells["status"] == "cached", "key"]) == done_before
    assert set(cells["status"]) == {"cached", "done"}
    after = finished_files(out)
    assert {k: after.get(k) for k in before} == before  # nothing of a finished cell was rewritten

    t4 = pd.read_csv(out / "tables" / "table4_truncation.csv")
    assert list(t4["truncate"]) == [2, 3]
    for row in t4.itertuples():
        aucs = [
            json.loads(
                (out / f"mil/demo/resnet18-random-t{row.truncate}/histotransfer/seed{s}/run/metrics.json").read_text()
            )["test"]["auc"]
            for s in (0, 1)
        ]
        aucs = [a for a in aucs if a is not None]
        assert row.demo_auc_mean == pytest.approx(np.mean(aucs), abs=1e-9)
    t3 = pd.read_csv(out / "tables" / "table3_finetuning.csv")
    tuned = json.loads((out / "finetune/demo/resnet18-random-t3/histotransfer/seed0/run/metrics.json").read_text())[
        "test"
    ]["auc"]
    assert t3.loc[0, "demo_finetuned_auc_mean"] == pytest.approx(tuned, abs=1e-9)
    cka = pd.read_csv(out / "tables" / "cka_stages.csv")
    assert len(cka) >= 2 and cka["cka"].between(-1e-6, 1 + 1e-6).all()
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 2  # CKA and truncation; no full-depth encoder for top-1
    for name in ("table1_architectures", "table2_histopathology_encoders", "table3_finetuning", "table4_truncation"):
        assert (out / "tables" / f"{name}.csv").is_file() and (out / "tables" / f"{name}.md").is_file()


@pytest.mark.slow
def test_study_under_torchrun_with_two_processes_writes_the_same_tables(tmp_path):
    """torchrun --nproc-per-node 2 (gloo, CPU): extraction sharded by slide, MIL runs dealt to the ranks,
    fine-tuning on one rank (one slide per step cannot be shared by two): the same tables as one process."""
    study = tmp_path / "study.yaml"
    study.write_text(STUDY)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same threads in both: float sums in the same order
    alone = [sys.executable, "-m", "histotransfer", "study", str(study), "--out", str(tmp_path / "one")]
    assert subprocess.run(alone, env=env, capture_output=True, timeout=600).returncode == 0
    single = tmp_path / "one" / "report.html"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "histotransfer",
        "study",
        str(study),
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in (
        "runs_mil",
        "runs_finetune",
        "cka_stages",
        "table1_architectures",
        "table3_finetuning",
        "table4_truncation",
    ):
        assert (tmp_path / "two" / "tables" / f"{name}.csv").read_bytes() == (
            single.parent / "tables" / f"{name}.csv"
        ).read_bytes(), name
    cells = pd.read_csv(tmp_path / "two" / "cells.csv")
    assert set(cells["status"]) == {"done"} and len(cells) == 9
    assert done.stdout.count("study: done in") == 1  # one summary, from rank 0
