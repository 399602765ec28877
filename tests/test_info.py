"""``histotransfer info``: each kind of path the pipeline writes is described with the numbers its own files
hold (patch counts from the HDF5 files, statuses from the CSV reports, AUCs from metrics.json), stale and
non-finite features are flagged, --json holds the same, and anything else is a one-line error (exit 2)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from histotransfer.cli import main
from histotransfer.demo_slides import make_demo_slides, write_pyramidal_tiff
from histotransfer.errors import HistotransferError
from histotransfer.features import extract_features
from histotransfer.features.feature_file import FeatureWriter, rows_fingerprint
from histotransfer.finetune import finetune
from histotransfer.info import Keyed, describe, render
from histotransfer.mil import train_mil
from histotransfer.patches.tiling import tile_slides
from histotransfer.study import runner, work

CMU_SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"
# Patient-level split of the 8 demo slides (demo_06/07 and demo_02/05 share a patient), both classes in each.
SPLIT = {
    "demo_06": "train",
    "demo_07": "train",
    "demo_02": "train",
    "demo_05": "train",
    "demo_03": "val",
    "demo_04": "val",
    "demo_01": "test",
    "demo_08": "test",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """8 demo slides plus a blank one (no tissue) and a broken one (error), tiled at 10x into 64 px patches;
    features of a random resnet18 cut after layer2 at 32 px; a 2-epoch MIL run, a 2-fold cross-validation and
    a 1-epoch fine-tuning. Then demo_08's slide file is replaced and re-tiled, making its features stale (its
    old patch file is kept aside)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("info")
    demo = make_demo_slides(root, n_slides=8, seed=0, size=1024, mpp=0.5)
    blank = write_pyramidal_tiff(root / "slides" / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), 0.5)
    broken = root / "slides" / "broken.svs"
    broken.write_bytes(b"not a slide")
    tiling = tile_slides([*demo.slides, blank, broken], root / "tiles", magnification=10, patch_size=64)
    torch.manual_seed(0)
    features = extract_features(
        tiling.folder, None, "resnet18", "random", truncate=2, input_size=32, batch_size=64, workers=0, device="cpu"
    )
    split_file = root / "split.csv"
    pd.DataFrame({"slide_id": list(SPLIT), "split": list(SPLIT.values())}).to_csv(split_file, index=False)
    run = train_mil(features, demo.labels_csv, root / "run", epochs=2, seed=0, split_file=split_file)
    per_slide = pd.read_csv(demo.labels_csv)[["slide_id", "label"]]
    per_slide.to_csv(root / "labels_per_slide.csv", index=False)
    cv = train_mil(features, root / "labels_per_slide.csv", root / "cv", epochs=1, seed=0, folds=2)
    ft = finetune(run, root / "ft", top_k=4, epochs=1, lr=1e-4, device="cpu", freeze_stages=1)
    old = root / "old_patches" / "demo_08.h5"
    old.parent.mkdir()
    shutil.copy(tiling.patches / "demo_08.h5", old)
    shutil.copy(root / "slides" / "demo_07.tif", root / "slides" / "demo_08.tif")
    tile_slides([root / "slides" / "demo_08.tif"], root / "tiles", magnification=10, patch_size=64)
    torch.set_num_threads(threads)
    return {
        "root": root,
        "tiling": tiling.folder,
        "patches": tiling.patches,
        "features": features,
        "run": run,
        "cv": cv,
        "ft": ft,
        "old_patch_file": old,
        "slides": root / "slides",
    }


def n_rows(path: Path, name: str = "coords") -> int:
    with h5py.File(path, "r") as f:
        return f[name].shape[0]


def attr(path: Path, key: str):
    with h5py.File(path, "r") as f:
        value = f.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------------------------- slides


def test_slide_is_described_with_its_pyramid_mpp_size_and_the_identity_tiling_recorded(built):
    path = built["slides"] / "demo_01.tif"
    d = describe(path)
    assert d["kind"] == "slide" and d["backend"] == "openslide"
    assert d["dimensions"] == [1024, 1024]
    assert [(lv["dimensions"], lv["downsample"]) for lv in d["levels"]] == [
        ([1024, 1024], 1.0),
        ([512, 512], 2.0),
        ([256, 256], 4.0),
    ]
    assert d["mpp"] == pytest.approx(0.5) and d["file_size"] == path.stat().st_size
    assert d["identity"] == json.loads(attr(built["patches"] / "demo_01.h5", "slide_identity"))


