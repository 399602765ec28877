"""Tiling: kept patches match a known tissue region; outputs, settings, re-runs and refusals."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import disk_and_bar

from histotransfer.errors import HistotransferError
from histotransfer.patches import read_patch_file, tile_slide, tile_slides
from histotransfer.patches.geometry import tiling_spec
from histotransfer.patches.tiling import grid_coords, mask_mpp_for, patch_coords, slide_mask, tissue_fractions
from histotransfer.slide import open_slide
from histotransfer.slide.backends import OpenSlideSlide, TiffSlideSlide


def _true_fractions(truth: np.ndarray, coords: np.ndarray, footprint: int) -> np.ndarray:
    table = cv2.integral(truth.astype(np.uint8), sdepth=cv2.CV_64F)
    x, y = coords[:, 0], coords[:, 1]
    area = (table[y + footprint, x + footprint] - table[y, x + footprint] - table[y + footprint, x] + table[y, x])
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
        covered[y:y + footprint, x:x + footprint] = True
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
    assert [(r.slide_id, r.status, r.n_patches) for r in one.results] == \
        [(r.slide_id, r.status, r.n_patches) for r in two.results]
    for s in slides:
        a = read_patch_file(one.patches / f"{s.stem}.h5")
        b = read_patch_file(two.patches / f"{s.stem}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)


def test_real_svs_tiles_identically_through_openslide_and_tiffslide(cmu_svs: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
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
