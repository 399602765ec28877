"""Hostile inputs, each replayed through the command line: the exit code, the message, no previously good file
changed (sha256 before and after) and no temporary file left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from histotransfer._io import HOST, h5_files
from histotransfer.cli import main
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder
from histotransfer.errors import HistotransferError
from histotransfer.features import read_feature_file
from histotransfer.finetune import save_encoder
from histotransfer.patches import read_patch_file

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EXTRACT = [
    "--encoder",
    "resnet18",
    "--weights",
    "random",
    "--truncate",
    "3",
    "--input-size",
    "32",
    "--workers",
    "0",
    "--batch-size",
    "16",
]
TILING = "10x_64px_0px_overlap"


pytestmark = pytest.mark.usefixtures("one_thread")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def run(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Eight 1024 px demo slides at 0.5 um/px, tiled at 10x into 64 px patches, features of a random resnet18
    cut after layer1, and a 2-epoch MIL run on them."""
    root = tmp_path_factory.mktemp("hostile")
    demo = make_demo_slides(root / "demo", n_slides=8, seed=3, size=1024, mpp=0.5)
    assert (
        main(
            [
                "tile",
                str(root / "demo" / "slides"),
                "--out",
                str(root / "tiles"),
                "--magnification",
                "10",
                "--patch-size",
                "64",
            ]
        )
        == 0
    )
    tiling = root / "tiles" / TILING
    assert main(["extract", "--patches", str(tiling), *EXTRACT]) == 0
    features = tiling / "features" / "resnet18-random-t3-s32-fp32"
    assert (
        main(
            [
                "train",
                "--features",
                str(features),
                "--labels",
                str(demo.labels_csv),
                "--out",
                str(root / "run"),
                "--epochs",
                "2",
                "--protocol",
                "split",
            ]
        )
        == 0
    )
    return {
        "root": root,
        "slides": root / "demo" / "slides",
        "labels": demo.labels_csv,
        "tiling": tiling,
        "features": features,
        "run": root / "run",
    }


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_retiling_never_mixes_tilings_and_features_always_match_their_patches(cohort, tmp_path, capsys):
    slides = copy_tree(cohort["slides"], tmp_path / "slides")
    out = tmp_path / "tiles"
    assert run(capsys, "tile", slides, "--out", out, "--magnification", "10", "--patch-size", "64")[0] == 0
    assert run(capsys, "tile", slides, "--out", out, "--magnification", "10", "--patch-size", "32")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["10x_32px_0px_overlap", TILING]  # both tilings coexist
    code, _, err = run(capsys, "extract", "--patches", out, *EXTRACT)
    assert code == 2 and "holds 2 tilings (10x_32px_0px_overlap, 10x_64px_0px_overlap); pass one of them" in err
    for name in ("10x_32px_0px_overlap", TILING):  # each tiling's features next to it, rows = its patches
        assert run(capsys, "extract", "--patches", out / name, *EXTRACT)[0] == 0
        for feature_file in (out / name / "features" / "resnet18-random-t3-s32-fp32").glob("*.h5"):
            patches = read_patch_file(out / name / "patches" / feature_file.name)
            np.testing.assert_array_equal(read_feature_file(feature_file).coords, patches.coords)
    # One --out for two tilings: the second is refused, the first's files are untouched.
    shared = tmp_path / "shared"
    assert run(capsys, "extract", "--patches", out / TILING, "--out", shared, *EXTRACT)[0] == 0
    before = digests(shared)
    code, _, err = run(capsys, "extract", "--patches", out / "10x_32px_0px_overlap", "--out", shared, *EXTRACT)
    assert code == 2 and f"holds features of tiling '{TILING}', not of '10x_32px_0px_overlap'" in err
    assert digests(shared) == before and temporaries(tmp_path) == []


def test_a_slide_replaced_in_place_is_retiled_and_its_features_redone(cohort, tmp_path, capsys):
    slides = copy_tree(cohort["slides"], tmp_path / "slides")
    out = tmp_path / "tiles"
    tile = ["tile", slides, "--out", out, "--magnification", "10", "--patch-size", "64"]
    assert run(capsys, *tile)[0] == 0
    assert run(capsys, "extract", "--patches", out / TILING, *EXTRACT)[0] == 0
    features = out / TILING / "features" / "resnet18-random-t3-s32-fp32"
    first, second = sorted(p.name for p in slides.glob("*.tif"))[:2]
    (slides / first).write_bytes((slides / second).read_bytes())  # another image under the same name
    code, out_text, _ = run(capsys, *tile)
    assert code == 0 and "1 done, 7 skipped (done before)" in out_text
    code, out_text, _ = run(capsys, "extract", "--patches", out / TILING, *EXTRACT)
    assert code == 0 and "1 done, 7 skipped (done before)" in out_text
    sid = Path(first).stem
    patches, feats = read_patch_file(out / TILING / "patches" / f"{sid}.h5"), read_feature_file(features / f"{sid}.h5")
    np.testing.assert_array_equal(feats.coords, patches.coords)
    assert feats.attrs["patches_fingerprint"] == patches.fingerprint


