"""``FinetuneSettings``: every option of top-k fine-tuning, defined once (CLI, Python API, study file,
fine-tuned run's ``config.json``)."""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from ..features.settings import Device
from ..settings import OMIT_DEFAULT, RUNTIME, Seed, StageSettings

#: The transformer-block layers low-rank adaptation can target: attention qkv and output projections, MLP layers.
LoraTarget = Literal["qkv", "proj", "fc1", "fc2"]
LORA_TARGETS: tuple[LoraTarget, ...] = ("qkv", "proj", "fc1", "fc2")
#: HED jitter strength when hed_sigma / hed_bias are left unset (natural-log optical density units).
HED_SIGMA, HED_BIAS = 0.05, 0.05


class FinetuneSettings(StageSettings):
    """How a run's encoder is fine-tuned end to end with its MIL head on the top-k attended patches."""

    stage: ClassVar[str] = "finetune"

    top_k: int = Field(64, ge=1, le=100000, description="patches per slide, by attention (the paper: 64)")
    lr: float = Field(1e-5, gt=0, le=10, description="Adam learning rate (the paper: 1e-5)")
    epochs: int = Field(20, ge=1, le=100000, description="training epochs")
    frozen_candidate: bool = Field(
        True,
        description="count the frozen start (epoch 0) as a candidate at "
        "selection, so fine-tuning never hands back a model worse on "
        "validation (off: the best fine-tuned epoch, as in the paper)",
    )
    batch_slides: int = Field(1, ge=1, le=4096, description="slides per optimizer step")
    freeze_stages: int = Field(
        0,
        ge=0,
        le=8,
        description="keep the stem and the first K stages fixed (0: train everything but BatchNorm statistics)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, or bf16/fp16 autocast on a GPU")
    seed: Seed = Field(0, description="seeds the slide order of each epoch and the LoRA initialisation")
    lora_rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="train rank-R LoRA matrices in the transformer blocks instead of "
        "the encoder's weights (merged into encoder.pt); none: full "
        "fine-tuning",
    )
    lora_alpha: int | None = Field(
        None, ge=1, le=65536, description="LoRA scale numerator: updates are alpha/rank * B A (none: alpha = rank)"
    )
    lora_targets: tuple[LoraTarget, ...] | None = Field(
        None,
        min_length=1,
        description="block layers LoRA adapts, of qkv, proj (attention), fc1, fc2 (MLP); none: all four",
    )
    stain_augment: Literal["none", "hed"] = Field(
        "none",
        description="hed: jitter each training patch's haematoxylin, eosin and DAB channels (Tellez et al.), "
        "seeded by the seed, the epoch and the slide; never validation or re-extraction",
        json_schema_extra=OMIT_DEFAULT,
    )
    hed_sigma: float | None = Field(
        None,
        ge=0,
        le=1,
        description=f"HED scale jitter: each channel times U(1 - sigma, 1 + sigma) (none: {HED_SIGMA})",
        json_schema_extra=OMIT_DEFAULT,
    )
    hed_bias: float | None = Field(
        None,
        ge=0,
        le=1,
        description=f"HED shift jitter: each channel plus U(-bias, bias), in optical density (none: {HED_BIAS})",
        json_schema_extra=OMIT_DEFAULT,
    )
    grad_checkpointing: bool = Field(
        False,
        description="recompute each stage (each block of a transformer) in "
        "the backward pass: far less activation memory for one "
        "extra forward pass per step",
        json_schema_extra=RUNTIME,
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N", json_schema_extra=RUNTIME)
    workers: int = Field(
        0, ge=0, le=256, description="patch-reading processes (0: in this process)", json_schema_extra=RUNTIME
    )
    extract_batch_size: int = Field(
        64, ge=1, le=65536, description="patches per batch when re-extracting", json_schema_extra=RUNTIME
    )

    @model_validator(mode="after")
    def _dependent_options(self) -> Self:
        """Options that depend on another (LoRA's on ``lora_rank``, HED's on ``stain_augment``) would be
        recorded but have no effect without it: refused."""
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_targets is not None):
            raise ValueError(
                "lora_alpha and lora_targets apply to low-rank adaptation: set lora_rank too, or "
                "drop them for full fine-tuning"
            )
        if self.stain_augment == "none" and (self.hed_sigma is not None or self.hed_bias is not None):
            raise ValueError("hed_sigma and hed_bias apply to stain_augment hed: set it too, or drop them")
        if self.lora_targets is not None and len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError(f"lora_targets {list(self.lora_targets)} names a layer twice: name each once")
        return self

    @property
    def hed_strength(self) -> tuple[float, float]:
        """(sigma, bias) of the HED jitter in effect."""
        return (
            HED_SIGMA if self.hed_sigma is None else self.hed_sigma,
            HED_BIAS if self.hed_bias is None else self.hed_bias,
        )
