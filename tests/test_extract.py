"""Feature extraction on real (generated) pyramidal TIFFs: files, values, resume, kill -9, torchrun sharding."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF

from conftest import torchrun_ranks
from histotransfer.cli import main
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder
from histotransfer.features import FeatureWriter, extract_features, read_feature_file, run_extraction
from histotransfer.patches import PatchReader, read_patch_file, write_patch_file
from histotransfer.patches.geometry import tiling_spec
from histotransfer.patches.tiling import tile_slides
from histotransfer.slide import open_slide

ENCODER = dict(encoder="resnet18", weights="random", truncate=2)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def grid_patch_file(
    patches_dir: Path, slide_path: Path, slide_id: str, n_side: int, step_fraction: float = 1.0, spec=None
) -> Path:
    """A patch file with an n_side x n_side grid of 32 px patches at 10x (level-0 footprint 128 px)."""
    if spec is None:
        with open_slide(slide_path) as slide:
            spec = tiling_spec(slide, magnification=10, patch_size=32)
    spec = dataclasses.replace(spec, slide_path=str(slide_path))
    step = int(spec.patch_size_level0 * step_fraction)
    xs, ys = np.meshgrid(np.arange(n_side) * step + 64, np.arange(n_side) * step + 64)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    path = patches_dir / f"{slide_id}.h5"
    write_patch_file(path, coords, np.ones(len(coords), np.float32), spec)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    slides = make_demo_slides(root / "demo", n_slides=2, seed=0, size=1024).slides
    patches = root / "patches"
    patches.mkdir()
    for i, s in enumerate(slides):
        grid_patch_file(patches, s, s.stem, n_side=6 + i)  # 36 and 49 patches
    return root, slides, patches


def reference_features(patch_file: Path, truncate: int, input_size: int | None = None) -> np.ndarray:
    """Independent path: pixels from PatchReader, NCHW contiguous, torchvision's normalize, plain forward."""
    ps = read_patch_file(patch_file)
    with open_slide(ps.spec.slide_path) as slide:
        reader = PatchReader(slide, ps.spec)
        pixels = np.stack([reader.read(x, y) for x, y in ps.coords])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float() / 255
    if input_size is not None:
        x = TF.resize(x, [input_size, input_size], antialias=True)
    x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.inference_mode():
        return create_encoder("resnet18", "random", truncate)(x).numpy()


def test_feature_writer_streams_and_publishes_only_complete_files(tmp_path):
    coords = np.arange(10).reshape(5, 2)
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    with FeatureWriter(tmp_path / "a.h5", coords, 3, attrs={"encoder": "x"}) as w:
        assert not (tmp_path / "a.h5").exists()
        w.write(rows[:2])
        w.write(rows[2:])
    bag = read_feature_file(tmp_path / "a.h5")
    np.testing.assert_array_equal(bag.features, rows)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["encoder"] == "x"
    with pytest.raises(ValueError, match="only 2 of 5 rows"), FeatureWriter(tmp_path / "b.h5", coords, 3) as w:
        w.write(rows[:2])
    w = FeatureWriter(tmp_path / "c.h5", coords, 3).open()
    with pytest.raises(ValueError, match="do not fit"):
        w.write(rows[:, :2])
    w.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]


def test_extract_writes_features_coords_attrs_and_report(demo, tmp_path):
    _root, slides, patches = demo
    folder = extract_features(patches, tmp_path, **ENCODER, batch_size=16, workers=0)
    assert folder == tmp_path / "features" / "resnet18-random-t2-native-fp32"
    assert sorted(p.name for p in folder.iterdir()) == ["demo_01.h5", "demo_02.h5", "extract.csv", "features.json"]
    for s in slides:
        bag = read_feature_file(folder / f"{s.stem}.h5")
        ps = read_patch_file(patches / f"{s.stem}.h5")
        assert bag.features.shape == (len(ps), 128) and bag.features.dtype == np.float32
        np.testing.assert_array_equal(bag.coords, ps.coords)
        np.testing.assert_allclose(bag.features, reference_features(patches / f"{s.stem}.h5", 2), rtol=1e-5, atol=1e-6)
        assert bag.attrs["encoder"] == "resnet18" and bag.attrs["truncate"] == 2
        assert bag.attrs["weights"] == "random" and bag.attrs["weights_sha256"] == ""
        assert bag.attrs["input_size"] == 32 and bag.attrs["stage"] == "layer2"
        assert bag.attrs["slide_path"] == str(s) and "torch" in bag.attrs["versions"]
        assert bag.attrs["format"] == "histotransfer.features"
    report = pd.read_csv(folder / "extract.csv")
    assert list(report.columns) == ["slide_id", "slide_path", "status", "n_patches", "seconds", "message"]
    assert sorted(zip(report.slide_id, report.status, report.n_patches)) == [
        ("demo_01", "ok", 36),
        ("demo_02", "ok", 49),
    ]