def test_the_same_slide_given_twice_is_a_duplicate_row(cohort, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    original = next(cohort["slides"].glob("*.tif"))
    (folder / original.name).symlink_to(original)
    (folder / f"z_copy_{original.name}").symlink_to(original)
    code, out_text, _ = run(
        capsys, "tile", folder, "--out", tmp_path / "out", "--magnification", "10", "--patch-size", "64"
    )
    assert code == 0 and "1 duplicate" in out_text
    report = pd.read_csv(tmp_path / "out" / TILING / "tiling.csv", keep_default_na=False).set_index("slide_id")
    assert report.loc[f"z_copy_{original.stem}", "status"] == "duplicate"
    assert f"the same file as {folder / original.name}" in report.loc[f"z_copy_{original.stem}", "message"]


def impostor_slides(cohort, folder: Path) -> Path:
    """A folder of the cohort's slide file names, every one holding another slide's image."""
    folder.mkdir()
    names = sorted(p.name for p in cohort["slides"].glob("*.tif"))
    for a, b in zip(names, names[1:] + names[:1]):
        (folder / a).write_bytes((cohort["slides"] / b).read_bytes())
    return folder


def test_slides_option_pointing_at_another_image_of_the_same_name_is_refused(cohort, tmp_path, capsys):
    impostors = impostor_slides(cohort, tmp_path / "impostors")
    out = tmp_path / "out"
    code, _, _err = run(capsys, "extract", "--patches", cohort["tiling"], "--out", out, *EXTRACT, "--slides", impostors)
    assert code == 1
    report = pd.read_csv(out / "features" / "resnet18-random-t3-s32-fp32" / "extract.csv", keep_default_na=False)
    assert set(report["status"]) == {"error"}
    assert all("is not the slide" in m and "differs in" in m and "head_sha256" in m for m in report["message"])
    assert not list((out / "features").rglob("*.h5")) and temporaries(out) == []


@pytest.mark.parametrize("command", ["heatmap", "finetune", "cka"])
def test_later_stages_refuse_another_image_of_the_same_name(cohort, tmp_path, capsys, command):
    impostors = impostor_slides(cohort, tmp_path / "impostors")
    out = tmp_path / "out"
    args = {
        "heatmap": ["heatmap", "--run", cohort["run"], "--out", out],
        "finetune": [
            "finetune",
            "--run",
            cohort["run"],
            "--out",
            out,
            "--epochs",
            "1",
            "--top-k",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        "cka": [
            "cka",
            "--encoder-a",
            cohort["run"],
            "--encoder-b",
            "resnet18",
            "--weights-b",
            "random",
            "--truncate-b",
            "3",
            "--patches",
            cohort["tiling"],
            "--out",
            out,
            "--n-patches",
            "16",
            "--no-baseline",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    }[command]
    before = digests(cohort["root"])
    code, _, err = run(capsys, *args, "--slides", impostors)
    if command == "heatmap":  # an error row per slide, the command fails
        report = pd.read_csv(out / "heatmaps.csv", keep_default_na=False)
        messages = list(report["message"])
        assert code == 1 and set(report["status"]) == {"error"} and not list(out.glob("*.png"))
    else:  # the whole call is refused before anything is written
        messages = [err]
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert all("is not the slide" in m and "differs in file_size" in m for m in messages)
    assert digests(cohort["root"]) == before and temporaries(tmp_path) == []


def test_non_finite_features_are_refused_at_extraction_and_in_mil(cohort, tmp_path, capsys):
    # An encoder whose weights hold a NaN: extraction writes nothing for any slide, says which row.
    encoder = create_encoder("resnet18", "random", 0)
    with torch.no_grad():
        encoder.body.stem.conv1.weight[0, 0, 0, 0] = float("nan")
    weights = save_encoder(encoder, tmp_path / "nan.pt")
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "extract",
        "--patches",
        cohort["tiling"],
        "--out",
        out,
        "--encoder",
        "resnet18",
        "--weights",
        weights,
        "--truncate",
        "3",
        "--input-size",
        "32",
        "--workers",
        "0",
    )
    assert code == 1 and "the encoder gave NaN or inf features for patch row 0" in err
    assert not list(out.rglob("*.h5")) and temporaries(out) == []
    # A feature file with one NaN row: train and evaluate stop, naming the file and the row, writing nothing.
    features = copy_tree(cohort["features"], tmp_path / "features")
    bad = sorted(features.glob("*.h5"))[2]
    with h5py.File(bad, "r+") as f:
        f["features"][5] = np.nan
    code, _, err = run(
        capsys,
        "train",
        "--features",
        features,
        "--labels",
        cohort["labels"],
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
    )
    assert code == 2 and f"{bad}: row 5 (patch at" in err and "holds NaN or inf features" in err
    assert not (tmp_path / "run").exists()
    before = digests(cohort["run"])
    for labels in (["--labels", cohort["labels"]], []):
        code, _, err = run(
            capsys, "evaluate", "--run", cohort["run"], "--features", features, "--out", tmp_path / "eval", *labels
        )
        assert code == 2 and "row 5" in err and not (tmp_path / "eval").exists()
    assert digests(cohort["run"]) == before


def test_evaluate_and_finetune_refuse_features_the_run_was_not_trained_on(cohort, tmp_path, capsys):
    features = copy_tree(cohort["features"], tmp_path / "features")
    victim = sorted(features.glob("*.h5"))[0]
    with h5py.File(victim, "r+") as f:  # the same slide re-extracted differently since training
        f["features"][0] += 1.0
        del f.attrs["fingerprint"]
    run_copy = copy_tree(cohort["run"], tmp_path / "run")
    config = json.loads((run_copy / "config.json").read_text())
    config["features_dir"] = str(features)
    (run_copy / "config.json").write_text(json.dumps(config))
    before = digests(run_copy)
    code, _, err = run(capsys, "evaluate", "--run", run_copy, "--features", features, "--out", tmp_path / "eval")
    assert code == 2 and "not the ones it saw" in err and victim.stem in err
    code, _, err = run(
        capsys,
        "finetune",
        "--run",
        run_copy,
        "--out",
        tmp_path / "ft",
        "--epochs",
        "1",
        "--top-k",
        "2",
        "--device",
        "cpu",
    )
    assert code == 2 and "not the ones it saw" in err and victim.stem in err
    assert digests(run_copy) == before


def test_a_second_extract_on_the_same_folder_keeps_the_first_ones_files_and_splits_the_slides(cohort, tmp_path, capsys):
    tiling = copy_tree(cohort["tiling"], tmp_path / "tiling")
    shutil.rmtree(tiling / "features")
    folder = tiling / "features" / "resnet18-random-t3-s32-fp32"
    folder.mkdir(parents=True)
    ids = sorted(p.stem for p in (tiling / "patches").glob("*.h5"))
    # Another live process is writing the first slide: its temporary file and lock are left alone.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = folder / f".{ids[0]}.h5.tmp-{HOST}-{sleeper.pid}.h5"
        live_tmp.write_bytes(b"being written")
        (folder / f".{ids[0]}.lock").write_text(f"{HOST} {sleeper.pid}\n")
        dead_tmp = folder / f".{ids[1]}.h5.tmp-{HOST}-999999.h5"
        dead_tmp.write_bytes(b"left by a killed run")
        code, out_text, _ = run(capsys, "extract", "--patches", tiling, *EXTRACT)
        assert code == 0 and f"busy {ids[0]}: being extracted by {HOST} pid {sleeper.pid}" in out_text
        assert live_tmp.read_bytes() == b"being written" and not dead_tmp.exists()
        assert [p.stem for p in h5_files(folder)] == ids[1:]
    finally:
        sleeper.kill()
        sleeper.wait()
    live_tmp.unlink()
    assert run(capsys, "extract", "--patches", tiling, *EXTRACT)[0] == 0  # the owner is gone: its slide is done
    assert [p.stem for p in h5_files(folder)] == ids and temporaries(tiling) == []


@pytest.mark.slow
def test_two_extract_processes_on_one_folder_do_each_slide_once(cohort, tmp_path):
    tiling = copy_tree(cohort["tiling"], tmp_path / "tiling")
    shutil.rmtree(tiling / "features")
    cmd = [sys.executable, "-m", "histotransfer", "extract", "--patches", str(tiling), *EXTRACT, "--batch-size", "4"]
    procs = [
        subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    folder = tiling / "features" / "resnet18-random-t3-s32-fp32"
    report = pd.read_csv(folder / "extract.csv")
    ids = sorted(p.stem for p in (tiling / "patches").glob("*.h5"))
    assert sorted(report["slide_id"]) == ids and set(report["status"]) <= {"ok", "skipped"}
    done = [int(text.split(" done")[0].split()[-1]) if " done" in text else 0 for text in outputs]
    assert sum(done) == len(ids)  # every slide extracted exactly once, by one of the two
    alone = tmp_path / "alone"
    copy_tree(tiling / "patches", alone / "patches")
    shutil.copy(tiling / "tiling.json", alone / "tiling.json")
    subprocess.run([*cmd[:5], str(alone), *cmd[6:]], env=SUBPROCESS_ENV, check=True, capture_output=True)
    reference = alone / "features" / "resnet18-random-t3-s32-fp32"
    for sid in ids:  # the same features as one process alone makes
        a, b = read_feature_file(folder / f"{sid}.h5"), read_feature_file(reference / f"{sid}.h5")
        assert a.fingerprint == b.fingerprint
        np.testing.assert_array_equal(a.features, b.features)
    assert temporaries(tiling) == [] and not list(folder.glob(".*.lock"))


def test_identical_runs_give_byte_identical_model_and_encoder_files(cohort, tmp_path, capsys):
    args = [
        "train",
        "--features",
        cohort["features"],
        "--labels",
        cohort["labels"],
        "--epochs",
        "2",
        "--protocol",
        "split",
    ]
    assert run(capsys, *args, "--out", tmp_path / "a")[0] == 0
    assert (tmp_path / "a" / "model.pt").read_bytes() == (cohort["run"] / "model.pt").read_bytes()
    encoder = create_encoder("resnet18", "random", 1)
    base = create_encoder("resnet18", "random", 0)
    first = save_encoder(encoder, tmp_path / "x" / "encoder.pt", base)
    second = save_encoder(encoder, tmp_path / "y" / "encoder.pt", base)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("command", ["tile", "extract", "train", "evaluate", "study"])
def test_out_that_is_an_existing_file_is_one_line_and_nothing_is_written(cohort, tmp_path, capsys, command):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    args = {
        "tile": ["tile", cohort["slides"]],
        "extract": ["extract", "--patches", cohort["tiling"], *EXTRACT],
        "train": ["train", "--features", cohort["features"], "--labels", cohort["labels"]],
        "evaluate": ["evaluate", "--run", cohort["run"], "--features", cohort["features"]],
        "study": ["study", Path(__file__).resolve().parents[1] / "examples" / "demo_study.yaml"],
    }[command]
    code, _, err = run(capsys, *args, "--out", target)
    assert code == 2 and "is an existing file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert target.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_symlink_loop_as_an_argument_is_one_line(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    code, _, err = run(capsys, "tile", tmp_path / "a", "--out", tmp_path / "out")
    assert code == 2 and "symbolic link loop" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "extract", "--patches", tmp_path / "a", *EXTRACT)
    assert code == 2 and len(err.strip().splitlines()) == 1


def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    return (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )


def test_out_not_writable_is_one_line(cohort, tmp_path, capsys):
    locked = tmp_path / "locked"
    if os.geteuid() == 0:
        if not _mount_tmpfs(locked, "1m", "ro"):
            pytest.skip("a read-only mount is needed to deny root a folder (mount is not permitted here)")
    else:
        locked.mkdir()
        locked.chmod(0o500)
    try:
        code, _, err = run(capsys, "tile", cohort["slides"], "--out", locked / "out")
        assert code == 2 and "cannot write there" in err and len(err.strip().splitlines()) == 1
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(locked)], check=False)
        else:
            locked.chmod(0o700)


