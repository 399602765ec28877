"""Several truncations in one extraction pass: the same files as one pass per truncation, resumed per truncation."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from histotransfer._io import HOST
from histotransfer.cli import main
from histotransfer.demo_slides import make_demo_slides
from histotransfer.errors import HistotransferError
from histotransfer.features import EncoderChoice, extract_features, read_feature_file, run_extraction
from histotransfer.features.extract import BatchEncoder, StageTaps
from histotransfer.patches import write_patch_file
from histotransfer.patches.geometry import tiling_spec
from histotransfer.slide import open_slide

ALL = [0, 1, 2, 3]
RUN = {"weights": "random", "input_size": 48, "batch_size": 4, "workers": 0}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread for the whole module, module fixtures included: the reference passes and the passes compared
    with them must split their sums the same way (a different thread count changes float32 rounding)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    """Two demo slides, 9 and 4 patches of 32 px at 10x (batches of 4 end mid-slide)."""
    root = tmp_path_factory.mktemp("multi")
    slides = make_demo_slides(root / "demo", n_slides=2, seed=0, size=1024).slides
    folder = root / "patches"
    folder.mkdir()
    for slide_path, n_side in zip(slides, (3, 2)):
        with open_slide(slide_path) as slide:
            spec = dataclasses.replace(tiling_spec(slide, magnification=10, patch_size=32), slide_path=str(slide_path))
        xs, ys = np.meshgrid(np.arange(n_side) * 160 + 64, np.arange(n_side) * 160 + 64)
        coords = np.stack([xs.ravel(), ys.ravel()], 1)
        write_patch_file(folder / f"{slide_path.stem}.h5", coords, np.ones(len(coords), np.float32), spec)
    return folder


@pytest.fixture(scope="module")
def separate(patches, tmp_path_factory) -> dict[str, dict[int, Path]]:
    """One extraction pass per truncation (the reference), for both networks."""
    out = tmp_path_factory.mktemp("separate")
    return {
        name: {t: extract_features(patches, out, name, truncate=t, **RUN) for t in ALL}
        for name in ("resnet18", "densenet121")
    }


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.h5"))}


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_one_pass_writes_the_bytes_of_one_pass_per_truncation(name, patches, separate, tmp_path):
    folders = extract_features(patches, tmp_path, name, truncate=[3, 1, 0, 2], **RUN)
    assert list(folders) == ALL
    for t in ALL:
        assert folders[t] == tmp_path / "features" / separate[name][t].name
        assert folders[t].name == f"{name}-random-t{t}-s48-fp32"
        assert sorted(p.name for p in folders[t].iterdir()) == sorted(p.name for p in separate[name][t].iterdir())
        ours, reference = file_bytes(folders[t]), file_bytes(separate[name][t])
        assert list(ours) == ["demo_01.h5", "demo_02.h5"]
        assert ours == reference
        assert json.loads((folders[t] / "features.json").read_text()) == json.loads(
            (separate[name][t] / "features.json").read_text()
        )
    bags = [read_feature_file(folders[t] / "demo_01.h5") for t in ALL]
    assert [b.attrs["truncate"] for b in bags] == ALL
    assert [b.attrs["stage"] for b in bags] == (
        [f"layer{4 - t}" for t in ALL] if name == "resnet18" else [f"denseblock{4 - t}" for t in ALL]
    )


def test_resume_runs_only_the_missing_truncations(patches, separate, tmp_path, monkeypatch):
    first = run_extraction(patches, tmp_path, "resnet18", truncate=[1, 3], **RUN)
    assert {t: sorted(r.status for r in run.results) for t, run in first.items()} == {1: ["ok", "ok"], 3: ["ok", "ok"]}
    (first[3].folder / "demo_02.h5").unlink()
    kept = {p: p.stat().st_mtime_ns for t in (1, 3) for p in first[t].folder.glob("*.h5")}

    asked: list[tuple[int, ...]] = []
    features = BatchEncoder.features

    def recording(self, pixels, truncations=None, source=None):
        asked.append(tuple(truncations))
        return features(self, pixels, truncations, source)

    monkeypatch.setattr(BatchEncoder, "features", recording)
    runs = run_extraction(patches, tmp_path, "resnet18", truncate=ALL, **RUN)
    status = {t: {r.slide_id: r.status for r in run.results} for t, run in runs.items()}
    assert status == {
        0: {"demo_01": "ok", "demo_02": "ok"},
        1: {"demo_01": "skipped", "demo_02": "skipped"},
        2: {"demo_01": "ok", "demo_02": "ok"},
        3: {"demo_01": "skipped", "demo_02": "ok"},
    }
    assert sorted(set(asked)) == [(0, 2), (0, 2, 3)]  # 9 patches of demo_01 in 3 batches, 4 of demo_02 in 1
    assert asked.count((0, 2)) == 3 and asked.count((0, 2, 3)) == 1
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    for t in ALL:
        assert file_bytes(runs[t].folder) == file_bytes(separate["resnet18"][t])


def test_non_finite_features_fail_only_their_truncation(patches, tmp_path, monkeypatch):
    features = BatchEncoder.features

    def poisoned(self, pixels, truncations=None, source=None):
        out = features(self, pixels, truncations, source)
        if 2 in out and len(pixels) == 4:  # demo_02's only batch (demo_01's has 9 patches)
            out[2][1, 5] = np.nan
        return out

    monkeypatch.setattr(BatchEncoder, "features", poisoned)
    runs = run_extraction(patches, tmp_path, "resnet18", truncate=[1, 2], **{**RUN, "batch_size": 9})
    assert {r.slide_id: r.status for r in runs[1].results} == {"demo_01": "ok", "demo_02": "ok"}
    assert {r.slide_id: r.status for r in runs[2].results} == {"demo_01": "ok", "demo_02": "error"}
    error = next(r for r in runs[2].results if r.status == "error")
    assert "NaN or inf features for patch row 1" in error.message
    assert not (runs[2].folder / "demo_02.h5").exists() and (runs[1].folder / "demo_02.h5").exists()
    assert not [p for p in runs[2].folder.iterdir() if p.name.startswith(".")]


def test_a_truncation_locked_elsewhere_is_busy_and_the_others_go_on(patches, tmp_path):
    folder = tmp_path / "features" / "resnet18-random-t2-s48-fp32"
    folder.mkdir(parents=True)
    lock = folder / ".demo_01.lock"
    lock.write_text(f"{HOST} {os.getpid()}\n")  # held by a live process: this one, as another extraction
    runs = run_extraction(patches, tmp_path, "resnet18", truncate=[0, 2], **RUN)
    assert {r.slide_id: r.status for r in runs[0].results} == {"demo_01": "ok", "demo_02": "ok"}
    assert {r.slide_id: r.status for r in runs[2].results} == {"demo_01": "busy", "demo_02": "ok"}
    assert lock.exists() and not (folder / "demo_01.h5").exists()


def test_return_types_and_truncation_values(patches, separate, tmp_path):
    single = extract_features(patches, tmp_path, "resnet18", truncate=2, **RUN)
    assert single == tmp_path / "features" / separate["resnet18"][2].name
    assert extract_features(patches, tmp_path, "resnet18", truncate=[2], **RUN) == {2: single}
    run = run_extraction(
        patches,
        tmp_path,
        EncoderChoice(encoder="resnet18", weights="random", truncate=[2, 2]),
        **{k: v for k, v in RUN.items() if k != "weights"},
    )
    assert list(run) == [2] and {r.status for r in run[2].results} == {"skipped"}
    for bad in ([], -1, [0, -2], [1.5], "2"):
        with pytest.raises(HistotransferError, match="truncate: pass a truncation"):
            EncoderChoice.build(encoder="resnet18", truncate=bad)
    with pytest.raises(HistotransferError, match=r"truncate must be 0\.\.3"):
        extract_features(patches, tmp_path / "bad", "resnet18", truncate=[1, 4], **RUN)
    assert not (tmp_path / "bad").exists()


def test_cli_reports_each_truncation(patches, tmp_path, capsys):
    args = [
        "extract",
        "--patches",
        str(patches),
        "--out",
        str(tmp_path),
        "--encoder",
        "resnet18",
        "--weights",
        "random",
        "--input-size",
        "48",
        "--workers",
        "0",
        "--truncate",
    ]
    assert main([*args, "3", "1"]) == 0
    out = capsys.readouterr().out
    for t in (1, 3):
        assert f"extract truncate {t}: 2 done" in out
        assert f"resnet18-random-t{t}-s48-fp32" in out
    assert main([*args, "1"]) == 0
    assert "extract: 2 skipped (done before)" in capsys.readouterr().out
    assert main([*args, "0", "4"]) == 2
    assert "truncate must be 0..3" in capsys.readouterr().err


def test_stage_taps_stop_at_the_deepest_stage_asked_for():
    calls: list[int] = []

    class Stage(nn.Module):
        def __init__(self, k: int):
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.k)
            return x + 1

    taps = StageTaps(nn.Sequential(*(Stage(k) for k in range(5))), {k: nn.Flatten() for k in (1, 2, 4)})
    out = taps(torch.zeros(1, 1), [2, 1])
    assert calls == [0, 1, 2] and sorted(out) == [1, 2]
    assert out[1].item() == 2 and out[2].item() == 3
