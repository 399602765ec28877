"""Attention heatmaps: the PNG overlay and a GeoJSON with one level-0 square per patch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import geojson
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest

from histotransfer.cli import main
from histotransfer.errors import HistotransferError
from histotransfer.mil import evaluate_run, train_mil, write_heatmaps
from histotransfer.mil.bags import patch_size_level0
from histotransfer.mil.heatmap import attention_overlay
from histotransfer.mil.rundir import read_attention, run_fingerprint, write_attention
from histotransfer.mil.synthetic import planted_bags, write_feature_folder

SHARED_SLIDE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch run on 10 bags of 12 patches on a 4 x 3 grid of 256 px squares (a 1024 x 768 slide)."""
    root = tmp_path_factory.mktemp("heat")
    bags = planted_bags(10, n_patches=(12, 12), dim=8, patch_size=256, seed=0)
    write_feature_folder(root / "features", bags, patch_size_level0=256)
    pd.DataFrame({"slide_id": [b.slide_id for b in bags], "label": [b.label for b in bags]}).to_csv(
        root / "labels.csv", index=False
    )
    run = train_mil(root / "features", root / "labels.csv", root / "run", epochs=1, protocol="split")
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
        assert feature["geometry"]["coordinates"] == [
            [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        ]
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["measurements"]["attention_score"] == pytest.approx(s, rel=1e-6)
    ranks = [f["properties"]["measurements"]["attention_rank"] for f in collection["features"]]
    assert ranks[int(np.argmax(score))] == 1 and sorted(ranks) == list(range(1, len(coords) + 1))


def test_heatmaps_of_a_folder_of_slides(run, tmp_path):
    root, run_dir, bags = run
    written = write_heatmaps(run_dir, [root / "slides"], tmp_path, mpp=0.5, max_side=512)
    assert sorted(p.name for p in written) == [
        "slide_000.geojson",
        "slide_000.png",
        "slide_001.geojson",
        "slide_001.png",
    ]
    for bag in bags[:2]:
        att = read_attention(run_dir / "attention" / f"{bag.slide_id}.h5")
        check_geojson(tmp_path / f"{bag.slide_id}.geojson", bag.coords, 256, att["score"])
        png = cv2.imread(str(tmp_path / f"{bag.slide_id}.png"))
        assert png is not None and png.shape[0] > 100 and png.shape[1] > 100
    report = pd.read_csv(tmp_path / "heatmaps.csv")
    assert report["status"].tolist() == ["ok", "ok"] and report["n_patches"].tolist() == [12, 12]


def test_new_slides_from_a_features_folder_and_annotations(run, tmp_path):
    root, run_dir, _bags = run
    new = planted_bags(1, n_patches=(12, 12), dim=8, patch_size=200, seed=5)[0]
    new.slide_id = "new_000"  # a slide the run never saw, other features and patch size
    shutil.copy(root / "slides" / "slide_000.png", tmp_path / "new_000.png")
    write_feature_folder(tmp_path / "new", [new])
    written = write_heatmaps(
        run_dir,
        [tmp_path / "new_000.png"],
        tmp_path / "out",
        mpp=0.5,
        features_dir=tmp_path / "new",
        patch_size_level0=200,
        object_type="annotation",
    )
    assert len(written) == 2
    collection = json.loads((tmp_path / "out" / "new_000.geojson").read_text())
    assert {f["properties"]["objectType"] for f in collection["features"]} == {"annotation"}
    assert collection["features"][-1]["geometry"]["coordinates"][0][2] == (new.coords[-1] + 200).tolist()


@pytest.mark.parametrize(
    "change, message",
    [
        ("encoder", "made by encoder"),  # same dimension, another encoder's attrs
        ("dimension", "dimension 5, expected 8"),
        ("replaced", "not the ones it saw"),  # a slide the run was trained on, its features replaced since
    ],
)
def test_features_that_are_not_the_runs_are_refused(run, tmp_path, change, message):
    root, run_dir, _bags = run
    other = planted_bags(1, n_patches=(12, 12), dim=5 if change == "dimension" else 8, patch_size=256, seed=9)[0]
    other.slide_id = "slide_000" if change == "replaced" else "new_000"
    attrs = {"encoder": "resnet18", "truncate": 2} if change == "encoder" else {}
    write_feature_folder(tmp_path / "feats", [other], patch_size_level0=256, **attrs)
    slide = tmp_path / f"{other.slide_id}.png"
    shutil.copy(root / "slides" / "slide_000.png", slide)
    report = tmp_path / "out" / "heatmaps.csv"
    write_heatmaps(run_dir, [slide], tmp_path / "out", mpp=0.5, features_dir=tmp_path / "feats")
    row = pd.read_csv(report).iloc[0]
    assert row["status"] == "error" and message in row["message"]
    assert not (tmp_path / "out" / f"{other.slide_id}.png").exists()


def test_missing_patch_size_is_reported_once_and_the_cli_fails(run, tmp_path, capsys):
    root, run_dir, bags = run
    write_feature_folder(tmp_path / "nosize", bags[:1])  # no patch_size_level0 attr
    code = main(
        [
            "heatmap",
            "--run",
            str(run_dir),
            "--slides",
            str(root / "slides" / "slide_000.png"),
            "--out",
            str(tmp_path / "out"),
            "--features",
            str(tmp_path / "nosize"),
            "--mpp",
            "0.5",
        ]
    )
    assert code == 1
    report = pd.read_csv(tmp_path / "out" / "heatmaps.csv")
    assert report["status"].tolist() == ["error"] and "--patch-size-level0" in report["message"][0]
    out = capsys.readouterr().out
    assert out.count("not recorded in the attention, feature or patch file attrs") == 1
    assert "failed: slide_000" in out
    # A slide file that does not exist is that slide's error row, as in tiling.
    assert (
        main(["heatmap", "--run", str(run_dir), "--slides", str(tmp_path / "none.svs"), "--out", str(tmp_path / "out")])
        == 1
    )
    report = pd.read_csv(tmp_path / "out" / "heatmaps.csv").set_index("slide_id")
    assert report.loc["none", "status"] == "error"


def test_a_slide_without_attention_is_reported_once_and_the_others_are_drawn(run, tmp_path, capsys):
    root, run_dir, _ = run
    cv2.imwrite(str(tmp_path / "stranger.png"), np.full((64, 64, 3), 255, np.uint8))
    code = main(
        [
            "heatmap",
            "--run",
            str(run_dir),
            "--slides",
            str(tmp_path / "stranger.png"),
            str(root / "slides" / "slide_000.png"),
            "--out",
            str(tmp_path / "out"),
            "--mpp",
            "0.5",
            "--max-side",
            "256",
        ]
    )
    assert code == 1
    out = capsys.readouterr().out
    assert out.count("no attention for slide 'stranger'") == 1 and "histotransfer evaluate" in out
    assert (tmp_path / "out" / "slide_000.png").is_file() and not (tmp_path / "out" / "stranger.png").exists()


def test_overlay_paints_each_patch_in_its_colour_and_leaves_the_rest():
    thumb = np.full((100, 100, 3), 255, np.uint8)
    coords = np.array([[0, 0], [500, 500]])
    out = attention_overlay(thumb, (1000, 1000), coords, np.array([1.0, 0.0]), 250, (0.0, 1.0), "jet", 0.5)
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


def white_slide(path: Path, size: tuple[int, int] = (1024, 768)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size[1], size[0], 3), 255, np.uint8))
    return path


