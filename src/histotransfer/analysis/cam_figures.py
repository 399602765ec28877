"""The CAM figures: ``<slide_id>_cam.png`` (the top-k patches with their maps on one colour range) and
``<slide_id>_slide.png`` (every CAM cell over the slide thumbnail, the patches framed, the lesion outlined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .._io import write_png
from ..annotations import Annotation
from ..mil import attention_overlay, cell_squares, heatmap_image, outline_lesion
from .cam import CamResult

FIGURE_TILE = 160  # approximate side in pixels of each patch in <slide_id>_cam.png

FIGURE_COLUMNS = 4

CMAP = "jet"


def _cell_layout(maps: np.ndarray, coords: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Every CAM cell as a square: level-0 corners (B*h*w, 2), values and the cell side."""
    h, w = maps.shape[1:]
    corners = cell_squares(coords, side, (h, w)).reshape(-1, 2)
    return corners, maps.reshape(-1), side / w


def _cam_range(maps: np.ndarray) -> tuple[float, float]:
    return 0.0, float(maps.max()) if maps.size else 0.0


def _label_tile(tile: np.ndarray, text: str) -> np.ndarray:
    """``tile`` with a white caption strip above it."""
    strip = np.full((18, tile.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([strip, tile])


def cam_figure(pixels: np.ndarray, maps: np.ndarray, scores: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The k patches (uint8 (k, S, S, 3)) with their CAM (k, h, w) painted over them on one colour range
    (0 to the largest cell of the k maps), ranked left to right, top to bottom, with the legend strip."""
    k, w = len(maps), maps.shape[2]
    tile = w * max(1, round(FIGURE_TILE / w))
    vrange = _cam_range(maps)
    tiles = []
    for i in range(k):
        image = cv2.resize(pixels[i], (tile, tile), interpolation=cv2.INTER_CUBIC)
        corners, values, cell = _cell_layout(maps[i : i + 1], np.zeros((1, 2)), float(tile))
        painted = attention_overlay(image, (tile, tile), corners, values, cell, vrange, CMAP)
        tiles.append(_label_tile(painted, f"#{i + 1} score {scores[i]:.3g}"))
    blank = np.full_like(tiles[0], 255)
    columns = min(k, FIGURE_COLUMNS)
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[r : r + columns]) for r in range(0, len(tiles), columns)]
    return heatmap_image(np.vstack(rows), vrange, CMAP, lines)


def slide_figure(
    thumb: np.ndarray,
    dimensions: tuple[int, int],
    maps: np.ndarray,
    coords: np.ndarray,
    side: float,
    lines: Sequence[str],
    annotation: Annotation | None = None,
) -> np.ndarray:
    """The slide thumbnail with every CAM cell painted at its level-0 place (colour range as
    :func:`cam_figure`), each top-k patch framed in white and the lesion, if annotated, outlined in black."""
    vrange = _cam_range(maps)
    corners, values, cell = _cell_layout(maps, coords, side)
    image = attention_overlay(thumb, dimensions, corners, values, cell, vrange, CMAP)
    sx, sy = image.shape[1] / dimensions[0], image.shape[0] / dimensions[1]
    for x, y in np.asarray(coords, np.float64):
        cv2.rectangle(
            image,
            (int(x * sx), int(y * sy)),
            (math.ceil((x + side) * sx), math.ceil((y + side) * sy)),
            (255, 255, 255),
            1,
        )
    if annotation is not None:
        image = outline_lesion(image, annotation, dimensions)
    return heatmap_image(image, vrange, CMAP, lines)


def figure_lines(record: dict[str, Any], k: int) -> list[str]:
    h, w = record["grid"]
    um = "n/a" if record["um_per_cell"] is None else f"{record['um_per_cell']:.3g} um"
    return [
        f"{record['slide_id']}: top {k} of {record['n_patches']} patches by attention",
        f"Grad-CAM of the {record['target_class_name']!r} logit at {record['stage']}: {h}x{w} cells of {um}",
    ]


def localisation_caption(scores: dict[str, Any]) -> str:
    def num(key: str) -> str:
        return "n/a" if scores[key] is None else f"{scores[key]:.3f}"

    return (
        f"lesion: pointing game {num('pointing_game')} (random cell {num('pointing_chance')}) over "
        f"{scores['n_pointing']} patch(es), CAM mass {num('cam_mass')} (uniform {num('lesion_area_share')})"
    )


def write_figures(
    out: Path,
    slide_id: str,
    result: CamResult,
    record: dict[str, Any],
    thumb: np.ndarray,
    lines: list[str],
    annotation: Annotation | None,
) -> None:
    """``<slide_id>_cam.png`` (the patches and their maps) and ``<slide_id>_slide.png`` (the cells over the
    thumbnail)."""
    write_png(cam_figure(record["pixels"], result.maps, record["score"], lines), out / f"{slide_id}_cam.png")
    write_png(
        slide_figure(
            thumb,
            record["dimensions"],
            result.maps,
            record["coords"],
            float(record["patch_size_level0"]),
            lines,
            annotation,
        ),
        out / f"{slide_id}_slide.png",
    )
