"""What a validated study is: its datasets, the encoder configurations of its grid, and each stage's settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.settings import CamSettings, CkaSettings
from ..features.settings import ExtractSettings
from ..finetune.settings import FinetuneSettings
from ..mil.settings import MilSettings
from ..patches.settings import TileSettings
from ..provenance import json_fingerprint


@dataclass(frozen=True)
class EncoderConfig:
    """One patch encoder configuration of the grid: architecture, weights (a named option, random or an
    absolute checkpoint path) and truncation, or for a transformer an exact number of blocks (``blocks``,
    with ``truncate`` 0)."""

    name: str
    weights: str
    truncate: int
    blocks: int | None = None

    @property
    def weights_tag(self) -> str:
        """A short folder-safe name for the weights (a checkpoint path becomes stem + hash of the path)."""
        if not Path(self.weights).is_absolute():
            return self.weights
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.weights).stem)[:40]
        return f"{stem}-{json_fingerprint(self.weights)[:8]}"

    @property
    def depth_tag(self) -> str:
        """``t<truncate>``, or ``b<blocks>``."""
        return f"t{self.truncate}" if self.blocks is None else f"b{self.blocks}"

    @property
    def full_depth(self) -> bool:
        """The whole network: neither truncated nor cut to a number of blocks."""
        return self.truncate == 0 and self.blocks is None

    @property
    def key(self) -> str:
        """Folder-safe identifier, unique per configuration."""
        return f"{self.name}-{self.weights_tag}-{self.depth_tag}"

    @property
    def label(self) -> str:
        """Human-readable name for tables and figures."""
        depth = f"truncate {self.truncate}" if self.blocks is None else f"{self.blocks} blocks"
        return f"{self.name} ({Path(self.weights).name}, {depth})"

    def spec(self) -> dict[str, Any]:
        """The encoder as the extraction and CKA APIs take it (``blocks`` only when set, so that the specs and
        cache keys of other configurations are those of before it existed)."""
        spec: dict[str, Any] = {"name": self.name, "weights": self.weights, "truncate": self.truncate}
        if self.blocks is not None:
            spec["blocks"] = self.blocks
        return spec


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: slide files, label file, tiling settings (or demo slides to generate), and how its
    slides are split (a split file, an official split rule, a group column to stratify and report by)."""

    name: str
    slides: tuple[Path, ...]
    labels: Path | None
    tile: TileSettings
    split_file: Path | None = None
    demo: dict[str, int] | None = None
    split_rule: str | None = None
    group_column: str | None = None
    annotations: Path | None = None  # lesion annotations (a demo dataset's are its lesion masks)

    def mil(self, settings: MilSettings, seed: int) -> MilSettings:
        """The study's MIL settings for this dataset and seed."""
        return MilSettings.build(settings, seed=seed, split_rule=self.split_rule, group_column=self.group_column)


@dataclass(frozen=True)
class MilVariant:
    """One way of training MIL in the study (its ``mil`` section, or one entry of a list of them), named by
    its recipe unless given a name: a column of every table."""

    name: str
    settings: MilSettings


@dataclass(frozen=True)
class Study:
    """A validated study file."""

    path: Path
    text: str
    name: str
    out: Path | None
    datasets: tuple[Dataset, ...]
    encoders: tuple[EncoderConfig, ...]
    seeds: tuple[int, ...]
    extract: ExtractSettings
    mil: tuple[MilVariant, ...]
    stains: tuple[str, ...] = ("none",)
    stain_ref: str | None = None
    finetune: FinetuneSettings | None = None
    finetune_mil: str = ""
    finetune_encoders: tuple[EncoderConfig, ...] = ()
    finetune_seeds: tuple[int, ...] = ()
    cka: CkaSettings | None = None
    cka_finetuned: bool = False
    cka_pairs: tuple[tuple[EncoderConfig, EncoderConfig], ...] = ()
    cam: CamSettings | None = None
    encoder_info: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    def extract_for(self, stain: str) -> ExtractSettings:
        """The extraction settings of one value of the stain axis (``none``: ``extract`` as it is)."""
        if stain == "none":
            return self.extract
        return ExtractSettings.build(self.extract, stain_norm=stain, stain_ref=self.stain_ref)


def stain_suffix(stain: str) -> str:
    """What a stain normalisation adds to a configuration's cell folders (nothing for none, so studies made
    before stain options existed keep their cells)."""
    return "" if stain == "none" else f"-{stain}"
