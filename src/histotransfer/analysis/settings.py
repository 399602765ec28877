"""``CkaSettings``: every option of the block-wise CKA comparison, defined once (CLI, Python API, study file,
``cka.json``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..features.settings import (
    Device,
    StainMethod,
    StainOptions,
    StainScope,
    stain_norm_field,
    stain_ref_field,
    stain_scope_field,
)
from ..settings import OMIT_DEFAULT, RUNTIME, Seed, StageSettings


class CkaSettings(StainOptions, StageSettings):
    """How two encoders are compared stage by stage with linear CKA."""

    stage: ClassVar[str] = "cka"

    n_patches: int = Field(2000, ge=2, le=10_000_000, description="patches sampled across slides")
    pooling: Literal["classifier", "mean", "flatten"] = Field(
        "classifier",
        description="classifier: each stage through the encoder's own pooling, the representation "
        "MIL sees (CNNs: global average; ViTs: final norm, then the class token or the "
        "model's token pooling); mean: the mean of each stage's spatial positions or "
        "un-normed tokens; flatten: the whole map (disk-hungry)",
    )
    full_matrix: bool = Field(False, description="also every stage of A against every stage of B")
    per_block: bool = Field(
        False,
        description="transformer encoders: compare every block, not only the four "
        "quarter stages (with full_matrix: every block against every "
        "block; memory grows with the square of the depth)",
        json_schema_extra=OMIT_DEFAULT,
    )
    estimator: Literal["biased", "debiased"] = Field(
        "biased",
        description="biased: Kornblith et al.'s HSIC estimator (the paper's); debiased: Song et al.'s "
        "unbiased HSIC, which does not inflate CKA when patches are few next to dimensions",
    )
    baseline: bool = Field(
        True,
        description="also compare encoder A with a randomly initialised network of the "
        "same architecture on the same patches: the CKA that shared "
        "architecture and inputs alone give, to read the others against "
        "(LayerScale ViTs: their initialisation without LayerScale)",
    )
    baseline_draws: int = Field(
        3, ge=1, le=100, description="random initialisations the baseline is the mean and sd of (seeds 1..N)"
    )
    seed: Seed = Field(0, description="seeds the patch sample")
    input_size: int | None = Field(
        None,
        ge=16,
        le=8192,
        description="resize patches (default: the runs' input size when both agree, else the tiled size)",
    )
    batch_size: int = Field(32, ge=1, le=65536, description="patches per batch", json_schema_extra=RUNTIME)
    workers: int = Field(
        0, ge=0, le=256, description="patch-reading processes (0: in this process)", json_schema_extra=RUNTIME
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N", json_schema_extra=RUNTIME)
    # Encoders given by registry name (or encoder.pt) see patches normalised as these say, like an extraction
    # with the same options; a run folder always brings its own normalisation.
    stain_norm: StainMethod = stain_norm_field()
    stain_ref: str | None = stain_ref_field()
    stain_scope: StainScope = stain_scope_field()


class CamSettings(StageSettings):
    """How the Grad-CAM maps inside a run's most-attended patches are made and drawn."""

    stage: ClassVar[str] = "cam"

    top_k: int = Field(8, ge=1, le=4096, description="most-attended patches per slide (highest raw attention score)")
    target_class: int = Field(
        1, ge=0, le=1, description="class index whose slide logit is explained (1: the positive class, 0: the other)"
    )
    max_side: int = Field(
        2048, ge=64, le=16384, description="longest side of the slide thumbnail the CAM cells are drawn over"
    )
    batch_size: int = Field(
        16, ge=1, le=65536, description="patches per encoder forward pass", json_schema_extra=RUNTIME
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N", json_schema_extra=RUNTIME)
