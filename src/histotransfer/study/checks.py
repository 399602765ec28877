"""Checks of a study file's parts, each problem collected with its key path (``datasets[0].labels``), the bad
value and the fix: sections through their :mod:`.schema` models, paths (relative to the study file's folder),
encoders against the registry (with the closest name for a typo), label and split files as ``train`` reads them,
and stain references."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import HistotransferError
from ..features.settings import ExtractSettings
from ..mil.settings import MilSettings
from ..patches.settings import TileSettings
from ..settings import describe_errors
from .grid import Dataset, EncoderConfig, MilVariant
from .schema import CHECKPOINT_SUFFIXES, STAIN_KEYS, DatasetEntry, EncoderRef, MilSection


class Checker:
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

    def encoders(
        self,
        name: str,
        weights: str | None,
        truncations: list[int],
        where: str,
        listed: bool = True,
        blocks: int | None = None,
    ) -> list[EncoderConfig]:
        """Check an encoder against the registry (imported lazily: torch) and expand its truncations (``listed``:
        given as the list ``truncations``, else as one ``truncation``), or check its ``blocks``."""
        from ..encoders import encoder_info, list_encoders, resolve_weights

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
                self.fail(
                    f"{where}.truncations[{j}]" if listed else f"{where}.truncation",
                    f"truncation {k} is too deep for {name}: it has {top + 1} stages, so truncation must be "
                    f"in 0..{top}",
                )
            else:
                out.append(EncoderConfig(name, label, k))
        return out

    def _blocks(
        self, name: str, label: str, truncations: list[int], blocks: int, where: str, depth: int | None, listed: bool
    ) -> list[EncoderConfig]:
        """The configuration of a transformer's first ``blocks`` blocks (truncation 0 beside it, or none)."""
        if depth is None:
            self.fail(
                f"{where}.blocks",
                f"blocks applies to transformer encoders, not {name}; use "
                f"{'truncations' if listed else 'truncation'} for it",
            )
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
            for key, what in (
                ("slides", "a folder of slides or a list of slide files"),
                ("labels", "a CSV with columns slide_id,label"),
            ):
                if raw.get(key) is None:
                    self.fail(f"{where}.{key}", f"missing (required): {what}")
        if d is None or tile is None:
            return None
        if d.demo is not None and (d.slides is not None or d.labels is not None):
            self.fail(where, "give either 'demo' (generated slides) or 'slides' and 'labels'")
            return None
        settings = TileSettings.model_validate(
            {
                **tile.model_dump(exclude_unset=True),
                **d.model_dump(include=set(TileSettings.model_fields) & d.model_fields_set),
            }
        )
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

        paths = [
            p
            for i, item in enumerate(items)
            if (p := self.path(item, f"{where}[{i}]" if len(items) > 1 else where, "slide file or folder"))
        ]
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
            self.fail(
                where.replace(".labels", ".group_column"),
                f"{labels} has no column {group_column!r} (its extra columns: {', '.join(table.extra) or 'none'})",
            )

    def extract(self, raw: Any) -> tuple[ExtractSettings | None, tuple[str, ...], str | None]:
        """The ``extract`` section: its settings without stain normalisation, the stain axis (``stain_norm``, one
        method or a list of them) and the resolved ``stain_ref``."""
        if not isinstance(raw, dict):
            return self.model(ExtractSettings, raw, "extract"), ("none",), None
        methods = raw.get("stain_norm", "none")
        listed = isinstance(methods, list)
        methods = methods if listed else [methods]
        if listed and (not methods or len({str(m) for m in methods}) != len(methods)):
            self.fail(
                "extract.stain_norm",
                f"expected a method (none, macenko, reinhard) or a non-empty list of "
                f"distinct ones, got {raw['stain_norm']!r}",
            )
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
        from ..stain import SLIDE_REGION

        region = SLIDE_REGION.match(value)
        if region is not None and not (self.base / value).exists() and not Path(value).exists():
            found = self.path(region["path"], where, "slide of the stain reference region")
            return None if found is None else f"{found}@{value[region.end('path') + 1 :]}"
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
            if isinstance(item, dict) and "annotations" in item:
                self.fail(
                    f"{where}.annotations",
                    "a study does not train on lesion annotations (a dataset's "
                    "annotations score the attention only); use `histotransfer train "
                    "--annotations` for that",
                )
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
        matches = [
            e
            for e in grid
            if e.name == ref.name
            and e.truncate == ref.truncation
            and e.blocks == ref.blocks
            and (ref.weights is None or e.weights == configs[0].weights)
        ]
        if len(matches) != 1:
            have = ", ".join(e.label for e in grid if e.name == ref.name) or "none"
            why = "is not" if not matches else "matches several configurations"
            depth = f"truncation {ref.truncation}" if ref.blocks is None else f"{ref.blocks} blocks"
            self.fail(
                where,
                f"{ref.name} with {depth} {why} in 'encoders' (configured for "
                f"{ref.name}: {have}); add it there{' or give weights' if matches else ''}",
            )
            return None
        return matches[0]
