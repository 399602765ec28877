"""``histotransfer info PATH``: say what a file or folder of the pipeline is and what it holds, without opening
HDF5 files by hand.

:func:`describe` tells the kind of ``PATH`` (a slide, a patch, feature or attention file, a tiling or patches
folder, a feature folder, a MIL or fine-tuned run folder, a study folder) and returns what it holds as plain JSON
values; :func:`render` prints that as aligned text. It reads attrs, shapes and the small JSON/CSV records, never
whole arrays, except the one feature file it is given (checked for NaN/inf rows) and the coordinates of patch
files (to tell whether features are stale). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ._io import h5_files
from ._read import read_csv, read_yaml
from .batch import REPORT_COLUMNS, STATUS_ORDER
from .errors import HistotransferError
from .features import first_non_finite
from .finetune.settings import FinetuneSettings
from .mil import feature_fingerprint, read_config, run_finished
from .mil.settings import MilSettings
from .patches import REPORT_FILE, SETTINGS_FILE, find_tiling, read_patch_file
from .slide import SLIDE_SUFFIXES, identity_differences, open_slide, slide_identity

FEATURES_RECORD = "features.json"
EXTRACT_REPORT = "extract.csv"
SPLIT_ORDER = ("train", "val", "test")
CELL_STATUSES = ("done", "cached", "failed", "blocked")
# Records that name the folder they lie in: ``info FILE`` describes that folder.
FOLDER_RECORDS = frozenset({"config.json", "metrics.json", "comparison.json", FEATURES_RECORD, EXTRACT_REPORT,
                            SETTINGS_FILE, REPORT_FILE, "cells.csv", "study.yaml"})
ROWS_PER_READ = 16384  # feature rows read at a time by the finite check: bounded memory for any slide
WHAT = ("pass a slide, a patch, feature or attention file (.h5), a tiling or patches folder, a feature folder, "
        "a run folder or a study folder")


class Keyed(dict):
    """A mapping keyed by data (slide ids, encoder ids, splits, statuses): its keys are shown as they are."""


# ---------------------------------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """An HDF5 attr as a plain JSON value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: _plain(v) for k, v in obj.attrs.items()}


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise HistotransferError(f"{path}: not a readable HDF5 file ({exc}); {WHAT}.") from exc


def _rows(dataset: h5py.Dataset) -> int:
    """Rows of an (N, K) dataset, or of CLAM's (1, N, K)."""
    return int(dataset.shape[-2]) if dataset.ndim >= 2 else int(dataset.shape[0])


def _layout(root: dict[str, Any], coords: dict[str, Any]) -> str:
    """Who wrote an HDF5 file: ours (name and version), or CLAM/TRIDENT told apart by their ``coords`` attrs."""
    if "format" in root:
        return f"{root['format']} v{root.get('format_version')}"
    return "TRIDENT" if "patch_size_level0" in coords else "CLAM"


def _status_counts(csv: Path) -> tuple[Keyed, Keyed] | tuple[None, None]:
    """A stage report's rows per status (in the report's status order) and its failed slides with the reason."""
    if not csv.is_file():
        return None, None
    df = read_csv(csv, text=True, usecols=lambda c: c in REPORT_COLUMNS)
    counts = Counter(df["status"])
    order = sorted(counts, key=lambda s: (STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER), s))
    failed = df[df["status"] == "error"]
    return Keyed((s, counts[s]) for s in order), Keyed(zip(failed["slide_id"], failed["message"]))


def _spread(counts: list[int]) -> dict[str, Any]:
    """min / median / max / total of per-slide patch counts."""
    if not counts:
        return {"min": None, "median": None, "max": None, "total": 0}
    return {"min": min(counts), "median": float(np.median(counts)), "max": max(counts), "total": sum(counts)}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------------ slide


