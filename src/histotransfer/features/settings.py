"""Settings of feature extraction: which encoder (:class:`EncoderChoice`) and how it is run
(:class:`ExtractSettings`), each option defined once for the CLI, the Python API and the study file."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from ..settings import OMIT_DEFAULT, RUNTIME, StageSettings

StainMethod = Literal["none", "macenko", "reinhard"]
StainScope = Literal["slide", "patch"]
# The scope every normalisation had before the option existed: recorded settings leave it out, so those
# results keep their fingerprints.
LEGACY_STAIN_SCOPE = "patch"
STAIN_REF_HELP = (
    "stain reference: a patch image, a folder of patch images (fitted as one set), a slide region "
    "SLIDE@x,y,w,h (level-0 pixels), or a fitted target .json (histotransfer stain-fit)"
)


def stain_norm_field() -> Any:
    """The ``stain_norm`` option, defined once for every stage that reads pixels (extraction, CKA)."""
    return Field(
        "none",
        description="normalise patch colour to the reference before the encoder: none, macenko or reinhard",
        json_schema_extra=OMIT_DEFAULT,
    )


def stain_ref_field() -> Any:
    """The ``stain_ref`` option (see :data:`STAIN_REF_HELP`)."""
    return Field(None, min_length=1, description=STAIN_REF_HELP, json_schema_extra=OMIT_DEFAULT)


def stain_scope_field() -> Any:
    """The ``stain_scope`` option: where the source stain is estimated (see :class:`StainOptions`)."""
    return Field(
        "slide",
        description="where the source stain is estimated: slide (once per slide, so the "
        "patches of a slide keep their colour differences) or patch (each patch on "
        "its own, which evens those out too)",
    )


class StainOptions:
    """The checks and recorded settings of the stain options of a stage that reads pixels.

    A method needs a reference (:func:`check_stain_options`). The scope shapes the result only when pixels are
    normalised, and per-patch normalisation is what every normalisation was before the option existed:
    :meth:`result_settings` leaves the scope out in both cases, so raw and per-patch results keep the settings
    and fingerprints they had, and per-slide ones get their own.
    """

    if TYPE_CHECKING:  # the fields of the settings class it is mixed into (declared there, in their order)
        stain_norm: str
        stain_ref: str | None
        stain_scope: str

    @model_validator(mode="after")
    def _stain_options(self) -> Self:
        check_stain_options(self.stain_norm, self.stain_ref)
        return self

    def result_settings(self) -> dict[str, Any]:
        """The base class's, without ``stain_scope`` where it does not change the result of before."""
        result = super().result_settings()  # type: ignore[misc]
        if self.stain_norm == "none" or self.stain_scope == LEGACY_STAIN_SCOPE:
            result.pop("stain_scope", None)
        return result


def check_stain_options(method: str, reference: str | None) -> None:
    """A method needs a reference; a reference without a method would be recorded but have no effect."""
    if method != "none" and reference is None:
        raise ValueError(
            f"stain_norm {method} needs stain_ref: a patch image, a folder of them, SLIDE@x,y,w,h or "
            "a fitted target .json"
        )
    if method == "none" and reference is not None:
        raise ValueError(
            "stain_ref is given but stain_norm is none: set stain_norm to macenko or reinhard, or drop stain_ref"
        )


class EncoderChoice(StageSettings):
    """An encoder of the registry, its weights and how many of its last stages are cut off: one truncation
    (an int), or a list of them extracted in one pass over the patches (:meth:`each` splits it); or, for a
    transformer, the exact number of its first blocks kept (``blocks``, instead of a truncation)."""

    stage: ClassVar[str] = "encoder"

    encoder: str = Field(min_length=1, description="encoder name (see `histotransfer encoders`)")
    weights: str | None = Field(
        None,
        description="named weights (imagenet, imagenet-v2, pretrained, ...), random, "
        "or a .safetensors/.pth/.pt checkpoint file (default: the "
        "encoder's default weights)",
    )
    truncate: int | list[int] = Field(
        0,
        description="drop the last K stages (0-3); several values (e.g. 0 1 2 3) "
        "extract each truncation, in one pass over the patches",
    )
    blocks: int | None = Field(
        None,
        ge=1,
        description="transformer encoders: keep exactly their first N blocks (instead of "
        "--truncate's quarters of the depth)",
        json_schema_extra=OMIT_DEFAULT,
    )

    @field_validator("truncate", mode="before")
    @classmethod
    def _check_truncate(cls, value: Any) -> int | list[int]:
        """A non-negative int, or a non-empty list of them (sorted, repeats dropped); the registry checks the
        upper bound, which depends on the encoder."""
        several = isinstance(value, (list, tuple))
        try:
            items = [operator.index(k) for k in (value if several else [value]) if not isinstance(k, bool)]
        except TypeError:
            items = []
        if not items or len(items) != (len(value) if several else 1) or min(items) < 0:
            raise ValueError("pass a truncation 0, 1, 2, ... or a non-empty list of them")
        return sorted(set(items)) if several else items[0]

    @field_validator("blocks", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        """True and False are not numbers of blocks (pydantic would read them as 1 and 0)."""
        if isinstance(value, bool):
            raise ValueError("pass a number of blocks 1, 2, ...")
        return value

    @model_validator(mode="after")
    def _one_depth(self) -> Self:
        """``blocks`` sets the depth by itself: a truncation beside it would contradict it or say nothing."""
        if self.blocks is not None and self.truncate != 0:
            raise ValueError(
                f"blocks {self.blocks} sets the depth by itself: drop truncate {self.truncate!r} (or blocks)"
            )
        return self

    @property
    def truncations(self) -> list[int]:
        """The truncations asked for, deepest network (smallest truncation) first."""
        return list(self.truncate) if isinstance(self.truncate, list) else [self.truncate]

    def each(self) -> list[EncoderChoice]:
        """One choice per truncation, each what an extraction of that truncation alone is given."""
        return [self.build(self, truncate=k) for k in self.truncations]


def check_device(value: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"'{value}' is not a device: use auto, cpu, cuda or cuda:N")


Device = Annotated[str, AfterValidator(check_device)]


class ExtractSettings(StainOptions, StageSettings):
    """How patches go through an encoder (everything but the encoder itself)."""

    stage: ClassVar[str] = "extract"

    input_size: int | None = Field(
        None,
        ge=16,
        le=8192,
        description="resize patches to N pixels (default: the "
        "encoder's input size if it has one, else "
        "the tiled patch size)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32 (IEEE float32 on every device) or bf16/fp16 autocast on a GPU"
    )
    dtype: Literal["float32", "float16"] = Field("float32", description="stored feature type")
    batch_size: int = Field(64, ge=1, le=65536, description="patches per batch", json_schema_extra=RUNTIME)
    workers: int | None = Field(
        None,
        ge=0,
        le=256,
        description="patch-reading processes (default: automatic; 0 reads in the main process)",
        json_schema_extra=RUNTIME,
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N", json_schema_extra=RUNTIME)
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="where JPEG tiles are decoded: gpu (nvJPEG "
        "beside a CUDA encoder), cpu (the loader "
        "processes), or auto (gpu when the encoder "
        "runs on CUDA); slides that are not "
        "JPEG-tiled are decoded on the CPU",
        json_schema_extra=RUNTIME,
    )
    stain_norm: StainMethod = stain_norm_field()
    stain_ref: str | None = stain_ref_field()
    stain_scope: StainScope = stain_scope_field()
