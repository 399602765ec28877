"""The study file's schema: one pydantic model per section, built on each stage's own settings class (a
dataset is ``TileSettings`` plus its files, the ``mil`` section ``MilSettings`` plus a name, ...), so that an
option added to a stage is a study key at once. :mod:`.config` validates a file with these models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..analysis.settings import CkaSettings
from ..finetune.settings import FinetuneSettings
from ..mil.settings import MilSettings
from ..patches.settings import TileSettings
from ..settings import Seed

STAIN_KEYS = ("stain_norm", "stain_ref")

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
TOP_KEYS = ("name", "out", "datasets", "encoders", "seeds", "tile", "extract", "mil", "finetune", "cka", "cam")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderEntry(_Strict):
    name: str
    weights: str | None = None
    truncations: list[int] = Field(default_factory=lambda: [0], min_length=1)
    blocks: int | None = Field(None, ge=1)  # a transformer's exact depth, instead of truncations

    @field_validator("truncations", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v


class EncoderRef(_Strict):
    name: str
    weights: str | None = None
    truncation: int = 0
    blocks: int | None = Field(None, ge=1)


class DemoSpec(_Strict):
    n_slides: int = Field(16, ge=4)
    seed: Seed = 0
    size: int = Field(4096, ge=512)


class DatasetEntry(TileSettings):
    """A dataset: its slides and labels (or generated demo slides), tiling settings overriding ``tile``, and how
    its slides are split (``split_file``, or an official ``split`` rule such as camelyon16; ``group_column``)."""

    name: str = Field(pattern=NAME_RE)
    slides: list[str] | None = None
    labels: str | None = None
    split_file: str | None = None
    split: Literal["camelyon16"] | None = None
    group_column: str | None = None
    annotations: str | None = None
    demo: DemoSpec | None = None

    @field_validator("slides", mode="before")
    @classmethod
    def _listed(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class MilSection(MilSettings):
    """One MIL variant of the study: the stage's settings and a name for the tables (default: its recipe)."""

    name: str | None = Field(None, pattern=NAME_RE)


class FinetuneSection(FinetuneSettings):
    encoders: list[EncoderRef] = Field(min_length=1)
    seeds: list[Seed] | None = None
    mil: str | None = None


class PairEntry(_Strict):
    a: EncoderRef
    b: EncoderRef


class CkaSection(CkaSettings):
    finetuned: bool = True
    pairs: list[PairEntry] = Field(default_factory=list)
