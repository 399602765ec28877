"""The study file: a YAML description of the whole grid, validated before any work starts.

Every problem is reported at once, each naming the key path (``datasets[0].labels``), the bad value and the fix:
a misspelt key comes with its closest valid spelling, an unknown encoder with the registry's names. Relative
paths are relative to the study file's folder, so a study file and its data can move together.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ..errors import HistotransferError
from ..slide import SLIDE_SUFFIXES, slide_id_of

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NO_DEFAULT = object()
NAMED_WEIGHTS = ("imagenet", "pretrained", "random")


@dataclass(frozen=True)
class EncoderConfig:
    """One patch encoder configuration of the grid: architecture, weights and truncation."""

    name: str
    weights: str  # "imagenet", "pretrained" (published checkpoint), "random" or an absolute checkpoint path
    truncate: int

    @property
    def weights_tag(self) -> str:
        """A short folder-safe name for the weights (a checkpoint path becomes stem + hash of the path)."""
        if self.weights in NAMED_WEIGHTS:
            return self.weights
        digest = hashlib.sha256(self.weights.encode()).hexdigest()[:8]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.weights).stem)[:40]
        return f"{stem}-{digest}"

    @property
    def key(self) -> str:
        """Folder-safe identifier, unique per configuration."""
        return f"{self.name}-{self.weights_tag}-t{self.truncate}"

    @property
    def label(self) -> str:
        """Human-readable name for tables and figures."""
        weights = self.weights if self.weights in NAMED_WEIGHTS else Path(self.weights).name
        return f"{self.name} ({weights}, truncate {self.truncate})"

    def spec(self) -> dict[str, Any]:
        """The encoder as the extraction and CKA APIs take it."""
        return {"name": self.name, "weights": self.weights, "truncate": self.truncate}


@dataclass(frozen=True)
class Dataset:
    """One dataset: its slides and labels (or generated demo slides) and how to tile them."""

    name: str
    slides: tuple[Path, ...]  # slide files (folders in the study file are expanded)
    labels: Path | None
    magnification: float = 20.0
    patch_size: int = 512
    stride: int | None = None
    min_tissue: float = 0.5
    mpp: float | None = None
    split_file: Path | None = None
    demo: dict[str, int] | None = None  # {"n_slides", "seed", "size"}: generate demo slides instead


@dataclass(frozen=True)
class ExtractSettings:
    input_size: int | None = None
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    dtype: str = "float32"


@dataclass(frozen=True)
class MilSettings:
    model: str = "histotransfer"
    epochs: int = 20
    lr: float = 1e-3
    standardize: bool = True
    early_stopping: int | None = None
    hidden: int | None = None
    dropout: float = 0.0


@dataclass(frozen=True)
class FinetuneSettings:
    encoders: tuple[EncoderConfig, ...]
    seeds: tuple[int, ...]
    top_k: int = 64
    epochs: int = 20
    lr: float = 1e-5
    freeze_stages: int = 0
    batch_slides: int = 1
    grad_checkpointing: bool = False
    precision: str = "fp32"
    device: str = "auto"
    workers: int = 0


@dataclass(frozen=True)
class CkaSettings:
    n_patches: int = 2000
    pooling: str = "mean"
    full_matrix: bool = False
    finetuned: bool = True  # frozen vs fine-tuned for every fine-tuning cell (the paper's Fig. 2)
    pairs: tuple[tuple[EncoderConfig, EncoderConfig], ...] = ()


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
    tile_workers: int
    extract: ExtractSettings
    mil: MilSettings
    finetune: FinetuneSettings | None
    cka: CkaSettings | None
    encoder_info: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)


def slide_files(folder: Path) -> list[Path]:
    """The slides directly inside ``folder`` (by extension), sorted, so a study lists exactly what it tiles."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES))


