"""Tiling: kept patches match a known tissue region; outputs, settings, re-runs and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import disk_and_bar
from histotransfer.cli import main
from histotransfer.demo_slides import render_tissue, write_pyramidal_tiff
from histotransfer.errors import HistotransferError
from histotransfer.patches import TileSettings, read_patch_file, tile_slide, tile_slides
from histotransfer.patches.geometry import tiling_spec
from histotransfer.patches.tiling import (
    EXCLUDED_COLOUR,
    MASK_EXCLUDED,
    MASK_TISSUE,
    centred_starts,
    grid_coords,
    mask_mpp_for,
    patch_coords,
    slide_mask,
    tissue_fractions,
)
from histotransfer.slide import open_slide
from histotransfer.slide.backends import OpenSlideSlide, TiffSlideSlide


def _true_fractions(truth: np.ndarray, coords: np.ndarray, footprint: int) -> np.ndarray:
    table = cv2.integral(truth.astype(np.uint8), sdepth=cv2.CV_64F)
    x, y = coords[:, 0], coords[:, 1]
    area = table[y + footprint, x + footprint] - table[y, x + footprint] - table[y + footprint, x] + table[y, x]
    return area / footprint**2


def test_known_tissue_at_20x_from_40x(make_slide, tmp_path: Path) -> None:
    size = (3072, 2560)
    truth = disk_and_bar(*size)
    path = make_slide("geo", size=size, mpp=0.25, tissue=truth)
    result = tile_slide(path, tmp_path / "out", magnification=20.0, patch_size=256)
    assert result.status == "ok"
    folder = tmp_path / "out" / "20x_256px_0px_overlap"  # TRIDENT's naming of the tiling's folder
    got = read_patch_file(folder / "patches" / "geo.h5")
    spec = got.spec
    assert spec.patch_size_level0 == 2 * 256 and spec.downsample == 2.0 and spec.patch_level == 1
    assert (spec.mpp, spec.target_magnification, spec.min_tissue, spec.stride) == (0.25, 20.0, 0.5, 256)

    footprint = spec.patch_size_level0
    grid = grid_coords(size, footprint, footprint)
    true = _true_fractions(truth, grid, footprint)
    kept = {tuple(c) for c in got.coords.tolist()}
    is_kept = np.array([tuple(c) in kept for c in grid.tolist()])
    assert len(kept) == is_kept.sum() == result.n_patches > 10
    # Mask pixels are 8 um = 32 level-0 px; a tissue edge crossing a patch may shift by up to ~1.5 of them.
    tol = 1.5 * 32 / footprint
    assert (true[is_kept] >= 0.5 - tol).all()
    assert (true[~is_kept] < 0.5 + tol).all()
    np.testing.assert_allclose(got.tissue_fraction, _true_fractions(truth, got.coords, footprint), atol=tol)
    covered = np.zeros_like(truth)
    for x, y in got.coords.tolist():
        covered[y : y + footprint, x : x + footprint] = True
    assert (covered & truth).sum() / truth.sum() > 0.8

    assert set(np.unique(cv2.imread(str(folder / "masks" / "geo.png"), cv2.IMREAD_GRAYSCALE))) <= {0, 255}
    thumb = cv2.imread(str(folder / "thumbnails" / "geo.png"))
    assert thumb.shape == (853, 1024, 3)  # longest side 1024


def test_tissue_fraction_is_exact_for_a_mask_of_squares() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True  # level 0 is 400 x 400: each mask pixel is 100 x 100
    coords = np.array([[100, 100], [50, 50], [150, 100], [0, 0], [300, 300]])
    got = tissue_fractions(mask, (400, 400), coords, 100)
    np.testing.assert_allclose(got, [1.0, 0.25, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(tissue_fractions(mask, (400, 400), np.array([[50, 150]]), 200), [150 * 150 / 200**2])


def test_stride_and_min_tissue(make_slide, tmp_path: Path) -> None:
    path = make_slide(size=(2048, 2048))
    with open_slide(path) as slide:
        spec = tiling_spec(slide, 20.0, 256, stride=128, min_tissue=0.9)
        coords, fractions = patch_coords(slide_mask(slide, mask_mpp_for(spec)), slide.dimensions, spec)
    assert (coords % 256 == 0).all() and (np.diff(np.unique(coords[:, 0])) >= 256).all()
    assert (np.isin(np.unique(coords[:, 0]) % 512, [0, 256])).all() and (coords % 512 == 256).any()
    assert (fractions >= 0.9 - 1e-6).all()


def test_refuses_magnification_above_the_slides(make_slide, tmp_path: Path) -> None:
    path = make_slide("twenty", size=(1024, 1024), mpp=0.5)
    with pytest.raises(HistotransferError, match=r"twenty\.tif: target magnification 40x .* higher than"):
        tile_slide(path, tmp_path / "out", magnification=40.0)
    assert tile_slide(path, tmp_path / "out", magnification=20.0, patch_size=128).status == "ok"


def test_rerun_skips_same_settings_and_other_settings_get_their_own_folder(make_slide, tmp_path: Path) -> None:
    slides = [make_slide("a", size=(1024, 1024)), make_slide("b", size=(1024, 1024), seed=1)]
    out = tmp_path / "out"
    first = tile_slides(slides, out, patch_size=128)
    assert [r.status for r in first.results] == ["ok", "ok"] and all(r.message == "" for r in first.results)
    stamp = (first.patches / "a.h5").stat().st_mtime_ns
    again = tile_slides(slides, out, patch_size=128)
    assert [(r.status, r.message) for r in again.results] == [("skipped", "already done with these settings")] * 2
    assert [r.n_patches for r in again.results] == [r.n_patches for r in first.results]
    assert (first.patches / "a.h5").stat().st_mtime_ns == stamp
    changed = tile_slides(slides, out, patch_size=128, min_tissue=0.9)
    assert [r.message for r in changed.results] == ["", ""]
    assert changed.folder != first.folder and changed.folder.name.startswith("20x_128px_0px_overlap_")
    assert read_patch_file(changed.patches / "a.h5").spec.min_tissue == 0.9
    assert read_patch_file(first.patches / "a.h5").spec.min_tissue == 0.5  # the first tiling is untouched
    assert (first.patches / "a.h5").stat().st_mtime_ns == stamp
    spelled_out = tile_slides(slides, out, patch_size=128, stride=128)  # the default stride, given
    assert spelled_out.folder == first.folder and [r.status for r in spelled_out.results] == ["skipped"] * 2
    report = pd.read_csv(first.folder / "tiling.csv")
    assert list(report.columns) == ["slide_id", "slide_path", "status", "n_patches", "seconds", "message"]
    assert list(report.slide_id) == ["a", "b"]


def test_duplicate_slide_ids_fail_before_any_work(make_slide, tmp_path: Path) -> None:
    a = make_slide("same", size=(512, 512))
    other = tmp_path / "other"
    other.mkdir()
    (other / "same.svs").write_bytes(a.read_bytes())
    with pytest.raises(HistotransferError, match=r"share the id 'same'"):
        tile_slides([a.parent, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run = tile_slides([a, a.parent], tmp_path / "out", patch_size=128)  # one file named twice
    assert [(r.slide_id, r.status) for r in run.results][1:] == [("same", "duplicate")] and len(run.results) == 2


def test_workers_give_the_same_outputs(make_slide, tmp_path: Path) -> None:
    slides = [make_slide(f"w{i}", size=(1024, 1024), seed=i) for i in range(3)]
    one = tile_slides(slides, tmp_path / "one", patch_size=128)
    two = tile_slides(slides, tmp_path / "two", patch_size=128, workers=2)
    assert [(r.slide_id, r.status, r.n_patches) for r in one.results] == [
        (r.slide_id, r.status, r.n_patches) for r in two.results
    ]
    for s in slides:
        a = read_patch_file(one.patches / f"{s.stem}.h5")
        b = read_patch_file(two.patches / f"{s.stem}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)


def test_real_svs_tiles_identically_through_openslide_and_tiffslide(
    cmu_svs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OpenSlideSlide(cmu_svs) as a, TiffSlideSlide(cmu_svs) as b:
        results = []
        for slide in (a, b):
            spec = tiling_spec(slide, 20.0, 256)
            results.append(patch_coords(slide_mask(slide, mask_mpp_for(spec)), slide.dimensions, spec))
        np.testing.assert_array_equal(results[0][0], results[1][0])
        np.testing.assert_array_equal(results[0][1], results[1][1])
        assert spec.downsample == 1.0 and spec.patch_size_level0 == 256 and len(results[0][0]) > 20
        for x, y in results[0][0][::7].tolist():
            np.testing.assert_array_equal(a.read_region((x, y), 0, (256, 256)), b.read_region((x, y), 0, (256, 256)))

    via_openslide = tile_slide(cmu_svs, tmp_path / "os", patch_size=256)

    class NoOpenSlide(OpenSlideSlide):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("OpenSlide unavailable")

    monkeypatch.setattr("histotransfer.slide.open.OpenSlideSlide", NoOpenSlide)
    with open_slide(cmu_svs) as slide:
        assert slide.backend == "tiffslide"
    via_tiffslide = tile_slide(cmu_svs, tmp_path / "ts", patch_size=256)
    assert via_openslide.n_patches == via_tiffslide.n_patches
    name = "20x_256px_0px_overlap/patches/CMU-1-Small-Region.h5"
    via_os, via_ts = read_patch_file(tmp_path / "os" / name), read_patch_file(tmp_path / "ts" / name)
    np.testing.assert_array_equal(via_os.coords, via_ts.coords)
    assert via_os.identity == via_ts.identity  # both backends see the same slide file


def test_the_same_file_under_the_same_name_twice_keeps_its_row_and_says_so(make_slide, tmp_path: Path) -> None:
    path = make_slide("twice", size=(1024, 1024))
    run = tile_slides([path, path.parent], tmp_path / "out", patch_size=128)
    report = pd.read_csv(run.folder / "tiling.csv", keep_default_na=False)
    assert report["slide_id"].tolist() == ["twice"] and report["status"].tolist() == ["ok"]
    assert f"also given as {path.parent / 'twice.tif'}" in report["message"][0]


def test_centred_starts_by_hand() -> None:
    # 1200 px of tissue at 300..1500 needs 5 windows of 256 (1280 px), centred: 40 px spare on each side
    np.testing.assert_array_equal(centred_starts(300, 1500, 2000, 256, 256), 260 + 256 * np.arange(5))
    # half-overlapping windows: 9 of them span 8 * 128 + 256 = 1280 px, the same centred start
    np.testing.assert_array_equal(centred_starts(300, 1500, 2000, 256, 128), 260 + 128 * np.arange(9))
    # the whole slide: 7 windows fit (1792 px), the 208 px left over split evenly instead of all at the end
    np.testing.assert_array_equal(centred_starts(0, 2000, 2000, 256, 256), 104 + 256 * np.arange(7))
    # at the edges the centred windows (starting at -106, or ending at 2106) are shifted back inside
    np.testing.assert_array_equal(centred_starts(0, 300, 2000, 256, 256), [0, 256])
    np.testing.assert_array_equal(centred_starts(1700, 2000, 2000, 256, 256), [1488, 1744])
    np.testing.assert_array_equal(centred_starts(1000, 1010, 2000, 256, 256), [877])  # one window: 1005 - 128
    grid = grid_coords((2000, 1600), 256, 256, bbox=(300, 300, 1500, 600))
    assert sorted({x for x, _ in grid.tolist()}) == list(range(260, 1285, 256))
    assert sorted({y for _, y in grid.tolist()}) == [194, 450]  # 300 px of tissue, 2 windows: (900 - 512) / 2


def _edge_slide(make_slide, name: str, x0: int, y0: int, x1: int, y1: int) -> tuple[Path, np.ndarray]:
    """A 2000 x 1600 px slide at 0.5 um/px (20x, mask pixels 16 px) whose tissue is one rectangle."""
    truth = np.zeros((1600, 2000), bool)
    truth[y0:y1, x0:x1] = True
    return make_slide(name, size=(2000, 1600), mpp=0.5, tissue=truth), truth


def _covered(coords: np.ndarray, truth: np.ndarray, footprint: int) -> float:
    covered = np.zeros_like(truth)
    for x, y in coords.tolist():
        covered[y : y + footprint, x : x + footprint] = True
    return float((covered & truth).sum() / truth.sum())


def test_tissue_grid_covers_tissue_at_the_right_and_bottom_edges(make_slide, tmp_path: Path) -> None:
    path, truth = _edge_slide(make_slide, "edge", 1008, 608, 2000, 1600)
    origin = read_patch_file(tile_slides([path], tmp_path / "out", patch_size=256).patches / "edge.h5")
    centred = read_patch_file(tile_slides([path], tmp_path / "out", patch_size=256, grid="tissue").patches / "edge.h5")
    # the origin grid stops at 7 * 256 = 1792 and 6 * 256 = 1536: the last 208 and 64 px are never covered
    assert origin.coords[:, 0].max() + 256 <= 1792 and origin.coords[:, 1].max() + 256 <= 1536
    assert _covered(origin.coords, truth, 256) < 0.75
    # 992 px of tissue per axis needs 4 windows (1024 px); centred they would end past the slide, so the grid
    # ends at its edge: starts 2000 - 1024 = 976 and 1600 - 1024 = 576
    expected = {(976 + 256 * i, 576 + 256 * j) for i in range(4) for j in range(4)}
    assert {tuple(c) for c in centred.coords.tolist()} == expected
    assert _covered(centred.coords, truth, 256) == 1.0
    assert centred.tiling_settings["grid"] == "tissue" and origin.tiling_settings["grid"] == "origin"


def test_tissue_grid_is_centred_on_the_tissue(make_slide) -> None:
    path, _ = _edge_slide(make_slide, "inner", 400, 400, 1200, 1008)
    with open_slide(path) as slide:
        spec = tiling_spec(slide, 20.0, 256)
        mask = slide_mask(slide, mask_mpp_for(spec))
        coords, _ = patch_coords(mask, slide.dimensions, spec, grid="tissue")
    # x: 800 px of tissue -> 4 windows (1024 px) from (400 + 1200 - 1024) / 2 = 288;
    # y: 608 px -> 3 windows (768 px) from (400 + 1008 - 768) / 2 = 320. A mask edge may move by one
    # 16 px mask pixel, moving the centre by 8 px.
    xs, ys = np.unique(coords[:, 0]), np.unique(coords[:, 1])
    assert len(xs) == 4 and len(ys) == 3 and np.all(np.diff(xs) == 256) and np.all(np.diff(ys) == 256)
    assert abs(xs[0] - 288) <= 8 and abs(ys[0] - 320) <= 8


def _pen_slide(tmp_path: Path) -> Path:
    """A 2 mm slide at 2 um/px: a tissue disk crossed by a blue marker stroke."""
    tissue = np.zeros((1024, 1024), np.uint8)
    cv2.circle(tissue, (512, 512), 380, 1, -1)
    rgb = render_tissue(tissue.astype(bool), None, np.random.default_rng(0))
    stroke = np.zeros_like(tissue)
    cv2.line(stroke, (100, 300), (900, 500), 1, 60)
    rgb[stroke.astype(bool)] = (40, 80, 170)
    return write_pyramidal_tiff(tmp_path / "slides" / "pen.tif", rgb, 2.0)


def test_mask_and_thumbnail_show_the_excluded_ink(tmp_path: Path) -> None:
    path = _pen_slide(tmp_path)
    plain = tile_slides([path], tmp_path / "out", magnification=5, patch_size=32)
    pen = tile_slides([path], tmp_path / "out", magnification=5, patch_size=32, exclude_pen=True)
    masks = [cv2.imread(str(run.folder / "masks" / "pen.png"), cv2.IMREAD_GRAYSCALE) for run in (plain, pen)]
    assert set(np.unique(masks[0])) == {0, MASK_TISSUE}
    assert set(np.unique(masks[1])) == {0, MASK_EXCLUDED, MASK_TISSUE}
    assert masks[1].shape == (512, 512)  # 4 um mask pixels: the stroke's centre runs from (50, 150) to (450, 250)
    on_ink = [masks[1][round(150 + t * 100), round(50 + t * 400)] for t in np.linspace(0.1, 0.9, 9)]
    assert on_ink == [MASK_EXCLUDED] * 9 and masks[0][200, 250] == MASK_TISSUE
    assert (masks[0][masks[1] == MASK_EXCLUDED] == MASK_TISSUE).mean() > 0.98  # what was excluded was 'tissue'
    red = [
        np.all(cv2.imread(str(run.folder / "thumbnails" / "pen.png"))[..., ::-1] == EXCLUDED_COLOUR, axis=-1)
        for run in (plain, pen)
    ]
    assert not red[0].any() and red[1].sum() > 500
    kept = read_patch_file(pen.patches / "pen.h5")
    assert len(kept) < len(read_patch_file(plain.patches / "pen.h5"))


OPTIONS = {"threshold": 30, "min_region_um2": 1e4, "min_hole_um2": 5e4, "exclude_pen": True, "grid": "tissue"}


def test_each_segmentation_option_gets_its_own_folder() -> None:
    names = [TileSettings().folder_name] + [TileSettings(**{k: v}).folder_name for k, v in OPTIONS.items()]
    names.append(TileSettings(**OPTIONS).folder_name)
    assert names[0] == "20x_512px_0px_overlap"
    assert len(set(names)) == len(names) and all(n.startswith("20x_512px_0px_overlap_") for n in names[1:])
    assert TileSettings(threshold=None, exclude_pen=False, grid="origin").folder_name == names[0]


def test_options_are_recorded_in_patch_file_and_settings(make_slide, tmp_path: Path) -> None:
    path = make_slide("rec", size=(1024, 1024))
    run = tile_slides([path], tmp_path / "out", patch_size=128, **OPTIONS)
    recorded = read_patch_file(run.patches / "rec.h5").tiling_settings
    assert {k: recorded[k] for k in OPTIONS} == OPTIONS
    settings = json.loads((run.folder / "tiling.json").read_text())["settings"]
    assert {k: settings[k] for k in OPTIONS} == OPTIONS


def test_segmentation_options_reach_the_mask(make_slide, tmp_path: Path) -> None:
    path = make_slide("opt", size=(1024, 1024))  # 256 x 256 um, its tissue about 0.03 mm^2
    assert tile_slide(path, tmp_path / "out", patch_size=128).status == "ok"
    assert tile_slide(path, tmp_path / "out", patch_size=128, threshold=255).status == "no_tissue"
    assert tile_slide(path, tmp_path / "out", patch_size=128, min_region_um2=1e5).status == "no_tissue"


def test_patch_files_recorded_before_the_options_still_count_as_done(make_slide, tmp_path: Path) -> None:
    """Options missing from an earlier patch file's record are at their defaults, which tile as before."""
    path = make_slide("old", size=(1024, 1024))
    first = tile_slides([path], tmp_path / "out", patch_size=128)
    with h5py.File(first.patches / "old.h5", "r+") as f:
        settings = json.loads(f.attrs["tiling_settings"])
        f.attrs["tiling_settings"] = json.dumps({k: v for k, v in settings.items() if k not in OPTIONS})
    assert [r.status for r in tile_slides([path], tmp_path / "out", patch_size=128).results] == ["skipped"]
    assert [r.status for r in tile_slides([path], tmp_path / "out", patch_size=128, grid="tissue").results] == ["ok"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "300"], "--threshold: Input should be less than or equal to 255 (got '300')"),
        (["--threshold", "-1"], "--threshold: Input should be greater than or equal to 0"),
        (["--min-region-um2", "-5"], "--min-region-um2: Input should be greater than or equal to 0"),
        (["--min-hole-um2", "inf"], "--min-hole-um2: Input should be a finite number"),
    ],
)
def test_bad_option_values_are_refused_naming_the_option(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tile", str(tmp_path), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_grid_is_refused_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tile", str(tmp_path), "--out", str(tmp_path / "out"), "--grid", "centre"])
    assert "--grid: invalid choice: 'centre'" in capsys.readouterr().err
    with pytest.raises(HistotransferError, match=r"grid: 'centre' is not one of origin, tissue"):
        tile_slides([tmp_path], tmp_path / "out", grid="centre")
    with pytest.raises(HistotransferError, match=r"threshold: .*less than or equal to 255"):
        TileSettings.build(threshold=256)


def test_a_patch_file_without_colour_statistics_is_tiled_again_with_the_same_patches(
    make_slide, tmp_path: Path
) -> None:
    path = make_slide("old", size=(1024, 1024))
    first = tile_slides([path], tmp_path / "out", patch_size=128)
    before = read_patch_file(first.patches / "old.h5")
    assert before.colour_stats is not None and before.colour_stats.shape == (30,)
    with h5py.File(first.patches / "old.h5", "r+") as f:
        del f.attrs["colour_stats"]
    again = tile_slides([path], tmp_path / "out", patch_size=128)
    after = read_patch_file(again.patches / "old.h5")
    assert [r.status for r in again.results] == ["ok"] and after.fingerprint == before.fingerprint
    np.testing.assert_array_equal(after.colour_stats, before.colour_stats)
