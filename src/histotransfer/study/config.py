"""The study file: a YAML description of the whole grid, validated before any work starts.

Each section is a stage's own settings class, validated by pydantic (``tile`` and each dataset:
``TileSettings``, ``extract``: ``ExtractSettings``, ``mil``: ``MilSettings``, ``finetune``: ``FinetuneSettings``,
``cka``: ``CkaSettings``), so an option added to a stage is a study key at once. Sections and list entries are
validated one by one, so every problem of the file is reported at once with its key path
(``datasets[0].labels``), the bad value and the fix; a misspelt key comes with its closest valid spelling, an
unknown encoder with the registry's names. Relative paths are relative to the study file's folder.

An encoder entry may give ``blocks: N`` (a transformer's first N blocks) instead of ``truncations``: its own
configuration (key ``<name>-<weights>-b<N>``), referred to as ``{name, blocks}`` in ``finetune.encoders`` and
``cka.pairs``.

``extract.stain_norm`` may be a list (``[none, reinhard, macenko]``): each value is its own configuration of
extraction, MIL, fine-tuning and CKA (the tables' Stain column), all with the one ``extract.stain_ref``. CKA
follows the extraction's normalisation, so the ``cka`` section takes no stain keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..analysis.settings import CamSettings, CkaSettings
from ..errors import HistotransferError
from ..features.settings import ExtractSettings
from ..finetune.settings import FinetuneSettings
from ..mil.settings import MilSettings
from ..patches.settings import TileSettings
from ..provenance import json_fingerprint
from ..settings import describe_errors
from .grid import Dataset, EncoderConfig, MilVariant, Study

STAIN_KEYS = ("stain_norm", "stain_ref")

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
TOP_KEYS = ("name", "out", "datasets", "encoders", "seeds", "tile", "extract", "mil", "finetune", "cka", "cam")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def settings_hash(obj: Any) -> str:
    """A stable short hash of JSON-able settings (cache keys)."""
    return json_fingerprint(obj)[:16]


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
    seed: int = 0
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
    seeds: list[int] | None = None
    mil: str | None = None


class PairEntry(_Strict):
    a: EncoderRef
    b: EncoderRef


class CkaSection(CkaSettings):
    finetuned: bool = True
    pairs: list[PairEntry] = Field(default_factory=list)


class _Checker:
    """Validates a study file part by part, collecting every problem with its key path."""

    def __init__(self, base: Path):
        self.base = base
        self.problems: list[str] = []
        self.info: dict[str, dict[str, Any]] = {}

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}" if where else message)

    def model(self, cls: type[BaseModel], raw: Any, where: str) -> Any:
        try:
            return cls.model_validate({} if raw is None else raw)
        except ValidationError as exc:
            self.problems += describe_errors(exc, cls, prefix=where).splitlines()
            return None

    def path(self, value: str | None, where: str, what: str) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else self.base / p).resolve()
        if not p.exists():
            self.fail(where, f"{what} not found: {p} (relative paths are relative to {self.base})")
            return None
        return p

    def encoders(self, name: str, weights: str | None, truncations: list[int], where: str,
                 listed: bool = True, blocks: int | None = None) -> list[EncoderConfig]:
        """Check an encoder against the registry (imported lazily: torch) and expand its truncations (``listed``:
        given as the list ``truncations``, else as one ``truncation``), or check its ``blocks``."""
        from ..features import encoder_info, list_encoders, resolve_weights

        names = list_encoders()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail(f"{where}.name", f"unknown encoder '{name}'{hint}; known encoders: {', '.join(names)}")
            return []
        meta = self.info.setdefault(name, encoder_info(name))
        if weights is not None and weights.lower().endswith(CHECKPOINT_SUFFIXES):
            found = self.path(weights, f"{where}.weights", f"weights file for {name}")
            if found is None:
                return []
            weights = str(found)
        try:
            choice = resolve_weights(name, weights)
        except HistotransferError as exc:
            self.fail(f"{where}.weights", str(exc))
            return []
        label = choice.option.name if choice.option is not None else str(choice.path or "random")
        if blocks is not None:
            return self._blocks(name, label, truncations, blocks, where, meta["transformer_blocks"], listed)
        out = []
        for j, k in enumerate(truncations):
            top = meta["n_stages"] - 1
            if not 0 <= k <= top:
                self.fail(f"{where}.truncations[{j}]" if listed else f"{where}.truncation", f"truncation {k} is too deep for {name}: it has {top + 1} stages, so truncation must be "
                          f"in 0..{top}")
            else:
                out.append(EncoderConfig(name, label, k))
        return out

    def _blocks(self, name: str, label: str, truncations: list[int], blocks: int, where: str, depth: int | None,
                listed: bool) -> list[EncoderConfig]:
        """The configuration of a transformer's first ``blocks`` blocks (truncation 0 beside it, or none)."""
        if depth is None:
            self.fail(f"{where}.blocks", f"blocks applies to transformer encoders, not {name}; use "
                                         f"{'truncations' if listed else 'truncation'} for it")
        elif blocks > depth:
            self.fail(f"{where}.blocks", f"{name} has {depth} blocks: pass blocks 1..{depth}")
        elif truncations != [0]:
            key = "truncations" if listed else "truncation"
            self.fail(f"{where}.{key}", f"blocks sets the depth of {name} by itself: drop {key}")
        else:
            return [EncoderConfig(name, label, 0, blocks)]
        return []

    def dataset(self, raw: Any, where: str, tile: TileSettings | None) -> Dataset | None:
        d = self.model(DatasetEntry, raw, where)
        if isinstance(raw, dict) and "demo" not in raw:
            for key, what in (("slides", "a folder of slides or a list of slide files"), ("labels", "a CSV with "
                                                                                             "columns slide_id,label")):
                if raw.get(key) is None:
                    self.fail(f"{where}.{key}", f"missing (required): {what}")
        if d is None or tile is None:
            return None
        if d.demo is not None and (d.slides is not None or d.labels is not None):
            self.fail(where, "give either 'demo' (generated slides) or 'slides' and 'labels'")
            return None
        settings = TileSettings.model_validate({**tile.model_dump(exclude_unset=True), **d.model_dump(
            include=set(TileSettings.model_fields) & d.model_fields_set)})
        if d.split is not None and d.split_file is not None:
            self.fail(where, "give either 'split' (an official split rule) or 'split_file'")
        if d.demo is not None:
            return Dataset(d.name, (), None, settings, None, d.demo.model_dump(), d.split, d.group_column)
        annotations = self.path(d.annotations, f"{where}.annotations", "annotations folder")
        slides = self._slides(d.slides or [], f"{where}.slides")
        labels = self.path(d.labels, f"{where}.labels", "labels CSV")
        split = self.path(d.split_file, f"{where}.split_file", "split CSV")
        if labels is not None:
            self._labels(labels, split, f"{where}.labels", d.group_column)
        return Dataset(d.name, tuple(slides), labels, settings, split, None, d.split, d.group_column, annotations)

    def _slides(self, items: list[str], where: str) -> list[Path]:
        from ..slide import list_slides

        paths = [p for i, item in enumerate(items)
                 if (p := self.path(item, f"{where}[{i}]" if len(items) > 1 else where, "slide file or folder"))]
        try:
            return [e.path for e in list_slides(paths) if e.duplicate_of is None]
        except HistotransferError as exc:
            self.fail(where, str(exc))
            return []

    def _labels(self, labels: Path, split: Path | None, where: str, group_column: str | None) -> None:
        """Everything `train` would refuse about the label and split files, before any work."""
        from ..mil import parse_labels, read_split_file

        try:
            table = parse_labels(labels)
            if split is not None:
                read_split_file(split, table.frame)
        except HistotransferError as exc:
            self.fail(where, str(exc))
            return
        if group_column is not None and group_column not in table.extra:
            self.fail(where.replace(".labels", ".group_column"),
                      f"{labels} has no column {group_column!r} (its extra columns: {', '.join(table.extra) or 'none'})")

    def extract(self, raw: Any) -> tuple[ExtractSettings | None, tuple[str, ...], str | None]:
        """The ``extract`` section: its settings without stain normalisation, the stain axis (``stain_norm``, one
        method or a list of them) and the resolved ``stain_ref``."""
        if not isinstance(raw, dict):
            return self.model(ExtractSettings, raw, "extract"), ("none",), None
        methods = raw.get("stain_norm", "none")
        listed = isinstance(methods, list)
        methods = methods if listed else [methods]
        if listed and (not methods or len({str(m) for m in methods}) != len(methods)):
            self.fail("extract.stain_norm", f"expected a method (none, macenko, reinhard) or a non-empty list of "
                                            f"distinct ones, got {raw['stain_norm']!r}")
            return None, (), None
        ref = raw.get("stain_ref")
        if isinstance(ref, str):
            ref = self.stain_reference(ref, "extract.stain_ref")
            if ref is None:
                return None, (), None
        base = self.model(ExtractSettings, {k: v for k, v in raw.items() if k not in STAIN_KEYS}, "extract")
        normalising = any(m != "none" for m in methods)
        for i, method in enumerate(methods):
            where = f"extract.stain_norm[{i}]" if listed else "extract"
            keys = {"stain_norm": method, "stain_ref": ref if method != "none" or not normalising else None}
            if self.model(ExtractSettings, keys, where) is None:
                return None, (), None
        return base, tuple(str(m) for m in methods), ref if normalising else None

    def stain_reference(self, value: str, where: str) -> str | None:
        """A stain reference with its path made absolute (a slide region ``SLIDE@x,y,w,h``: its slide's)."""
        from ..features import SLIDE_REGION

        region = SLIDE_REGION.match(value)
        if region is not None and not (self.base / value).exists() and not Path(value).exists():
            found = self.path(region["path"], where, "slide of the stain reference region")
            return None if found is None else f"{found}@{value[region.end('path') + 1:]}"
        found = self.path(value, where, "stain reference (patch image, folder, SLIDE@x,y,w,h or target .json)")
        return None if found is None else str(found)

    def mil(self, raw: Any) -> list[MilVariant]:
        """The ``mil`` section: one mapping, or a list of them (variants compared side by side)."""
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            self.fail("mil", "expected a mapping of MIL settings or a non-empty list of them")
        variants = []
        for i, item in enumerate(items):
            where = f"mil[{i}]" if isinstance(raw, list) else "mil"
            if isinstance(item, dict) and "seed" in item:
                self.fail(f"{where}.seed", "set the seeds with the top-level 'seeds' list")
            m = self.model(MilSection, item, where)
            if m is not None:
                settings = MilSettings.model_validate(m.model_dump(exclude={"name"}, exclude_unset=True))
                variants.append(MilVariant(m.name or m.recipe, settings))
        names = [v.name for v in variants]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            self.fail("mil", f"two MIL variants are named {dup!r}; give each a distinct 'name'")
        return variants

    def ref(self, ref: EncoderRef, where: str, grid: list[EncoderConfig] | None) -> EncoderConfig | None:
        """An encoder reference: any configuration (grid None) or one of the grid's (weights may be left out)."""
        configs = self.encoders(ref.name, ref.weights, [ref.truncation], where, listed=False, blocks=ref.blocks)
        if not configs or grid is None:
            return configs[0] if configs else None
        matches = [e for e in grid if e.name == ref.name and e.truncate == ref.truncation and e.blocks == ref.blocks
                   and (ref.weights is None or e.weights == configs[0].weights)]
        if len(matches) != 1:
            have = ", ".join(e.label for e in grid if e.name == ref.name) or "none"
            why = "is not" if not matches else "matches several configurations"
            depth = f"truncation {ref.truncation}" if ref.blocks is None else f"{ref.blocks} blocks"
            self.fail(where, f"{ref.name} with {depth} {why} in 'encoders' (configured for "
                             f"{ref.name}: {have}); add it there{' or give weights' if matches else ''}")
            return None
        return matches[0]


