"""Slide readers: OpenSlide, tiffslide and plain images give the same geometry, metadata and pixels."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from histotransfer.errors import HistotransferError
from histotransfer.slide import SlideEntry, list_slides, open_slide, slide_id_of, slide_index
from histotransfer.slide.backends import OpenSlideSlide, TiffSlideSlide


@pytest.mark.parametrize(
    "name, expected", [("a.svs", "a"), ("b.ome.tiff", "b"), ("c.OME.TIF", "c"), ("d.e.tif", "d.e"), ("f", "f")]
)
def test_slide_id_is_file_name_without_extension(name: str, expected: str) -> None:
    assert slide_id_of(Path("/x") / name) == expected


def test_generated_tiff_opens_with_openslide_geometry_and_mpp(make_slide) -> None:
    path = make_slide("s1", size=(1536, 1024))
    with open_slide(path) as slide:
        assert slide.backend == "openslide"
        assert slide.slide_id == "s1"
        assert slide.dimensions == (1536, 1024)
        assert slide.level_dimensions == [(1536, 1024), (768, 512), (384, 256)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        assert slide.level_count == 3
        assert slide.mpp == pytest.approx(0.25)
        assert slide.magnification == pytest.approx(40.0)  # no objective power in a generic TIFF: 10 / mpp


def test_openslide_and_tiffslide_read_identical_pixels_and_white_outside(make_slide) -> None:
    path = make_slide("s2", size=(1024, 1024))
    with OpenSlideSlide(path) as a, TiffSlideSlide(path) as b:
        assert (a.dimensions, a.level_dimensions, a.mpp) == (b.dimensions, b.level_dimensions, b.mpp)
        for loc, level, size in [
            ((0, 0), 0, (1024, 1024)),
            ((-64, -32), 0, (200, 100)),
            ((900, 1000), 0, (300, 50)),
            ((512, 256), 1, (300, 300)),
            ((-40, 1000), 2, (80, 80)),
        ]:
            ra, rb = a.read_region(loc, level, size), b.read_region(loc, level, size)
            assert ra.shape == (size[1], size[0], 3) and ra.dtype == np.uint8
            np.testing.assert_array_equal(ra, rb)
        corner = a.read_region((-64, -32), 0, (200, 100))
        assert (corner[:32] == 255).all() and (corner[:, :64] == 255).all()
        np.testing.assert_array_equal(corner[32:, 64:], a.read_region((0, 0), 0, (136, 68)))


def test_thumbnail_longest_side_and_matches_level(make_slide) -> None:
    with open_slide(make_slide("s3", size=(2048, 1024))) as slide:
        thumb = slide.thumbnail(512)
        assert thumb.shape == (256, 512, 3)
        np.testing.assert_array_equal(thumb, slide.read_level(2))
        assert slide.thumbnail(300).shape == (150, 300, 3)
        assert slide.thumbnail(10_000).shape == (1024, 2048, 3)  # never upscaled


def test_mpp_override_and_pickling(make_slide) -> None:
    path = make_slide("s4", size=(512, 512))
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.magnification == pytest.approx(20.0)
        clone = pickle.loads(pickle.dumps(slide))
        assert (clone.path, clone.mpp, clone.dimensions) == (slide.path, 0.5, slide.dimensions)
        np.testing.assert_array_equal(
            clone.read_region((10, 20), 0, (64, 64)), slide.read_region((10, 20), 0, (64, 64))
        )
        clone.close()


def test_slide_without_mpp_needs_mpp_flag(make_slide) -> None:
    path = make_slide("nompp", size=(512, 512), mpp=None)
    with pytest.raises(HistotransferError, match=r"nompp\.tif.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.backend == "openslide"


def test_plain_png_needs_mpp_and_reads_exact_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    png = tmp_path / "plain.png"
    cv2.imwrite(str(png), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    with pytest.raises(HistotransferError, match=r"plain\.png.*--mpp"):
        open_slide(png)
    with open_slide(png, mpp=0.5) as slide:
        assert slide.backend == "image" and slide.dimensions == (400, 300) and slide.level_count == 1
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (400, 300)), img)
        region = slide.read_region((380, -10), 0, (40, 30))
        np.testing.assert_array_equal(region[10:, :20], img[:20, 380:])
        assert (region[:10] == 255).all() and (region[:, 20:] == 255).all()


def test_plain_strip_tiff_is_read_as_image_with_mpp(tmp_path: Path) -> None:
    img = np.random.default_rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, img, photometric="rgb")
    with open_slide(path, mpp=1.0) as slide:
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (96, 64)), img)


@pytest.mark.parametrize("content", [b"hello, not a slide\n", b""])
def test_unreadable_files_name_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.svs"
    path.write_bytes(content)
    with pytest.raises(HistotransferError, match=r"fake\.svs: not a slide"):
        open_slide(path)
    with pytest.raises(HistotransferError, match=r"missing\.svs: no such file"):
        open_slide(tmp_path / "missing.svs")


def test_truncated_tiff_is_refused(make_slide, tmp_path: Path) -> None:
    data = make_slide("whole", size=(1024, 1024)).read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(HistotransferError, match=r"cut\.tif: .*(truncated|not a slide)"), open_slide(cut) as slide:
        slide.read_level(0)


def test_real_svs_reads_identically_through_openslide_and_tiffslide(cmu_svs: Path) -> None:
    with OpenSlideSlide(cmu_svs) as a, TiffSlideSlide(cmu_svs) as b:
        for s in (a, b):
            assert s.dimensions == (2220, 2967)
            assert s.mpp == pytest.approx(0.499)
            assert s.magnification == pytest.approx(20.0)
        np.testing.assert_array_equal(a.read_level(0), b.read_level(0))
        ref = np.asarray(openslide.OpenSlide(str(cmu_svs)).read_region((100, 200), 0, (64, 48)))[..., :3]
        np.testing.assert_array_equal(a.read_region((100, 200), 0, (64, 48)), ref)


def test_a_folder_lists_its_slide_files_by_name_without_hidden_or_other_files(make_slide, tmp_path: Path) -> None:
    b = make_slide("b", size=(256, 256))
    folder = b.parent
    make_slide("a", size=(256, 256))
    (folder / "._a.tif").write_bytes(b"macOS resource fork")
    (folder / ".hidden.svs").write_bytes(b"hidden")
    (folder / "notes.txt").write_text("not a slide")
    (folder / "sub.tif").mkdir()  # a folder with a slide suffix
    assert list_slides(folder) == [SlideEntry("a", folder / "a.tif"), SlideEntry("b", folder / "b.tif")]
    link = tmp_path / "copy.tif"
    link.symlink_to(folder / "a.tif")  # the same file under another name: kept, marked as the repeat
    assert list_slides([folder, link])[-1] == SlideEntry("copy", link, folder / "a.tif")
    assert slide_index([folder, link]) == {"a": folder / "a.tif", "b": folder / "b.tif"}
