"""Shared fixtures: small seeded pyramidal TIFF slides written with the same writer as the demo slides."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from histotransfer.demo_slides import DemoSlides, make_demo_slides, render_tissue, write_pyramidal_tiff

CMU_SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"


def disk_and_bar(width: int, height: int) -> np.ndarray:
    """A geometric tissue region known exactly: a disk plus a rectangle, on a white slide."""
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (int(width * 0.35), int(height * 0.45)), int(min(width, height) * 0.28), 1, -1)
    cv2.rectangle(mask, (int(width * 0.55), int(height * 0.2)), (int(width * 0.85), int(height * 0.8)), 1, -1)
    return mask.astype(bool)


def write_synthetic_slide(
    path: Path,
    size: tuple[int, int] = (2048, 2048),
    mpp: float | None = 0.25,
    tissue: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
    seed: int = 0,
) -> Path:
    """A pyramidal tiled JPEG TIFF (levels halving down to 256 px) of H&E-like tissue where ``tissue`` is set.

    ``tissue`` defaults to ``disk_and_bar``; ``mpp=None`` writes a slide without resolution tags.
    """
    width, height = size
    if tissue is None:
        tissue = disk_and_bar(width, height)
    rgb = render_tissue(tissue, lesion, np.random.default_rng(seed))
    return write_pyramidal_tiff(path, rgb, mpp)


@pytest.fixture
def make_slide(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_slide(name="slide", size=(2048, 2048), mpp=0.25, tissue=None, lesion=None, seed=0)``
    writes ``tmp_path/slides/<name>.tif`` and returns its path."""

    def factory(name: str = "slide", **kwargs: object) -> Path:
        return write_synthetic_slide(tmp_path / "slides" / f"{name}.tif", **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.fixture(scope="session")
def small_demo_slides(tmp_path_factory: pytest.TempPathFactory) -> DemoSlides:
    """Four 2048 px demo slides (two positive, two negative) at 0.25 um/px, made once per test session."""
    return make_demo_slides(tmp_path_factory.mktemp("demo_slides"), n_slides=4, seed=0, size=2048)


@pytest.fixture
def cmu_svs() -> Path:
    """The real Aperio slide from ../shared (skips when absent)."""
    if not CMU_SVS.exists():
        pytest.skip(f"real slide {CMU_SVS} is absent (optional shared data)")
    return CMU_SVS


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test, restored after: tiny inputs run faster without OpenMP spin-waiting on a
    shared, loaded machine. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torchrun_ranks(args: list[str], logs: Path, timeout: float = 120) -> tuple[int, list[str]]:
    """Run ``python <args>`` under ``torchrun --nproc-per-node 2`` (gloo, CPU); return torchrun's exit status and
    each rank's stderr (torchrun's own report of a failed job goes to its stderr, not to the ranks')."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    found = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(found) == ["0", "1"], done.stderr[-3000:]
    return done.returncode, [found["0"], found["1"]]
