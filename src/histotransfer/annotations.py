"""Lesion annotations of a slide, in level-0 pixel coordinates: rasterised masks and per-patch lesion overlap.

Two sources, chosen by file suffix:

* GeoJSON (``.geojson``, ``.json``), as QuPath exports it: a FeatureCollection, a list of Features (older
  QuPath), one Feature or a bare geometry. Polygon and MultiPolygon areas count, holes are holes; geometries
  without area (points, lines) are skipped; overlapping polygons are merged. Coordinates are level-0 pixels.
  ``classes`` keeps only the features whose QuPath classification name is listed (a "Tissue" outline in the
  same export would otherwise count as lesion).
* A binary mask image (``.png``, ``.tif``, ``.tiff``, ``.bmp``; any non-zero pixel is lesion) with its
  ``downsample``, the level-0 pixels per mask pixel: given by the caller, or else read from a sidecar JSON
  named after the image plus ``.json`` (``tumour.png`` -> ``tumour.png.json``: ``{"downsample": 16}``). A mask
  pixel (r, c) covers the level-0 square ``[c * d, (c + 1) * d) x [r * d, (r + 1) * d)``.

Conventions shared by both: a rasterised pixel is lesion when its centre lies inside the lesion (points on
the boundary are outside); ``patch_overlap`` is the exact area fraction of each patch square inside it.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
from scipy.ndimage import map_coordinates
from shapely.geometry import shape as geometry_from_geojson

from ._read import check_regular_file, read_text
from .demo_slides import LESION_MASK_DOWNSAMPLE
from .errors import FormatError, HistotransferError

GEOJSON_SUFFIXES = (".geojson", ".json")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
SIDECAR_SUFFIX = ".json"
AREA_TYPES = ("Polygon", "MultiPolygon")
LINEAR_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")
RASTER_SHIFT = 8  # fractional bits of the vertex coordinates handed to OpenCV's polygon filling


class Annotation(ABC):
    """A slide's lesion region in level-0 pixel coordinates, and where it was read from."""

    source: Path

    @abstractmethod
    def contains_xy(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether each level-0 point (x, y) lies inside the lesion (bool array of the broadcast shape)."""

    @abstractmethod
    def rasterize(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """Bool mask of ``shape`` (rows, cols) at ``downsample`` level-0 px per pixel: pixel centres inside."""

    @abstractmethod
    def patch_overlap(self, coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
        """Fraction (N,) float64 of each square patch (top-left ``coords`` (N, 2) level-0 x, y) inside."""

    @property
    @abstractmethod
    def is_empty(self) -> bool:
        """True when the annotation holds no lesion at all."""


def _patch_corners(coords: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N, 2) top-left corners as float64 and the (N, 2) bottom-right ones."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if not size > 0:
        raise ValueError(f"patch size must be positive, got {size}")
    return xy, xy + size


class PolygonAnnotation(Annotation):
    """A lesion given as (Multi)Polygon geometry, e.g. read from a QuPath GeoJSON export."""

    def __init__(self, geometry: shapely.Geometry, source: str | os.PathLike[str] = "<geometry>"):
        self.geometry = geometry
        self.source = Path(source)
        shapely.prepare(self.geometry)

    @property
    def is_empty(self) -> bool:
        return bool(self.geometry.is_empty)

    def contains_xy(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(shapely.contains_xy(self.geometry, x, y), dtype=bool)

    def rasterize(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """OpenCV fills the polygons, then the pixels within reach of an edge are decided by shapely.

        ``cv2.fillPoly`` is fast but also paints pixels that its outline touches, up to a pixel outside the
        polygon; testing every pixel centre with shapely is exact but takes seconds for a slide-sized mask.
        So the fill decides the pixels farther than 1.5 px from every edge, shapely the band along the edges.
        """
        rows, cols = shape
        mask = np.zeros((rows, cols), np.uint8)
        band = np.zeros((rows, cols), np.uint8)
        for polygon in _clipped_polygons(self.geometry, shape, downsample):
            rings = [_pixel_ring(ring, downsample) for ring in (polygon.exterior, *polygon.interiors)]
            # One call with all rings of a polygon fills by the even-odd rule: holes stay empty.
            cv2.fillPoly(mask, rings, 1, lineType=cv2.LINE_8, shift=RASTER_SHIFT)
            cv2.polylines(band, rings, True, 1, thickness=3, lineType=cv2.LINE_8, shift=RASTER_SHIFT)
        out = mask.astype(bool)
        r, c = np.nonzero(band)
        out[r, c] = self.contains_xy((c + 0.5) * downsample, (r + 0.5) * downsample)
        return out

    def patch_overlap(self, coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
        top_left, bottom_right = _patch_corners(coords, patch_size_level0)
        boxes = shapely.box(top_left[:, 0], top_left[:, 1], bottom_right[:, 0], bottom_right[:, 1])
        out = np.zeros(len(boxes), dtype=np.float64)
        hit = shapely.intersects(self.geometry, boxes)
        inside = hit & shapely.contains(self.geometry, boxes)
        out[inside] = 1.0
        partial = hit & ~inside
        out[partial] = shapely.area(shapely.intersection(boxes[partial], self.geometry)) / patch_size_level0**2
        return out


def _clipped_polygons(geometry: shapely.Geometry, shape: tuple[int, int], downsample: float) -> list[shapely.Polygon]:
    """The polygons of ``geometry`` cut (in float, level-0 px) to the raster of ``shape`` plus a margin.

    A vertex far outside the raster (1e10 px) would overflow OpenCV's 32-bit fixed-point coordinates and turn
    its edges around; cutting the polygon to the raster keeps every edge that crosses it exactly where it is."""
    margin = 4 * downsample
    box = shapely.box(-margin, -margin, shape[1] * downsample + margin, shape[0] * downsample + margin)
    clipped = shapely.intersection(geometry, box)
    return [p for p in shapely.get_parts(clipped) if isinstance(p, shapely.Polygon) and not p.is_empty]


def _pixel_ring(ring: shapely.LinearRing, downsample: float) -> np.ndarray:
    """A ring's level-0 vertices as OpenCV fixed-point pixel coordinates (pixel (c, r) centred at (c, r))."""
    xy = np.asarray(ring.coords, dtype=np.float64) / downsample - 0.5
    return np.round(xy * (1 << RASTER_SHIFT)).astype(np.int32)


class MaskAnnotation(Annotation):
    """A lesion given as a binary mask whose pixels are ``downsample`` x ``downsample`` level-0 squares."""

    def __init__(self, mask: np.ndarray, downsample: float, source: str | os.PathLike[str] = "<mask>"):
        if not downsample > 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = float(downsample)
        self.source = Path(source)
        # Summed-area table in level-0 px^2, (rows + 1, cols + 1) with a zero first row and column.
        self._integral = cv2.integral(self.mask.view(np.uint8), sdepth=cv2.CV_64F) * self.downsample**2

    @property
    def is_empty(self) -> bool:
        return not self.mask.any()

    def contains_xy(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
        c = np.floor(x / self.downsample)
        r = np.floor(y / self.downsample)
        rows, cols = self.mask.shape
        ok = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        out = np.zeros(x.shape, dtype=bool)
        out[ok] = self.mask[r[ok].astype(np.int64), c[ok].astype(np.int64)]
        return out

    def rasterize(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        rows, cols = shape
        centres_y = (np.arange(rows) + 0.5) * downsample
        centres_x = (np.arange(cols) + 0.5) * downsample
        return self.contains_xy(centres_x[None, :], centres_y[:, None])

    def patch_overlap(self, coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
        """Exact areas from the summed-area table: the lesion area of [0, X) x [0, Y) is the bilinear
        interpolation of the table at (X, Y) / downsample, because the mask is constant on each pixel."""
        top_left, bottom_right = _patch_corners(coords, patch_size_level0)

        def area_before(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            rows, cols = self.mask.shape
            r = np.clip(y / self.downsample, 0, rows)
            c = np.clip(x / self.downsample, 0, cols)
            return map_coordinates(self._integral, [r, c], order=1, mode="nearest")

        x0, y0 = top_left.T
        x1, y1 = bottom_right.T
        area = area_before(x1, y1) - area_before(x0, y1) - area_before(x1, y0) + area_before(x0, y0)
        return np.clip(area / patch_size_level0**2, 0.0, 1.0)


def load_annotation(
    path: str | os.PathLike[str], downsample: float | None = None, classes: Sequence[str] | None = None
) -> Annotation:
    """The lesion annotation in ``path``: a GeoJSON file (level-0 px) or a binary mask image.

    ``downsample`` (level-0 px per mask pixel) is for masks only; without it the mask's sidecar JSON gives it.
    ``classes`` filters GeoJSON features by QuPath classification name (default: every feature).
    """
    path = Path(path)
    check_regular_file(path, "annotation")
    if not path.is_file():
        raise HistotransferError(f"{path}: annotation file not found; pass a GeoJSON file or a mask image.")
    suffix = path.suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        if downsample is not None:
            raise HistotransferError(f"{path}: a GeoJSON annotation is in level-0 pixels; drop the downsample.")
        return PolygonAnnotation(read_geojson_lesion(path, classes), path)
    if suffix in MASK_SUFFIXES:
        if classes is not None:
            raise HistotransferError(f"{path}: a mask image has no classes; drop the class filter.")
        return MaskAnnotation(read_mask_image(path), mask_downsample(path, downsample), path)
    raise HistotransferError(
        f"{path}: unknown annotation type '{path.suffix}'; use GeoJSON ({', '.join(GEOJSON_SUFFIXES)}) or a "
        f"mask image ({', '.join(MASK_SUFFIXES)})."
    )


def read_geojson_lesion(path: Path, classes: Sequence[str] | None = None) -> shapely.Geometry:
    """The union of the Polygon/MultiPolygon areas of a GeoJSON file (level-0 px; holes kept)."""
    try:
        data = json.loads(read_text(path, "annotation"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not readable as JSON ({exc}); export the annotations as GeoJSON.") from None
    polygons = []
    for feature in _features(data, path):
        if classes is not None and _class_name(feature) not in classes:
            continue
        polygons += _areas(feature.get("geometry"), path)
    return shapely.union_all(polygons) if polygons else shapely.MultiPolygon()


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    """The Features of a FeatureCollection, a list of Features, one Feature, or a bare geometry."""
    items: Any
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        items = [data]
    elif isinstance(data, dict) and isinstance(data.get("type"), str):
        items = [{"type": "Feature", "geometry": data}]
    else:
        raise FormatError(
            f"{path}: not GeoJSON (no FeatureCollection, Feature or geometry at the top level); "
            "export the annotations as GeoJSON."
        )
    if not isinstance(items, list) or not all(isinstance(f, dict) and f.get("type") == "Feature" for f in items):
        raise FormatError(f"{path}: its features must be a list of GeoJSON Feature objects; re-export the file.")
    return items


def _class_name(feature: dict[str, Any]) -> str | None:
    """QuPath's classification name of a feature (``{"name": ...}`` or a plain string), or None."""
    classification = (feature.get("properties") or {}).get("classification")
    if isinstance(classification, dict):
        return classification.get("name")
    return classification if isinstance(classification, str) else None


def _areas(geometry: Any, path: Path) -> list[shapely.Geometry]:
    """The valid polygons of one GeoJSON geometry (none for points and lines or a null geometry)."""
    if geometry is None:
        return []
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise FormatError(f"{path}: a GeometryCollection without a 'geometries' list; re-export the file.")
        return [p for part in parts for p in _areas(part, path)]
    if kind in LINEAR_TYPES:
        return []
    if kind not in AREA_TYPES:
        raise FormatError(f"{path}: unsupported geometry {kind!r}; annotations must be Polygon or MultiPolygon.")
    try:
        shape = geometry_from_geojson(geometry)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, shapely.errors.ShapelyError) as exc:
        raise FormatError(f"{path}: malformed {kind} coordinates ({exc}); re-export the file.") from None
    if not np.isfinite(shapely.get_coordinates(shape)).all():
        raise FormatError(f"{path}: a {kind} vertex is NaN or infinite; fix or re-export this annotation file.")
    # QuPath can export self-touching or self-crossing outlines: repair them, then keep their area only.
    valid = shapely.make_valid(shape)
    return [p for p in shapely.get_parts(valid) if isinstance(p, (shapely.Polygon, shapely.MultiPolygon))]


def read_mask_image(path: Path) -> np.ndarray:
    """Bool mask of an image file: any non-zero colour channel is lesion (an alpha channel is ignored)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FormatError(f"{path}: not readable as an image; save the mask as PNG or TIFF.")
    if image.ndim == 2:
        return np.asarray(image != 0)
    return np.asarray(image[..., :3].any(axis=2))


def mask_downsample(path: Path, downsample: float | None) -> float:
    """Level-0 px per mask pixel: ``downsample`` if given, else the sidecar JSON's ``downsample``."""
    sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
    if downsample is None and not sidecar.is_file():
        raise HistotransferError(
            f"{path}: mask without a downsample; pass it (level-0 pixels per mask pixel) or write "
            f'{sidecar.name} holding {{"downsample": D}}.'
        )
    if downsample is None:
        try:
            downsample = json.loads(sidecar.read_text())["downsample"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FormatError(f'{sidecar}: expected {{"downsample": D}} ({exc!r}); fix the file.') from None
    if (
        not isinstance(downsample, (int, float))
        or isinstance(downsample, bool)
        or not (math.isfinite(downsample) and downsample > 0)
    ):
        raise HistotransferError(
            f"{path}: downsample {downsample!r} must be a positive number of level-0 pixels per mask pixel."
        )
    return float(downsample)


def demo_lesion_annotations(
    demo_dir: str | os.PathLike[str], slide_ids: Iterable[str] | None = None
) -> dict[str, MaskAnnotation]:
    """The true lesion masks of generated demo slides (``demo_dir/lesion_masks/<slide_id>.png``), by slide id.

    Negative slides' masks are empty. The masks carry no sidecar: their downsample is the demo's constant.
    """
    folder = Path(demo_dir) / "lesion_masks"
    if not folder.is_dir():
        raise HistotransferError(f"{folder}: not found; pass the folder that make_demo_slides wrote.")
    paths = {p.stem: p for p in sorted(folder.glob("*.png")) if not p.name.startswith(".")}
    wanted = list(paths) if slide_ids is None else list(slide_ids)
    missing = [s for s in wanted if s not in paths]
    if missing:
        raise HistotransferError(f"{folder}: no lesion mask for {', '.join(missing[:5])}; regenerate the demo.")
    return {s: MaskAnnotation(read_mask_image(paths[s]), LESION_MASK_DOWNSAMPLE, paths[s]) for s in wanted}