def test_rerun_skips_finished_slides_and_reports_a_broken_one(demo, tmp_path):
    _root, slides, _ = demo
    patches = tmp_path / "patches"
    patches.mkdir()
    for s in slides:
        grid_patch_file(patches, s, s.stem, n_side=3)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(slides[0].read_bytes()[:3000])
    spec = read_patch_file(patches / "demo_01.h5").spec
    grid_patch_file(patches, broken, "broken", n_side=2, spec=spec)

    run = run_extraction(patches, tmp_path / "out", **ENCODER, workers=0)
    assert {r.slide_id: r.status for r in run.results} == {"demo_01": "ok", "demo_02": "ok", "broken": "error"}
    error = next(r for r in run.results if r.status == "error")
    assert str(broken) in error.message
    assert not (run.folder / "broken.h5").exists()
    assert not [p for p in run.folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    before = {p.name: p.stat().st_mtime_ns for p in run.folder.glob("*.h5")}

    again = run_extraction(patches, tmp_path / "out", **ENCODER, workers=0)
    assert {r.slide_id: r.status for r in again.results} == {
        "demo_01": "skipped",
        "demo_02": "skipped",
        "broken": "error",
    }
    assert {p.name: p.stat().st_mtime_ns for p in again.folder.glob("*.h5")} == before
    report = pd.read_csv(again.folder / "extract.csv")
    assert sorted(report.slide_id) == ["broken", "demo_01", "demo_02"]
    slide_paths = dict(zip(report.slide_id, report.slide_path))
    assert {sid: Path(slide_paths[sid]).resolve() for sid in ("demo_01", "demo_02")} == {
        s.stem: s.resolve() for s in slides[:2]
    }  # skipped rows name the slide too, as ok rows do


def test_float16_resized_and_worker_processes(demo, tmp_path):
    """Worker processes give the same bytes as in-process reading; float16 is float32 rounded; resize works."""
    _, slides, patches = demo
    a = extract_features(patches, tmp_path / "a", **ENCODER, input_size=64, workers=0, batch_size=10)
    b = extract_features(patches, tmp_path / "b", **ENCODER, input_size=64, workers=2, batch_size=10)
    h = extract_features(patches, tmp_path / "h", **ENCODER, input_size=64, workers=0, batch_size=10, dtype="float16")
    assert a.name == "resnet18-random-t2-s64-fp32" and h.name == "resnet18-random-t2-s64-fp32-f16"
    for s in slides:
        fa = read_feature_file(a / f"{s.stem}.h5")
        assert (a / f"{s.stem}.h5").read_bytes() == (b / f"{s.stem}.h5").read_bytes()
        with h5py.File(h / f"{s.stem}.h5") as f:
            assert f["features"].dtype == np.float16
            np.testing.assert_array_equal(f["features"][()], fa.features.astype(np.float16))
        assert fa.attrs["input_size"] == 64
        # 32 px patches upsampled bilinearly to 64 px: close to torchvision's resize of the same pixels.
        ref = reference_features(patches / f"{s.stem}.h5", 2, input_size=64)
        assert np.corrcoef(fa.features.ravel(), ref.ravel())[0, 1] > 0.999


def test_cli_extract_and_clear_errors(demo, tmp_path, capsys):
    _, _, patches = demo
    out = tmp_path / "out"
    args = [
        "extract",
        "--patches",
        str(patches),
        "--out",
        str(out),
        "--encoder",
        "resnet18",
        "--weights",
        "random",
        "--truncate",
        "3",
        "--workers",
        "0",
    ]
    assert main(args) == 0
    assert "extract: 2 done" in capsys.readouterr().out
    assert len(list((out / "features" / "resnet18-random-t3-native-fp32").glob("*.h5"))) == 2

    assert main(["extract", "--patches", str(tmp_path / "nope"), "--out", str(out), "--encoder", "resnet18"]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    assert main([*args, "--precision", "bf16", "--device", "cpu"]) == 2
    assert "runs on a CUDA GPU only" in capsys.readouterr().err
    assert main([*args, "--truncate", "4"]) == 2
    assert "truncate must be 0..3" in capsys.readouterr().err


def test_offline_imagenet_fails_before_writing_anything(demo, tmp_path, monkeypatch, capsys):
    _, _, patches = demo
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "out"
    assert main(["extract", "--patches", str(patches), "--out", str(out), "--encoder", "resnet18"]) == 2
    assert "could not download ImageNet weights for resnet18" in capsys.readouterr().err
    assert not out.exists()


def test_moved_slides_are_found_with_slides_dir(demo, tmp_path):
    _, slides, _ = demo
    moved = tmp_path / "moved"
    moved.mkdir()
    patches = tmp_path / "patches"
    patches.mkdir()
    grid_patch_file(
        patches,
        tmp_path / "gone" / slides[0].name,
        slides[0].stem,
        n_side=2,
        spec=read_patch_file(demo[2] / f"{slides[0].stem}.h5").spec,
    )
    (moved / slides[0].name).write_bytes(slides[0].read_bytes())
    run = run_extraction(patches, tmp_path / "a", **ENCODER, workers=0)
    assert run.results[0].status == "error" and "pass --slides" in run.results[0].message
    run = run_extraction(patches, tmp_path / "b", **ENCODER, workers=0, slides=moved)
    assert run.results[0].status == "ok" and run.results[0].slide_path == str(moved / slides[0].name)


def test_a_checkpoint_counts_by_its_contents_not_by_how_its_path_is_spelled(demo, tmp_path, monkeypatch):
    _, slides, _ = demo
    patches = tmp_path / "patches"
    patches.mkdir()
    grid_patch_file(patches, slides[0], slides[0].stem, n_side=2)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    first = run_extraction(patches, tmp_path / "out", "resnet18", str(tmp_path / "w.pt"), 2, workers=0)
    monkeypatch.chdir(tmp_path)
    again = run_extraction(patches, tmp_path / "out", "resnet18", "w.pt", 2, workers=0)
    assert again.folder == first.folder and [r.status for r in again.results] == ["skipped"]
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")  # other weights, same name
    replaced = run_extraction(patches, tmp_path / "out", "resnet18", "w.pt", 2, workers=0)
    assert replaced.folder != first.folder and [r.status for r in replaced.results] == ["ok"]


def test_tile_then_extract(demo, tmp_path):
    """The tiling stage's own output feeds extraction directly."""
    _, slides, _ = demo
    tiled = tile_slides(slides, tmp_path, magnification=10, patch_size=32, min_tissue=0.25)
    ok = {r.slide_id: r.n_patches for r in tiled.results if r.status == "ok"}
    assert ok, "tiling found no tissue"
    run = run_extraction(tmp_path, None, **ENCODER, workers=0)  # the output folder holding one tiling
    assert run.folder == tiled.folder / "features" / "resnet18-random-t2-native-fp32"
    assert {r.slide_id: r.n_patches for r in run.results if r.status == "ok"} == ok


@pytest.fixture(scope="module")
def long_patches(demo, tmp_path_factory):
    """Two slides of 81 overlapping patches each: long enough to kill a run in the middle of a slide."""
    _, slides, _ = demo
    patches = tmp_path_factory.mktemp("long") / "patches"
    patches.mkdir()
    for s in slides:
        grid_patch_file(patches, s, s.stem, n_side=9, step_fraction=0.5)
    return patches


def extract_cmd(patches: Path, out: Path, *options: str) -> list[str]:
    return [
        "-m",
        "histotransfer",
        "extract",
        "--patches",
        str(patches),
        "--out",
        str(out),
        "--encoder",
        "resnet18",
        "--weights",
        "random",
        "--batch-size",
        "8",
        *options,
    ]


@pytest.mark.slow
def test_kill_9_mid_slide_then_resume_is_byte_identical(long_patches, tmp_path):
    out = tmp_path / "killed"
    folder = out / "features" / "resnet18-random-t0-s64-fp32"
    cmd = [sys.executable, *extract_cmd(long_patches, out, "--input-size", "64", "--workers", "1")]
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # Wait for the first slide to be finished and the second to be half-written.
            if (folder / "demo_01.h5").exists() and list(folder.glob(".demo_02.h5.tmp-*")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed mid-slide"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (folder / "demo_02.h5").exists()  # the half-written slide is not under its final name
    assert list(folder.glob(".demo_02.h5.tmp-*"))

    # The same command again (in this process: the resume logic is the same code).
    resumed = run_extraction(long_patches, out, "resnet18", "random", input_size=64, batch_size=8, workers=1)
    assert {r.slide_id: r.status for r in resumed.results} == {"demo_01": "skipped", "demo_02": "ok"}
    clean = extract_features(
        long_patches, tmp_path / "clean", "resnet18", "random", input_size=64, batch_size=8, workers=0
    )
    assert sorted(p.name for p in folder.iterdir()) == ["demo_01.h5", "demo_02.h5", "extract.csv", "features.json"]
    for name in ("demo_01.h5", "demo_02.h5"):
        assert (folder / name).read_bytes() == (clean / name).read_bytes()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(demo, tmp_path):
    _root, slides, patches = demo
    # A third slide so that the two ranks get unequal numbers of slides.
    three = tmp_path / "patches"
    three.mkdir()
    for p in patches.glob("*.h5"):
        (three / p.name).write_bytes(p.read_bytes())
    grid_patch_file(three, slides[0], "demo_03", n_side=4)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *extract_cmd(three, tmp_path / "dist", "--input-size", "64", "--workers", "0", "--device", "cpu"),
    ]
    done = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0/2]" in done.stdout and "[rank 1/2]" in done.stdout
    single = extract_features(three, tmp_path / "single", "resnet18", "random", input_size=64, batch_size=8, workers=0)
    dist_folder = tmp_path / "dist" / "features" / single.name
    assert sorted(p.name for p in dist_folder.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in ("demo_01.h5", "demo_02.h5", "demo_03.h5"):
        assert (dist_folder / name).read_bytes() == (single / name).read_bytes()
    report = pd.read_csv(dist_folder / "extract.csv")
    assert sorted(report.slide_id) == ["demo_01", "demo_02", "demo_03"]  # each slide once
    assert set(report.status) == {"ok"}


@pytest.mark.slow
def test_under_torchrun_a_rank_failing_outside_a_slide_stops_both_with_its_one_line(demo, tmp_path):
    """Rank 1 alone finds its report path taken by a folder; rank 0 (which would wait for it at the next barrier
    and then die with "Connection closed by peer") stops too, with the same line."""
    _root, _slides, patches = demo
    taken = tmp_path / "out" / "features" / "resnet18-random-t0-s64-fp32" / "extract.rank1.csv"
    taken.mkdir(parents=True)
    code, errors = torchrun_ranks(
        extract_cmd(patches, tmp_path / "out", "--input-size", "64", "--workers", "0", "--device", "cpu"),
        tmp_path / "logs",
    )
    assert code != 0
    line = f"histotransfer extract: error: rank 1: {taken}: is a folder, not a regular file; pass a regular input file."
    assert [e.strip() for e in errors] == [line, line]


def test_default_workers_share_the_cores_between_local_ranks(monkeypatch):
    from histotransfer.features.loader import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers(torch.device("cuda")) == 8
    assert default_workers(torch.device("cpu")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 8 cores per rank
    assert default_workers(torch.device("cuda")) == 7
    assert default_workers(torch.device("cpu")) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(torch.device("cuda")) == 1
    assert default_workers(torch.device("cpu")) == 0
