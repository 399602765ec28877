"""``TileSettings``: every option of tiling, defined once (CLI, Python API, study file, recorded settings)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..provenance import json_fingerprint
from ..settings import RUNTIME, StageSettings

# tissue.MIN_AREA_UM2 (0.02 mm^2), written out so that reading settings does not import OpenCV
MIN_AREA_UM2 = 20000.0


class TileSettings(StageSettings):
    """How slides are cut into patches (the paper: 512 px patches at 20x with at least 50% tissue)."""

    stage: ClassVar[str] = "tile"

    magnification: float = Field(
        20.0, gt=0, le=1000, description="target magnification; 20x = 0.5 um/px, 40x = 0.25 um/px"
    )
    patch_size: int = Field(512, ge=8, le=65536, description="patch side in pixels at the target magnification")
    stride: int | None = Field(
        None, ge=1, description="grid step in pixels at the target (default: the patch size, no overlap)"
    )
    min_tissue: float = Field(
        0.5, gt=0, le=1, description="keep patches whose tissue fraction is at least this, in (0, 1]"
    )
    mpp: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="level-0 microns per pixel, overriding the slides' own (needed for plain images)",
    )
    threshold: int | None = Field(
        None,
        ge=0,
        le=255,
        description="HSV saturation (0-255) above which a mask "
        "pixel is tissue (default: Otsu's threshold, at "
        "least 20)",
    )
    min_region_um2: float = Field(
        MIN_AREA_UM2,
        ge=0,
        allow_inf_nan=False,
        description="drop tissue regions smaller than this, in square microns; 20000 = 0.02 mm^2",
    )
    min_hole_um2: float = Field(
        MIN_AREA_UM2, ge=0, allow_inf_nan=False, description="fill holes in tissue smaller than this, in square microns"
    )
    exclude_pen: bool = Field(
        False, description="take blue, green and black pen ink, with its halo, out of the tissue mask"
    )
    grid: Literal["origin", "tissue"] = Field(
        "origin",
        description="where the patch grid starts: 'origin' at "
        "the slide's top-left corner, 'tissue' centred "
        "on the tissue's bounding box",
    )
    workers: int = Field(1, ge=1, le=256, description="slides tiled in parallel processes", json_schema_extra=RUNTIME)

    @model_validator(mode="before")
    @classmethod
    def _stride_of_patch_size_is_default(cls, data: Any) -> Any:
        """A stride equal to the patch size is the default (no overlap), recorded as such, so that spelling it
        out names the same tiling."""
        if isinstance(data, dict) and data.get("stride") is not None:
            size = data.get("patch_size", cls.model_fields["patch_size"].default)
            try:
                same = int(data["stride"]) == int(size)
            except (TypeError, ValueError):
                return data  # the field validators say what is wrong
            if same:
                return {**data, "stride": None}
        return data

    @property
    def step(self) -> int:
        """The grid step in target pixels."""
        return self.stride if self.stride is not None else self.patch_size

    @property
    def folder_name(self) -> str:
        """The tiling's folder, named as TRIDENT names it (``20x_512px_0px_overlap``); other settings that
        differ from the defaults add a short hash, so different tilings never share a folder."""
        overlap = self.patch_size - self.step
        name = f"{self.magnification:g}x_{self.patch_size}px_" + (
            f"{overlap}px_overlap" if overlap >= 0 else f"{-overlap}px_gap"
        )
        extra = {
            k: v
            for k, v in self.result_settings().items()
            if k not in ("magnification", "patch_size", "stride") and v != type(self).model_fields[k].default
        }
        if extra:
            name += "_" + json_fingerprint(extra)[:8]
        return name
