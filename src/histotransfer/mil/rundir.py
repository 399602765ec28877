"""The run folder of a MIL model (``train``) or a fine-tuned one (``finetune``): what it holds, how it is written,
and how a later command checks that it is the run it thinks it is.

``config.json`` records the settings (``MilSettings``), the encoder that made the features, the labels, the split
and the fingerprints of every input (each slide's feature file, the label file, the split file), so
:func:`guard` can tell "this exact run is already here" (kept) from "another run is here" (refused, naming each
field that differs with both values), and evaluate/heatmap/finetune can tell when they are given other inputs
than the run saw. ``metrics.json`` is written last and marks a finished run. Nothing here imports torch at
module level: checking a finished run is instant.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pandas as pd

from .._io import atomic_path, ensure_space, write_json, write_torch
from .._read import read_csv
from ..errors import FormatError, HistotransferError, ProvenanceError
from ..formats import ATTENTION, open_h5, stamp
from ..provenance import json_fingerprint, short
from .settings import SMALL_SPLIT

if TYPE_CHECKING:
    import torch

    from .models import AttentionMIL

MODEL_FORMAT = ("histotransfer.mil", 1)
RUN_FORMAT = ("histotransfer.run", 2)
DONE_FILE = "metrics.json"
# Records of what happened, not settings: they never make two runs "different".
RECORDS = frozenset({"versions", "ignored_slides", "unreadable_slides", "format", "format_version"})


@dataclass
class FitResult:
    """What a training loop hands back: the selected state, the per-epoch history and the selected epoch."""

    state: dict[str, torch.Tensor]
    history: pd.DataFrame
    selected_epoch: int


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/config.json``, checked to be a run folder of this version."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise HistotransferError(
            f"{run_dir}: no config.json, not a run folder; pass a folder `histotransfer train` or `finetune` wrote."
        )
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise FormatError(f"{path}: not readable JSON ({exc}); re-run the command that made it.") from exc
    if config.get("format") != RUN_FORMAT[0] or config.get("format_version") != RUN_FORMAT[1]:
        raise FormatError(
            f"{path}: a run folder of another histotransfer version (layout "
            f"{config.get('format_version')}, this version reads {RUN_FORMAT[1]}); re-train it."
        )
    return config


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 48 else text[:45] + "..."


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each field on which two run configs differ, with both values (recorded first)."""
    diffs = []
    for key in sorted((set(old) | set(new)) - RECORDS):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        nested = key in ("settings", "inputs", "encoder", "split", "finetune")
        if nested and isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) == b.get(sub):
                    continue
                if sub == "features" and isinstance(a.get(sub), dict) and isinstance(b.get(sub), dict):
                    fa, fb = a[sub], b[sub]
                    changed = sorted(s for s in set(fa) | set(fb) if fa.get(s) != fb.get(s))
                    diffs.append(f"inputs.features: {len(changed)} slide(s) differ ({', '.join(changed[:5])})")
                else:
                    diffs.append(f"{key}.{sub} ({_shown(a.get(sub))} vs {_shown(b.get(sub))})")
        else:
            diffs.append(f"{key} ({_shown(a)} vs {_shown(b)})")
    return diffs


def guard(run_dir: Path, config: dict[str, Any], done_file: str = DONE_FILE) -> bool:
    """True when ``run_dir`` already holds this finished run; a one-line error when it holds another run."""
    path = run_dir / "config.json"
    if not path.is_file():
        return False
    try:
        old = read_config(run_dir)
    except FormatError as exc:
        raise HistotransferError(
            f"{run_dir}: holds a run this version cannot read ({exc}); choose another --out or delete that folder."
        ) from exc
    diff = config_differences(old, config)
    if diff:
        raise HistotransferError(
            f"{run_dir}: holds a run made differently (differs in: {'; '.join(diff)}); "
            "choose another --out or delete that folder."
        )
    return run_finished(run_dir, done_file)


def run_finished(run_dir: str | Path, done_file: str = DONE_FILE) -> bool:
    """Whether ``run_dir`` holds a finished run: its ``done_file`` is written and its ``model.pt`` is a whole
    model archive (for a cross-validation folder, every fold's). A model file missing, cut short or damaged leaves
    the run to be redone, however complete the rest looks; ``train``, ``finetune``, ``info`` and the study's cache
    all decide with this."""
    run_dir = Path(run_dir)
    if not (run_dir / done_file).is_file():
        return False
    folds = [p for p in run_dir.glob("fold_*") if p.is_dir()]
    if folds and not (run_dir / "model.pt").exists():
        return all(run_finished(p) for p in folds)
    return archive_intact(run_dir / "model.pt")