def test_disk_full_stops_with_one_line_leaves_no_partial_file_and_resumes(cohort, tmp_path, capsys):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "600k"):
        pytest.skip("a small tmpfs mount is needed to fill a disk (root and mount permission)")
    try:
        out = small / "out"
        args = [
            "extract",
            "--patches",
            cohort["tiling"],
            "--out",
            out,
            "--encoder",
            "resnet18",
            "--weights",
            "random",
            "--truncate",
            "0",
            "--input-size",
            "32",
            "--workers",
            "0",
            "--dtype",
            "float32",
        ]
        (small / "filler").write_bytes(b"\0" * 420_000)
        code, _, err = run(capsys, *args)
        assert code == 2 and "no space left on the device" in err and "re-run the same command" in err
        assert err.count("histotransfer extract: error:") == 1 and "Traceback" not in err
        assert temporaries(small) == []
        folder = out / "features" / "resnet18-random-t0-s32-fp32"
        done_before = {p.name for p in folder.glob("*.h5")}
        for p in folder.glob("*.h5"):  # what was finished is complete
            read_feature_file(p)
        (small / "filler").unlink()
        code, out_text, _ = run(capsys, *args)
        assert (code == 0 and f"{len(done_before)} skipped" in out_text) or not done_before
        assert len(list(folder.glob("*.h5"))) == 8 and temporaries(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--min-tissue", "0", "--min-tissue: Input should be greater than 0"),
        ("--min-tissue", "1.5", "--min-tissue: Input should be less than or equal to 1"),
        ("--magnification", "0", "--magnification: Input should be greater than 0"),
        ("--magnification", "-5", "--magnification: Input should be greater than 0"),
        ("--patch-size", "big", "--patch-size: Input should be a valid integer"),
    ],
)
def test_tiling_options_are_checked_at_the_door(cohort, tmp_path, capsys, option, value, message):
    code, _, err = run(capsys, "tile", cohort["slides"], "--out", tmp_path / "out", option, value)
    assert code == 2 and message in err and not (tmp_path / "out").exists()


