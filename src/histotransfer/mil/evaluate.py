"""Apply a trained MIL run to (new) slides: predictions, attention, and metrics when labels are given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .._io import remove_stale_temps, write_csv, write_json
from ..errors import HistotransferError
from .bags import load_bags, patch_size_level0
from .labels import feature_files, read_labels
from .metrics import slide_metrics
from .rundir import load_run_model, read_checkpoint, read_config, write_attention
from .train import predict


def evaluate_run(run_dir: str | Path, features_dir: str | Path, labels_csv: str | Path | None = None,
                 out_dir: str | Path | None = None) -> dict[str, Any]:
    """Predict every slide of ``features_dir`` (or, with ``labels_csv``, every labelled slide) with the run's
    model; write ``predictions.csv``, ``attention/<slide_id>.h5`` and, with labels, ``metrics.json``
    (``{"all": {...}}``, the same keys as a run's) to ``out_dir`` (default ``RUN/evaluation``).

    Returns ``{"out_dir": Path, "predictions": DataFrame, "metrics": dict | None}``. Features must come from
    the encoder the run was trained on.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    classes = read_checkpoint(run_dir)["classes"]
    model = load_run_model(run_dir)
    files = feature_files(features_dir)
    if labels_csv is not None:
        frame = read_labels(labels_csv, features_dir, classes=classes).frame
        files = {s: files[s] for s in frame["slide_id"]}
    bags, broken = load_bags(files, expect_dim=model.in_dim, expect_encoder=config["encoder"])
    if not bags.slide_ids:
        raise HistotransferError(f"{features_dir}: none of the feature files could be read; see the warnings.")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    remove_stale_temps(out_dir)
    probs, scores = predict(model, bags.features)
    for sid, coords, attrs, prob, score in zip(bags.slide_ids, bags.coords, bags.attrs, probs[:, 1], scores):
        write_attention(out_dir / "attention" / f"{sid}.h5", sid, coords, score, prob, patch_size_level0(attrs))
    predictions = pd.DataFrame({"slide_id": bags.slide_ids, "probability": probs[:, 1]})
    metrics = None
    if labels_csv is not None:
        predictions = frame[["slide_id", "patient_id", "label"]].merge(predictions, on="slide_id")
        metrics = {"all": slide_metrics(predictions["label"], predictions["probability"], seed=config["seed"])}
        write_json(metrics, out_dir / "metrics.json")
    predictions["predicted"] = [classes[int(p > 0.5)] for p in predictions["probability"]]
    write_csv(predictions, out_dir / "predictions.csv")
    if broken:
        write_csv(pd.DataFrame({"slide_id": list(broken), "message": list(broken.values())}),
                  out_dir / "unreadable.csv")
    return {"out_dir": out_dir, "predictions": predictions,
            "metrics": None if metrics is None else metrics["all"]}
