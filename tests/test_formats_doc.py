"""docs/formats.md names every attribute, dataset, record key and column the writers produce.

A small real pipeline (generated slides, tiling, random-weight features, one MIL epoch with a group column,
an evaluation with lesion annotations) is run once; every HDF5 attr and dataset name, every top-level JSON key
and every CSV column of its files must appear in the document as a `name` in backticks, and each format's
name and version must be the code's. A writer that adds a field without documenting it fails here.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch

from histotransfer.analysis.cam_file import CAM_FORMAT
from histotransfer.batch import REPORT_COLUMNS
from histotransfer.demo_slides import make_demo_slides
from histotransfer.features import extract_features
from histotransfer.formats import ATTENTION, FEATURES, PATCHES
from histotransfer.mil import evaluate_run, train_mil
from histotransfer.mil.rundir import MODEL_FORMAT, RUN_FORMAT
from histotransfer.patches.tiling import tile_slides

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def documented() -> set[str]:
    """Every `span` in backticks of docs/formats.md."""
    return set(re.findall(r"`([^`\n]+)`", DOC.read_text()))


def undocumented(names: set[str] | list[str]) -> list[str]:
    """The names not written in backticks anywhere in docs/formats.md."""
    spans = documented()
    return sorted(n for n in set(names) if n not in spans)


def h5_names(path: Path) -> set[str]:
    """Root attrs, dataset names and the datasets' attrs of an HDF5 file."""
    with h5py.File(path, "r") as f:
        names = set(f.attrs)
        for key in f:
            names.add(key)
            names |= set(f[key].attrs)
    return names


def h5_json_attr(path: Path, attr: str) -> dict:
    with h5py.File(path, "r") as f:
        value = f.attrs[attr]
    return json.loads(value.decode() if isinstance(value, bytes) else value)


def json_keys(path: Path) -> set[str]:
    return set(json.loads(path.read_text()))


def csv_columns(path: Path) -> set[str]:
    return set(pd.read_csv(path, nrows=0).columns)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Eight 1024 px demo slides tiled at 10x (32 px patches), resnet18 (random) features truncated by 2 at
    32 px, a one-epoch MIL run grouped by centre, and its evaluation against the lesion masks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("formats_doc")
        demo = make_demo_slides(root / "demo", n_slides=8, seed=0, size=1024)
        tiling = tile_slides(
            demo.slides, root / "tiles", magnification=10, patch_size=32, min_tissue=0.25, min_region_um2=0
        )
        features = extract_features(
            tiling.folder, None, "resnet18", "random", 2, input_size=32, batch_size=64, workers=0, device="cpu"
        )
        labels = pd.read_csv(demo.labels_csv, dtype=str)
        labels["centre"] = ["A" if int(p.rsplit("_", 1)[1]) % 2 else "B" for p in labels["patient_id"]]
        labels.to_csv(root / "labels.csv", index=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = train_mil(
                features, root / "labels.csv", root / "run", epochs=1, seed=0, group_column="centre", protocol="split"
            )
            evaluate_run(run, features, root / "labels.csv", annotations_dir=demo.labels_csv.parent / "lesion_masks")
    finally:
        torch.set_num_threads(threads)
    return {"tiling": tiling.folder, "features": features, "run": run, "evaluation": run / "evaluation"}


def test_the_check_reports_a_name_the_document_lacks():
    assert undocumented({"format", "no_such_field_xyz"}) == ["no_such_field_xyz"]


def test_format_names_and_versions_are_the_code_s():
    text = DOC.read_text()
    for name, version in (PATCHES, FEATURES, ATTENTION, RUN_FORMAT, MODEL_FORMAT, CAM_FORMAT):
        row = re.search(rf"^\|\s*`{re.escape(name)}`\s*\|\s*(\d+)\s*\|", text, re.MULTILINE)
        assert row is not None, f"no row for {name} in the table of formats"
        assert int(row.group(1)) == version, f"{name}: the document says version {row.group(1)}, the code {version}"


def test_tiling_folder_is_documented(pipeline):
    tiling = pipeline["tiling"]
    patch_file = next((tiling / "patches").glob("*.h5"))
    names = h5_names(patch_file) | set(h5_json_attr(patch_file, "tiling_settings"))
    names |= json_keys(tiling / "tiling.json") | set(json.loads((tiling / "tiling.json").read_text())["settings"])
    names |= csv_columns(tiling / "tiling.csv") | set(REPORT_COLUMNS)
    names |= set(h5_json_attr(patch_file, "slide_identity"))
    assert {"coords", "tissue_fraction", "slide_identity", "tiling", "tiling_settings"} <= names
    assert undocumented(names) == []


def test_feature_folder_is_documented(pipeline):
    folder = pipeline["features"]
    feature_file = next(folder.glob("*.h5"))
    names = h5_names(feature_file) | json_keys(folder / "features.json") | csv_columns(folder / "extract.csv")
    names |= set(h5_json_attr(feature_file, "preprocessing")) | set(h5_json_attr(feature_file, "settings"))
    names |= set(json.loads((folder / "features.json").read_text())["encoder"])
    assert {"features", "patches_fingerprint", "settings_fingerprint", "fingerprint", "weights_label"} <= names
    assert undocumented(names) == []


def test_mil_run_folder_is_documented(pipeline):
    run = pipeline["run"]
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    names = set(config) | set(config["inputs"]) | set(config["split"]) | set(config["encoder"])
    names |= set(config["model"]) | set(config["training"])
    names |= set(metrics) | set(metrics["test"]) | set(metrics["groups"]["test"])
    shortcut = metrics["shortcut"]
    names |= set(shortcut) | set(shortcut["within"]) | set(shortcut["group"]) | set(shortcut["splits"])
    names |= h5_names(next((run / "attention").glob("*.h5")))
    for table in ("splits.csv", "predictions.csv", "history.csv"):
        names |= csv_columns(run / table)
    assert {"kind", "inputs", "label_columns", "positive_class", "warnings", "groups"} <= names
    assert undocumented(names) == []


def test_evaluation_folder_is_documented(pipeline):
    folder = pipeline["evaluation"]
    metrics = json.loads((folder / "metrics.json").read_text())
    names = set(metrics) | set(metrics["localisation"]) | json_keys(folder / "evaluation.json")
    names |= set(metrics["shortcut"]) | set(metrics["shortcut"]["batches"] or {})
    for table in ("predictions.csv", "localisation.csv"):
        names |= csv_columns(folder / table)
    assert {"all", "localisation", "top_patch_hit"} <= names
    assert undocumented(names) == []