def test_a_patch_larger_than_the_slide_is_an_error_row_not_no_tissue(cohort, tmp_path, capsys):
    code, _, err = run(
        capsys, "tile", cohort["slides"], "--out", tmp_path / "out", "--magnification", "10", "--patch-size", "1024"
    )
    assert code == 1 and "more than the slide's 1024 x 1024; choose a smaller --patch-size" in err
    report = pd.read_csv(tmp_path / "out" / "10x_1024px_0px_overlap" / "tiling.csv")
    assert set(report["status"]) == {"error"}


def test_labels_files_are_checked_at_the_door_and_the_positive_class_is_said(cohort, tmp_path, capsys):
    ids = sorted(p.stem for p in cohort["features"].glob("*.h5"))
    semicolons = tmp_path / "semi.csv"
    semicolons.write_text("slide_id;label\n" + "".join(f"{s};{i % 2}\n" for i, s in enumerate(ids)))
    code, _, err = run(
        capsys, "train", "--features", cohort["features"], "--labels", semicolons, "--out", tmp_path / "r1"
    )
    assert code == 2 and "separated by semicolons, not commas" in err and not (tmp_path / "r1").exists()
    cased = tmp_path / "cased.csv"
    cased.write_text(
        "slide_id,label\n" + "".join(f"{s},{['Tumor', 'tumor', 'normal'][i % 3]}\n" for i, s in enumerate(ids))
    )
    code, _, err = run(capsys, "train", "--features", cohort["features"], "--labels", cased, "--out", tmp_path / "r2")
    assert code == 2 and "'Tumor' and 'tumor' differ only by case" in err
    code, out_text, _ = run(
        capsys,
        "train",
        "--features",
        cohort["features"],
        "--labels",
        cohort["labels"],
        "--out",
        cohort["run"],
        "--epochs",
        "2",
        "--protocol",
        "split",
    )
    assert code == 0 and "positive class: '1'" in out_text and "already trained" in out_text
    assert json.loads((cohort["run"] / "metrics.json").read_text())["positive_class"] == "1"


def test_study_check_catches_what_train_would_refuse_about_labels(cohort, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    ids = sorted(p.stem for p in cohort["slides"].glob("*.tif"))
    labels.write_text("slide_id,label\n" + "".join(f"{s},{'abc'[i % 3]}\n" for i, s in enumerate(ids)))
    study = tmp_path / "study.yaml"
    study.write_text(
        f"datasets:\n  - {{name: d, slides: {cohort['slides']}, labels: {labels}}}\n"
        "encoders:\n  - {name: resnet18, weights: random}\n"
    )
    code, _, err = run(capsys, "study", study, "--check")
    assert code == 2 and "datasets[0].labels: " in err and "holds 3 classes" in err


def test_a_run_records_what_it_was_trained_on(cohort):
    config = json.loads((cohort["run"] / "config.json").read_text())
    inputs = config["inputs"]
    files = sorted(cohort["features"].glob("*.h5"))
    assert inputs["features"] == {p.stem: read_feature_file(p).fingerprint for p in files}
    assert inputs["labels_sha256"] == hashlib.sha256(Path(cohort["labels"]).read_bytes()).hexdigest()
    assert config["settings"]["seed"] == 0 and config["encoder"]["settings_fingerprint"]


def test_a_killed_process_lock_and_temporary_do_not_block_a_rerun(cohort, tmp_path, capsys):
    tiling = copy_tree(cohort["tiling"], tmp_path / "tiling")
    folder = tiling / "features" / "resnet18-random-t3-s32-fp32"
    sid = sorted(p.stem for p in folder.glob("*.h5"))[0]
    (folder / f"{sid}.h5").unlink()
    (folder / f".{sid}.lock").write_text(f"{HOST} 999999\n")  # its process was killed
    time.sleep(0.01)
    code, out_text, _ = run(capsys, "extract", "--patches", tiling, *EXTRACT)
    assert code == 0 and "1 done, 7 skipped" in out_text and not (folder / f".{sid}.lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# Tilings mixed in one feature folder, patch coordinates off the slide, runs without a loadable model, reused
# evaluate/heatmap folders, dead CKA temporaries, slide edits of the same size, failed model writes, damaged
# checkpoints, and refusals made before anything is written.


def _one_line_error(err: str, command: str) -> bool:
    """Exactly one error line (progress bars aside) and no traceback."""
    return err.count(f"histotransfer {command}: error:") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file "
            "write failed"
        ),
        OSError(28, "No space left on device"),
    ],
)
def test_a_failed_model_write_is_one_line_and_leaves_no_model(cohort, tmp_path, capsys, monkeypatch, failure):
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise failure

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--features", cohort["features"], "--labels", cohort["labels"], "--out", out, "--epochs", "1"
    )
    assert code == 2 and _one_line_error(err, "train") and str(out / "model.pt") in err
    expected = "could not write the file (" if isinstance(failure, RuntimeError) else "no space left on the device"
    assert expected in err and "Traceback" not in err
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists() and temporaries(tmp_path) == []


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["missing", "cut short", "a byte changed"])
def test_a_run_counts_as_finished_only_when_its_model_loads(cohort, tmp_path, capsys, damage):
    from histotransfer.info import describe
    from histotransfer.study.runner import _outputs_exist

    run_copy = copy_tree(cohort["run"], tmp_path / "run")
    model = run_copy / "model.pt"
    {"missing": Path.unlink, "cut short": _truncate, "a byte changed": _flip_middle_byte}[damage](model)
    assert describe(run_copy)["finished"] is False
    code, _, err = run(capsys, "info", run_copy, "--check")
    assert code == 1 and "model.pt is missing or does not load" in err
    assert not _outputs_exist({"run": "run"}, tmp_path)  # the study redoes the cell
    code, out_text, _ = run(
        capsys,
        "train",
        "--features",
        cohort["features"],
        "--labels",
        cohort["labels"],
        "--out",
        run_copy,
        "--epochs",
        "2",
        "--protocol",
        "split",
    )
    assert code == 0 and "kept (done before)" not in out_text and "train: done" in out_text
    assert model.read_bytes() == (cohort["run"] / "model.pt").read_bytes()  # redone, the same model
    assert _outputs_exist({"run": "run"}, tmp_path)
    assert run(capsys, "info", run_copy, "--check")[0] == 0