def settings_hash(obj: Any) -> str:
    """A stable short hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Checker:
    """Collects every problem in the study file, so the user fixes them in one pass."""

    def __init__(self, path: Path):
        self.base = path.parent
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}" if where else message)

    def section(self, raw: Any, where: str, schema: dict[str, Any], required: tuple[str, ...] = ()) -> dict:
        """Check a mapping's keys against ``schema`` (key -> default); return it with defaults filled in."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail(where, f"expected a mapping of keys {sorted(schema)}, got {type(raw).__name__} {raw!r}")
            return {k: v for k, v in schema.items() if v is not NO_DEFAULT}
        for key in raw:
            if key not in schema:
                close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(schema)}"
                self.fail(_join(where, key), f"unknown key '{key}'{hint}")
        for key in required:
            if raw.get(key) is None:
                self.fail(_join(where, key), "missing (required)")
        return {k: raw.get(k, d) for k, d in schema.items() if k in raw or d is not NO_DEFAULT}

    def number(self, value: Any, where: str, kind: type, low: float | None = None, high: float | None = None,
               optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if isinstance(value, str) and kind is float:
            # PyYAML reads exponents without a dot (``1e-3``) as text (YAML 1.1); accept them as numbers.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int and not float(value).is_integer():
            ok = False
        if not ok or (low is not None and value < low) or (high is not None and value > high):
            rng = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
            self.fail(where, f"expected {'an integer' if kind is int else 'a number'}{rng}, got {value!r}")
            return None
        return kind(value)

    def boolean(self, value: Any, where: str) -> bool | None:
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, got {value!r}")
            return None
        return value

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str | None:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail(where, f"'{value}' is not one of {', '.join(choices)}{hint}")
            return None
        return value

    def path(self, value: Any, where: str, what: str) -> Path | None:
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a path to {what}, got {value!r}")
            return None
        p = Path(value).expanduser()
        p = p if p.is_absolute() else (self.base / p)
        p = p.resolve()
        if not p.exists():
            self.fail(where, f"{what} not found: {p} (relative paths are relative to {self.base})")
            return None
        return p

    def csv_columns(self, path: Path, where: str, needed: tuple[str, ...], what: str) -> None:
        try:
            columns = list(pd.read_csv(path, nrows=0).columns)
        except Exception as exc:  # any parse failure is the user's file
            self.fail(where, f"{path} is not a readable CSV {what} ({' '.join(str(exc).split())})")
            return
        missing = [c for c in needed if c not in columns]
        if missing:
            self.fail(where, f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(columns)}); "
                             f"a {what} needs columns {', '.join(needed)}")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


TOP_SCHEMA = {
    "name": None, "out": None, "datasets": NO_DEFAULT, "encoders": NO_DEFAULT, "seeds": [0],
    "tile": None, "extract": None, "mil": None, "finetune": None, "cka": None,
}
DATASET_SCHEMA = {
    "name": NO_DEFAULT, "slides": None, "labels": None, "magnification": 20.0, "patch_size": 512,
    "stride": None, "min_tissue": 0.5, "mpp": None, "split_file": None, "demo": None,
}
DEMO_SCHEMA = {"n_slides": 16, "seed": 0, "size": 4096}
ENCODER_SCHEMA = {"name": NO_DEFAULT, "weights": None, "truncations": [0]}
ENCODER_REF_SCHEMA = {"name": NO_DEFAULT, "weights": None, "truncation": 0}
TILE_SCHEMA = {"workers": 1}
EXTRACT_SCHEMA = {"input_size": None, "batch_size": 64, "workers": None, "device": "auto", "precision": "fp32",
                  "dtype": "float32"}
MIL_SCHEMA = {"model": "histotransfer", "epochs": 20, "lr": 1e-3, "standardize": True, "early_stopping": None,
              "hidden": None, "dropout": 0.0}
FINETUNE_SCHEMA = {"encoders": NO_DEFAULT, "seeds": None, "top_k": 64, "epochs": 20, "lr": 1e-5,
                   "freeze_stages": 0, "batch_slides": 1, "grad_checkpointing": False, "precision": "fp32",
                   "device": "auto", "workers": 0}
