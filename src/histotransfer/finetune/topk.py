"""Top-k patch sampling: the patches a trained attention-MIL run attended to most, per slide.

As in the paper, fine-tuning sees only the k patches of each training/validation slide with the highest
*pre-softmax* attention score (the softmax is monotonic within a slide, so this is also the top-k softmax
weight, but the raw score keeps the ranking free of softmax saturation ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .._io import write_csv
from .._read import read_csv
from ..errors import FormatError, HistotransferError, ProvenanceError
from ..formats import ATTENTION, check
from ..mil import run_fingerprint
from ..provenance import short

TOPK_COLUMNS = ["slide_id", "split", "rank", "x", "y", "score"]


def read_splits(run_dir: Path) -> pd.DataFrame:
    """The run's ``splits.csv`` (slide_id, patient_id, label, split) with slide ids as strings."""
    path = run_dir / "splits.csv"
    if not path.is_file():
        raise HistotransferError(f"{path}: not found; pass a run folder written by 'histotransfer train'.")
    splits = read_csv(path, missing=False)
    missing = {"slide_id", "label", "split"} - set(splits.columns)
    if missing:
        raise FormatError(f"{path}: missing column(s) {', '.join(sorted(missing))}.")
    return splits


def read_attention_scores(path: Path, fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 coords (N, 2) and raw pre-softmax scores (N,) from ``attention/<slide_id>.h5``; a file recording
    another run than ``fingerprint`` (the run was retrained or its model replaced since) is refused."""
    if not path.is_file():
        raise HistotransferError(f"{path}: attention file not found; re-run 'histotransfer train' for this run.")
    with h5py.File(path, "r") as f:
        check(f, ATTENTION, path, needs=("coords", "score"))
        recorded = f.attrs.get("run_fingerprint")
        if fingerprint is not None and recorded is not None and recorded != fingerprint:
            raise ProvenanceError(
                f"{path}: made by another run ({short(str(recorded))}) than this one's model "
                f"({short(fingerprint)}); re-train the run."
            )
        coords = np.asarray(f["coords"][()], dtype=np.int64)
        score = np.asarray(f["score"][()], dtype=np.float64).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(score) or len(score) == 0:
        raise FormatError(
            f"{path}: expected coords (N, 2) and score (N,) with N >= 1, got {coords.shape}, {score.shape}."
        )
    if not np.isfinite(score).all():
        raise FormatError(f"{path}: attention scores contain NaN or inf; the run's model diverged, retrain it.")
    return coords, score


def top_k_indices(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; ties keep file order (lower index first)."""
    return np.argsort(-score, kind="stable")[:k]


def select_top_k(
    run_dir: str | Path,
    k: int = 64,
    splits: Sequence[str] = ("train", "val"),
    out_path: str | Path | None = None,
    save: bool = True,
) -> pd.DataFrame:
    """Per slide of ``splits``, the k patches with the highest pre-softmax attention score.

    Returns a DataFrame (slide_id, split, rank, x, y, score) with rank 1 the highest score, ties broken by
    the patch's order in the attention file; slides with fewer than k patches keep all of them. Saved (unless
    ``save`` is False) as ``topk.csv`` in the run folder (or at ``out_path``).
    """
    run_dir = Path(run_dir)
    if k < 1:
        raise HistotransferError(f"top-k: k must be at least 1, got {k}.")
    table = read_splits(run_dir)
    chosen = table[table["split"].isin(list(splits))]
    if chosen.empty:
        raise HistotransferError(
            f"{run_dir / 'splits.csv'}: no slides in split(s) {', '.join(splits)}; "
            f"the run has {', '.join(sorted(table['split'].unique()))}."
        )
    parts = []
    whole_run = all((run_dir / f).is_file() for f in ("model.pt", "config.json"))
    fingerprint = run_fingerprint(run_dir) if whole_run else None  # a bare folder of attention files: unchecked
    for slide_id, split in zip(chosen["slide_id"], chosen["split"]):
        coords, score = read_attention_scores(run_dir / "attention" / f"{slide_id}.h5", fingerprint)
        idx = top_k_indices(score, k)
        parts.append(
            pd.DataFrame(
                {
                    "slide_id": slide_id,
                    "split": split,
                    "rank": np.arange(1, len(idx) + 1),
                    "x": coords[idx, 0],
                    "y": coords[idx, 1],
                    "score": score[idx],
                }
            )
        )
    df = pd.concat(parts, ignore_index=True)[TOPK_COLUMNS]
    if save:
        write_csv(df, run_dir / "topk.csv" if out_path is None else out_path)
    return df