FINETUNE = ["--epochs", "1", "--top-k", "2", "--device", "cpu", "--workers", "0"]


@pytest.mark.parametrize("kind", ["garbage", "cut short", "pickled object", "another model"])
def test_a_damaged_checkpoint_on_resume_is_one_line_saying_to_remove_it(cohort, tmp_path, capsys, kind):
    import argparse

    out = tmp_path / "ft"
    out.mkdir()
    checkpoint = out / "checkpoint.pt"
    if kind == "garbage":
        checkpoint.write_bytes(b"\x00not a checkpoint" * 64)
    elif kind == "pickled object":
        torch.save({"epoch": 1, "model": argparse.Namespace(a=1)}, checkpoint)
    else:
        state = {
            "epoch": 1,
            "model": {"w": torch.zeros(3)},
            "optimizer": {},
            "scaler": {},
            "best_state": None,
            "best_key": None,
            "best_epoch": 1,
            "history": [],
        }
        torch.save(state, checkpoint)
        if kind == "cut short":
            _truncate(checkpoint)
    code, _, err = run(capsys, "finetune", "--run", cohort["run"], "--out", out, *FINETUNE)
    assert code == 2 and _one_line_error(err, "finetune") and "Traceback" not in err
    assert f"{checkpoint}: not a readable checkpoint of this fine-tuning" in err
    assert "delete it, or move it aside, and re-run the same command" in err
    assert checkpoint.exists() and not (out / "model.pt").exists()


def test_finetune_refuses_another_slide_before_writing_anything(cohort, tmp_path, capsys):
    impostors = impostor_slides(cohort, tmp_path / "impostors")
    out = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", "--run", cohort["run"], "--out", out, *FINETUNE, "--slides", impostors)
    assert code == 2 and _one_line_error(err, "finetune") and "is not the slide" in err
    assert not out.exists() and temporaries(tmp_path) == []


def test_train_refuses_a_feature_folder_mixing_two_tilings(cohort, tmp_path, capsys):
    slides = copy_tree(cohort["slides"], tmp_path / "slides")
    out = tmp_path / "tiles"
    assert run(capsys, "tile", slides, "--out", out, "--magnification", "10", "--patch-size", "32")[0] == 0
    assert run(capsys, "extract", "--patches", out / "10x_32px_0px_overlap", *EXTRACT)[0] == 0
    mixed = copy_tree(cohort["features"], tmp_path / "mixed")
    intruder = sorted(mixed.glob("*.h5"))[-1]
    shutil.copy(out / "10x_32px_0px_overlap" / "features" / "resnet18-random-t3-s32-fp32" / intruder.name, intruder)
    code, _, err = run(
        capsys, "train", "--features", mixed, "--labels", cohort["labels"], "--out", tmp_path / "run", "--epochs", "1"
    )
    assert code == 2 and _one_line_error(err, "train")
    assert f"{intruder}: features of tiling '10x_32px_0px_overlap'" in err and f"of tiling '{TILING}'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("corner", [(5000, 5000), (-64, 0), (0, 10**12)])
def test_patch_coordinates_off_the_slide_are_refused_naming_the_slide(cohort, tmp_path, capsys, corner):
    from histotransfer.errors import FormatError

    tiling = copy_tree(cohort["tiling"], tmp_path / "tiling")
    shutil.rmtree(tiling / "features")
    victim = sorted((tiling / "patches").glob("*.h5"))[0]
    with h5py.File(victim, "r+") as f:
        f["coords"][1] = corner
    with pytest.raises(FormatError, match=r"patch row 1 at .* lies outside slide .*\(1024 x 1024 level-0 pixels\)"):
        read_patch_file(victim)
    code = run(capsys, "extract", "--patches", tiling, *EXTRACT)[0]
    folder = tiling / "features" / "resnet18-random-t3-s32-fp32"
    report = pd.read_csv(folder / "extract.csv", keep_default_na=False).set_index("slide_id")
    assert code == 1 and report.loc[victim.stem, "status"] == "error"
    assert f"at ({corner[0]}, {corner[1]})" in report.loc[victim.stem, "message"]
    assert victim.stem in report.loc[victim.stem, "message"] and not (folder / victim.name).exists()