def _objective_power(path: Path, backend: str) -> float | None:
    """The objective power the slide's metadata records (``Slide.magnification`` falls back to 10 / mpp, so it
    cannot say whether the slide records one)."""
    if backend == "openslide":
        import openslide

        with openslide.OpenSlide(str(path)) as osr:
            value = osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    elif backend == "tiffslide":
        import tiffslide

        with tiffslide.TiffSlide(str(path)) as ts:
            value = ts.properties.get("tiffslide.objective-power")
    else:
        return None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def describe_slide(path: Path) -> dict[str, Any]:
    """Reader backend, vendor, pyramid, native mpp, objective power, file size and identity of a slide file."""
    try:
        slide = open_slide(path)
    except HistotransferError as first:
        # A slide without microns per pixel is still worth describing: a stand-in mpp opens it (native_mpp
        # stays None, and the identity records only the native value).
        try:
            slide = open_slide(path, mpp=1.0)
        except HistotransferError:
            raise first from None
    with slide:
        levels = [{"level": i, "dimensions": list(d), "downsample": round(ds, 6)}
                  for i, (d, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))]
        return {"kind": "slide", "path": str(path), "backend": slide.backend, "vendor": slide.vendor,
                "dimensions": list(slide.dimensions), "levels": levels, "mpp": slide.native_mpp,
                "objective_power": _objective_power(path, slide.backend), "file_size": path.stat().st_size,
                "identity": slide_identity(slide)}


# ------------------------------------------------------------------------------------------------- patch file


