"""Top-k selection: exactly the k highest pre-softmax attention scores per train/val slide."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from histotransfer.errors import FormatError, HistotransferError
from histotransfer.finetune.topk import select_top_k
from histotransfer.formats import ATTENTION, stamp


def write_attention(path: Path, coords: np.ndarray, score: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        stamp(f, ATTENTION)
        f["coords"] = coords
        f["score"] = score.astype(np.float32)
        f["weight"] = np.exp(score - score.max()) / np.exp(score - score.max()).sum()


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    rows, attention = [], {}
    sizes = {"s0": 500, "s1": 70, "s2": 10, "s3": 300, "s4": 200}
    split = {"s0": "train", "s1": "train", "s2": "val", "s3": "test", "s4": "val"}
    for i, (sid, n) in enumerate(sizes.items()):
        coords = rng.integers(0, 10**6, size=(n, 2))
        score = np.round(rng.normal(size=n), 1)  # rounding plants many ties
        write_attention(tmp_path / "attention" / f"{sid}.h5", coords, score)
        attention[sid] = (coords, score.astype(np.float32).astype(np.float64))
        rows.append({"slide_id": sid, "patient_id": f"p{i}", "label": i % 2, "split": split[sid]})
    pd.DataFrame(rows).to_csv(tmp_path / "splits.csv", index=False)
    return tmp_path, attention, split


def test_top_k_is_exactly_the_highest_scores_with_deterministic_ties(run_dir):
    path, attention, split = run_dir
    df = select_top_k(path, k=64)
    assert (path / "topk.csv").is_file()
    saved = pd.read_csv(path / "topk.csv", dtype={"slide_id": str})
    pd.testing.assert_frame_equal(saved, df, check_dtype=False)
    assert set(df["slide_id"]) == {"s0", "s1", "s2", "s4"}  # test slides never used
    for sid, group in df.groupby("slide_id"):
        coords, score = attention[sid]
        k = min(64, len(score))
        # independent reference: sort (index) by (-score, index)
        ref = sorted(range(len(score)), key=lambda i: (-score[i], i))[:k]
        assert len(group) == k
        assert list(group["rank"]) == list(range(1, k + 1))
        assert group["split"].unique().tolist() == [split[sid]]
        np.testing.assert_array_equal(group[["x", "y"]].to_numpy(), coords[ref])
        np.testing.assert_array_equal(group["score"].to_numpy(), score[ref])
        rest = np.delete(score, ref)
        assert rest.size == 0 or rest.max() <= group["score"].min()


def test_splits_k_and_output_path(run_dir, tmp_path):
    path, attention, _ = run_dir
    out = tmp_path / "elsewhere" / "topk.csv"
    df = select_top_k(path, k=1, splits=("test",), out_path=out)
    assert out.is_file() and not (path / "topk.csv").exists()
    coords, score = attention["s3"]
    assert len(df) == 1 and df["score"].iloc[0] == score.max()
    assert (df[["x", "y"]].to_numpy()[0] == coords[np.argmax(score)]).all()


def test_bad_runs_are_refused(run_dir):
    path, _, _ = run_dir
    with pytest.raises(HistotransferError, match="k must be at least 1"):
        select_top_k(path, k=0)
    with pytest.raises(HistotransferError, match="no slides in split"):
        select_top_k(path, splits=("holdout",))
    (path / "attention" / "s2.h5").unlink()
    with pytest.raises(HistotransferError, match=r"s2\.h5: attention file not found"):
        select_top_k(path)
    with h5py.File(path / "attention" / "s2.h5", "w") as f:
        stamp(f, ATTENTION)
        f["coords"] = np.zeros((3, 2), dtype=np.int64)
        f["score"] = np.array([0.0, np.nan, 1.0])
    with pytest.raises(FormatError, match="NaN"):
        select_top_k(path)
    with pytest.raises(HistotransferError, match=r"splits\.csv: not found"):
        select_top_k(path / "attention")
