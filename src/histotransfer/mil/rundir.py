"""Files of a MIL run folder: the model (``model.pt``), per-slide attention and the ROC plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from .._io import atomic_path
from ..errors import FormatError, HistotransferError
from ..formats import ATTENTION, open_h5, stamp
from .models import AttentionMIL, build_model

MODEL_FORMAT = ("histotransfer.mil", 1)


def save_model(model: AttentionMIL, path: Path, classes: list[str], selected_epoch: int) -> None:
    """Write ``model.pt``: a plain dict of tensors and JSON-like values, loadable with ``weights_only=True``."""
    payload = {
        "format": MODEL_FORMAT[0], "format_version": MODEL_FORMAT[1],
        "config": model.config, "classes": list(classes), "selected_epoch": int(selected_epoch),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The contents of ``RUN/model.pt``, checked."""
    run_dir = Path(run_dir)
    path = run_dir / "model.pt"
    if not path.is_file():
        hint = (" it holds cross-validation folds: pass one of its fold_<k> folders"
                if any(run_dir.glob("fold_*")) else " train one with `histotransfer train`")
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
    payload = read_checkpoint(run_dir)
    model = build_model(payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise HistotransferError(f"{run_dir}: no config.json, not a MIL run folder; pass the folder `train` wrote.")
    return json.loads(path.read_text())


def write_attention(path: Path, slide_id: str, coords: np.ndarray, scores: np.ndarray,
                    probability: float, patch_size_level0: int | None) -> None:
    """Write ``attention/<slide_id>.h5``: coords, raw scores and their softmax weights."""
    s = np.asarray(scores, dtype=np.float64)
    weight = np.exp(s - s.max())
    weight /= weight.sum()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        stamp(f, ATTENTION)
        f.attrs["slide_id"] = slide_id
        f.attrs["probability"] = float(probability)
        if patch_size_level0 is not None:
            f.attrs["patch_size_level0"] = int(patch_size_level0)
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        f.create_dataset("score", data=s.astype(np.float32))
        f.create_dataset("weight", data=weight.astype(np.float32))


def read_attention(path: str | Path) -> dict[str, Any]:
    """An attention file as ``{"coords", "score", "weight", "attrs"}``."""
    with open_h5(path, ATTENTION, ("coords", "score", "weight"), "re-run `histotransfer train` for this run") as f:
        out = {k: f[k][()] for k in ("coords", "score", "weight")}
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return out


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: Path, title: str) -> None:
    """Save ROC curves ``name -> (labels, probabilities, auc)`` as a PNG (splits with one class are left out)."""
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
        fig.savefig(tmp, format="png")
