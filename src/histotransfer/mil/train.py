"""Train an attention-MIL slide classifier on a folder of feature files and write a run folder.

Training follows the paper: Adam (no weight decay), cross-entropy, one slide per step in a shuffled order,
and the epoch with the best validation AUC (ties: lower validation loss) is kept. A fixed seed gives the same
run on the same CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from .. import __version__
from .._io import remove_stale_temps, write_csv, write_json
from ..errors import HistotransferError
from ..features.feature_file import read_feature_attrs
from .bags import BagSet, encoder_attrs, feature_stats, load_bags, patch_size_level0
from .labels import LabelTable, feature_files, read_labels
from .metrics import METRIC_KEYS, slide_metrics
from .models import DEFAULT_HIDDEN, STD_FLOOR_FRACTION, VARIANTS, AttentionMIL
from .rundir import plot_roc, save_model, write_attention
from .splits import DEFAULT_FRACTIONS, SPLITS, kfold_splits, random_split, read_split_file


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch inside a forked RNG state and turn on deterministic algorithms, restoring both after."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def train_epoch(model: AttentionMIL, bags: list[torch.Tensor], targets: list[torch.Tensor],
                order: np.ndarray, optimizer: torch.optim.Optimizer) -> float:
    """One pass over the slides in ``order``, one optimizer step per slide; returns the mean loss.

    ``bags`` are contiguous float32 (N_i, D) tensors and ``targets`` (1,) int64 tensors, prepared once so
    the loop allocates nothing but the activations."""
    model.train()
    total = 0.0
    for i in order:
        logits, _ = model(bags[i])
        loss = F.cross_entropy(logits, targets[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / max(len(order), 1)


@torch.inference_mode()
def predict(model: AttentionMIL, bags: list[torch.Tensor]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, n_classes) and raw attention scores of each bag, in eval mode."""
    model.eval()
    probs, scores = [], []
    for bag in bags:
        logits, s = model(bag)
        probs.append(torch.softmax(logits[0].double(), 0).numpy())
        scores.append(s.numpy())
    return np.stack(probs) if probs else np.zeros((0, model.n_classes)), scores