def archive_intact(path: Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive: a zip holding a pickle record whose every record matches
    its CRC-32. Checked without torch (``info`` never imports it): a file cut short has no zip directory, a damaged
    one fails its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/data.pkl") for n in archive.namelist()) and archive.testzip() is None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return False


def check_inputs(config: dict[str, Any], fingerprints: dict[str, str | None], source: str | Path) -> None:
    """Refuse feature files of the run's own slides that are not the ones the run was trained on."""
    recorded = (config.get("inputs") or {}).get("features") or {}
    changed = sorted(s for s, fp in fingerprints.items() if s in recorded and recorded[s] != fp)
    missing = sorted(s for s, fp in fingerprints.items() if s in recorded and fp is None)
    if missing:
        raise ProvenanceError(
            f"{source}: the feature files of {len(missing)} slide(s) the run was trained on are "
            f"missing or unreadable ({', '.join(missing[:5])}); restore them or re-train the run."
        )
    if changed:
        shown = ", ".join(f"{s} ({short(recorded[s])} vs {short(fingerprints[s])})" for s in changed[:3])
        raise ProvenanceError(
            f"{source}: the features of {len(changed)} slide(s) the run was trained on are not the ones it saw "
            f"({shown}{', ...' if len(changed) > 3 else ''}); they were re-extracted or replaced since. Re-train "
            "the run on these features, or restore the original feature files."
        )


def save_model(model: AttentionMIL, path: Path, classes: list[str], selected_epoch: int) -> None:
    """Write ``model.pt``: a plain dict of tensors and JSON-like values, loadable with ``weights_only=True``
    (byte-identical for identical models)."""
    payload = {
        "format": MODEL_FORMAT[0],
        "format_version": MODEL_FORMAT[1],
        "config": model.config,
        "classes": list(classes),
        "selected_epoch": int(selected_epoch),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    write_torch(payload, path)


def fold_dirs(run_dir: str | Path) -> list[Path]:
    """The fold runs of a cross-validation run folder (``fold_0``, ``fold_1``, ... in order); empty for a run of
    one split."""
    run_dir = Path(run_dir)
    if (run_dir / "model.pt").is_file():
        return []
    folds = [p for p in run_dir.glob("fold_*") if p.name[5:].isdigit() and (p / "config.json").is_file()]
    return sorted(folds, key=lambda p: int(p.name[5:]))


def model_run(run_dir: str | Path) -> Path:
    """The run folder whose model a command applies: ``run_dir`` itself, or for a cross-validation its
    ``fold_0``, a complete run of one split (model, attention, its own test split), saying so."""
    folds = fold_dirs(run_dir)
    if not folds:
        return Path(run_dir)
    from tqdm.auto import tqdm

    tqdm.write(
        f"{run_dir}: a {len(folds)}-fold cross-validation; using the model of {folds[0].name} (pass "
        f"{Path(run_dir) / 'fold_<k>'} for another fold)"
    )
    return folds[0]


def read_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The contents of ``RUN/model.pt``, checked."""
    import torch

    run_dir = Path(run_dir)
    path = run_dir / "model.pt"
    if not path.is_file():
        hint = (
            " it holds cross-validation folds: pass one of its fold_<k> folders"
            if any(run_dir.glob("fold_*"))
            else " train one with `histotransfer train`"
        )
        raise HistotransferError(f"{run_dir}: no model.pt, not a finished MIL run folder;{hint}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FormatError(f"{path}: not a readable model file ({exc}); re-run training.") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT[0]:
        raise FormatError(f"{path}: not a histotransfer MIL model; pass a folder made by `histotransfer train`.")
    if payload.get("format_version") != MODEL_FORMAT[1]:
        raise FormatError(
            f"{path}: model layout version {payload.get('format_version')}, this histotransfer reads "
            f"{MODEL_FORMAT[1]}; re-train with this version."
        )
    return payload


def load_run_model(run_dir: str | Path) -> AttentionMIL:
    """The trained AttentionMIL of a run folder (selected epoch, standardisation included), in eval mode."""
    from .models import build_model

    payload = read_checkpoint(run_dir)
    model = build_model(payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def run_fingerprint(run_dir: str | Path) -> str:
    """What identifies a trained run for the files made from it (attention, heatmaps, CAMs): its model file and
    the encoder of its features. Retraining or replacing the model changes it."""
    from .._io import file_sha256

    run_dir = Path(run_dir)
    return json_fingerprint(
        {"model_sha256": file_sha256(run_dir / "model.pt"), "encoder": read_config(run_dir).get("encoder")}
    )


def check_run_folder(out: Path, fingerprint: str, run_dir: Path, record: str, what: str) -> None:
    """Refuse an output folder holding another run's outputs: its ``record`` (a JSON file, or a CSV report with a
    ``run_fingerprint`` column) or its attention files name another run, or none. The folder's own run may
    write into it again."""
    path = out / record
    found: set[str] = set()
    if path.is_file():
        if path.suffix == ".json":
            try:
                found.add(str(json.loads(path.read_text()).get("run_fingerprint")))
            except (ValueError, AttributeError):
                found.add("unreadable")
        else:
            table = read_csv(path, text=True)
            found |= set(table["run_fingerprint"]) if "run_fingerprint" in table.columns else {"None"}
    for att in sorted((out / "attention").glob("*.h5")) if (out / "attention").is_dir() else []:
        with h5py.File(att, "r") as f:
            found.add(str(f.attrs.get("run_fingerprint", "None")))
    others = sorted(found - {fingerprint})
    if others:
        shown = ", ".join("none recorded" if o == "None" else short(o) for o in others)
        raise HistotransferError(
            f"{out}: holds {what} of another run (run fingerprint {shown}; this run {run_dir} is "
            f"{short(fingerprint)}); choose another --out, or delete that folder."
        )


def write_attention(
    path: Path,
    slide_id: str,
    coords: np.ndarray,
    scores: np.ndarray,
    probability: float,
    patch_size_level0: int | None,
    feature_attrs: dict[str, Any] | None = None,
    fingerprint: str | None = None,
) -> None:
    """Write ``attention/<slide_id>.h5``: coords, raw scores and their softmax weights, with the slide identity
    and the feature file fingerprint they come from (so heatmaps and CAMs can check the slide they draw on) and
    the fingerprint of the run that made them (:func:`run_fingerprint`, so no reader takes them for another
    run's)."""
    s = np.asarray(scores, dtype=np.float64)
    weight = np.exp(s - s.max())
    weight /= weight.sum()
    ensure_space(path, 24 * len(s))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        stamp(f, ATTENTION)
        f.attrs["slide_id"] = slide_id
        f.attrs["probability"] = float(probability)
        if fingerprint is not None:
            f.attrs["run_fingerprint"] = fingerprint
        if patch_size_level0 is not None:
            f.attrs["patch_size_level0"] = int(patch_size_level0)
        for key in ("slide_identity", "fingerprint", "slide_path", "patch_file"):
            if feature_attrs is not None and feature_attrs.get(key):
                f.attrs["features_fingerprint" if key == "fingerprint" else key] = str(feature_attrs[key])
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64), track_times=False)
        f.create_dataset("score", data=s.astype(np.float32), track_times=False)
        f.create_dataset("weight", data=weight.astype(np.float32), track_times=False)