def expected_pixel(value: float, lo: float, hi: float) -> np.ndarray:
    """White blended half and half with the colormap's own colour of ``value`` on [lo, hi]."""
    colour = np.array(matplotlib.colormaps["jet"]((value - lo) / (hi - lo))[:3]) * 255
    return np.round(0.5 * 255 + 0.5 * colour).astype(np.uint8)


def rgb_at(png: Path, row: int, col: int) -> np.ndarray:
    return cv2.imread(str(png))[row, col, ::-1]


def test_cohort_scale_gives_one_colour_per_value_across_slides_and_slide_scale_does_not(run, tmp_path):
    _, run_dir, bags = run
    coords = bags[0].coords  # a 4 x 3 grid of 256 px squares on a 1024 x 768 slide
    first = int(np.argmin(coords[:, 0] + coords[:, 1]))  # the square at (0, 0)
    scores = {"a": np.zeros(12), "b": np.full(12, 0.5)}
    scores["a"][first], scores["b"][first] = 1.0, 1.0  # the same score on both slides
    scores["a"][(first + 1) % 12], scores["b"][(first + 1) % 12] = 2.0, 4.0
    for sid, s in scores.items():
        write_attention(tmp_path / "att" / f"{sid}.h5", sid, coords, s, 0.5, 256, fingerprint=run_fingerprint(run_dir))
        white_slide(tmp_path / "slides" / f"{sid}.png")
    kwargs = {"attention_dir": tmp_path / "att", "mpp": 0.5, "max_side": 512}
    write_heatmaps(run_dir, [tmp_path / "slides"], tmp_path / "cohort", **kwargs)
    write_heatmaps(run_dir, [tmp_path / "slides"], tmp_path / "slide", scale="slide", **kwargs)
    cohort = [rgb_at(tmp_path / "cohort" / f"{sid}.png", 64, 64) for sid in "ab"]
    np.testing.assert_array_equal(cohort[0], expected_pixel(1.0, 0.0, 4.0))
    np.testing.assert_array_equal(cohort[1], expected_pixel(1.0, 0.0, 4.0))
    own = [rgb_at(tmp_path / "slide" / f"{sid}.png", 64, 64) for sid in "ab"]
    np.testing.assert_array_equal(own[0], expected_pixel(1.0, 0.0, 2.0))
    np.testing.assert_array_equal(own[1], expected_pixel(1.0, 0.5, 4.0))
    assert (own[0] != own[1]).any()
    png = cv2.imread(str(tmp_path / "cohort" / "a.png"))
    assert png.shape[0] == 384 and png.shape[1] > 512  # the thumbnail, then the legend strip