def test_slide_without_mpp_is_described_with_mpp_missing(make_slide):
    d = describe(make_slide("nompp", size=(1024, 1024), mpp=None))
    assert d["kind"] == "slide" and d["mpp"] is None and d["identity"]["native_mpp"] is None


def test_real_aperio_slide_reports_vendor_mpp_and_objective_power(cmu_svs):
    d = describe(cmu_svs)
    assert (d["vendor"], d["mpp"], d["objective_power"]) == ("aperio", pytest.approx(0.499), 20.0)
    assert d["dimensions"] == [2220, 2967] and len(d["levels"]) == 1


# ------------------------------------------------------------------------------------------------ patch files


def test_patch_file_reports_count_spec_tiling_slide_and_the_fingerprint_extraction_recorded(built):
    path = built["patches"] / "demo_01.h5"
    d = describe(path)
    assert d["kind"] == "patch file" and d["layout"] == "histotransfer.patches v2"
    assert d["slide_id"] == "demo_01" and d["patches"] == n_rows(path)
    assert d["spec"] == {
        "patch_size": 64,
        "patch_size_level0": 128,
        "patch_level": 1,
        "magnification": 10.0,
        "mpp": 0.5,
        "stride": 64,
        "min_tissue": 0.5,
    }
    assert d["tiling"] == "10x_64px_0px_overlap" and d["tiling_settings"]["patch_size"] == 64
    assert d["slide_path"] == str(built["slides"] / "demo_01.tif") and d["slide_exists"] is True
    assert d["slide_identity"] == json.loads(attr(path, "slide_identity"))
    assert d["fingerprint"] == attr(built["features"] / "demo_01.h5", "patches_fingerprint")
    assert "slide_matches" not in d
    assert describe(path, check=True)["slide_matches"] is True


def test_check_flags_a_patch_file_whose_slide_file_was_replaced(built):
    d = describe(built["old_patch_file"], check=True)
    assert d["slide_matches"] is False
    assert any(diff.startswith("head_sha256") for diff in d["slide_differences"])
    assert main(["info", "--check", str(built["old_patch_file"])]) == 1  # scripts can rely on the status
    assert main(["info", str(built["old_patch_file"])]) == 0


