"""The study file: a YAML description of the whole grid, validated before any work starts.

Each section is a stage's own settings class (the models of :mod:`.schema`: ``tile`` and each dataset
``TileSettings``, ``extract`` ``ExtractSettings``, ``mil`` ``MilSettings``, ``finetune`` ``FinetuneSettings``,
``cka`` ``CkaSettings``), so an option added to a stage is a study key at once. Sections and list entries are
validated one by one (:mod:`.checks`), so every problem of the file is reported at once with its key path
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
from typing import Any, cast

from .._read import read_yaml
from ..analysis.settings import CamSettings, CkaSettings
from ..errors import HistotransferError
from ..features.settings import ExtractSettings
from ..finetune.settings import FinetuneSettings
from ..patches.settings import TileSettings
from ..settings import SEED_MAX
from .checks import Checker
from .grid import EncoderConfig, Study
from .schema import STAIN_KEYS, TOP_KEYS, CkaSection, EncoderEntry, FinetuneSection


def _read_yaml(path: Path) -> tuple[str, Any]:
    if not path.exists():
        raise HistotransferError(f"study file not found: {path}")
    return read_yaml(path, "study")


def _listed(v: Checker, raw: dict[str, Any], key: str) -> list[Any]:
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
    v = Checker(path.parent)
    if not isinstance(raw, dict):
        raise HistotransferError(f"{path}: expected a mapping of keys {', '.join(TOP_KEYS)}, got {raw!r}")
    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1, cutoff=0.6)
            v.fail(
                str(key),
                f"unknown key '{key}'"
                + (f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(TOP_KEYS)}"),
            )
    tile = v.model(TileSettings, raw.get("tile"), "tile")
    extract, stains, stain_ref = v.extract(raw.get("extract"))
    mil = v.mil(raw.get("mil"))
    seeds = raw.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if (
        not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        v.fail(
            "seeds", f"expected a non-empty list of distinct integers from 0 to {SEED_MAX}, got {raw.get('seeds')!r}"
        )
    datasets = [
        d for i, item in enumerate(_listed(v, raw, "datasets")) if (d := v.dataset(item, f"datasets[{i}]", tile))
    ]
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
    ft_encoders = [
        c for i, r in enumerate(ft.encoders if ft else []) if (c := v.ref(r, f"finetune.encoders[{i}]", grid))
    ]
    if ft is not None and ft.mil is not None and ft.mil not in [m.name for m in mil]:
        v.fail("finetune.mil", f"{ft.mil!r} is not one of the MIL variants ({', '.join(m.name for m in mil)})")
    for s in (ft.seeds or []) if ft else []:
        if s not in seeds:
            v.fail("finetune.seeds", f"seed {s} is not one of the study's seeds {seeds}")
    cka = v.model(CkaSection, raw["cka"], "cka") if raw.get("cka") is not None else None
    for key in STAIN_KEYS:
        if isinstance(raw.get("cka"), dict) and key in raw["cka"]:
            v.fail(
                f"cka.{key}",
                "CKA sees the patches as the extraction normalised them: set extract.stain_norm "
                "and extract.stain_ref instead",
            )
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
        raise HistotransferError(
            f"{path}: {len(v.problems)} problem(s) in the study file (nothing was run):\n{listing}"
        )
    out = raw.get("out")
    extract = cast(ExtractSettings, extract)  # a missing extract section was a problem, raised above
    return Study(
        path=path,
        text=text,
        name=str(raw.get("name") or path.stem),
        out=(path.parent / Path(out).expanduser()).resolve() if out else None,
        datasets=tuple(datasets),
        encoders=tuple(grid),
        seeds=tuple(seeds),
        extract=extract,
        stains=stains,
        stain_ref=stain_ref,
        mil=tuple(mil),
        finetune=FinetuneSettings.model_validate(
            ft.model_dump(exclude={"encoders", "seeds", "mil"}, exclude_unset=True)
        )
        if ft
        else None,
        finetune_mil=(ft.mil if ft and ft.mil else mil[0].name),
        finetune_encoders=tuple(dict.fromkeys(ft_encoders)),
        finetune_seeds=tuple(ft.seeds or seeds) if ft else (),
        cka=CkaSettings.model_validate(cka.model_dump(exclude={"finetuned", "pairs"}, exclude_unset=True))
        if cka
        else None,
        cka_finetuned=bool(cka and cka.finetuned),
        cka_pairs=tuple(pairs),
        cam=cam,
        encoder_info=v.info,
    )