def test_patch_side_from_a_clam_patch_file(run, tmp_path, make_slide):
    _, run_dir, _ = run
    slide = make_slide("clam", size=(1024, 1024))  # levels 1024, 512, 256 px: level 1 is 2x downsampled
    coords = np.array([[0, 0], [400, 400]], np.int64)
    write_attention(
        tmp_path / "att" / "clam.h5",
        "clam",
        coords,
        np.array([0.0, 1.0]),
        0.5,
        None,
        fingerprint=run_fingerprint(run_dir),
    )
    (tmp_path / "patches").mkdir()
    with h5py.File(tmp_path / "patches" / "clam.h5", "w") as f:
        dset = f.create_dataset("coords", data=coords)
        dset.attrs["patch_size"], dset.attrs["patch_level"] = 200, 1  # CLAM: 200 px read at level 1
    written = write_heatmaps(
        run_dir,
        [slide],
        tmp_path / "out",
        attention_dir=tmp_path / "att",
        patches_dir=tmp_path / "patches",
        max_side=256,
    )
    ring = json.loads(written[1].read_text())["features"][1]["geometry"]["coordinates"][0]
    assert ring[0] == [400, 400] and ring[2] == [800, 800]  # side 200 * 2 level-0 px


def test_attention_written_by_evaluate_draws_a_slide_the_run_never_saw(run, tmp_path):
    _, run_dir, _ = run
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    bag = planted_bags(1, n_patches=(12, 12), dim=8, patch_size=256, seed=7)[0]
    bag.slide_id = "external"
    write_feature_folder(tmp_path / "ext", [bag], patch_size_level0=256)
    slide = white_slide(tmp_path / "slides" / "external.png")
    args = ["heatmap", "--run", str(run_copy), "--slides", str(slide), "--mpp", "0.5", "--max-side", "256"]
    evaluate_run(run_copy, tmp_path / "ext", out_dir=tmp_path / "eval")
    assert main([*args, "--out", str(tmp_path / "out1"), "--attention", str(tmp_path / "eval" / "attention")]) == 0
    evaluate_run(run_copy, tmp_path / "ext")  # RUN/evaluation/attention, found without an option
    assert main([*args, "--out", str(tmp_path / "out2")]) == 0
    att = read_attention(run_copy / "evaluation" / "attention" / "external.h5")
    for out in ("out1", "out2"):
        check_geojson(tmp_path / out / "external.geojson", bag.coords, 256, att["score"])


def test_a_bad_scale_or_value_is_refused(run, tmp_path, capsys):
    root, run_dir, _ = run
    base = ["heatmap", "--run", str(run_dir), "--slides", str(root / "slides"), "--out", str(tmp_path)]
    for option, bad, allowed in (
        ("--scale", "global", "'cohort', 'slide'"),
        ("--value", "softmax", "'score', 'weight'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([*base, option, bad])
        assert exc.value.code == 2
        assert f"argument {option}: invalid choice: '{bad}' (choose from {allowed})" in capsys.readouterr().err
    with pytest.raises(HistotransferError, match="--scale global: use one of cohort, slide"):
        write_heatmaps(run_dir, [root / "slides"], tmp_path, scale="global")
    with pytest.raises(HistotransferError, match="--value softmax: use one of score, weight"):
        write_heatmaps(run_dir, [root / "slides"], tmp_path, value="softmax")
    assert not list(tmp_path.iterdir())


def test_patch_side_from_trident_attrs_on_the_feature_coords(run, tmp_path):
    root, run_dir, bags = run
    write_feature_folder(tmp_path / "trident", bags[:1])  # no root attrs
    with h5py.File(tmp_path / "trident" / "slide_000.h5", "a") as f:
        f["coords"].attrs["patch_size"], f["coords"].attrs["patch_size_level0"] = 224, 256
    written = write_heatmaps(
        run_dir,
        [root / "slides" / "slide_000.png"],
        tmp_path / "out",
        mpp=0.5,
        features_dir=tmp_path / "trident",
        max_side=256,
    )
    ring = json.loads(written[1].read_text())["features"][0]["geometry"]["coordinates"][0]
    assert ring[2] == [ring[0][0] + 256, ring[0][1] + 256]
