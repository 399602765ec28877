"""Demo slides: deterministic real pyramidal JPEG TIFFs, balanced labels, lesions inside tissue."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from histotransfer._io import file_sha256
from histotransfer.demo_slides import LESION_MASK_DOWNSAMPLE, make_demo_slides
from histotransfer.errors import HistotransferError
from histotransfer.slide import open_slide
from histotransfer.slide.backends import TiffSlideSlide


def test_demo_slides_are_deterministic(tmp_path: Path) -> None:
    a = make_demo_slides(tmp_path / "a", n_slides=2, seed=3, size=1024)
    b = make_demo_slides(tmp_path / "b", n_slides=2, seed=3, size=1024)
    assert [p.name for p in a.slides] == [p.name for p in b.slides]
    assert [file_sha256(p) for p in a.slides] == [file_sha256(p) for p in b.slides]
    assert a.labels_csv.read_text() == b.labels_csv.read_text()
    c = make_demo_slides(tmp_path / "c", n_slides=2, seed=4, size=1024)
    assert [file_sha256(p) for p in a.slides] != [file_sha256(p) for p in c.slides]
    stamp = a.slides[0].stat().st_mtime_ns
    make_demo_slides(tmp_path / "a", n_slides=2, seed=3, size=1024)  # complete set reused, not rewritten
    assert a.slides[0].stat().st_mtime_ns == stamp


def test_demo_slides_are_real_pyramidal_tiffs_with_mpp(small_demo_slides) -> None:
    for path in small_demo_slides.slides:
        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            assert len(pages) >= 3 and all(p.is_tiled and p.compression == 7 for p in pages)
        with open_slide(path) as slide, TiffSlideSlide(path) as ts:
            assert slide.backend == "openslide" and slide.level_count >= 3
            assert slide.mpp == ts.mpp == pytest.approx(0.25)
            assert slide.dimensions == (2048, 2048)


def test_labels_balanced_with_patients_of_two_slides(tmp_path: Path) -> None:
    labels = pd.read_csv(make_demo_slides(tmp_path, n_slides=16, seed=0, size=512).labels_csv)
    assert list(labels.columns) == ["slide_id", "patient_id", "label"]
    assert len(labels) == 16 and labels.slide_id.is_unique
    assert (labels.label == 1).sum() == (labels.label == 0).sum() == 8
    per_patient = labels.groupby("patient_id")
    assert (per_patient.size() == 2).sum() >= 2 and per_patient.size().max() <= 2
    assert (per_patient.label.nunique() == 1).all()  # a patient's slides share its label


def test_lesions_sit_inside_tissue_with_a_different_look(small_demo_slides) -> None:
    labels = pd.read_csv(small_demo_slides.labels_csv).set_index("slide_id").label
    for path in small_demo_slides.slides:
        sid = path.stem
        lesion = cv2.imread(str(small_demo_slides.lesion_masks[sid]), cv2.IMREAD_GRAYSCALE) > 0
        assert lesion.shape == (2048 // LESION_MASK_DOWNSAMPLE,) * 2
        with open_slide(path) as slide:
            rgb = cv2.resize(slide.read_level(3), lesion.shape[::-1], interpolation=cv2.INTER_AREA)
        tissue = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 40
        if labels[sid] == 0:
            assert not lesion.any()
            continue
        assert 0.01 < lesion.mean() < 0.3
        inner = cv2.erode(lesion.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert tissue[inner].mean() > 0.99
        normal = cv2.erode((tissue & ~lesion).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        # Lesions are darker (dense nuclei) than the surrounding tissue.
        assert rgb[inner].mean() < rgb[normal].mean() - 20


def test_lesion_radius_shrinks_the_lesions_and_the_default_set_is_unchanged(tmp_path):
    default = make_demo_slides(tmp_path / "default", n_slides=4, seed=2, size=1024)
    small = make_demo_slides(tmp_path / "small", n_slides=4, seed=2, size=1024, lesion_radius=0.05)
    area = {
        name: sum(int((cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0).sum()) for p in demo.lesion_masks.values())
        for name, demo in (("default", default), ("small", small))
    }
    assert 0 < area["small"] < area["default"] / 4
    assert "lesion_radius" not in json.loads((tmp_path / "default" / "demo_slides.json").read_text())
    assert json.loads((tmp_path / "small" / "demo_slides.json").read_text())["lesion_radius"] == 0.05
    with pytest.raises(HistotransferError, match=r"lesion_radius=0\.5"):
        make_demo_slides(tmp_path / "bad", n_slides=2, lesion_radius=0.5)
