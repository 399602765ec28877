"""Lesion annotations: rasterisation against hand-made masks and shapely, exact patch overlaps, file reading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import shapely

from histotransfer.annotations import (
    MaskAnnotation,
    PolygonAnnotation,
    demo_lesion_annotations,
    load_annotation,
)
from histotransfer.errors import HistotransferError

SQUARE_WITH_HOLE = {
    "type": "Polygon",
    "coordinates": [[[0, 0], [8, 0], [8, 8], [0, 8], [0, 0]], [[2, 2], [6, 2], [6, 6], [2, 6], [2, 2]]],
}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def centre_reference(geometry: shapely.Geometry, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Every pixel centre tested with shapely: the definition, slow but independent of OpenCV."""
    r, c = np.mgrid[: shape[0], : shape[1]]
    return shapely.contains_xy(geometry, (c + 0.5) * downsample, (r + 0.5) * downsample)


def test_polygon_with_hole_rasterises_to_the_hand_made_mask(tmp_path):
    expected = np.zeros((10, 10), bool)
    expected[0:8, 0:8] = True
    expected[2:6, 2:6] = False
    annotation = load_annotation(write_json(tmp_path / "a.geojson", SQUARE_WITH_HOLE))
    np.testing.assert_array_equal(annotation.rasterize((10, 10), 1), expected)
    scaled = shapely.affinity.scale(annotation.geometry, 4, 4, origin=(0, 0))
    np.testing.assert_array_equal(PolygonAnnotation(scaled).rasterize((10, 10), 4), expected)


def test_pixel_centres_on_the_boundary_are_outside():
    # Centres (c + 0.5, r + 0.5) with c + r == 7 lie on the hypotenuse x + y = 8; OpenCV alone would fill them.
    triangle = PolygonAnnotation(shapely.Polygon([(0, 0), (8, 0), (0, 8)]))
    r, c = np.mgrid[:10, :10]
    np.testing.assert_array_equal(triangle.rasterize((10, 10), 1), r + c <= 6)


def test_rasterisation_equals_pixel_centre_test_on_random_polygons_with_holes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        parts = []
        for _ in range(2):
            angle = np.sort(rng.uniform(0, 2 * np.pi, 9))
            radius = rng.uniform(30, 70, 9)
            cx, cy = rng.uniform(80, 220, 2)
            ring = np.c_[cx + radius * np.cos(angle), cy + radius * np.sin(angle)]
            hole = np.c_[cx + 12 * np.cos(angle), cy + 12 * np.sin(angle)]
            parts.append(shapely.make_valid(shapely.Polygon(ring, [hole])))
        geometry = shapely.union_all(parts)
        downsample = float(rng.choice([1.0, 2.5, 4.0]))
        shape = (int(300 / downsample), int(310 / downsample))
        got = PolygonAnnotation(geometry).rasterize(shape, downsample)
        np.testing.assert_array_equal(got, centre_reference(geometry, shape, downsample))


def test_multipolygon_feature_collection_with_overlaps_and_holes(tmp_path):
    collection = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"classification": {"name": "Tumor"}},
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [SQUARE_WITH_HOLE["coordinates"], [[[10, 0], [14, 0], [14, 4], [10, 4], [10, 0]]]],
                },
            },
            {
                "type": "Feature",
                "properties": {"classification": {"name": "Tumor"}},  # overlaps the second square
                "geometry": {"type": "Polygon", "coordinates": [[[12, 2], [16, 2], [16, 4], [12, 4], [12, 2]]]},
            },
            {
                "type": "Feature",
                "properties": {"classification": {"name": "Tissue"}},
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]]]},
            },
            {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [3, 3]}},
        ],
    }
    annotation = load_annotation(write_json(tmp_path / "qupath.geojson", collection), classes=["Tumor"])
    expected = np.zeros((10, 20), bool)
    expected[0:8, 0:8] = True
    expected[2:6, 2:6] = False
    expected[0:4, 10:14] = True
    expected[2:4, 12:16] = True
    np.testing.assert_array_equal(annotation.rasterize((10, 20), 1), expected)
    assert annotation.geometry.area == pytest.approx(64 - 16 + 16 + 4)  # the overlap counted once
    everything = load_annotation(tmp_path / "qupath.geojson")
    assert everything.rasterize((10, 20), 1).all()


def test_qupath_feature_list_single_feature_and_bare_geometry_are_read(tmp_path):
    feature = {"type": "Feature", "geometry": SQUARE_WITH_HOLE, "properties": {"objectType": "annotation"}}
    for name, data in (("list.json", [feature]), ("one.geojson", feature), ("bare.geojson", SQUARE_WITH_HOLE)):
        annotation = load_annotation(write_json(tmp_path / name, data))
        assert annotation.geometry.area == pytest.approx(48)


