"""Apply a trained MIL run to (new) slides: predictions, attention, and metrics when labels are given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._io import file_sha256, output_folder, remove_stale_temps, write_csv, write_json
from ..errors import HistotransferError
from .bags import load_bags, patch_size_level0
from .labels import feature_files, read_labels
from .metrics import slide_metrics
from .models import predict
from .rundir import check_inputs, load_run_model, read_checkpoint, read_config, write_attention


def evaluate_run(run_dir: str | Path, features_dir: str | Path, labels_csv: str | Path | None = None,
                 out_dir: str | Path | None = None) -> dict[str, Any]:
    """Predict every slide of ``features_dir`` (or, with ``labels_csv``, every labelled slide) with the run's
    model; write ``predictions.csv``, ``attention/<slide_id>.h5``, ``evaluation.json`` (what was evaluated,
    with the fingerprints of its inputs) and, with labels, ``metrics.json`` (``{"all": {...},
    "positive_class"}``) to ``out_dir`` (default ``RUN/evaluation``).

    Features must come from the encoder the run was trained on, made with the same settings. Slides the run was
    trained on must have the very feature files it saw (else ProvenanceError). Every input is read and checked
    before anything is written. Returns ``{"out_dir", "predictions", "metrics", "positive_class"}``.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    if out_dir.exists() and not out_dir.is_dir():
        raise HistotransferError(f"--out {out_dir}: is an existing file, not a folder; choose a folder.")
    config = read_config(run_dir)
    classes = read_checkpoint(run_dir)["classes"]
    model = load_run_model(run_dir)
    files = feature_files(features_dir)
    frame = None
    if labels_csv is not None:
        frame = read_labels(labels_csv, features_dir, classes=classes).frame
        files = {s: files[s] for s in frame["slide_id"]}
    bags, broken = load_bags(files, expect_dim=model.in_dim, expect_encoder=config["encoder"])
    if not bags.slide_ids:
        raise HistotransferError(f"{features_dir}: none of the feature files could be read; see the warnings.")
    check_inputs(config, dict(zip(bags.slide_ids, bags.fingerprints)), features_dir)
    probs, scores = predict(model, bags.features)
    if not np.isfinite(probs).all():
        bad = bags.slide_ids[int(np.argmax(~np.isfinite(probs).all(axis=1)))]
        raise HistotransferError(f"{run_dir}: the model gives no finite probability for slide {bad}; re-train it.")
    out_dir = output_folder(out_dir)
    remove_stale_temps(out_dir)
    for sid, coords, attrs, prob, score in zip(bags.slide_ids, bags.coords, bags.attrs, probs[:, 1], scores):
        write_attention(out_dir / "attention" / f"{sid}.h5", sid, coords, score, prob, patch_size_level0(attrs),
                        attrs)
    predictions = pd.DataFrame({"slide_id": bags.slide_ids, "probability": probs[:, 1]})
    metrics = None
    positive = config["positive_class"]
    if frame is not None:
        predictions = frame[["slide_id", "patient_id", "label"]].merge(predictions, on="slide_id")
        metrics = {"all": slide_metrics(predictions["label"], predictions["probability"], seed=config["seed"]),
                   "positive_class": positive}
        write_json(metrics, out_dir / "metrics.json")
    predictions["predicted"] = [classes[int(p > 0.5)] for p in predictions["probability"]]
    write_csv(predictions, out_dir / "predictions.csv")
    if broken:
        write_csv(pd.DataFrame({"slide_id": list(broken), "message": list(broken.values())}),
                  out_dir / "unreadable.csv")
    write_json({"run": str(run_dir.resolve()), "features_dir": str(Path(features_dir).resolve()),
                "labels": None if labels_csv is None else str(Path(labels_csv).resolve()),
                "labels_sha256": None if labels_csv is None else file_sha256(labels_csv),
                "features": dict(zip(bags.slide_ids, bags.fingerprints)), "positive_class": positive},
               out_dir / "evaluation.json")
    return {"out_dir": out_dir, "predictions": predictions, "positive_class": positive,
            "metrics": None if metrics is None else metrics["all"]}
