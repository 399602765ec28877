"""The study file: a YAML description of the whole grid, validated (pydantic) before any work starts.

Each section is a stage's own settings class (``tile`` / a dataset: ``TileSettings``, ``extract``:
``ExtractSettings``, ``mil``: ``MilSettings``, ``finetune``: ``FinetuneSettings``, ``cka``: ``CkaSettings``), so an
option added to a stage is a study key at once. Every problem is reported at once with its key path
(``datasets[0].labels``), the bad value and the fix; a misspelt key comes with its closest valid spelling, an
unknown encoder with the registry's names. Relative paths are relative to the study file's folder.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..analysis.settings import CkaSettings
from ..errors import HistotransferError
from ..features.settings import ExtractSettings
from ..finetune.settings import FinetuneSettings
from ..mil.settings import MilSettings
from ..patches.settings import TileSettings
from ..provenance import json_fingerprint
from ..settings import describe_errors
from ..slide import list_slides

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def settings_hash(obj: Any) -> str:
    """A stable short hash of JSON-able settings (cache keys)."""
    return json_fingerprint(obj)[:16]


@dataclass(frozen=True)
class EncoderConfig:
    """One patch encoder configuration of the grid: architecture, weights (a named option, random or an
    absolute checkpoint path) and truncation."""

    name: str
    weights: str
    truncate: int

    @property
    def weights_tag(self) -> str:
        """A short folder-safe name for the weights (a checkpoint path becomes stem + hash of the path)."""
        if not Path(self.weights).is_absolute():
            return self.weights
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.weights).stem)[:40]
        return f"{stem}-{json_fingerprint(self.weights)[:8]}"

    @property
    def key(self) -> str:
        """Folder-safe identifier, unique per configuration."""
        return f"{self.name}-{self.weights_tag}-t{self.truncate}"

    @property
    def label(self) -> str:
        """Human-readable name for tables and figures."""
        return f"{self.name} ({Path(self.weights).name}, truncate {self.truncate})"

    def spec(self) -> dict[str, Any]:
        """The encoder as the extraction and CKA APIs take it."""
        return {"name": self.name, "weights": self.weights, "truncate": self.truncate}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class _Context:
    """What the checks needing files and the registry share: the study file's folder and encoder infos."""

    base: Path
    info: dict[str, dict[str, Any]] = field(default_factory=dict)


def _path(value: str | None, ctx: _Context, what: str) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    p = (p if p.is_absolute() else ctx.base / p).resolve()
    if not p.exists():
        raise ValueError(f"{what} not found: {p} (relative paths are relative to {ctx.base})")
    return p


def _is_file(weights: str) -> bool:
    return weights.lower().endswith((".safetensors", ".pth", ".pt", ".ckpt", ".bin"))


def _encoder(name: str, weights: str | None, truncations: list[int], ctx: _Context) -> list[EncoderConfig]:
    """Check an encoder entry against the registry (lazily imported: torch) and expand its truncations."""
    from ..features.registry import encoder_info, list_encoders
    from ..features.weights import resolve_weights

    names = list_encoders()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown encoder '{name}'{hint}; known encoders: {', '.join(names)}")
    meta = ctx.info.setdefault(name, encoder_info(name))
    if weights is not None and _is_file(weights):
        weights = str(_path(weights, ctx, f"weights file for {name}"))
    try:
        choice = resolve_weights(name, weights)
    except HistotransferError as exc:
        raise ValueError(str(exc)) from None
    top = meta["n_stages"] - 1
    for k in truncations:
        if not 0 <= k <= top:
            raise ValueError(f"truncation {k} is too deep for {name}: it has {top + 1} stages, so truncation "
                             f"must be in 0..{top}")
    label = choice.option.name if choice.option is not None else ("random" if choice.path is None else
                                                                   str(choice.path))
    return [EncoderConfig(name, label, k) for k in truncations]