def _slide_check(slide_path: str | None, mpp: float | None, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """Whether the slide file at ``slide_path`` is still the one whose identity a patch file recorded."""
    if not recorded:
        return {"slide_matches": None, "slide_differences": ["no slide identity recorded (CLAM/TRIDENT file)"]}
    if not slide_path or not Path(slide_path).is_file():
        return {"slide_matches": None, "slide_differences": [f"no slide file at {slide_path}"]}
    with open_slide(slide_path, mpp=mpp) as slide:
        differences = identity_differences(recorded, slide_identity(slide))
    return {"slide_matches": not differences, "slide_differences": differences}


def describe_patch_file(path: Path, check: bool = False) -> dict[str, Any]:
    """Layout, slide, patch count, geometry, tiling, recorded slide (and, with ``check``, whether it still
    matches) and fingerprint of a patch file."""
    with _open_h5(path) as f:
        layout = _layout(_attrs(f), _attrs(f["coords"]) if "coords" in f else {})
    patches = read_patch_file(path)
    spec = patches.spec
    slide_path = spec.slide_path or ""
    out: dict[str, Any] = {"kind": "patch file", "path": str(path), "layout": layout, "slide_id": patches.slide_id,
           "patches": len(patches),
           "spec": {"patch_size": spec.patch_size, "patch_size_level0": spec.patch_size_level0,
                    "patch_level": spec.patch_level, "magnification": spec.target_magnification, "mpp": spec.mpp,
                    "stride": spec.stride, "min_tissue": spec.min_tissue},
           "tiling": patches.tiling, "tiling_settings": patches.tiling_settings,
           "slide_path": spec.slide_path, "slide_exists": bool(slide_path) and Path(slide_path).is_file(),
           "slide_identity": patches.identity}
    if check:
        out.update(_slide_check(spec.slide_path, spec.mpp, patches.identity))
    out["fingerprint"] = patches.fingerprint
    return out


# ----------------------------------------------------------------------------------------------- feature file


def _scan_features(f: h5py.File) -> tuple[int, int | None, str]:
    """(rows holding NaN/inf, first such row, sha256 of coords and rows) of a feature file, read in blocks.

    The digest is the one ``feature_file.rows_fingerprint`` computes over the whole arrays (coords as int64,
    then the rows as stored), here fed block by block so that a large slide never sits in memory whole.
    """
    dset = f["features"]
    coords = np.asarray(f["coords"][()], dtype=np.int64).reshape(-1, 2)
    digest = hashlib.sha256(np.ascontiguousarray(coords).tobytes())
    n, bad, first = _rows(dset), 0, None
    for start in range(0, n, ROWS_PER_READ):
        rows = dset[0, start:start + ROWS_PER_READ] if dset.ndim == 3 else dset[start:start + ROWS_PER_READ]
        digest.update(np.ascontiguousarray(rows).tobytes())
        finite = np.isfinite(rows).all(axis=1)
        bad += int((~finite).sum())
        if first is None and (row := first_non_finite(rows)) is not None:
            first = start + row
    return bad, first, digest.hexdigest()


def _patch_file_of(path: Path, recorded: str | None) -> Path | None:
    """The patch file a feature file was made from: where it recorded it, else its tiling's ``patches`` folder
    (features live in ``<tiling>/features/<encoder_id>/``, so the two move together)."""
    for candidate in (Path(recorded) if recorded else None, path.parent.parent.parent / "patches" / path.name):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def describe_feature_file(path: Path) -> dict[str, Any]:
    """Encoder, weights, settings, shape, finite check, source patch file (stale or not) and fingerprint of a
    feature file."""
    with _open_h5(path) as f:
        attrs = _attrs(f)
        layout = _layout(attrs, _attrs(f["coords"]))
        rows, dim = _rows(f["features"]), int(f["features"].shape[-1])
        dtype = str(f["features"].dtype)
        bad, first, digest = _scan_features(f)
    recorded = attrs.get("fingerprint")
    patch_file = _patch_file_of(path, attrs.get("patch_file"))
    stale = None
    if patch_file is not None and attrs.get("patches_fingerprint"):
        stale = read_patch_file(patch_file).fingerprint != attrs["patches_fingerprint"]
    sha = attrs.get("weights_sha256")
    return {"kind": "feature file", "path": str(path), "layout": layout, "slide_id": path.stem,
            "encoder": attrs.get("encoder"), "encoder_id": attrs.get("encoder_id"), "stage": attrs.get("stage"),
            "truncate": attrs.get("truncate"), **({"blocks": attrs["blocks"]} if "blocks" in attrs else {}),
            "weights": {"label": attrs.get("weights_label", attrs.get("weights")),
                        "sha256": sha[:12] if sha else None},
            "input_size": attrs.get("input_size"), "precision": attrs.get("precision"), "dtype": dtype,
            "feature_dim": dim, "patches": rows,
            "non_finite": {"rows": bad, "first_row": first},
            "patch_file": str(patch_file) if patch_file else attrs.get("patch_file"),
            "patch_file_exists": patch_file is not None, "stale": stale,
            "fingerprint": recorded or digest,
            "fingerprint_matches_contents": (recorded == digest) if recorded else None}


def describe_attention_file(path: Path) -> dict[str, Any]:
    """Slide, patch count, predicted probability and feature file fingerprint of a run's attention file."""
    with _open_h5(path) as f:
        attrs = _attrs(f)
        score = np.asarray(f["score"][()], dtype=np.float64)
    return {"kind": "attention file", "path": str(path), "layout": _layout(attrs, {}),
            "slide_id": attrs.get("slide_id", path.stem), "patches": len(score),
            "probability": attrs.get("probability"),
            "score_range": [float(score.min()), float(score.max())] if len(score) else None,
            "patch_size_level0": attrs.get("patch_size_level0"),
            "features_fingerprint": attrs.get("features_fingerprint")}


# -------------------------------------------------------------------------------------------- tiling folders


def _feature_folders(root: Path | None) -> Keyed:
    """The feature folders of a tiling (``<tiling>/features/<encoder_id>/``) and their slide counts."""
    base = root / "features" if root is not None else None
    if base is None or not base.is_dir():
        return Keyed()
    return Keyed((d.name, {"slides": len(h5_files(d))}) for d in sorted(base.iterdir())
                 if d.is_dir() and ((d / FEATURES_RECORD).is_file() or h5_files(d)))


def describe_tiling(path: Path) -> dict[str, Any]:
    """Name, settings, slides, patches per slide, ``tiling.csv`` statuses and feature folders of a tiling
    (or of a bare folder of CLAM/TRIDENT patch files)."""
    tiling = find_tiling(path)
    counts = []
    for p in tiling.files:
        with _open_h5(p) as f:
            counts.append(_rows(f["coords"]))
    statuses, failed = _status_counts(tiling.root / REPORT_FILE) if tiling.root else (None, None)
    return {"kind": "tiling" if tiling.root is not None else "patch folder",
            "path": str(tiling.root or tiling.patches), "tiling": tiling.name, "settings": tiling.settings,
            "patch_folder": str(tiling.patches), "slides": len(counts), "patches_per_slide": _spread(counts),
            "statuses": statuses, "failed": failed, "feature_folders": _feature_folders(tiling.root)}


# --------------------------------------------------------------------------------------------- feature folder


def _patch_folder_of(folder: Path, record: dict[str, Any] | None) -> Path | None:
    """The patches a feature folder was extracted from: its ``features.json``, else its tiling's folder."""
    for candidate in (Path(record["patches"]) if record and record.get("patches") else None,
                      folder.parent.parent / "patches"):
        if candidate is not None and candidate.is_dir():
            return candidate
    return None


def _stale_files(files: list[Path], patches: Path) -> list[str]:
    """Slides whose feature file was made from other patches than the patch file there now (or one gone)."""
    stale = []
    for p in files:
        with _open_h5(p) as f:
            recorded = _plain(f.attrs.get("patches_fingerprint"))
        if not recorded:
            continue
        source = patches / p.name
        if not source.is_file() or read_patch_file(source).fingerprint != recorded:
            stale.append(p.stem)
    return stale


def describe_feature_folder(path: Path) -> dict[str, Any]:
    """Encoder, tiling, files, dimension, ``extract.csv`` statuses and stale files of a feature folder."""
    record = _read_json(path / FEATURES_RECORD)
    files = h5_files(path)
    dim = None
    if files:
        with _open_h5(files[0]) as f:
            dim = int(f["features"].shape[-1])
    statuses, failed = _status_counts(path / EXTRACT_REPORT)
    patches = _patch_folder_of(path, record)
    tiled = {p.stem for p in h5_files(patches)} if patches is not None else None
    return {"kind": "feature folder", "path": str(path),
            "encoder_id": (record or {}).get("encoder_id"), "tiling": (record or {}).get("tiling"),
            "encoder": (record or {}).get("encoder"), "files": len(files), "feature_dim": dim,
            "statuses": statuses, "failed": failed, "patch_folder": str(patches) if patches else None,
            "not_extracted": sorted(tiled - {p.stem for p in files}) if tiled is not None else None,
            "stale": _stale_files(files, patches) if patches is not None else None}


# ------------------------------------------------------------------------------------------------ run folder


def _split_counts(run: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The split method and the slides in each split (or each cross-validation fold)."""
    split = config.get("split") or {}
    out: dict[str, Any] = {"method": split.get("method")}
    if "fold" in split:
        out["fold"] = split["fold"]
    path = run / "splits.csv"
    if path.is_file():
        df = read_csv(path, text=True)
        column = "split" if "split" in df.columns else "fold"
        counts = Counter(df[column])
        keys = [s for s in SPLIT_ORDER if s in counts] if column == "split" else sorted(counts, key=int)
        out.update((k if column == "split" else f"fold_{k}", counts[k]) for k in keys)
    return out


def _split_metrics(metrics: dict[str, Any]) -> Keyed:
    """AUC, its 95% CI and the number of slides per split, as ``metrics.json`` holds them."""
    return Keyed((s, {k: metrics[s].get(k) for k in ("auc", "auc_ci_low", "auc_ci_high", "n_slides")})
                 for s in SPLIT_ORDER if isinstance(metrics.get(s), dict))


def _cv_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Mean and sd over folds of each split's AUC, each fold's test AUC, and the test metrics of the pooled
    out-of-fold predictions."""
    mean, sd = metrics.get("mean") or {}, metrics.get("sd") or {}
    out: dict[str, Any] = {
        "auc_over_folds": Keyed((s, {"auc_mean": mean[s].get("auc"), "auc_sd": (sd.get(s) or {}).get("auc")})
                                for s in SPLIT_ORDER if s in mean),
        "fold_test_metrics": Keyed((k, _split_metrics(m).get("test")) for k, m in (metrics.get("folds") or {}).items())}
    if metrics.get("pooled"):
        out["pooled_out_of_fold"] = _split_metrics(metrics["pooled"]).get("test")
    return out


def _inputs_check(config: dict[str, Any]) -> dict[str, Any]:
    """Whether the feature files now in the run's ``features_dir`` are the ones it was trained on."""
    recorded = (config.get("inputs") or {}).get("features") or {}
    folder = Path(config.get("features_dir") or "")
    missing, changed = [], []
    for sid, fingerprint in recorded.items():
        path = folder / f"{sid}.h5"
        if not path.is_file():
            missing.append(sid)
        elif feature_fingerprint(path) != fingerprint:
            changed.append(sid)
    return {"features_dir": str(folder), "checked": len(recorded),
            "unchanged": len(recorded) - len(missing) - len(changed), "changed": sorted(changed),
            "missing": sorted(missing)}


def _run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine the run's result (devices, workers and batch sizes left out)."""
    cls = FinetuneSettings if config.get("kind") == "finetune" else MilSettings
    return {k: v for k, v in (config.get("settings") or {}).items() if k not in cls.runtime_fields()}


def describe_run(path: Path, check: bool = False) -> dict[str, Any]:
    """Kind, settings, encoder, labels, split, metrics and inputs of a MIL, cross-validation or fine-tuned run
    folder (with ``check``: whether its feature files are still the ones it was trained on)."""
    config = read_config(path)
    metrics = _read_json(path / "metrics.json")
    folds = metrics is not None and "folds" in metrics
    if config.get("kind") == "finetune":
        kind = "fine-tuned run"
    else:
        kind = "cross-validation run" if folds else "MIL run"
    encoder = config.get("encoder") or {}
    out: dict[str, Any] = {
        "kind": kind, "path": str(path), "finished": run_finished(path), "settings": _run_settings(config),
        "encoder": encoder.get("encoder_id") or "not recorded (CLAM/TRIDENT features)",
        "features_dir": config.get("features_dir"), "labels": config.get("labels"),
        "positive_class": config.get("positive_class"), "split": _split_counts(path, config)}
    if metrics is not None:
        out.update(_cv_metrics(metrics) if folds else {"metrics": _split_metrics(metrics)})
    out["trained_on"] = {"feature_files": len((config.get("inputs") or {}).get("features") or {}),
                         "unreadable": len(config.get("unreadable_slides") or {})}
    if check:
        out["inputs_check"] = _inputs_check(config)
        if metrics is not None:  # metrics written, yet unfinished: the model file is missing or does not load
            out["model_loads"] = out["finished"]
    if config.get("kind") == "finetune":
        out["source_run"] = ((config.get("finetune") or {}).get("source") or {}).get("run")
        comparison = _read_json(path / "comparison.json") or {}
        out["comparison"] = Keyed((s, {"frozen_auc": v.get("frozen_auc"), "finetuned_auc": v.get("finetuned_auc")})
                                  for s, v in (comparison.get("splits") or {}).items())
    return out


# ---------------------------------------------------------------------------------------------- study folder


def describe_study(path: Path) -> dict[str, Any]:
    """Name, cells by kind and status, failed and blocked cells with their reason, and the report of a study."""
    spec = read_yaml(path / "study.yaml")[1] if (path / "study.yaml").is_file() else None
    out: dict[str, Any] = {"kind": "study", "path": str(path),
                           "name": spec.get("name") if isinstance(spec, dict) else None}
    cells_csv = path / "cells.csv"
    if cells_csv.is_file():
        df = read_csv(cells_csv, text=True)
        order = [s for s in CELL_STATUSES if s in set(df["status"])] + sorted(set(df["status"]) - set(CELL_STATUSES))
        by_kind = Keyed()
        for kind, group in df.groupby("kind", sort=False):
            counts = Counter(group["status"])
            by_kind[kind] = {s: counts[s] for s in order if counts[s]}
        totals = Counter(df["status"])
        out.update({"cells": len(df), "statuses": Keyed((s, totals[s]) for s in order), "by_kind": by_kind,
                    "failed": Keyed(df.loc[df["status"] == "failed", ["key", "message"]].itertuples(index=False)),
                    "blocked": Keyed(df.loc[df["status"] == "blocked", ["key", "message"]].itertuples(index=False))})
    else:
        out["cells"] = "none run yet (no cells.csv)"
    report = path / "report.html"
    out["report"] = str(report) if report.is_file() else None
    return out


# ---------------------------------------------------------------------------------------------- dispatching


def _h5_kind(path: Path) -> str:
    """``patches``, ``features`` or ``attention``: by the layout name of our files, by datasets otherwise."""
    with _open_h5(path) as f:
        name = _plain(f.attrs.get("format"))
        datasets = set(f.keys())
    if isinstance(name, str) and name.startswith("histotransfer."):
        return name.removeprefix("histotransfer.")
    if "features" in datasets:
        return "features"
    if "coords" in datasets:
        return "patches"
    raise HistotransferError(f"{path}: an HDF5 file without 'coords' or 'features' (not a patch or feature "
                             f"file); {WHAT}.")


def _describe_file(path: Path, check: bool) -> dict[str, Any]:
    if path.name in FOLDER_RECORDS:
        return _describe_folder(path.parent, check)
    if path.suffix.lower() == ".h5":
        kind = _h5_kind(path)
        if kind == "patches":
            return describe_patch_file(path, check)
        if kind == "features":
            return describe_feature_file(path)
        if kind == "attention":
            return describe_attention_file(path)
        raise HistotransferError(f"{path}: a '{kind}' file, which info does not describe; {WHAT}.")
    if path.name.lower().endswith(SLIDE_SUFFIXES):
        return describe_slide(path)
    raise HistotransferError(f"{path}: not a file `histotransfer info` describes; {WHAT}.")


def _folder_h5_kind(path: Path) -> str | None:
    files = h5_files(path)
    return _h5_kind(files[0]) if files else None


def _describe_folder(path: Path, check: bool) -> dict[str, Any]:
    if (path / "config.json").is_file():
        return describe_run(path, check)
    if (path / "cells.csv").is_file() or (path / "study.yaml").is_file():
        return describe_study(path)
    if (path / FEATURES_RECORD).is_file() or (path / EXTRACT_REPORT).is_file():
        return describe_feature_folder(path)
    kind = _folder_h5_kind(path)
    if kind == "features":
        return describe_feature_folder(path)
    tilings = [p for p in path.iterdir() if p.is_dir() and (p / SETTINGS_FILE).is_file()]
    if kind == "patches" or (path / SETTINGS_FILE).is_file() or tilings or _folder_h5_kind(path / "patches"):
        return describe_tiling(path)
    raise HistotransferError(f"{path}: not a folder `histotransfer info` describes; {WHAT}.")


def describe(path: str | Path, check: bool = False) -> dict[str, Any]:
    """What ``path`` is and what it holds, as JSON values: ``kind``, ``path``, then the kind's fields.

    ``check`` also opens the slide a patch file was cut from and compares it with the identity recorded, and
    compares a run's feature files with the fingerprints it was trained on. Raises HistotransferError (one
    line) for a path that is missing or not something histotransfer reads or writes.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise HistotransferError(f"{path}: no such file or folder; check the path.")
    return _describe_folder(path, check) if path.is_dir() else _describe_file(path, check)


def failed_checks(description: dict[str, Any]) -> list[str]:
    """What ``describe(..., check=True)`` found wrong: a slide file that is not the one tiled, a run's feature
    files changed or missing since training. Empty when every check passed (or none could be made)."""
    found = []
    if description.get("slide_matches") is False:
        found.append(f"{description['path']}: the slide file is not the one tiled "
                     f"({'; '.join(description.get('slide_differences') or [])})")
    inputs = description.get("inputs_check") or {}
    if inputs.get("changed") or inputs.get("missing"):
        found.append(f"{description['path']}: feature files changed ({len(inputs['changed'])}) or missing "
                     f"({len(inputs['missing'])}) since training, in {inputs['features_dir']}")
    if description.get("model_loads") is False:
        found.append(f"{description['path']}: metrics.json is written but model.pt is missing or does not load; "
                     "re-run the command that made the run (it redoes it)")
    return found


# ------------------------------------------------------------------------------------------------ rendering


def _scalar(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if value == [] or value == {}:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_scalar(v)}" for k, v in value.items())
    return str(value)


def _flat(value: Any) -> bool:
    """Whether a value reads well on one line: scalars, lists of scalars, short dicts of those."""
    if isinstance(value, dict):
        return (not value or all(_flat(v) and not isinstance(v, dict) for v in value.values())) \
            and len(_scalar(value)) <= 96
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return True


def _lines(mapping: dict[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    labels = {k: str(k) if isinstance(mapping, Keyed) else str(k).replace("_", " ") for k in mapping}
    width = max((len(v) for v in labels.values()), default=0)
    lines = []
    for key, value in mapping.items():
        if isinstance(value, dict) and not _flat(value):
            lines.append(f"{pad}{labels[key]}")
            lines += _lines(value, indent + 2)
        elif isinstance(value, list) and value and not _flat(value):
            lines.append(f"{pad}{labels[key]}")
            lines += [f"{pad}  {_scalar(item)}" for item in value]
        else:
            lines.append(f"{pad}{labels[key]:<{width}}  {_scalar(value)}".rstrip())
    return lines


def render(description: dict[str, Any]) -> str:
    """A description as aligned text: the kind and path, then one line per field (nested fields indented)."""
    fields = {k: v for k, v in description.items() if k not in ("kind", "path")}
    return "\n".join([f"{description['kind']}: {description['path']}", *_lines(fields, 2)])


# ------------------------------------------------------------------------------------------------------- CLI
