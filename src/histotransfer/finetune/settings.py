"""``FinetuneSettings``: every option of top-k fine-tuning, defined once (CLI, Python API, study file,
fine-tuned run's ``config.json``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..features.settings import Device
from ..settings import RUNTIME, StageSettings


class FinetuneSettings(StageSettings):
    """How a run's encoder is fine-tuned end to end with its MIL head on the top-k attended patches."""

    stage: ClassVar[str] = "finetune"

    top_k: int = Field(64, ge=1, le=100000, description="patches per slide, by attention (the paper: 64)")
    lr: float = Field(1e-5, gt=0, le=10, description="Adam learning rate (the paper: 1e-5)")
    epochs: int = Field(20, ge=1, le=100000, description="training epochs")
    batch_slides: int = Field(1, ge=1, le=4096, description="slides per optimizer step")
    freeze_stages: int = Field(0, ge=0, le=8, description="keep the stem and the first K stages fixed (0: train "
                                                          "everything but BatchNorm statistics)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, or bf16/fp16 autocast on a GPU")
    seed: int = Field(0, description="seeds the slide order of each epoch")
    grad_checkpointing: bool = Field(False, description="recompute each stage in the backward pass: far less "
                                                        "activation memory for one extra forward pass per step",
                                     json_schema_extra=RUNTIME)
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N", json_schema_extra=RUNTIME)
    workers: int = Field(0, ge=0, le=256, description="patch-reading processes (0: in this process)",
                         json_schema_extra=RUNTIME)
    extract_batch_size: int = Field(64, ge=1, le=65536, description="patches per batch when re-extracting",
                                    json_schema_extra=RUNTIME)