def test_cka_removes_scratch_folders_of_dead_processes_and_keeps_live_ones(cohort, tmp_path, capsys):
    from histotransfer._io import temp_folder

    out = tmp_path / "cka"
    out.mkdir()
    with temp_folder(out, "cka-maps") as mine:  # the scratch folder names the process that owns it
        assert mine.name.startswith(f".cka-maps-{HOST}-{os.getpid()}-")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, live = out / f".cka-maps-{HOST}-999999-k1ll3d", out / f".cka-maps-{HOST}-{sleeper.pid}-w0rk1ng"
        for folder in (dead, live):
            folder.mkdir()
            (folder / "maps.npy").write_bytes(b"\0" * 1024)
        code = run(
            capsys,
            "cka",
            "--encoder-a",
            cohort["run"],
            "--encoder-b",
            "resnet18",
            "--weights-b",
            "random",
            "--truncate-b",
            "3",
            "--patches",
            cohort["tiling"],
            "--out",
            out,
            "--n-patches",
            "16",
            "--no-baseline",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--pooling",
            "flatten",
        )[0]
        assert code == 0 and not dead.exists() and (live / "maps.npy").is_file()
        assert sorted(p.name for p in out.rglob(".cka-maps-*")) == [live.name]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_slide_edited_in_the_middle_with_its_size_unchanged_is_detected(tmp_path, capsys):
    from histotransfer.demo_slides import render_tissue, write_pyramidal_tiff
    from histotransfer.slide import IDENTITY_KEYS

    rng = np.random.default_rng(0)
    tissue = np.zeros((2048, 2048), bool)
    tissue[512:1536, 512:1536] = True
    rgb = render_tissue(tissue, None, rng)  # noise makes the JPEG tiles large: the file exceeds 2 MiB
    rgb = np.clip(rgb.astype(np.int16) + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    slide = write_pyramidal_tiff(tmp_path / "slides" / "big.tif", rgb, 0.5)
    size = slide.stat().st_size
    assert size > (2 << 20) + (64 << 10) and "sample_sha256" in IDENTITY_KEYS
    out = tmp_path / "tiles"
    tile = ["tile", tmp_path / "slides", "--out", out, "--magnification", "10", "--patch-size", "64"]
    assert run(capsys, *tile)[0] == 0
    data = bytearray(slide.read_bytes())
    data[size // 2] ^= 0xFF  # beyond the first and last MiB; the size is the same
    slide.write_bytes(bytes(data))
    code = run(capsys, "extract", "--patches", out / TILING, *EXTRACT)[0]
    report = pd.read_csv(out / TILING / "features" / "resnet18-random-t3-s32-fp32" / "extract.csv")
    assert code == 1 and report["status"].tolist() == ["error"]
    message = report["message"][0]
    assert "is not the slide" in message and "differs in sample_sha256" in message and "head_sha256" not in message
    code, out_text, _ = run(capsys, *tile)
    assert code == 0 and "1 done" in out_text  # re-tiled: the slide changed
    # A patch file recorded before the sample existed is checked on the keys it holds, and kept by tile.
    with h5py.File(out / TILING / "patches" / "big.h5", "r+") as f:
        identity = json.loads(f.attrs["slide_identity"])
        del identity["sample_sha256"]
        f.attrs["slide_identity"] = json.dumps(identity)
    assert run(capsys, "extract", "--patches", out / TILING, *EXTRACT)[0] == 0
    code, out_text, _ = run(capsys, *tile)
    assert code == 0 and "1 skipped" in out_text


@pytest.fixture(scope="module")
def second_run(cohort):
    """Another run on the same features (another seed): its model, and so its fingerprint, differ."""
    out = cohort["root"] / "run_seed1"
    assert (
        main(
            [
                "train",
                "--features",
                str(cohort["features"]),
                "--labels",
                str(cohort["labels"]),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    return out


def test_evaluate_into_a_folder_of_another_run_is_refused_and_its_attention_is_never_taken_for_ours(
    cohort, second_run, tmp_path, capsys
):
    from histotransfer.mil import run_fingerprint

    shared = tmp_path / "eval"
    evaluate = ["--features", cohort["features"], "--out", shared]
    assert run(capsys, "evaluate", "--run", cohort["run"], *evaluate)[0] == 0
    first = run_fingerprint(cohort["run"])
    assert json.loads((shared / "evaluation.json").read_text())["run_fingerprint"] == first
    for path in (shared / "attention").glob("*.h5"):
        with h5py.File(path, "r") as f:
            assert f.attrs["run_fingerprint"] == first
    before = digests(shared)
    code, _, err = run(capsys, "evaluate", "--run", second_run, *evaluate)
    assert code == 2 and _one_line_error(err, "evaluate") and f"{shared}: holds the evaluation of another run" in err
    assert digests(shared) == before
    assert run(capsys, "evaluate", "--run", cohort["run"], *evaluate)[0] == 0  # its own run may write again
    # heatmap --attention: the first run's attention is not painted as the second's
    code, _, _ = run(
        capsys,
        "heatmap",
        "--run",
        second_run,
        "--slides",
        cohort["slides"],
        "--out",
        tmp_path / "maps",
        "--attention",
        shared / "attention",
    )
    report = pd.read_csv(tmp_path / "maps" / "heatmaps.csv", keep_default_na=False)
    assert code == 1 and set(report["status"]) == {"error"} and not list((tmp_path / "maps").glob("*.png"))
    assert all("was made by run" in m and "not by this run" in m for m in report["message"])


def test_heatmap_into_a_folder_of_another_run_is_refused_and_its_report_names_the_run(
    cohort, second_run, tmp_path, capsys
):
    from histotransfer.mil import run_fingerprint

    out = tmp_path / "maps"
    assert run(capsys, "heatmap", "--run", cohort["run"], "--slides", cohort["slides"], "--out", out)[0] == 0
    report = pd.read_csv(out / "heatmaps.csv", keep_default_na=False)
    assert set(report["run_fingerprint"]) == {run_fingerprint(cohort["run"])} and len(report) == 8
    assert set(report["run"]) == {str(cohort["run"].resolve())}
    before = digests(out)
    code, _, err = run(capsys, "heatmap", "--run", second_run, "--slides", cohort["slides"], "--out", out)
    assert code == 2 and _one_line_error(err, "heatmap") and f"{out}: holds heatmaps of another run" in err
    assert digests(out) == before


def test_bench_extract_weights_file_applies_only_to_the_configs_it_fits(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_extract.py"
    spec = importlib.util.spec_from_file_location("bench_extract", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    weights = str(save_encoder(create_encoder("resnet18", "random", 0), tmp_path / "resnet18.pt"))
    assert bench.default_weights("resnet18", weights) == weights
    capsys.readouterr()
    assert bench.default_weights("densenet121", weights) in ("random", str(bench.DENSENET))
    said = capsys.readouterr().out
    assert f"--weights {weights} does not fit densenet121" in said and "densenet121 runs with" in said
    with pytest.raises(SystemExit, match="--weights nonsense"):
        bench.default_weights("resnet18", "nonsense")


# ---- Ids read as missing values, foreign encodings, special files, out-of-range options, YAML aliases ----

NA_IDS = ["NA", "null", "nan", "None", "NaN", "NULL", "#NA", "<NA>"]  # pandas' missing-value spellings


@pytest.mark.slow
def test_slide_ids_spelt_like_missing_values_stay_slides_through_finetune(cohort, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    labels = pd.read_csv(cohort["labels"], dtype=str, keep_default_na=False).sort_values("slide_id")
    labels = labels.groupby("label").head(3)  # three slides of each class, the fewest a split takes
    names = dict(zip(labels["slide_id"], NA_IDS))
    for sid in names:
        (slides / f"{names[sid]}.tif").write_bytes((cohort["slides"] / f"{sid}.tif").read_bytes())
    labels = labels.assign(slide_id=labels["slide_id"].map(names))
    labels.assign(patient_id=labels["slide_id"]).to_csv(tmp_path / "labels.csv", index=False)
    tile = ["tile", slides, "--out", tmp_path / "tiles", "--magnification", "5", "--patch-size", "64"]
    assert run(capsys, *tile)[0] == 0
    tiling = tmp_path / "tiles" / "5x_64px_0px_overlap"
    assert run(capsys, "extract", "--patches", tiling, *EXTRACT)[0] == 0
    features = tiling / "features" / "resnet18-random-t3-s32-fp32"
    assert (
        run(
            capsys,
            "train",
            "--features",
            features,
            "--labels",
            tmp_path / "labels.csv",
            "--out",
            tmp_path / "run",
            "--epochs",
            "1",
        )[0]
        == 0
    )
    code, _, _ = run(
        capsys,
        "finetune",
        "--run",
        tmp_path / "run",
        "--out",
        tmp_path / "ft",
        "--epochs",
        "1",
        "--top-k",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
    )
    assert code == 0
    splits = pd.read_csv(tmp_path / "ft" / "splits.csv", dtype=str, keep_default_na=False)
    assert sorted(splits["slide_id"]) == sorted(names.values())
    fitted = sorted(splits.loc[splits["split"] != "test", "slide_id"])
    topk = pd.read_csv(tmp_path / "ft" / "topk.csv", dtype=str, keep_default_na=False)
    assert sorted(set(topk["slide_id"])) == fitted
    refeatured = {p.stem for p in (tmp_path / "ft").rglob("*.h5") if p.parent.name != "attention"}
    assert refeatured == set(names.values())  # every slide fine-tuned on or re-extracted, none read as missing


def test_every_reader_keeps_na_spelt_ids_as_text(tmp_path):
    from histotransfer._read import read_csv

    path = tmp_path / "t.csv"
    path.write_text("slide_id,patient_id,case_id,centre_id,score,label\nN/A,NA,null,None,NA,1\nnan,,n/a,NaN,0.5,0\n")
    table = read_csv(path)
    assert list(table["slide_id"]) == ["N/A", "nan"] and list(table["patient_id"]) == ["NA", ""]
    assert list(table["case_id"]) == ["null", "n/a"] and list(table["centre_id"]) == ["None", "NaN"]
    assert table["score"].isna().tolist() == [True, False]  # other columns still read missing values


@pytest.mark.slow
def test_labels_and_split_files_in_utf16_are_read_and_latin1_is_one_line(cohort, tmp_path, capsys):
    labels = pd.read_csv(cohort["labels"], dtype=str, keep_default_na=False)
    # Excel's "Unicode text": UTF-16 LE with its byte-order mark, tab-separated.
    excel = tmp_path / "labels.txt"
    excel.write_bytes(labels.to_csv(sep="\t", index=False).encode("utf-16"))
    assert excel.read_bytes()[:2] == b"\xff\xfe"
    split = tmp_path / "split.csv"  # UTF-8 with a byte-order mark (Excel's "CSV UTF-8")
    ids = sorted(labels["slide_id"])
    split.write_text((cohort["run"] / "splits.csv").read_text(), encoding="utf-8-sig")
    code, _, err = run(
        capsys,
        "train",
        "--features",
        cohort["features"],
        "--labels",
        excel,
        "--split-file",
        split,
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
    )
    assert code == 0, err
    written = pd.read_csv(tmp_path / "run" / "splits.csv", dtype=str, keep_default_na=False)
    given = pd.read_csv(cohort["run"] / "splits.csv", dtype=str, keep_default_na=False)
    assert sorted(zip(written["slide_id"], written["split"])) == sorted(zip(given["slide_id"], given["split"]))
    latin = tmp_path / "labels.csv"
    latin.write_bytes(
        ("slide_id,label\n" + "".join(f"{s},{['tumeur maligné', 'bénin'][i % 2]}\n" for i, s in enumerate(ids))).encode(
            "latin-1"
        )
    )
    for args in (
        ["train", "--features", cohort["features"], "--labels", latin, "--out", tmp_path / "r2"],
        [
            "train",
            "--features",
            cohort["features"],
            "--labels",
            cohort["labels"],
            "--split-file",
            latin,
            "--out",
            tmp_path / "r2",
        ],
    ):
        code, _, err = run(capsys, *args)
        assert code == 2 and "labels.csv is not UTF-8 (looks like Latin-1" in err and str(latin) in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r2").exists()


@pytest.mark.parametrize(
    "seed, message",
    [
        ("-1", "--seed: Input should be greater than or equal to 0"),
        ("4294967296", "--seed: Input should be less than or equal to 4294967295"),
    ],
)
@pytest.mark.parametrize("command", ["train", "finetune", "cka", "demo"])
def test_seeds_numpy_cannot_take_are_refused_at_the_door(cohort, tmp_path, capsys, command, seed, message):
    out = tmp_path / "out"
    args = {
        "train": ["train", "--features", cohort["features"], "--labels", cohort["labels"], "--out", out],
        "finetune": ["finetune", "--run", cohort["run"], "--out", out, "--device", "cpu"],
        "cka": [
            "cka",
            "--encoder-a",
            cohort["run"],
            "--encoder-b",
            "resnet18",
            "--weights-b",
            "random",
            "--patches",
            cohort["tiling"],
            "--out",
            out,
            "--device",
            "cpu",
        ],
        "demo": ["demo", "--out", out],
    }[command]
    code, _, err = run(capsys, *args, "--seed", seed)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_study_check_refuses_a_negative_seed(cohort, tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(
        f"datasets:\n  - {{name: d, slides: {cohort['slides']}, labels: {cohort['labels']}}}\n"
        "encoders:\n  - {name: resnet18, weights: random}\nseeds: [0, -1]\n"
    )
    code, _, err = run(capsys, "study", study, "--check")
    assert code == 2 and "seeds: expected a non-empty list of distinct integers from 0 to 4294967295" in err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-side", "0", "--max-side: Input should be greater than or equal to 64"),
        ("--max-side", "1", "--max-side: Input should be greater than or equal to 64"),
        ("--max-side", "-5", "--max-side: Input should be greater than or equal to 64"),
        ("--patch-size-level0", "-5", "--patch-size-level0: Input should be greater than or equal to 1"),
        ("--patch-size-level0", "0", "--patch-size-level0: Input should be greater than or equal to 1"),
        ("--mpp", "-0.5", "--mpp: Input should be greater than 0"),
    ],
)
def test_heatmap_sizes_are_checked_at_the_door(cohort, tmp_path, capsys, option, value, message):
    code, _, err = run(
        capsys,
        "heatmap",
        "--run",
        cohort["run"],
        "--slides",
        cohort["slides"],
        "--out",
        tmp_path / "out",
        option,
        value,
    )
    assert code == 2 and message in err and not (tmp_path / "out").exists()


def test_heatmap_out_that_is_an_existing_file_names_it(cohort, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, _, err = run(capsys, "heatmap", "--run", cohort["run"], "--slides", cohort["slides"], "--out", target)
    assert code == 2 and f"--out {target}: is an existing file, not a folder; choose a folder" in err
    assert target.read_text() == "not a folder" and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("n", ["0", "-3", "5"])
def test_demo_with_too_few_slides_says_how_many_it_needs(tmp_path, capsys, n):
    code, _, err = run(capsys, "demo", "--out", tmp_path / "out", "--n-slides", n)
    assert code == 2 and "--n-slides: Input should be greater than or equal to 6" in err
    assert not (tmp_path / "out").exists()


def _geojson_polygon(path: Path, ring: list[list[float]]) -> Path:
    path.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}))
    return path


def test_an_annotation_vertex_far_outside_the_slide_keeps_its_outline(tmp_path):
    from histotransfer.annotations import load_annotation

    far = 1e10  # 256 x 1e10 overflows OpenCV's 32-bit fixed-point vertices
    ring = [[100, 100], [far, 100], [far, 500], [100, 500], [100, 100]]
    annotation = load_annotation(_geojson_polygon(tmp_path / "far.geojson", ring))
    mask = annotation.rasterize((256, 256), 4.0)
    rows, cols = np.mgrid[0:256, 0:256]
    expected = (cols >= 25) & (rows >= 25) & (rows < 125)  # pixel centres inside x >= 100, 100 <= y < 500
    np.testing.assert_array_equal(mask, expected)


def test_a_nan_annotation_vertex_names_the_annotation_file(cohort, tmp_path, capsys):
    splits = pd.read_csv(cohort["run"] / "splits.csv", dtype=str, keep_default_na=False)
    sid = sorted(splits.loc[splits["label"] == "1", "slide_id"])[0]
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    bad = annotations / f"{sid}.geojson"
    bad.write_text('{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [100, 100], [0, 100], [0, 0]]]}')
    code, _, _ = run(
        capsys,
        "heatmap",
        "--run",
        cohort["run"],
        "--slides",
        cohort["slides"] / f"{sid}.tif",
        "--out",
        tmp_path / "out",
        "--annotations",
        annotations,
    )
    report = pd.read_csv(tmp_path / "out" / "heatmaps.csv", dtype=str, keep_default_na=False)
    assert code == 1 and list(report["status"]) == ["error"]
    assert f"{bad}: a Polygon vertex is NaN or infinite; fix or re-export this annotation file" in report["message"][0]


def _study_text(cohort) -> str:
    return (
        f"datasets:\n  - {{name: d, slides: {cohort['slides']}, labels: {cohort['labels']}}}\n"
        "encoders:\n  - {name: resnet18, weights: random}\n"
    )


def test_yaml_aliases_in_a_study_file_are_refused_before_they_expand(cohort, tmp_path, capsys):
    plain = tmp_path / "plain.yaml"
    plain.write_text(_study_text(cohort) + "tile: {min_tissue: 0.5}\nmil: {dropout: 0.5}\n")
    assert run(capsys, "study", plain, "--check")[0] == 0
    aliased = tmp_path / "aliased.yaml"  # the same study once expanded: refused all the same, naming the line
    aliased.write_text(_study_text(cohort) + "tile: {min_tissue: &f 0.5}\nmil: {dropout: *f}\n")
    code, _, err = run(capsys, "study", aliased, "--check")
    assert code == 2 and f"{aliased}: line 6 uses the YAML alias *f; anchors and aliases" in err
    assert len(err.strip().splitlines()) == 1
    bomb = tmp_path / "bomb.yaml"  # each level nine times the one before
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)
    ]
    bomb.write_text("\n".join(levels) + "\n" + _study_text(cohort))
    code, _, err = run(capsys, "study", bomb, "--check")
    assert code == 2 and "line 2 uses the YAML alias *a0" in err


def test_a_named_pipe_given_as_a_slide_is_refused_not_waited_on(cohort, tmp_path):
    pipe = tmp_path / "pipe.svs"
    os.mkfifo(pipe)
    cmd = [sys.executable, "-m", "histotransfer", "tile", str(pipe), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        cmd,
        env={**SUBPROCESS_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and f"{pipe}: is a named pipe, not a regular file" in done.stderr
    assert not (tmp_path / "out").exists()


def test_named_pipes_among_slides_labels_study_and_annotations_are_refused(cohort, tmp_path, capsys):
    slides = copy_tree(cohort["slides"], tmp_path / "slides")
    os.mkfifo(slides / "zz_pipe.tif")
    code, _, err = run(capsys, "tile", slides, "--out", tmp_path / "out")
    assert code == 2 and f"{slides / 'zz_pipe.tif'}: is a named pipe, not a regular file" in err
    assert not (tmp_path / "out").exists()
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    code, _, err = run(capsys, "train", "--features", cohort["features"], "--labels", pipe, "--out", tmp_path / "r")
    assert code == 2 and f"{pipe}: is a named pipe, not a regular file; pass a regular label file" in err
    code, _, err = run(
        capsys,
        "train",
        "--features",
        cohort["features"],
        "--labels",
        cohort["labels"],
        "--split-file",
        pipe,
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and f"{pipe}: is a named pipe, not a regular file; pass a regular split file" in err
    os.mkfifo(tmp_path / "study.yaml")
    code, _, err = run(capsys, "study", tmp_path / "study.yaml", "--check")
    assert code == 2 and "study.yaml: is a named pipe, not a regular file; pass a regular study file" in err
    from histotransfer.annotations import load_annotation

    os.mkfifo(tmp_path / "lesion.geojson")
    with pytest.raises(HistotransferError, match=r"lesion\.geojson: is a named pipe, not a regular file"):
        load_annotation(tmp_path / "lesion.geojson")
    assert not (tmp_path / "r").exists()


def test_a_png_named_like_a_slide_is_told_what_it_is(tmp_path, capsys):
    import cv2

    fake = tmp_path / "slide.svs"
    _, data = cv2.imencode(".png", np.full((300, 300, 3), 200, np.uint8))
    fake.write_bytes(data.tobytes())
    code, _, err = run(capsys, "tile", fake, "--out", tmp_path / "out")
    assert code == 1 and f"{fake}: is a PNG image, not a .svs slide (its extension does not match its content)" in err
    assert "rename it to .png and pass --mpp" in err