class EncoderEntry(_Strict):
    name: str
    weights: str | None = None
    truncations: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("truncations", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    def configs(self, ctx: _Context) -> list[EncoderConfig]:
        return _encoder(self.name, self.weights, list(dict.fromkeys(self.truncations)), ctx)


class EncoderRef(_Strict):
    name: str
    weights: str | None = None
    truncation: int = 0


class DemoSpec(_Strict):
    n_slides: int = Field(16, ge=4)
    seed: int = 0
    size: int = Field(4096, ge=512)


class DatasetEntry(TileSettings):
    """A dataset: its slides and labels (or generated demo slides), and tiling settings overriding ``tile``."""

    name: str = Field(pattern=NAME_RE)
    slides: list[str] | None = None
    labels: str | None = None
    split_file: str | None = None
    demo: DemoSpec | None = None

    @field_validator("slides", mode="before")
    @classmethod
    def _listed(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _source(self) -> DatasetEntry:
        if self.demo is not None and (self.slides is not None or self.labels is not None):
            raise ValueError("give either 'demo' (generated slides) or 'slides' and 'labels'")
        if self.demo is None and (self.slides is None or self.labels is None):
            raise ValueError("needs 'slides' (a folder or a list of slide files) and 'labels' (a CSV), or 'demo'")
        return self


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: slide files, label file, tiling settings (or demo slides to generate)."""

    name: str
    slides: tuple[Path, ...]
    labels: Path | None
    tile: TileSettings
    split_file: Path | None = None
    demo: dict[str, int] | None = None


class FinetuneSection(FinetuneSettings):
    encoders: list[EncoderRef] = Field(min_length=1)
    seeds: list[int] | None = None


class PairEntry(_Strict):
    a: EncoderRef
    b: EncoderRef


class CkaSection(CkaSettings):
    finetuned: bool = True
    pairs: list[PairEntry] = Field(default_factory=list)


class StudyFile(_Strict):
    """The schema of a study file."""

    name: str | None = None
    out: str | None = None
    datasets: list[DatasetEntry] = Field(min_length=1)
    encoders: list[EncoderEntry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    tile: TileSettings = TileSettings()
    extract: ExtractSettings = ExtractSettings()
    mil: MilSettings = MilSettings()
    finetune: FinetuneSection | None = None
    cka: CkaSection | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @field_validator("mil")
    @classmethod
    def _no_seed(cls, v: MilSettings) -> MilSettings:
        if "seed" in v.model_fields_set:
            raise ValueError("set the seeds with the top-level 'seeds' list, not mil.seed")
        return v


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
    tile: TileSettings
    extract: ExtractSettings
    mil: MilSettings
    finetune: FinetuneSettings | None
    finetune_encoders: tuple[EncoderConfig, ...]
    finetune_seeds: tuple[int, ...]
    cka: CkaSettings | None
    cka_finetuned: bool
    cka_pairs: tuple[tuple[EncoderConfig, EncoderConfig], ...]
    encoder_info: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)


def _semantics(f: StudyFile, base: Path) -> tuple[list[str], dict[str, Any]]:
    """Checks that need the registry and the files (every one collected): encoders, paths, labels, refs."""
    from ..mil.labels import parse_labels

    problems: list[str] = []
    ctx = _Context(base)
    grid: list[EncoderConfig] = []
    for i, e in enumerate(f.encoders):
        try:
            for cfg in e.configs(ctx):
                if cfg in grid:
                    problems.append(f"encoders[{i}]: {cfg.label} is listed more than once")
                grid.append(cfg)
        except ValueError as exc:
            problems.append(f"encoders[{i}]: {exc}")
    datasets = []
    for i, d in enumerate(f.datasets):
        where = f"datasets[{i}]"
        try:
            tile = TileSettings.model_validate({**f.tile.model_dump(exclude_unset=True),
                                                **d.model_dump(include=set(TileSettings.model_fields) &
                                                               d.model_fields_set)})
            slides: list[Path] = []
            labels = split = None
            if d.demo is None:
                slides = [e.path for e in list_slides([_path(s, ctx, "slide file or folder") for s in d.slides])
                          if e.duplicate_of is None]
                labels = _path(d.labels, ctx, "labels file")
                parse_labels(labels)
                split = _path(d.split_file, ctx, "split file")
            datasets.append(Dataset(d.name, tuple(slides), labels, tile, split,
                                    d.demo.model_dump() if d.demo else None))
        except (ValueError, HistotransferError) as exc:
            problems.append(f"{where}: {exc}")
    names = [d.name for d in f.datasets]
    problems += [f"datasets: dataset name '{n}' is used more than once" for n in sorted(set(names))
                 if names.count(n) > 1]
    refs = {}
    for where, ref in _refs(f):
        try:
            refs[where] = _encoder(ref.name, ref.weights, [ref.truncation], ctx)[0]
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    for where, cfg in refs.items():
        if where.startswith("finetune") and cfg not in grid:
            problems.append(f"{where}: {cfg.label} is not one of the configurations in 'encoders'")
    for s in (f.finetune.seeds or []) if f.finetune else []:
        if s not in f.seeds:
            problems.append(f"finetune.seeds: seed {s} is not one of the study's seeds {f.seeds}")
    if f.cka is not None and f.cka.finetuned and f.finetune is None and not f.cka.pairs:
        problems.append("cka: nothing to compare: add a 'finetune' section (frozen vs fine-tuned) or cka.pairs")
    return problems, {"grid": grid, "datasets": datasets, "refs": refs, "info": ctx.info}


def _refs(f: StudyFile) -> list[tuple[str, EncoderRef]]:
    out = [(f"finetune.encoders[{i}]", r) for i, r in enumerate(f.finetune.encoders)] if f.finetune else []
    if f.cka is not None:
        for i, p in enumerate(f.cka.pairs):
            out += [(f"cka.pairs[{i}].a", p.a), (f"cka.pairs[{i}].b", p.b)]
    return out


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; raise one HistotransferError listing every problem found."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise HistotransferError(f"study file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HistotransferError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    try:
        f = StudyFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        problems = describe_errors(exc, StudyFile).splitlines()
    else:
        problems, found = _semantics(f, path.parent)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise HistotransferError(f"{path}: {len(problems)} problem(s) in the study file (nothing was run):\n{listing}")
    refs = found["refs"]
    ft = f.finetune
    return Study(
        path=path, text=text, name=f.name or path.stem,
        out=(path.parent / Path(f.out).expanduser()).resolve() if f.out else None,
        datasets=tuple(found["datasets"]), encoders=tuple(found["grid"]), seeds=tuple(f.seeds), tile=f.tile,
        extract=f.extract, mil=f.mil,
        finetune=FinetuneSettings.model_validate(ft.model_dump(exclude={"encoders", "seeds"}, exclude_unset=True))
        if ft else None,
        finetune_encoders=tuple(dict.fromkeys(v for k, v in refs.items() if k.startswith("finetune"))),
        finetune_seeds=tuple(ft.seeds or f.seeds) if ft else (),
        cka=CkaSettings.model_validate(f.cka.model_dump(exclude={"finetuned", "pairs"}, exclude_unset=True))
        if f.cka else None,
        cka_finetuned=bool(f.cka and f.cka.finetuned),
        cka_pairs=tuple((refs[f"cka.pairs[{i}].a"], refs[f"cka.pairs[{i}].b"])
                        for i in range(len(f.cka.pairs))) if f.cka else (),
        encoder_info=found["info"],
    )