def _loss_auc(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
    """Mean cross-entropy and AUC (None with one class) of predicted probabilities."""
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    auc = float(roc_auc_score(labels, probs[:, 1])) if len(np.unique(labels)) == 2 else None
    return float(-np.log(p).mean()), auc


@dataclass
class FitResult:
    state: dict[str, torch.Tensor]
    history: pd.DataFrame
    selected_epoch: int


def fit(model: AttentionMIL, train: tuple[list[torch.Tensor], np.ndarray],
        val: tuple[list[torch.Tensor], np.ndarray], epochs: int, lr: float, seed: int,
        early_stopping: int | None = None, desc: str = "training") -> FitResult:
    """Train ``model`` and keep the epoch with the best validation AUC (ties: lower loss).

    Without validation slides the last epoch is kept; with one validation class, the lowest loss."""
    train_bags, train_labels = train
    val_bags, val_labels = val
    targets = [torch.tensor([int(y)]) for y in train_labels]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    best_key, best_state, best_epoch, since_best = None, None, 0, 0
    rows = []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        t0 = time.perf_counter()
        train_loss = train_epoch(model, train_bags, targets, rng.permutation(len(train_bags)), optimizer)
        val_loss, val_auc = (math.nan, None)
        if len(val_bags):
            val_loss, val_auc = _loss_auc(predict(model, val_bags)[0], val_labels)
        key = (-1.0 if val_auc is None else val_auc, -val_loss) if len(val_bags) else (epoch,)
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_epoch, since_best = key, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        rows.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                     "val_auc": math.nan if val_auc is None else val_auc, "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auc="-" if val_auc is None else f"{val_auc:.3f}")
        if early_stopping and len(val_bags) and since_best >= early_stopping:
            break
    history = pd.DataFrame(rows)
    history["selected"] = history["epoch"] == best_epoch
    return FitResult(best_state, history, best_epoch)


def _check_args(model: str, epochs: int, lr: float, folds: int | None, split_file, early_stopping,
                hidden, dropout) -> None:
    if model not in VARIANTS:
        raise HistotransferError(f"--model {model}: unknown; choose one of {', '.join(VARIANTS)}.")
    if epochs < 1 or not lr > 0:
        raise HistotransferError("--epochs must be >= 1 and --lr > 0.")
    if folds is not None and split_file is not None:
        raise HistotransferError("--folds and --split-file exclude each other; pass one.")
    if early_stopping is not None and early_stopping < 1:
        raise HistotransferError("--early-stopping must be >= 1 epochs (or left out).")
    if hidden is not None and hidden < 1:
        raise HistotransferError("--hidden must be >= 1.")
    if not 0.0 <= dropout < 1.0:
        raise HistotransferError("--dropout must be in [0, 1).")


def _make_splits(table: LabelTable, seed: int, split_file, folds: int | None) -> list[pd.DataFrame]:
    if split_file is not None:
        return [read_split_file(split_file, table.frame)]
    if folds is not None:
        return kfold_splits(table.frame, table.classes, folds, seed)
    return [random_split(table.frame, table.classes, seed)]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Top-level settings on which two run configs differ (versions and the folder's unlabelled or
    unreadable slides aside: they are records, not settings)."""
    keys = (set(old) | set(new)) - {"versions", "ignored_slides", "unreadable_slides"}
    return sorted(k for k in keys if old.get(k) != new.get(k))


def _guard_out_dir(run_dir: Path, config: dict[str, Any]) -> bool:
    """True when ``run_dir`` already holds this finished run; error when it holds another one."""
    path = run_dir / "config.json"
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    diff = _differences(old, config)
    if diff:
        raise HistotransferError(
            f"{run_dir}: holds a run with other settings (differs in: {', '.join(diff)}); choose another --out "
            "or delete that folder."
        )
    return (run_dir / "metrics.json").is_file()


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (so a config compares equal to the one read back from disk)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _split_arrays(bags: BagSet, split: pd.DataFrame, name: str) -> tuple[list[torch.Tensor], np.ndarray]:
    rows = split[split["split"] == name]
    return bags.subset(rows["slide_id"].tolist()).features, rows["label"].to_numpy(dtype=int)


def train_run(run_dir: Path, bags: BagSet, split: pd.DataFrame, config: dict[str, Any]) -> dict[str, Any]:
    """Train one model on ``split`` (slide_id, patient_id, label, split) and write the run folder.

    Returns the metrics per split. A folder that already holds this finished run is left as it is."""
    if _guard_out_dir(run_dir, config):
        tqdm.write(f"{run_dir}: already trained with these settings; kept as it is")
        return json.loads((run_dir / "metrics.json").read_text())
    remove_stale_temps(run_dir)
    (run_dir / "metrics.json").unlink(missing_ok=True)
    write_csv(split, run_dir / "splits.csv")
    write_json(config, run_dir / "config.json")
    mcfg, tcfg = config["model"], config["training"]
    with seeded(config["seed"]):
        model = AttentionMIL(bags.dim, len(config["label_mapping"]), mcfg["name"], mcfg["hidden"], mcfg["dropout"])
        train = _split_arrays(bags, split, "train")
        if mcfg["standardize"]:
            model.set_standardization(*feature_stats(train[0]))
        result = fit(model, train, _split_arrays(bags, split, "val"), tcfg["epochs"], tcfg["lr"],
                     config["seed"], tcfg["early_stopping"], desc=f"training {run_dir.name}")
    model.load_state_dict(result.state)
    classes = sorted(config["label_mapping"], key=config["label_mapping"].get)
    save_model(model, run_dir / "model.pt", classes, result.selected_epoch)
    write_csv(result.history, run_dir / "history.csv")

    return write_run_outputs(run_dir, model, bags, split, config["seed"],
                             f"{mcfg['name']} attention MIL, epoch {result.selected_epoch}")


def write_run_outputs(run_dir: Path, model: AttentionMIL, bags: BagSet, split: pd.DataFrame, seed: int,
                      title: str) -> dict[str, Any]:
    """Predict every slide of ``split`` with the trained ``model`` and write the run's evaluation files:
    ``attention/<slide_id>.h5``, ``predictions.csv``, ``roc.png`` (titled ``title``) and, last, as the mark
    of a finished run, ``metrics.json``. Returns the metrics per split (bootstrap CIs seeded by ``seed``)."""
    ordered = split.sort_values(["split", "slide_id"], key=lambda c: c.map(SPLITS.index) if c.name == "split" else c)
    subset = bags.subset(ordered["slide_id"].tolist())
    probs, scores = predict(model, subset.features)
    for sid, coords, attrs, prob, score in zip(subset.slide_ids, subset.coords, subset.attrs, probs[:, 1], scores):
        write_attention(run_dir / "attention" / f"{sid}.h5", sid, coords, score, prob, patch_size_level0(attrs))
    cols = [c for c in ("slide_id", "patient_id", "split", "label") if c in ordered.columns]
    predictions = ordered[cols].assign(probability=probs[:, 1])
    write_csv(predictions, run_dir / "predictions.csv")
    metrics, curves = {}, {}
    for name in SPLITS:
        part = predictions[predictions["split"] == name]
        metrics[name] = slide_metrics(part["label"], part["probability"], seed=seed)
        curves[name] = (part["label"].to_numpy(), part["probability"].to_numpy(), metrics[name]["auc"])
    plot_roc(curves, run_dir / "roc.png", title)
    write_json(metrics, run_dir / "metrics.json")
    return metrics


def _encoder_of(paths: list[Path]) -> dict[str, Any]:
    """Encoder attrs of the first readable feature file (unreadable ones are reported when loading)."""
    for path in paths:
        try:
            return encoder_attrs(read_feature_attrs(path))
        except (HistotransferError, OSError):
            continue
    raise HistotransferError(f"{paths[0].parent}: none of the labelled slides' feature files can be read.")


def _fold_summary(per_fold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-fold metrics plus their mean and sample sd over folds (None where no fold has a value)."""
    summary: dict[str, Any] = {"folds": per_fold, "mean": {}, "sd": {}}
    for name in SPLITS:
        summary["mean"][name], summary["sd"][name] = {}, {}
        for key in METRIC_KEYS:
            values = [m[name][key] for m in per_fold.values() if m[name][key] is not None]
            summary["mean"][name][key] = float(np.mean(values)) if values else None
            summary["sd"][name][key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return summary


def train_mil(features_dir: str | Path, labels_csv: str | Path, out_dir: str | Path, model: str = "histotransfer",
              epochs: int = 20, lr: float = 1e-3, seed: int = 0, split_file: str | Path | None = None,
              folds: int | None = None, standardize: bool = True, early_stopping: int | None = None,
              hidden: int | None = None, dropout: float = 0.0) -> Path:
    """Train attention MIL on ``features_dir/<slide_id>.h5`` with labels from ``labels_csv``; return the run
    folder ``out_dir`` (with ``folds``: ``out_dir/fold_<k>/`` run folders and a summary ``metrics.json``).

    The split is patient-level stratified 65/15/20 (seeded), the user's ``split_file`` (slide_id,split), or
    ``folds``-fold cross-validation. Bad labels, splits or settings raise HistotransferError before anything
    is written. Re-running with the same settings keeps finished runs (and folds) and redoes the rest.
    """
    _check_args(model, epochs, lr, folds, split_file, early_stopping, hidden, dropout)
    table = read_labels(labels_csv, features_dir)
    files = feature_files(features_dir)
    splits = _make_splits(table, seed, split_file, folds)
    out_dir = Path(out_dir)
    config = _jsonable({
        "features_dir": Path(features_dir).resolve(),
        "encoder": _encoder_of([files[s] for s in table.frame["slide_id"]]),
        "labels": Path(labels_csv).resolve(),
        "label_mapping": table.mapping,
        "positive_class": table.classes[1],
        "model": {"name": model, "hidden": hidden or DEFAULT_HIDDEN, "dropout": dropout,
                  "standardize": standardize, "std_floor_fraction": STD_FLOOR_FRACTION if standardize else None},
        "training": {"epochs": epochs, "lr": lr, "optimizer": "Adam", "weight_decay": 0.0,
                     "loss": "cross_entropy", "steps": "one slide per step, shuffled each epoch",
                     "selection": "best val AUC, ties: lower val loss", "early_stopping": early_stopping},
        "seed": seed,
        "split": ({"method": "file", "file": Path(split_file).resolve()} if split_file is not None else
                  {"method": "k-fold", "folds": folds} if folds is not None else
                  {"method": "random", "fractions": DEFAULT_FRACTIONS}),
        "ignored_slides": table.ignored,
        "unreadable_slides": {},
        "versions": {"histotransfer": __version__, "torch": torch.__version__},
    })
    runs = [out_dir / f"fold_{k}" for k in range(folds)] if folds is not None else [out_dir]
    if folds is not None:
        _guard_out_dir(out_dir, config)
    for k, run_dir in enumerate(runs):
        _guard_out_dir(run_dir, _fold_config(config, k, folds))
    bags, broken = load_bags({s: files[s] for s in table.frame["slide_id"]}, expect_encoder=config["encoder"])
    if broken:
        table.frame = table.frame[~table.frame["slide_id"].isin(broken)].reset_index(drop=True)
        config["unreadable_slides"] = broken
        if split_file is None:
            splits = _make_splits(table, seed, None, folds)
        else:
            splits = [s[~s["slide_id"].isin(broken)].reset_index(drop=True) for s in splits]
            if splits[0].loc[splits[0]["split"] == "train", "label"].nunique() < 2:
                raise HistotransferError(
                    f"{split_file}: without the unreadable slide(s) {', '.join(broken)} the train split holds "
                    "one class; re-extract their features or change the split."
                )
    if folds is None:
        train_run(out_dir, bags, splits[0], config)
        return out_dir
    per_fold = {run_dir.name: train_run(run_dir, bags, split, _fold_config(config, k, folds))
                for k, (run_dir, split) in enumerate(zip(runs, splits))}
    folds_table = pd.concat([s[s["split"] == "test"].assign(fold=k) for k, s in enumerate(splits)])
    write_csv(folds_table.drop(columns="split").sort_values("slide_id"), out_dir / "splits.csv")
    write_json(config, out_dir / "config.json")
    write_json(_fold_summary(per_fold), out_dir / "metrics.json")
    return out_dir


def _fold_config(config: dict[str, Any], k: int, folds: int | None) -> dict[str, Any]:
    if folds is None:
        return config
    return {**config, "split": {**config["split"], "fold": k}}
