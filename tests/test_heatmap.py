"""Attention heatmaps: the PNG overlay and a GeoJSON with one level-0 square per patch."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import geojson
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import Normalize

from histotransfer.cli import main
from histotransfer.mil import train_mil, write_heatmaps
from histotransfer.mil.bags import patch_size_level0
from histotransfer.mil.heatmap import attention_overlay
from histotransfer.mil.rundir import read_attention
from histotransfer.mil.synthetic import planted_bags, write_feature_folder

SHARED_SLIDE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch run on 10 bags of 12 patches on a 4 x 3 grid of 256 px squares (a 1024 x 768 slide)."""
    root = tmp_path_factory.mktemp("heat")
    bags = planted_bags(10, n_patches=(12, 12), dim=8, patch_size=256, seed=0)
    write_feature_folder(root / "features", bags, patch_size_level0=256)
    pd.DataFrame({"slide_id": [b.slide_id for b in bags], "label": [b.label for b in bags]}).to_csv(
        root / "labels.csv", index=False)
    run = train_mil(root / "features", root / "labels.csv", root / "run", epochs=1)
    slides = root / "slides"
    slides.mkdir()
    rng = np.random.default_rng(0)
    for b in bags[:2]:
        cv2.imwrite(str(slides / f"{b.slide_id}.png"), rng.integers(120, 255, (768, 1024, 3), dtype=np.uint8))
    return root, run, bags


def check_geojson(path: Path, coords: np.ndarray, size: int, score: np.ndarray) -> None:
    collection = geojson.loads(path.read_text())
    assert collection.is_valid, collection.errors()
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(coords)
    for feature, (x, y), s in zip(collection["features"], coords.tolist(), score.tolist()):
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["geometry"]["coordinates"] == [[[x, y], [x + size, y], [x + size, y + size], [x, y + size],
                                                       [x, y]]]
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["measurements"]["attention_score"] == pytest.approx(s, rel=1e-6)
    ranks = [f["properties"]["measurements"]["attention_rank"] for f in collection["features"]]
    assert ranks[int(np.argmax(score))] == 1 and sorted(ranks) == list(range(1, len(coords) + 1))


def test_heatmaps_of_a_folder_of_slides(run, tmp_path):
    root, run_dir, bags = run
    written = write_heatmaps(run_dir, [root / "slides"], tmp_path, mpp=0.5, max_side=512)
    assert sorted(p.name for p in written) == ["slide_000.geojson", "slide_000.png",
                                               "slide_001.geojson", "slide_001.png"]
    for bag in bags[:2]:
        att = read_attention(run_dir / "attention" / f"{bag.slide_id}.h5")
        check_geojson(tmp_path / f"{bag.slide_id}.geojson", bag.coords, 256, att["score"])
        png = cv2.imread(str(tmp_path / f"{bag.slide_id}.png"))
        assert png is not None and png.shape[0] > 100 and png.shape[1] > 100
    report = pd.read_csv(tmp_path / "heatmaps.csv")
    assert report["status"].tolist() == ["ok", "ok"] and report["n_patches"].tolist() == [12, 12]


def test_new_slides_from_a_features_folder_and_annotations(run, tmp_path):
    root, run_dir, bags = run
    new = planted_bags(1, n_patches=(12, 12), dim=8, patch_size=200, seed=5)[0]
    new.slide_id = "slide_000"  # same name as a slide image, other features and patch size
    write_feature_folder(tmp_path / "new", [new])
    written = write_heatmaps(run_dir, [root / "slides" / "slide_000.png"], tmp_path / "out", mpp=0.5,
                             features_dir=tmp_path / "new", patch_size_level0=200, object_type="annotation")
    assert len(written) == 2
    collection = json.loads((tmp_path / "out" / "slide_000.geojson").read_text())
    assert {f["properties"]["objectType"] for f in collection["features"]} == {"annotation"}
    assert collection["features"][-1]["geometry"]["coordinates"][0][2] == (new.coords[-1] + 200).tolist()


def test_missing_patch_size_is_reported_and_the_cli_fails(run, tmp_path, capsys):
    root, run_dir, bags = run
    write_feature_folder(tmp_path / "nosize", bags[:1])  # no patch_size_level0 attr
    code = main(["heatmap", "--run", str(run_dir), "--slides", str(root / "slides" / "slide_000.png"),
                 "--out", str(tmp_path / "out"), "--features", str(tmp_path / "nosize"), "--mpp", "0.5"])
    assert code == 1
    report = pd.read_csv(tmp_path / "out" / "heatmaps.csv")
    assert report["status"].tolist() == ["error"] and "--patch-size-level0" in report["message"][0]
    assert "failed slide_000" in capsys.readouterr().out
    assert main(["heatmap", "--run", str(run_dir), "--slides", str(tmp_path / "none.svs"), "--out",
                 str(tmp_path / "out")]) == 2


def test_overlay_paints_each_patch_in_its_colour_and_leaves_the_rest():
    thumb = np.full((100, 100, 3), 255, np.uint8)
    coords = np.array([[0, 0], [500, 500]])
    out = attention_overlay(thumb, (1000, 1000), coords, np.array([1.0, 0.0]), 250, Normalize(0, 1), "jet", 0.5)
    jet = matplotlib.colormaps["jet"]
    for (r, c), v in (((10, 10), 1.0), ((60, 60), 0.0)):
        expected = np.round(0.5 * 255 + 0.5 * np.array(jet(v)[:3]) * 255)
        np.testing.assert_array_equal(out[r, c], expected)
    assert (out[30:50, :] == 255).all() and (out[:, 80:] == 255).all()


def test_patch_size_from_the_patch_file(tmp_path):
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f.attrs["patch_size_level0"] = 1024
    assert patch_size_level0({"patch_file": str(tmp_path / "p.h5")}) == 1024
    assert patch_size_level0({"patch_size_level0": 512, "patch_file": str(tmp_path / "p.h5")}) == 512
    assert patch_size_level0({"patch_file": str(tmp_path / "gone.h5")}) is None


@pytest.mark.skipif(not SHARED_SLIDE.is_file(), reason="real slide ../shared/data/CMU-1-Small-Region.svs is absent")
def test_heatmap_on_a_real_svs(run, tmp_path):
    _, run_dir, _ = run
    w, h, size = 2220, 2967, 512
    xs, ys = np.meshgrid(np.arange(0, w - size, size), np.arange(0, h - size, size))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    bag = planted_bags(1, n_patches=(len(coords), len(coords)), dim=8, seed=1)[0]
    bag.slide_id, bag.coords = "CMU-1-Small-Region", coords
    write_feature_folder(tmp_path / "features", [bag], patch_size_level0=size)
    written = write_heatmaps(run_dir, [SHARED_SLIDE], tmp_path / "out", features_dir=tmp_path / "features")
    assert [p.suffix for p in written] == [".png", ".geojson"]
    collection = geojson.loads(written[1].read_text())
    assert collection.is_valid and len(collection["features"]) == len(coords)
    xy = np.array([f["geometry"]["coordinates"][0][2] for f in collection["features"]])
    assert xy[:, 0].max() <= w and xy[:, 1].max() <= h  # level-0 pixels, inside the slide