CKA_SCHEMA = {"n_patches": 2000, "pooling": "mean", "full_matrix": False, "finetuned": True, "pairs": None}
PAIR_SCHEMA = {"a": NO_DEFAULT, "b": NO_DEFAULT}
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")


def _encoder_registry() -> tuple[list[str], Any, Any]:
    """The registry's encoder names, ``encoder_info`` and ``resolve_weights`` (imported lazily: torch)."""
    from ..features.encoders import encoder_info, list_encoders, resolve_weights

    return list(list_encoders()), encoder_info, resolve_weights


def _max_truncate(info: dict[str, Any]) -> int:
    """How many stages an encoder can lose: all but the first of its stages after the stem."""
    return int(info["n_stages"]) - 1


class _Validator(_Checker):
    def __init__(self, path: Path):
        super().__init__(path)
        self.names, self.info_fn, self.resolve_weights = _encoder_registry()
        self.info: dict[str, dict[str, Any]] = {}

    def encoder_name(self, value: Any, where: str) -> str | None:
        if not isinstance(value, str) or value not in self.names:
            close = difflib.get_close_matches(str(value), self.names, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.fail(where, f"unknown encoder '{value}'{hint}; known encoders: {', '.join(self.names)}")
            return None
        if value not in self.info:
            self.info[value] = dict(self.info_fn(value))
        return value

    def weights(self, value: Any, where: str, name: str) -> str | None:
        """'imagenet', 'pretrained' (a histopathology encoder's published checkpoint), 'random' or a file."""
        if value is None:
            value = "pretrained" if self.info[name].get("family") == "histopathology" else "imagenet"
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected 'imagenet', 'pretrained', 'random' or a checkpoint path, got {value!r}")
            return None
        if value not in NAMED_WEIGHTS:
            p = self.path(value, where, f"weights file for {name}")
            if p is None:
                return None
            value = str(p)
        try:
            self.resolve_weights(name, value)
        except HistotransferError as exc:
            self.fail(where, str(exc))
            return None
        return value

    def truncation(self, value: Any, where: str, name: str) -> int | None:
        k = self.number(value, where, int, low=0)
        if k is None:
            return None
        top = _max_truncate(self.info[name])
        if k > top:
            self.fail(where, f"truncation {k} is too deep for {name}: it has {top + 1} stages, so truncation "
                             f"must be in 0..{top}")
            return None
        return k

    def dataset(self, raw: Any, where: str) -> Dataset | None:
        d = self.section(raw, where, DATASET_SCHEMA, required=("name",))
        name = d.get("name")
        if name is not None and (not isinstance(name, str) or not NAME_RE.match(name)):
            self.fail(_join(where, "name"), f"'{name}' must be a folder-safe name (letters, digits, _ . -)")
            name = None
        demo = None
        slides: list[Path] = []
        labels = None
        if d.get("demo") is not None:
            dd = self.section(d["demo"], _join(where, "demo"), DEMO_SCHEMA)
            demo = {"n_slides": self.number(dd["n_slides"], _join(where, "demo.n_slides"), int, low=4),
                    "seed": self.number(dd["seed"], _join(where, "demo.seed"), int),
                    "size": self.number(dd["size"], _join(where, "demo.size"), int, low=512)}
            for key in ("slides", "labels"):
                if d.get(key) is not None:
                    self.fail(_join(where, key), "give either 'demo' (generated slides) or 'slides' and 'labels'")
        else:
            raw_slides = d.get("slides")
            if raw_slides is None:
                self.fail(_join(where, "slides"), "missing (required): a folder of slides or a list of slide files")
            else:
                items = raw_slides if isinstance(raw_slides, list) else [raw_slides]
                for i, item in enumerate(items):
                    w = _join(where, "slides") + (f"[{i}]" if isinstance(raw_slides, list) else "")
                    p = self.path(item, w, "slide file or folder")
                    if p is not None and p.is_dir():
                        found = slide_files(p)
                        if not found:
                            self.fail(w, f"no slide files in {p} (looked for {', '.join(SLIDE_SUFFIXES)})")
                        slides.extend(found)
                    elif p is not None:
                        slides.append(p)
            ids = [slide_id_of(p) for p in slides]
            for dup in sorted({i for i in ids if ids.count(i) > 1}):
                files = ", ".join(str(p) for p in slides if slide_id_of(p) == dup)
                self.fail(_join(where, "slides"), f"two slides share the id '{dup}' ({files}); rename one")
            if d.get("labels") is None:
                self.fail(_join(where, "labels"), "missing (required): a CSV with columns slide_id,label")
            else:
                labels = self.path(d["labels"], _join(where, "labels"), "labels CSV")
                if labels is not None:
                    self.csv_columns(labels, _join(where, "labels"), ("slide_id", "label"), "labels file")
        split_file = None
        if d.get("split_file") is not None:
            split_file = self.path(d["split_file"], _join(where, "split_file"), "split CSV")
            if split_file is not None:
                self.csv_columns(split_file, _join(where, "split_file"), ("slide_id", "split"), "split file")
        values = dict(
            magnification=self.number(d["magnification"], _join(where, "magnification"), float, low=0.1),
            patch_size=self.number(d["patch_size"], _join(where, "patch_size"), int, low=8),
            stride=self.number(d["stride"], _join(where, "stride"), int, low=1, optional=True),
            min_tissue=self.number(d["min_tissue"], _join(where, "min_tissue"), float, low=0.0, high=1.0),
            mpp=self.number(d["mpp"], _join(where, "mpp"), float, low=1e-6, optional=True),
        )
        if name is None or any(values[k] is None for k in ("magnification", "patch_size", "min_tissue")):
            return None
        return Dataset(name=name, slides=tuple(slides), labels=labels, split_file=split_file, demo=demo, **values)

    def encoder_ref(self, raw: Any, where: str, grid: tuple[EncoderConfig, ...]) -> EncoderConfig | None:
        """An encoder given as {name, weights, truncation} that must be one of the grid's configurations."""
        d = self.section(raw, where, ENCODER_REF_SCHEMA, required=("name",))
        name = self.encoder_name(d.get("name"), _join(where, "name")) if "name" in d else None
        if name is None:
            return None
        k = self.truncation(d["truncation"], _join(where, "truncation"), name)
        if k is None:
            return None
        matches = [e for e in grid if e.name == name and e.truncate == k]
        if d["weights"] is not None:
            w = self.weights(d["weights"], _join(where, "weights"), name)
            if w is None:
                return None
            matches = [e for e in matches if e.weights == w]
        if len(matches) != 1:
            have = ", ".join(e.label for e in grid if e.name == name) or "none"
            why = "is not" if not matches else "matches several configurations"
            self.fail(where, f"{name} with truncation {k} {why} in 'encoders' (configured for {name}: {have}); "
                             f"add it there{' or give weights' if matches else ''}")
            return None
        return matches[0]

    def free_encoder(self, raw: Any, where: str) -> EncoderConfig | None:
        """An encoder given as {name, weights, truncation} for CKA pairs (need not be in the grid)."""
        d = self.section(raw, where, ENCODER_REF_SCHEMA, required=("name",))
        name = self.encoder_name(d.get("name"), _join(where, "name")) if "name" in d else None
        if name is None:
            return None
        w = self.weights(d["weights"], _join(where, "weights"), name)
        k = self.truncation(d["truncation"], _join(where, "truncation"), name)
        return None if w is None or k is None else EncoderConfig(name, w, k)

    def seeds(self, raw: Any, where: str) -> tuple[int, ...]:
        items = raw if isinstance(raw, list) else [raw]
        seeds = [self.number(s, f"{where}[{i}]", int) for i, s in enumerate(items)]
        if not items:
            self.fail(where, "expected a non-empty list of integer seeds")
        if len({repr(s) for s in items}) != len(items):
            self.fail(where, f"seeds must be distinct, got {raw!r}")
        return tuple(s for s in seeds if s is not None)


def _read_yaml(path: Path) -> tuple[str, Any]:
    if not path.is_file():
        raise HistotransferError(f"study file not found: {path}")
    text = path.read_text()
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HistotransferError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; raise one HistotransferError listing every problem found."""
    path = Path(path).expanduser().resolve()
    text, raw = _read_yaml(path)
    v = _Validator(path)
    top = v.section(raw, "", TOP_SCHEMA, required=("datasets", "encoders"))

    name = top.get("name") or path.stem
    if not isinstance(name, str) or not name.strip():
        v.fail("name", f"expected a text, got {name!r}")
    out = None
    if top.get("out") is not None:
        if isinstance(top["out"], str) and top["out"]:
            out = (path.parent / Path(top["out"]).expanduser()).resolve()
        else:
            v.fail("out", f"expected a folder path, got {top['out']!r}")

    datasets: list[Dataset] = []
    raw_ds = top.get("datasets")
    if raw_ds is not None and (not isinstance(raw_ds, list) or not raw_ds):
        v.fail("datasets", "expected a non-empty list of datasets (each with name, slides, labels, ...)")
    elif raw_ds:
        for i, item in enumerate(raw_ds):
            ds = v.dataset(item, f"datasets[{i}]")
            if ds is not None:
                datasets.append(ds)
        names = [d.name for d in datasets]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            v.fail("datasets", f"dataset name '{dup}' is used more than once")

    encoders: list[EncoderConfig] = []
    raw_enc = top.get("encoders")
    if raw_enc is not None and (not isinstance(raw_enc, list) or not raw_enc):
        v.fail("encoders", "expected a non-empty list of encoders (each with name, weights, truncations)")
    elif raw_enc:
        for i, item in enumerate(raw_enc):
            where = f"encoders[{i}]"
            d = v.section(item, where, ENCODER_SCHEMA, required=("name",))
            ename = v.encoder_name(d.get("name"), _join(where, "name")) if "name" in d else None
            if ename is None:
                continue
            w = v.weights(d["weights"], _join(where, "weights"), ename)
            truncs = d["truncations"] if isinstance(d["truncations"], list) else [d["truncations"]]
            for j, t in enumerate(truncs):
                k = v.truncation(t, f"{where}.truncations[{j}]", ename)
                if w is not None and k is not None:
                    cfg = EncoderConfig(ename, w, k)
                    if cfg in encoders:
                        v.fail(where, f"{cfg.label} is listed more than once")
                    else:
                        encoders.append(cfg)
    grid = tuple(encoders)

    seeds = v.seeds(top.get("seeds", [0]), "seeds")

    tl = v.section(top.get("tile"), "tile", TILE_SCHEMA)
    tile_workers = v.number(tl["workers"], "tile.workers", int, low=1)
    ex = v.section(top.get("extract"), "extract", EXTRACT_SCHEMA)
    extract = ExtractSettings(
        input_size=v.number(ex["input_size"], "extract.input_size", int, low=8, optional=True),
        batch_size=v.number(ex["batch_size"], "extract.batch_size", int, low=1),
        workers=v.number(ex["workers"], "extract.workers", int, low=0, optional=True),
        device=v.choice(ex["device"], "extract.device", DEVICES),
        precision=v.choice(ex["precision"], "extract.precision", PRECISIONS),
        dtype=v.choice(ex["dtype"], "extract.dtype", ("float32", "float16")),
    )

    m = v.section(top.get("mil"), "mil", MIL_SCHEMA)
    mil = MilSettings(
        model=v.choice(m["model"], "mil.model", ("histotransfer", "gated")),
        epochs=v.number(m["epochs"], "mil.epochs", int, low=1),
        lr=v.number(m["lr"], "mil.lr", float, low=0.0),
        standardize=v.boolean(m["standardize"], "mil.standardize"),
        early_stopping=v.number(m["early_stopping"], "mil.early_stopping", int, low=1, optional=True),
        hidden=v.number(m["hidden"], "mil.hidden", int, low=1, optional=True),
        dropout=v.number(m["dropout"], "mil.dropout", float, low=0.0, high=0.99),
    )

    finetune = None
    if top.get("finetune") is not None:
        f = v.section(top["finetune"], "finetune", FINETUNE_SCHEMA, required=("encoders",))
        refs = f.get("encoders")
        chosen: list[EncoderConfig] = []
        if refs is not None and (not isinstance(refs, list) or not refs):
            v.fail("finetune.encoders", "expected a non-empty list of {name, weights, truncation}")
        elif refs:
            for i, item in enumerate(refs):
                cfg = v.encoder_ref(item, f"finetune.encoders[{i}]", grid)
                if cfg is not None and cfg not in chosen:
                    chosen.append(cfg)
        ft_seeds = seeds if f["seeds"] is None else v.seeds(f["seeds"], "finetune.seeds")
        for s in ft_seeds:
            if s not in seeds:
                v.fail("finetune.seeds", f"seed {s} is not one of the study's seeds {list(seeds)}")
        finetune = FinetuneSettings(
            encoders=tuple(chosen), seeds=tuple(ft_seeds),
            top_k=v.number(f["top_k"], "finetune.top_k", int, low=1),
            epochs=v.number(f["epochs"], "finetune.epochs", int, low=1),
            lr=v.number(f["lr"], "finetune.lr", float, low=0.0),
            freeze_stages=v.number(f["freeze_stages"], "finetune.freeze_stages", int, low=0, high=4),
            batch_slides=v.number(f["batch_slides"], "finetune.batch_slides", int, low=1),
            grad_checkpointing=v.boolean(f["grad_checkpointing"], "finetune.grad_checkpointing"),
            precision=v.choice(f["precision"], "finetune.precision", PRECISIONS),
            device=v.choice(f["device"], "finetune.device", DEVICES),
            workers=v.number(f["workers"], "finetune.workers", int, low=0),
        )

    cka = None
    if top.get("cka") is not None:
        c = v.section(top["cka"], "cka", CKA_SCHEMA)
        pairs: list[tuple[EncoderConfig, EncoderConfig]] = []
        raw_pairs = c.get("pairs") or []
        if not isinstance(raw_pairs, list):
            v.fail("cka.pairs", "expected a list of {a: encoder, b: encoder}")
            raw_pairs = []
        for i, item in enumerate(raw_pairs):
            pd_ = v.section(item, f"cka.pairs[{i}]", PAIR_SCHEMA, required=("a", "b"))
            a = v.free_encoder(pd_["a"], f"cka.pairs[{i}].a") if "a" in pd_ else None
            b = v.free_encoder(pd_["b"], f"cka.pairs[{i}].b") if "b" in pd_ else None
            if a is not None and b is not None:
                pairs.append((a, b))
        cka = CkaSettings(
            n_patches=v.number(c["n_patches"], "cka.n_patches", int, low=2),
            pooling=v.choice(c["pooling"], "cka.pooling", ("mean", "flatten")),
            full_matrix=v.boolean(c["full_matrix"], "cka.full_matrix"),
            finetuned=v.boolean(c["finetuned"], "cka.finetuned"),
            pairs=tuple(pairs),
        )
        if cka.finetuned and finetune is None and not pairs:
            v.fail("cka", "nothing to compare: add a 'finetune' section (frozen vs fine-tuned) or cka.pairs")

    if v.problems:
        listing = "\n".join(f"  - {p}" for p in v.problems)
        raise HistotransferError(f"{path}: {len(v.problems)} problem(s) in the study file (nothing was run):\n"
                                 f"{listing}")
    return Study(path=path, text=text, name=str(name), out=out, datasets=tuple(datasets), encoders=grid,
                 seeds=seeds, tile_workers=tile_workers, extract=extract, mil=mil, finetune=finetune, cka=cka,
                 encoder_info=v.info)