@pytest.mark.parametrize(
    "layout, attrs",
    [
        ("CLAM", {"patch_size": 256, "patch_level": 0, "level_dim": [1024, 1024]}),
        ("TRIDENT", {"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20.0}),
    ],
)
def test_clam_and_trident_patch_files_are_told_apart_by_their_coords_attrs(tmp_path, layout, attrs):
    path = tmp_path / "s1.h5"
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("coords", data=np.arange(10, dtype=np.int64).reshape(5, 2) * 256)
        dset.attrs.update(attrs)
    d = describe(path, check=True)
    assert (d["layout"], d["patches"], d["spec"]["patch_size"]) == (layout, 5, 256)
    assert d["slide_identity"] is None and d["slide_matches"] is None


# --------------------------------------------------------------------------------------------------- tilings


def test_tiling_reports_patch_counts_of_the_files_statuses_of_tiling_csv_and_its_feature_folders(built):
    d = describe(built["tiling"])
    files = sorted(built["patches"].glob("*.h5"))
    counts = [n_rows(p) for p in files]
    assert d["kind"] == "tiling" and d["tiling"] == "10x_64px_0px_overlap" and d["settings"]["magnification"] == 10
    assert d["slides"] == len(files) == 8
    assert d["patches_per_slide"] == {
        "min": min(counts),
        "median": float(np.median(counts)),
        "max": max(counts),
        "total": sum(counts),
    }
    report = pd.read_csv(built["tiling"] / "tiling.csv", keep_default_na=False)
    assert d["statuses"] == dict(Counter(report["status"]))
    assert d["statuses"] == {"ok": 8, "no_tissue": 1, "error": 1}
    assert list(d["failed"]) == ["broken"] and "broken.svs" in d["failed"]["broken"]
    assert d["feature_folders"] == {built["features"].name: {"slides": 8}}
    assert describe(built["patches"]) == d
    assert describe(built["root"] / "tiles") == d


def test_bare_folder_of_patch_files_is_a_patch_folder(built, tmp_path):
    shutil.copy(built["patches"] / "demo_02.h5", tmp_path / "demo_02.h5")
    d = describe(tmp_path)
    assert d["kind"] == "patch folder" and d["tiling"] is None and d["statuses"] is None
    assert d["patches_per_slide"]["total"] == n_rows(tmp_path / "demo_02.h5")


# ---------------------------------------------------------------------------------------------- feature files


def test_feature_file_reports_encoder_shape_provenance_and_a_fingerprint_matching_its_contents(built):
    path = built["features"] / "demo_01.h5"
    d = describe(path)
    with h5py.File(path, "r") as f:
        shape = f["features"].shape
    assert d["kind"] == "feature file" and d["layout"] == "histotransfer.features v2"
    assert (d["encoder"], d["encoder_id"], d["stage"], d["truncate"]) == (
        "resnet18",
        built["features"].name,
        "layer2",
        2,
    )
    assert d["weights"] == {"label": "random", "sha256": None}
    assert (d["input_size"], d["precision"], d["dtype"]) == (32, "fp32", "float32")
    assert (d["patches"], d["feature_dim"]) == shape == (n_rows(built["patches"] / "demo_01.h5"), 128)
    assert d["non_finite"] == {"rows": 0, "first_row": None}
    assert d["patch_file"] == str(built["patches"] / "demo_01.h5") and d["stale"] is False
    assert d["fingerprint"] == attr(path, "fingerprint") and d["fingerprint_matches_contents"] is True


def test_feature_file_of_a_retiled_slide_is_stale(built):
    assert describe(built["features"] / "demo_08.h5")["stale"] is True


def test_feature_file_with_nan_and_inf_rows_is_flagged_with_its_first_bad_row(built, tmp_path):
    path = tmp_path / "demo_03.h5"
    shutil.copy(built["features"] / "demo_03.h5", path)
    with h5py.File(path, "r+") as f:
        f["features"][9, 3] = np.inf
        f["features"][5, 0] = np.nan
    d = describe(path)
    assert d["non_finite"] == {"rows": 2, "first_row": 5}
    assert d["fingerprint_matches_contents"] is False


def test_clam_feature_file_gets_the_fingerprint_computed_from_its_arrays(tmp_path):
    rng = np.random.default_rng(0)
    coords, feats = np.arange(14, dtype=np.int64).reshape(7, 2), rng.normal(size=(7, 5)).astype(np.float32)
    path = tmp_path / "s1.h5"
    with h5py.File(path, "w") as f:
        f["coords"], f["features"] = coords, feats
    d = describe(path)
    assert (d["layout"], d["patches"], d["feature_dim"], d["stale"]) == ("CLAM", 7, 5, None)
    assert d["fingerprint"] == rows_fingerprint(coords, feats) and d["fingerprint_matches_contents"] is None


# --------------------------------------------------------------------------------------------- feature folder


def test_feature_folder_reports_files_dimension_extract_statuses_and_stale_files(built):
    d = describe(built["features"])
    report = pd.read_csv(built["features"] / "extract.csv", keep_default_na=False)
    assert d["kind"] == "feature folder" and d["encoder_id"] == built["features"].name
    assert d["tiling"] == "10x_64px_0px_overlap" and d["encoder"]["encoder"] == "resnet18"
    assert (d["files"], d["feature_dim"]) == (8, 128)
    assert d["statuses"] == dict(Counter(report["status"])) == {"ok": 8}
    assert d["patch_folder"] == str(built["patches"])
    assert d["not_extracted"] == [] and d["stale"] == ["demo_08"]
    assert describe(built["features"] / "features.json") == d


# ------------------------------------------------------------------------------------------------ run folders


def test_mil_run_reports_settings_split_and_the_metrics_of_metrics_json(built):
    run = built["run"]
    d = describe(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert d["kind"] == "MIL run" and d["finished"] is True
    assert {k: d["settings"][k] for k in ("recipe", "epochs", "lr", "seed")} == {
        "recipe": "histotransfer",
        "epochs": 2,
        "lr": 1e-3,
        "seed": 0,
    }
    assert d["encoder"] == built["features"].name and d["positive_class"] == "1"
    assert d["split"] == {"method": "file", **Counter(SPLIT.values())}
    for split in ("train", "val", "test"):
        assert d["metrics"][split] == {k: metrics[split][k] for k in ("auc", "auc_ci_low", "auc_ci_high", "n_slides")}
    assert d["trained_on"] == {"feature_files": 8, "unreadable": 0}
    assert describe(run, check=True)["inputs_check"] == {
        "features_dir": str(built["features"]),
        "checked": 8,
        "unchanged": 8,
        "changed": [],
        "missing": [],
    }


def test_check_flags_feature_files_replaced_or_gone_since_training(built, tmp_path):
    features, run = tmp_path / "features", tmp_path / "run"
    shutil.copytree(built["features"], features)
    shutil.copytree(built["run"], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "features_dir": str(features)}))
    with h5py.File(features / "demo_02.h5", "r") as f:  # re-extracted: other rows, so another fingerprint
        coords, rows = f["coords"][()], f["features"][()]
        attrs = {k: v for k, v in f.attrs.items() if k not in ("fingerprint", "format", "format_version")}
    with FeatureWriter(features / "demo_02.h5", coords, rows.shape[1], attrs=attrs) as w:
        w.write(rows * 2)
    (features / "demo_03.h5").unlink()
    assert describe(run, check=True)["inputs_check"] == {
        "features_dir": str(features),
        "checked": 8,
        "unchanged": 6,
        "changed": ["demo_02"],
        "missing": ["demo_03"],
    }
    assert main(["info", "--check", str(run)]) == 1 and main(["info", "--check", str(built["run"])]) == 0


def test_cross_validation_run_reports_the_mean_and_sd_over_folds(built):
    d = describe(built["cv"])
    metrics = json.loads((built["cv"] / "metrics.json").read_text())
    assert d["kind"] == "cross-validation run" and d["split"] == {"method": "k-fold", "fold_0": 4, "fold_1": 4}
    assert d["auc_over_folds"]["test"] == {
        "auc_mean": metrics["mean"]["test"]["auc"],
        "auc_sd": metrics["sd"]["test"]["auc"],
    }
    assert d["fold_test_metrics"]["fold_1"]["auc"] == metrics["folds"]["fold_1"]["test"]["auc"]
    assert d["pooled_out_of_fold"]["auc"] == metrics["pooled"]["test"]["auc"]
    fold = describe(built["cv"] / "fold_0")
    assert fold["kind"] == "MIL run" and fold["split"]["fold"] == 0


def test_finetuned_run_reports_its_source_run_and_frozen_vs_finetuned_auc(built):
    d = describe(built["ft"])
    comparison = json.loads((built["ft"] / "comparison.json").read_text())
    assert d["kind"] == "fine-tuned run" and d["source_run"] == str(built["run"].resolve())
    assert d["settings"]["top_k"] == 4 and "device" not in d["settings"]
    assert d["comparison"] == {
        s: {"frozen_auc": v["frozen_auc"], "finetuned_auc": v["finetuned_auc"]} for s, v in comparison["splits"].items()
    }
    assert d["metrics"]["test"]["auc"] == json.loads((built["ft"] / "metrics.json").read_text())["test"]["auc"]


# ------------------------------------------------------------------------------------------------------ study


def _stand_in(kind: str, fail: set[str]):
    """A study stage that writes what the real one returns (the runner and its cells.csv are real)."""

    def work(cell, ctx, folder):
        if cell.key in fail:
            raise HistotransferError(f"cannot do {cell.key}: broken on purpose")
        if kind == "tile":
            (folder / "patches").mkdir(exist_ok=True)
            return {"patches": f"{cell.key}/patches"}, ""
        if kind == "extract":
            (folder / "features").mkdir(exist_ok=True)
            return {"features": {str(t): f"{cell.key}/features" for t in cell.settings["encoder"]["truncate"]}}, ""
        (folder / "run").mkdir(exist_ok=True)
        (folder / "run" / "metrics.json").write_text(json.dumps({"test": {"auc": 0.7, "n_slides": 2}}))
        return {"run": f"{cell.key}/run"}, ""

    return work


def test_study_reports_cells_by_kind_and_status_failed_cells_and_the_report(tmp_path, monkeypatch):
    (tmp_path / "slides").mkdir()
    for i in range(4):
        (tmp_path / "slides" / f"s{i}.tif").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(4)))
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "info study",
                "datasets": [{"name": "a", "slides": "slides", "labels": "labels.csv"}],
                "encoders": [{"name": "resnet18", "weights": "random", "truncations": [0, 1]}],
                "seeds": [0],
            }
        )
    )
    fail = {"extract/a/resnet18-random"}
    for kind in ("tile", "extract", "mil"):
        monkeypatch.setitem(work.WORK, kind, _stand_in(kind, fail))
    out = tmp_path / "out"
    failed = {"extract/a/resnet18-random": "cannot do extract/a/resnet18-random: broken on purpose"}
    blocked = {
        f"mil/a/resnet18-random-t{t}/histotransfer/seed0": "needs extract/a/resnet18-random, which failed"
        for t in (0, 1)
    }
    for expected, listed in (
        ({"done": 1, "failed": 1, "blocked": 2}, (failed, blocked)),
        ({"cached": 1, "done": 3}, ({}, {})),
    ):
        runner.execute(runner.load_study(study), out, progress=False)
        fail.clear()
        d = describe(out)
        cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
        assert d["kind"] == "study" and d["name"] == "info study" and d["cells"] == len(cells) == 4
        assert d["statuses"] == dict(Counter(cells["status"])) == expected
        assert d["by_kind"] == {k: dict(Counter(g["status"])) for k, g in cells.groupby("kind", sort=False)}
        assert (d["failed"], d["blocked"]) == listed
        assert d["report"] == str(out / "report.html")
        assert describe(out / "cells.csv") == d


