"""Tiling batches: bad slides are reported and skipped, killed runs resume to the same outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from histotransfer._io import HOST
from histotransfer.cli import main
from histotransfer.patches import read_patch_file, tile_slides


def test_batch_with_bad_slides_tiles_the_good_ones_and_reports_the_rest(make_slide, tmp_path: Path, capsys) -> None:
    good = [make_slide("good1", size=(1024, 1024)), make_slide("good2", size=(1024, 1024), seed=1)]
    folder = good[0].parent
    data = good[0].read_bytes()
    (folder / "corrupt.tif").write_bytes(data[: len(data) * 6 // 10])
    (folder / "text.svs").write_text("this is a text file, not a slide\n")
    make_slide("nompp", size=(1024, 1024), mpp=None)
    make_slide("blank", size=(1024, 1024), tissue=np.zeros((1024, 1024), bool))
    missing = tmp_path / "elsewhere" / "missing.svs"
    out = tmp_path / "out"

    rc = main(["tile", str(folder), str(missing), "--out", str(out), "--patch-size", "128"])

    assert rc != 0
    err = capsys.readouterr().err
    assert "failed" in err and "corrupt" in err and "missing" in err
    out = out / "20x_128px_0px_overlap"
    report = pd.read_csv(out / "tiling.csv", keep_default_na=False).set_index("slide_id")
    assert sorted(report.index) == ["blank", "corrupt", "good1", "good2", "missing", "nompp", "text"]
    status = report.status.to_dict()
    assert status == {
        "good1": "ok",
        "good2": "ok",
        "blank": "no_tissue",
        "corrupt": "error",
        "missing": "error",
        "nompp": "error",
        "text": "error",
    }
    for sid in ("corrupt", "missing", "nompp", "text"):
        message = report.loc[sid, "message"]
        assert report.loc[sid, "slide_path"] in message and "\n" not in message
    assert "--mpp" in report.loc["nompp", "message"]
    assert "no such file" in report.loc["missing", "message"]
    for sid in ("good1", "good2"):
        assert report.loc[sid, "n_patches"] == len(read_patch_file(out / "patches" / f"{sid}.h5")) > 0
        assert (out / "masks" / f"{sid}.png").exists() and (out / "thumbnails" / f"{sid}.png").exists()
    assert not (out / "patches" / "blank.h5").exists() and (out / "thumbnails" / "blank.png").exists()
    assert sorted(p.name for p in (out / "patches").iterdir()) == ["good1.h5", "good2.h5"]


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_killed_run_resumes_to_the_same_outputs(make_slide, tmp_path: Path) -> None:
    slides = [make_slide(f"k{i}", size=(2048, 2048), seed=i) for i in range(8)]
    out, reference = tmp_path / "out", tmp_path / "reference"
    code = (
        "import sys; from histotransfer.patches import tile_slides; "
        "tile_slides(sys.argv[2:], sys.argv[1], patch_size=128)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out), *map(str, slides)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill as soon as the first patch file (or its temporary, often mid-write) appears.
    deadline = time.monotonic() + 120
    patches = out / "20x_128px_0px_overlap" / "patches"
    while not list(patches.glob("*.h5")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (patches / f".k7.h5.tmp-{HOST}-999999.h5").write_bytes(b"half-written")  # as a kill mid-write leaves

    resumed = tile_slides(slides, out, patch_size=128)
    expected = tile_slides(slides, reference, patch_size=128)

    assert {r.status for r in resumed.results} <= {"ok", "skipped"} and len(resumed.results) == 8
    assert [r.n_patches for r in resumed.results] == [r.n_patches for r in expected.results]
    assert _temp_files(out) == []
    out, reference = resumed.folder, expected.folder
    for s in slides:
        a, b = (read_patch_file(d / "patches" / f"{s.stem}.h5") for d in (out, reference))
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.tissue_fraction, b.tissue_fraction)
        for sub in ("masks", "thumbnails"):
            np.testing.assert_array_equal(
                cv2.imread(str(out / sub / f"{s.stem}.png")), cv2.imread(str(reference / sub / f"{s.stem}.png"))
            )
    report = pd.read_csv(out / "tiling.csv")
    assert sorted(report.slide_id) == sorted(s.stem for s in slides) and set(report.status) <= {"ok", "skipped"}
