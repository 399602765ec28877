"""Patch files: round trip, CLAM/TRIDENT compatibility, and clear errors for unusable files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from histotransfer.errors import FormatError
from histotransfer.formats import PATCHES
from histotransfer.patches.geometry import resolve_spec
from histotransfer.patches.patch_file import PatchSpec, read_patch_file, write_patch_file
from histotransfer.slide import open_slide

SPEC = PatchSpec(
    patch_size=256,
    patch_size_level0=512,
    patch_level=1,
    downsample=2.0,
    target_magnification=20.0,
    mpp=0.25,
    min_tissue=0.5,
    stride=256,
    slide_path="/data/s.tif",
)


def test_round_trip_and_clam_readable_attrs(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [512, 0], [1024, 512]], np.int64)
    fraction = np.array([0.5, 0.75, 1.0], np.float32)
    path = tmp_path / "patches" / "s.h5"
    write_patch_file(path, coords, fraction, SPEC)
    got = read_patch_file(path)
    assert got.slide_id == "s" and len(got) == 3
    np.testing.assert_array_equal(got.coords, coords)
    assert got.coords.dtype == np.int64
    np.testing.assert_array_equal(got.tissue_fraction, fraction)
    assert got.spec == SPEC
    with h5py.File(path) as f:
        assert f.attrs["format"] == PATCHES[0] and f.attrs["format_version"] == PATCHES[1]
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].attrs["patch_level"] == 1
        assert f.attrs["patch_size_level0"] == 512
    assert [p.name for p in path.parent.iterdir()] == ["s.h5"]  # no temporary left behind


def test_write_refuses_mismatched_lengths_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with pytest.raises(ValueError):
        write_patch_file(path, np.zeros((3, 2)), np.zeros(2), SPEC)
    assert list(tmp_path.iterdir()) == []


def test_clam_file_is_read_and_resolved_against_its_slide(tmp_path: Path, make_slide) -> None:
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [1024, 0]], np.int64))
        d.attrs["patch_level"] = 1
        d.attrs["patch_size"] = 256
    got = read_patch_file(path)
    assert got.spec.patch_size == 256 and got.spec.patch_level == 1 and got.spec.patch_size_level0 is None
    assert np.isnan(got.tissue_fraction).all() and len(got.tissue_fraction) == 2
    with open_slide(make_slide(size=(1024, 1024))) as slide:
        spec = resolve_spec(got.spec, slide)
    assert (spec.patch_size_level0, spec.downsample, spec.mpp) == (512, 2.0, 0.25)
    assert spec.target_magnification == pytest.approx(20.0)


def test_trident_file_is_read_and_its_level_chosen(tmp_path: Path, make_slide) -> None:
    path = tmp_path / "trident.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [1024, 1024]], np.int64))
        d.attrs.update(
            patch_size=256,
            patch_size_level0=1024,
            target_magnification=10.0,
            level0_magnification=40.0,
            overlap=0,
            name="trident",
        )
    got = read_patch_file(path)
    with open_slide(make_slide(size=(2048, 2048))) as slide:
        spec = resolve_spec(got.spec, slide)
    assert (spec.patch_level, spec.downsample, spec.target_magnification) == (2, 4.0, 10.0)


def _h5(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_unusable_files_raise_format_errors_naming_the_file(tmp_path: Path) -> None:
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(FormatError, match=r"text\.h5: not a readable HDF5"):
        read_patch_file(text)
    with pytest.raises(FormatError, match=r"nocoords\.h5: missing dataset\(s\) coords"):
        read_patch_file(_h5(tmp_path / "nocoords.h5", features=np.zeros((2, 4))))
    shape = _h5(tmp_path / "shape.h5", coords=np.zeros((4, 3), np.int64))
    with pytest.raises(FormatError, match=r"shape\.h5: 'coords' must be \(N, 2\)"):
        read_patch_file(shape)
    frac = _h5(tmp_path / "frac.h5", coords=np.array([[0.5, 1.0]]))
    with pytest.raises(FormatError, match=r"frac\.h5: 'coords' must hold whole pixel"):
        read_patch_file(frac)
    with pytest.raises(FormatError, match=r"nosize\.h5: no positive patch_size"):
        read_patch_file(_h5(tmp_path / "nosize.h5", coords=np.zeros((1, 2), np.int64)))
    noscale = _h5(tmp_path / "noscale.h5", coords=np.zeros((1, 2), np.int64))
    with h5py.File(noscale, "a") as f:
        f["coords"].attrs["patch_size"] = 256
    with pytest.raises(FormatError, match=r"noscale\.h5: cannot tell the patches' scale"):
        read_patch_file(noscale)


def test_other_layout_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    write_patch_file(path, np.zeros((1, 2)), np.ones(1), SPEC)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = PATCHES[1] + 1
    with pytest.raises(FormatError, match=r"old\.h5: layout version"):
        read_patch_file(path)


def test_clam_downsample_pair_reads_as_one_number(tmp_path):
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [512, 0]], dtype=np.int64))
        d.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0])})
    spec = read_patch_file(path).spec
    assert spec.downsample == 2.0 and spec.patch_level == 1 and spec.patch_size == 256