# --------------------------------------------------------------------------------------------- CLI and output


def test_json_output_parses_and_holds_the_same_numbers(built, capsys):
    for path in (built["run"], built["patches"] / "demo_01.h5", built["tiling"]):
        assert main(["info", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == describe(path)


def test_text_output_aligns_one_field_a_line(built, capsys):
    path = built["patches"] / "demo_02.h5"
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"patch file: {path}\n")
    assert re.search(rf"^  patches +{n_rows(path)}$", text, re.MULTILINE)
    assert re.search(r"^  slide exists +yes$", text, re.MULTILINE)


def test_render_relabels_field_names_but_not_data_keys():
    text = render(
        {
            "kind": "thing",
            "path": "/p",
            "slide_id": "s1",
            "long_field": None,
            "ok": True,
            "per_slide": Keyed({"demo_01": 3, "demo_10": [1, 2]}),
            "spec": {"patch_size": 64, "mpp": 0.5},
            "failed": Keyed(),
        }
    )
    assert text == (
        "thing: /p\n"
        "  slide id    s1\n"
        "  long field  -\n"
        "  ok          yes\n"
        "  per slide   demo_01=3, demo_10=[1, 2]\n"
        "  spec        patch_size=64, mpp=0.5\n"
        "  failed      none"
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing.h5", "no such file or folder"),
        ("labels.csv", "not a file `histotransfer info` describes"),
        ("lesion_masks", "not a folder `histotransfer info` describes"),
    ],
)
def test_unknown_path_is_a_one_line_error_with_exit_2(built, capsys, name, expected):
    assert main(["info", str(built["root"] / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("histotransfer info: error:") and expected in err and err.count("\n") == 1


def test_info_imports_no_torch(built):
    paths = [built["run"], built["ft"], built["features"] / "demo_01.h5", built["features"], built["tiling"]]
    code = (
        "import sys; from histotransfer.cli import build_parser; build_parser('info'); "
        "from histotransfer.info import describe; "
        f"[describe(p, check=True) for p in {[str(p) for p in paths]!r}]; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
