"""PatchReader: direct tile decoding gives OpenSlide's pixels, resizes off-level reads, works in workers.

Tolerance: both paths decode the same JPEG tiles with libjpeg-turbo (OpenSlide through its bundled library,
ours through imagecodecs), which gives identical output; we allow at most 2 grey levels per channel in case a
platform's builds differ in IDCT or upsampling, and require the mean difference to stay below 0.05.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from histotransfer.patches import PatchReader
from histotransfer.patches.geometry import tiling_spec
from histotransfer.slide import open_slide
from histotransfer.slide.backends import TiffSlideSlide

MAX_JPEG_DIFF = 2


def _openslide_rgb(path: Path, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    osr = openslide.OpenSlide(str(path))
    rgba = np.asarray(osr.read_region(location, level, size)).astype(np.uint16)
    osr.close()
    alpha = rgba[..., 3:]
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= MAX_JPEG_DIFF and diff.mean() < 0.05


def test_native_level_read_matches_openslide(make_slide) -> None:
    path = make_slide(size=(2048, 1536))
    with open_slide(path) as slide:
        spec = tiling_spec(slide, 20.0, 256)
        reader = PatchReader(slide, spec)
        assert (spec.patch_level, spec.patch_size_level0) == (1, 512)
        assert reader.direct and reader.native
        for x, y in [(0, 0), (512, 1024), (1536, 1024), (1800, 1400), (-100, 40)]:
            patch = reader.read(x, y)
            assert patch.shape == (256, 256, 3)
            _assert_close(patch, _openslide_rgb(path, (x, y), 1, (256, 256)))
        assert (reader.read(1800, 1400)[(1536 - 1400) // 2 :] == 255).all()  # beyond the slide: white


def test_off_level_read_is_resized_from_the_level_above(make_slide) -> None:
    path = make_slide(size=(2048, 2048))
    with open_slide(path) as slide:
        spec = tiling_spec(slide, 30.0, 128)  # 0.333 um/px: level 0 (0.25) read and shrunk by 3/4
        reader = PatchReader(slide, spec)
        assert (spec.patch_level, spec.patch_size_level0) == (0, 171) and not reader.native
        ref = cv2.resize(_openslide_rgb(path, (700, 900), 0, (171, 171)), (128, 128), interpolation=cv2.INTER_AREA)
        _assert_close(reader.read(700, 900), ref)


def test_formats_without_direct_decoding_use_the_backend(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8)
    png = tmp_path / "img.png"
    cv2.imwrite(str(png), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    with open_slide(png, mpp=0.5) as slide:
        reader = PatchReader(slide, tiling_spec(slide, 20.0, 200))
        assert not reader.direct and reader.native
        np.testing.assert_array_equal(reader.read(300, 100), img[100:300, 300:500])


def _read_in_worker(reader: PatchReader) -> np.ndarray:
    return reader.read(512, 512)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_pickles_and_reads_in_worker_processes(make_slide, method: str) -> None:
    with open_slide(make_slide(size=(1024, 1024))) as slide:
        reader = PatchReader(slide, tiling_spec(slide, 20.0, 128))
        expected = reader.read(512, 512)  # opens handles in this process first
        clone = pickle.loads(pickle.dumps(reader))
        np.testing.assert_array_equal(clone.read(512, 512), expected)
        clone.close()
        with mp.get_context(method).Pool(1) as pool:
            np.testing.assert_array_equal(pool.apply(_read_in_worker, (reader,)), expected)


def test_real_svs_patches_match_openslide_through_both_backends(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide, TiffSlideSlide(cmu_svs) as ts:
        spec = tiling_spec(slide, 20.0, 512)  # 0.499 um/px is 20x within tolerance: read natively
        assert (spec.patch_level, spec.patch_size_level0, spec.downsample) == (0, 512, 1.0)
        ours, via_tiffslide = PatchReader(slide, spec), PatchReader(ts, spec)
        assert ours.direct and via_tiffslide.direct
        for x, y in [(0, 0), (700, 1200), (1800, 2600)]:
            ref = _openslide_rgb(cmu_svs, (x, y), 0, (512, 512))
            _assert_close(ours.read(x, y), ref)
            _assert_close(via_tiffslide.read(x, y), ref)
            np.testing.assert_array_equal(ts.read_region((x, y), 0, (512, 512)), ref)