def _read_yaml(path: Path) -> tuple[str, Any]:
    if not path.is_file():
        raise HistotransferError(f"study file not found: {path}")
    text = path.read_text()
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HistotransferError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def _listed(v: _Checker, raw: dict[str, Any], key: str) -> list[Any]:
    items = raw.get(key)
    if items is None:
        v.fail(key, "missing (required)")
        return []
    if not isinstance(items, list) or not items:
        v.fail(key, f"expected a non-empty list, got {items!r}")
        return []
    return items


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; raise one HistotransferError listing every problem found."""
    path = Path(path).expanduser().resolve()
    text, raw = _read_yaml(path)
    v = _Checker(path.parent)
    if not isinstance(raw, dict):
        raise HistotransferError(f"{path}: expected a mapping of keys {', '.join(TOP_KEYS)}, got {raw!r}")
    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1, cutoff=0.6)
            v.fail(str(key), f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else
                                                       f"; valid keys: {', '.join(TOP_KEYS)}"))
    tile = v.model(TileSettings, raw.get("tile"), "tile")
    extract, stains, stain_ref = v.extract(raw.get("extract"))
    mil = v.mil(raw.get("mil"))
    seeds = raw.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or \
            len(set(seeds)) != len(seeds):
        v.fail("seeds", f"expected a non-empty list of distinct integers, got {raw.get('seeds')!r}")
    datasets = [d for i, item in enumerate(_listed(v, raw, "datasets"))
                if (d := v.dataset(item, f"datasets[{i}]", tile))]
    names = [d.name for d in datasets]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        v.fail("datasets", f"dataset name '{dup}' is used more than once")
    grid: list[EncoderConfig] = []
    for i, item in enumerate(_listed(v, raw, "encoders")):
        e = v.model(EncoderEntry, item, f"encoders[{i}]")
        for cfg in v.encoders(e.name, e.weights, e.truncations, f"encoders[{i}]", blocks=e.blocks) if e else []:
            if cfg in grid:
                v.fail(f"encoders[{i}]", f"{cfg.label} is listed more than once")
            grid.append(cfg)
    ft = v.model(FinetuneSection, raw["finetune"], "finetune") if raw.get("finetune") is not None else None
    ft_encoders = [c for i, r in enumerate(ft.encoders if ft else [])
                   if (c := v.ref(r, f"finetune.encoders[{i}]", grid))]
    if ft is not None and ft.mil is not None and ft.mil not in [m.name for m in mil]:
        v.fail("finetune.mil", f"{ft.mil!r} is not one of the MIL variants ({', '.join(m.name for m in mil)})")
    for s in (ft.seeds or []) if ft else []:
        if s not in seeds:
            v.fail("finetune.seeds", f"seed {s} is not one of the study's seeds {seeds}")
    cka = v.model(CkaSection, raw["cka"], "cka") if raw.get("cka") is not None else None
    for key in STAIN_KEYS:
        if isinstance(raw.get("cka"), dict) and key in raw["cka"]:
            v.fail(f"cka.{key}", "CKA sees the patches as the extraction normalised them: set extract.stain_norm "
                                 "and extract.stain_ref instead")
    pairs = []
    for i, p in enumerate(cka.pairs if cka else []):
        a, b = v.ref(p.a, f"cka.pairs[{i}].a", None), v.ref(p.b, f"cka.pairs[{i}].b", None)
        if a is not None and b is not None:
            pairs.append((a, b))
    if cka is not None and cka.finetuned and raw.get("finetune") is None and not cka.pairs:
        v.fail("cka", "nothing to compare: add a 'finetune' section (frozen vs fine-tuned) or cka.pairs")
    cam = v.model(CamSettings, raw["cam"], "cam") if raw.get("cam") is not None else None
    if v.problems:
        listing = "\n".join(f"  - {p}" for p in v.problems)
        raise HistotransferError(f"{path}: {len(v.problems)} problem(s) in the study file (nothing was run):\n"
                                 f"{listing}")
    out = raw.get("out")
    return Study(
        path=path, text=text, name=str(raw.get("name") or path.stem),
        out=(path.parent / Path(out).expanduser()).resolve() if out else None, datasets=tuple(datasets),
        encoders=tuple(grid), seeds=tuple(seeds), extract=extract, stains=stains, stain_ref=stain_ref,
        mil=tuple(mil),
        finetune=FinetuneSettings.model_validate(ft.model_dump(exclude={"encoders", "seeds", "mil"},
                                                               exclude_unset=True)) if ft else None,
        finetune_mil=(ft.mil if ft and ft.mil else mil[0].name),
        finetune_encoders=tuple(dict.fromkeys(ft_encoders)), finetune_seeds=tuple(ft.seeds or seeds) if ft else (),
        cka=CkaSettings.model_validate(cka.model_dump(exclude={"finetuned", "pairs"}, exclude_unset=True))
        if cka else None,
        cka_finetuned=bool(cka and cka.finetuned), cka_pairs=tuple(pairs), cam=cam, encoder_info=v.info,
    )