def read_attention(path: str | Path, fingerprint: str | None = None, own: bool = False) -> dict[str, Any]:
    """An attention file as ``{"coords", "score", "weight", "attrs"}``.

    With ``fingerprint`` (:func:`run_fingerprint`), a file made by another run is refused; so is one recording
    no run, unless ``own`` (the run's own ``attention/`` folder, written with the run by an earlier version).
    """
    with open_h5(path, ATTENTION, ("coords", "score", "weight"), "re-run `histotransfer train` for this run") as f:
        out = {k: f[k][()] for k in ("coords", "score", "weight")}
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    recorded = out["attrs"].get("run_fingerprint")
    if fingerprint is not None and recorded != fingerprint and not (own and recorded is None):
        made_by = "records no run" if recorded is None else f"was made by run {short(str(recorded))}"
        raise ProvenanceError(
            f"{path}: {made_by}, not by this run ({short(fingerprint)}); re-run `histotransfer "
            "evaluate` for this run into its own --out and pass that folder."
        )
    return out


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: Path, title: str) -> None:
    """Save ROC curves ``name -> (labels, probabilities, auc)`` as a PNG (splits with one class are left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for name, (labels, probs, auc) in curves.items():
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f}, n={len(labels)})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def write_config(config: dict[str, Any], run_dir: Path) -> None:
    """Write ``config.json`` stamped with the run folder layout."""
    write_json({"format": RUN_FORMAT[0], "format_version": RUN_FORMAT[1], **config}, run_dir / "config.json")


def write_run_outputs(
    run_dir: Path,
    model: AttentionMIL,
    bags: Any,
    split: pd.DataFrame,
    seed: int,
    title: str,
    positive_class: str,
    group_column: str | None = None,
) -> dict[str, Any]:
    """Predict every slide of ``split`` with the trained ``model`` and write the run's evaluation files:
    ``attention/<slide_id>.h5``, ``predictions.csv``, ``roc.png`` (titled ``title``) and, last, as the mark
    of a finished run, ``metrics.json``. Returns what metrics.json holds: the metrics per split
    (bootstrap CIs seeded by ``seed``) and the keys below.

    With ``group_column`` (e.g. centre) metrics.json also holds, per split, the metrics of each group and the
    mean within-group AUC (groups with one class have none): a model that learned the centre instead of the
    disease ranks well across centres and poorly within them. ``shortcut`` holds how well slide colour (and the
    group) alone predict the labels of these slides (:func:`~histotransfer.mil.shortcut.run_shortcut`), next
    to the test AUC."""
    from .._io import write_csv
    from .bags import patch_size_level0
    from .metrics import slide_metrics
    from .models import predict
    from .shortcut import run_shortcut, slide_colour_stats_of
    from .splits import SPLITS

    ordered = split.sort_values(["split", "slide_id"], key=lambda c: c.map(SPLITS.index) if c.name == "split" else c)
    subset = bags.subset(ordered["slide_id"].tolist())
    probs, scores = predict(model, subset.features)
    fingerprint = run_fingerprint(run_dir)
    for sid, coords, attrs, prob, score in zip(subset.slide_ids, subset.coords, subset.attrs, probs[:, 1], scores):
        write_attention(
            run_dir / "attention" / f"{sid}.h5", sid, coords, score, prob, patch_size_level0(attrs), attrs, fingerprint
        )
    cols = [c for c in ("slide_id", "patient_id", group_column, "split", "label") if c and c in ordered.columns]
    predictions = ordered[cols].assign(probability=probs[:, 1])
    write_csv(predictions, run_dir / "predictions.csv")
    metrics: dict[str, Any] = {}
    curves = {}
    for name in SPLITS:
        part = predictions[predictions["split"] == name]
        metrics[name] = slide_metrics(part["label"], part["probability"], seed=seed)
        curves[name] = (part["label"].to_numpy(), part["probability"].to_numpy(), metrics[name]["auc"])
    plot_roc(curves, run_dir / "roc.png", title)
    extra: dict[str, Any] = {"positive_class": positive_class, "warnings": small_split_warnings(metrics)}
    if group_column is not None:
        extra["groups"] = {
            name: group_metrics(predictions[predictions["split"] == name], group_column, seed) for name in SPLITS
        }
    extra["shortcut"] = run_shortcut(
        predictions,
        slide_colour_stats_of(dict(zip(subset.slide_ids, subset.attrs))),
        metrics["test"]["auc"],
        group_column,
        seed,
    )
    write_json({**metrics, **extra}, run_dir / DONE_FILE)
    return {**metrics, **extra}


def small_split_warnings(metrics: dict[str, Any]) -> list[str]:
    """A sentence for each of the val/test splits too small for a stable AUC (stated, not hidden)."""
    return [
        f"the {name} split has {m['n_slides']} slide{'' if m['n_slides'] == 1 else 's'}: its AUC and "
        f"confidence interval rest on too few slides to compare encoders (aim for at least {SMALL_SPLIT})"
        for name, m in metrics.items()
        if name in ("val", "test") and 0 < (m.get("n_slides") or 0) < SMALL_SPLIT
    ]


def group_metrics(predictions: pd.DataFrame, group_column: str, seed: int) -> dict[str, Any]:
    """Metrics of each group of one split and the mean AUC within groups (None when no group has two classes)."""
    from .metrics import slide_metrics

    per = {
        str(g): slide_metrics(part["label"], part["probability"], seed=seed)
        for g, part in predictions.groupby(group_column, sort=True)
    }
    aucs = [m["auc"] for m in per.values() if m["auc"] is not None]
    return {
        "per_group": per,
        "mean_within_group_auc": float(np.mean(aucs)) if aucs else None,
        "groups_with_auc": len(aucs),
    }