def test_patch_overlap_is_the_area_fraction_of_each_square():
    square = PolygonAnnotation(shapely.box(0, 0, 100, 100))
    coords = np.array([[0, 0], [50, 0], [0, 50], [50, 50], [-50, 0], [200, 200], [25, 25]])
    expected = [1.0, 0.5, 0.5, 0.25, 0.5, 0.0, 0.75 * 0.75]
    np.testing.assert_allclose(square.patch_overlap(coords, 100), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(square.patch_overlap(coords[-1:], 50), [1.0], rtol=0, atol=1e-12)
    holed = PolygonAnnotation(
        shapely.Polygon([(0, 0), (200, 0), (200, 200), (0, 200)], [[(50, 50), (150, 50), (150, 150), (50, 150)]])
    )
    np.testing.assert_allclose(
        holed.patch_overlap(np.array([[0, 0], [50, 50], [100, 0]]), 100), [0.75, 0.0, 0.75], rtol=0, atol=1e-12
    )


def test_mask_patch_overlap_counts_partial_mask_pixels_exactly():
    mask = np.zeros((20, 20), bool)
    mask[0:10, 0:10] = True  # level-0 [0, 100) x [0, 100) at downsample 10
    annotation = MaskAnnotation(mask, 10)
    coords = np.array([[0, 0], [50, 0], [50, 50], [5, 0], [3, 7], [-50, -50], [300, 0]])
    expected = [1.0, 0.5, 0.25, 0.95, 0.97 * 0.93, 0.25, 0.0]
    np.testing.assert_allclose(annotation.patch_overlap(coords, 100), expected, rtol=0, atol=1e-12)


def test_mask_and_polygon_overlaps_agree_on_pixel_aligned_shapes():
    geometry = shapely.union_all([shapely.box(0, 0, 80, 40), shapely.box(40, 40, 120, 120)])
    polygon = PolygonAnnotation(geometry)
    mask = MaskAnnotation(polygon.rasterize((16, 16), 8), 8)
    coords = np.random.default_rng(1).uniform(-30, 130, (200, 2))
    np.testing.assert_allclose(mask.patch_overlap(coords, 37.5), polygon.patch_overlap(coords, 37.5), rtol=0, atol=1e-9)


def test_mask_file_with_sidecar_or_caller_downsample(tmp_path):
    mask = np.zeros((6, 8), np.uint8)
    mask[1:4, 2:7] = 255
    path = tmp_path / "lesion.png"
    cv2.imwrite(str(path), mask)
    with pytest.raises(HistotransferError, match=re.escape("lesion.png.json")):
        load_annotation(path)
    assert load_annotation(path, downsample=4).downsample == 4
    write_json(tmp_path / "lesion.png.json", {"downsample": 16})
    annotation = load_annotation(path)
    assert annotation.downsample == 16
    np.testing.assert_array_equal(annotation.rasterize((6, 8), 16), mask > 0)
    coarse = annotation.rasterize((3, 4), 32)  # centres at level-0 16 + 32 k: mask pixels 1 + 2 k
    np.testing.assert_array_equal(coarse, (mask > 0)[1::2, 1::2])
    assert annotation.contains_xy(np.array([2 * 16 + 1, 0]), np.array([16 + 1, 0])).tolist() == [True, False]


def test_colour_mask_ignores_its_alpha_channel(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[1:3, 2:4, 2] = 200  # red in OpenCV's BGRA order
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), rgba)
    expected = np.zeros((4, 5), bool)
    expected[1:3, 2:4] = True
    np.testing.assert_array_equal(load_annotation(path, downsample=2).mask, expected)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"answer": 42}),
        json.dumps({"type": "FeatureCollection", "features": {"a": 1}}),
        json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0]]]}}),
        json.dumps({"type": "Polygon", "coordinates": "abc"}),
        json.dumps({"type": "Circle", "coordinates": [0, 0]}),
    ],
)
def test_malformed_geojson_is_an_error_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.geojson"
    path.write_text(text)
    with pytest.raises(HistotransferError, match=re.escape(str(path))):
        load_annotation(path)


def test_bad_sidecar_and_unknown_suffix_are_errors(tmp_path):
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), np.zeros((2, 2), np.uint8))
    write_json(tmp_path / "m.png.json", {"downsample": -1})
    with pytest.raises(HistotransferError, match=re.escape(str(path))):
        load_annotation(path)
    other = tmp_path / "m.xml"
    other.write_text("<x/>")
    with pytest.raises(HistotransferError, match="unknown annotation type"):
        load_annotation(other)


def test_demo_lesion_masks_load_as_annotations(small_demo_slides):
    folder = small_demo_slides.labels_csv.parent
    annotations = demo_lesion_annotations(folder)
    assert sorted(annotations) == sorted(small_demo_slides.lesion_masks)
    labels = pd.read_csv(small_demo_slides.labels_csv).set_index("slide_id")["label"]
    for slide_id, annotation in annotations.items():
        png = cv2.imread(str(small_demo_slides.lesion_masks[slide_id]), cv2.IMREAD_GRAYSCALE) > 0
        assert annotation.is_empty == (labels[slide_id] == 0)
        np.testing.assert_array_equal(annotation.rasterize(png.shape, 16), png)
    with pytest.raises(HistotransferError, match="no lesion mask"):
        demo_lesion_annotations(folder, ["demo_99"])
