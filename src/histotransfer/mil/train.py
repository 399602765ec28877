"""Train an attention-MIL slide classifier on a folder of feature files and write a run folder.

Training follows the paper: Adam (no weight decay), cross-entropy, one slide per step in a shuffled order, and
the epoch with the best validation score kept (``MilSettings.select_by``: AUC by default, accuracy as the paper's
code does, or loss; ties: lower validation loss). A fixed seed gives the same run on the same CPU.

With ``MilSettings.balance = "groups"`` and a group column, each epoch instead draws its slides with replacement,
weighted so that every label x group cell of the training split is drawn equally often on average
(:func:`balance_weights`): the group (e.g. the centre) then tells nothing about the label in what the model sees,
so it must learn the label from the tissue.

With ``MilSettings.annotations`` the positive training slides that have a lesion annotation add
:func:`attention_loss` to their slide loss: their attention learns to single out the lesion
(:mod:`histotransfer.mil.supervision`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from .._io import output_folder, remove_stale_temps, write_csv, write_json
from .._read import read_csv
from .bags import BagSet, feature_stats, load_bags, patch_size_level0
from .metrics import METRIC_KEYS
from .models import AttentionMIL, predict
from .plan import RunPlan, plan_run
from .rundir import DONE_FILE, FitResult, guard, save_model, write_config, write_run_outputs
from .settings import MilSettings
from .shortcut import judge
from .splits import SPLITS
from .supervision import lesion_targets


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


def attention_loss(scores: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of raw attention scores (N,), taken as logits, against float targets (N,): 1 for
    a patch touching the lesion, 0 elsewhere."""
    return F.binary_cross_entropy_with_logits(scores, lesion)


def train_epoch(
    model: AttentionMIL,
    bags: list[torch.Tensor],
    targets: list[torch.Tensor],
    order: np.ndarray,
    optimizer: torch.optim.Optimizer,
    lesions: Sequence[torch.Tensor | None] | None = None,
    attention_weight: float = 1.0,
) -> float:
    """One pass over the slides in ``order``, one optimizer step per slide; returns the mean loss.

    ``bags`` are contiguous float32 (N_i, D) tensors and ``targets`` (1,) int64 tensors, prepared once so
    the loop allocates nothing but the activations. ``lesions`` (one per slide, None for most) are patch targets
    of :func:`attention_loss`, added to that slide's cross-entropy times ``attention_weight``."""
    model.train()
    total = 0.0
    for i in order:
        logits, scores = model(bags[i])
        loss = F.cross_entropy(logits, targets[i])
        lesion = None if lesions is None else lesions[i]
        if lesion is not None:
            loss = loss + attention_weight * attention_loss(scores, lesion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / max(len(order), 1)


def balance_weights(labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray | None:
    """Per-slide weights, summing to the number of slides, under which every label x group cell present has the
    same total weight (each slide: ``n / (cells * cell size)``); None without groups (nothing to balance)."""
    if groups is None:
        return None
    cells = pd.Series(list(zip(np.asarray(labels).tolist(), np.asarray(groups).tolist(), strict=True)))
    sizes = cells.map(cells.value_counts()).to_numpy(dtype=np.float64)
    return len(cells) / (cells.nunique() * sizes)


def epoch_order(n: int, rng: np.random.Generator, weights: np.ndarray | None = None) -> np.ndarray:
    """The slides of one epoch: a permutation of ``range(n)``, or with ``weights`` ``n`` draws with replacement
    in proportion to them."""
    if weights is None:
        return rng.permutation(n)
    return rng.choice(n, size=n, p=weights / weights.sum())


def validation_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Mean cross-entropy, AUC (None with one class) and accuracy (argmax) of predicted probabilities."""
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    auc = float(roc_auc_score(labels, probs[:, 1])) if len(np.unique(labels)) == 2 else None
    return {"loss": float(-np.log(p).mean()), "auc": auc, "accuracy": float((probs.argmax(1) == labels).mean())}


def selection_key(scores: dict[str, float | None], select_by: str) -> tuple[float, ...]:
    """Larger is better: the chosen validation score (a missing AUC ranks lowest), ties broken by lower loss."""
    loss = float(scores["loss"])  # type: ignore[arg-type]
    if select_by == "loss":
        return (-loss,)
    value = scores[select_by]
    return (-1.0 if value is None else float(value), -loss)


def fit(
    model: AttentionMIL,
    train: tuple[list[torch.Tensor], np.ndarray],
    val: tuple[list[torch.Tensor], np.ndarray],
    epochs: int,
    lr: float,
    seed: int,
    early_stopping: int | None = None,
    desc: str = "training",
    select_by: str = "auc",
    weights: np.ndarray | None = None,
    lesions: Sequence[torch.Tensor | None] | None = None,
    attention_weight: float = 1.0,
) -> FitResult:
    """Train ``model`` and keep the epoch with the best validation ``select_by`` score (ties: lower loss).

    ``weights`` (one per training slide, e.g. :func:`balance_weights`) make each epoch draw its slides in
    proportion to them (:func:`epoch_order`). ``lesions`` (one per training slide, None where it has none)
    supervise the attention (:func:`train_epoch`). Without validation slides the last epoch is kept; with one
    validation class, AUC selection falls back to the lowest loss."""
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
        train_loss = train_epoch(
            model, train_bags, targets, epoch_order(len(train_bags), rng, weights), optimizer, lesions, attention_weight
        )
        scores: dict[str, float | None] = {"loss": math.nan, "auc": None, "accuracy": None}
        if len(val_bags):
            scores = validation_scores(predict(model, val_bags)[0], val_labels)
        key = selection_key(scores, select_by) if len(val_bags) else (epoch,)
        if best_key is None or key > best_key:
            best_key, best_epoch, since_best = key, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        rows.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": scores["loss"],
                "val_auc": math.nan if scores["auc"] is None else scores["auc"],
                "val_accuracy": math.nan if scores["accuracy"] is None else scores["accuracy"],
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auc="-" if scores["auc"] is None else f"{scores['auc']:.3f}")
        if early_stopping and len(val_bags) and since_best >= early_stopping:
            break
    history = pd.DataFrame(rows)
    history["selected"] = history["epoch"] == best_epoch
    assert best_state is not None
    return FitResult(best_state, history, best_epoch)


def _split_arrays(bags: BagSet, split: pd.DataFrame, name: str) -> tuple[list[torch.Tensor], np.ndarray]:
    rows = split[split["split"] == name]
    return bags.subset(rows["slide_id"].tolist()).features, rows["label"].to_numpy(dtype=int)


def _training_lesions(
    split: pd.DataFrame, lesions: Mapping[str, np.ndarray] | None
) -> list[torch.Tensor | None] | None:
    """The attention targets of the training slides, in their order (None: no slide has any)."""
    if not lesions:
        return None
    ids = split.loc[split["split"] == "train", "slide_id"]
    return [torch.from_numpy(lesions[s]) if s in lesions else None for s in ids]


def training_weights(split: pd.DataFrame, settings: MilSettings) -> np.ndarray | None:
    """The training slides' sampling weights that ``settings.balance`` asks for (None: a plain shuffle)."""
    if settings.balance != "groups" or settings.group_column is None:
        return None
    rows = split[split["split"] == "train"]
    return balance_weights(rows["label"].to_numpy(dtype=int), rows[settings.group_column].astype(str).to_numpy())


def train_run(
    run_dir: Path,
    bags: BagSet,
    split: pd.DataFrame,
    config: dict[str, Any],
    lesions: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train one model on ``split`` (slide_id, patient_id, label, split) and write the run folder.

    ``lesions`` (slide_id -> patch targets, :func:`~histotransfer.mil.supervision.lesion_targets`) supervise the
    attention of those training slides. Returns the contents of its ``metrics.json``. A folder that already holds
    this finished run is left as it is."""
    import json

    if guard(run_dir, config):
        tqdm.write(f"{run_dir}: already trained with these settings and inputs; kept as it is")
        return json.loads((run_dir / DONE_FILE).read_text())  # what a fresh run returns: its metrics.json
    remove_stale_temps(run_dir)
    (run_dir / DONE_FILE).unlink(missing_ok=True)
    write_csv(split, run_dir / "splits.csv")
    write_config(config, run_dir)
    s = MilSettings.model_validate(config["settings"])
    with seeded(s.seed):
        model = AttentionMIL(bags.dim, len(config["label_mapping"]), s.model, s.hidden, s.dropout)
        train = _split_arrays(bags, split, "train")
        if s.standardize:
            model.set_standardization(*feature_stats(train[0]))
        result = fit(
            model,
            train,
            _split_arrays(bags, split, "val"),
            s.epochs,
            s.lr,
            s.seed,
            s.early_stopping,
            desc=f"training {run_dir.name}",
            select_by=s.select_by or "auc",
            weights=training_weights(split, s),
            lesions=_training_lesions(split, lesions),
            attention_weight=s.attention_weight,
        )
    model.load_state_dict(result.state)
    classes = sorted(config["label_mapping"], key=config["label_mapping"].get)
    save_model(model, run_dir / "model.pt", classes, result.selected_epoch)
    write_csv(result.history, run_dir / "history.csv")
    return write_run_outputs(
        run_dir,
        model,
        bags,
        split,
        s.seed,
        f"{s.model} attention MIL, epoch {result.selected_epoch}",
        config["positive_class"],
        s.group_column,
    )


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def out_of_fold(run_dirs: list[Path]) -> pd.DataFrame:
    """Every slide's prediction by the fold that tested it (each fold's ``predictions.csv``, test rows), with its
    ``fold``, sorted by slide."""
    parts = [
        read_csv(d / "predictions.csv").query("split == 'test'").drop(columns="split").assign(fold=k)
        for k, d in enumerate(run_dirs)
    ]
    return pd.concat(parts, ignore_index=True).sort_values("slide_id", ignore_index=True)


def _fold_summary(
    per_fold: dict[str, dict[str, Any]], oof: pd.DataFrame, seed: int, group_column: str | None, split: dict[str, Any]
) -> dict[str, Any]:
    """Per-fold metrics plus their mean and sample sd over folds (None where no fold has a value), the test AUC
    of each fold, the metrics of the pooled out-of-fold predictions ``oof`` (one prediction per slide, by the
    fold that tested it; per group too with ``group_column``), the mean within-group AUC over folds (with a group
    column) and the shortcut check (every fold checks the same slides) judged on ``oof`` against its AUC."""
    from .metrics import slide_metrics
    from .rundir import group_metrics

    summary: dict[str, Any] = {
        "protocol": {"folds": split["folds"], "why": split.get("why")},
        "folds": per_fold,
        "mean": {},
        "sd": {},
    }
    for name in SPLITS:
        summary["mean"][name], summary["sd"][name] = {}, {}
        for key in METRIC_KEYS:
            values = [m[name][key] for m in per_fold.values() if m[name][key] is not None]
            summary["mean"][name][key] = float(np.mean(values)) if values else None
            summary["sd"][name][key] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    summary["fold_test_auc"] = [m["test"]["auc"] for m in per_fold.values()]
    summary["pooled"] = {"test": slide_metrics(oof["label"], oof["probability"], seed=seed)}
    if group_column is not None:
        summary["pooled"]["groups"] = group_metrics(oof, group_column, seed)
    first = next(iter(per_fold.values()))
    if "groups" in first:
        summary["mean_within_group_auc"] = {
            name: _mean([m["groups"][name]["mean_within_group_auc"] for m in per_fold.values()]) for name in SPLITS
        }
    if "shortcut" in first:
        summary["shortcut"] = judge(first["shortcut"], oof, summary["pooled"]["test"]["auc"], seed)
    return summary


def train_planned(plan: RunPlan) -> Path:
    """Train the runs of a plan (see :func:`histotransfer.mil.plan.plan_run`) and return the run folder."""
    bags, broken = load_bags(plan.files, expect_encoder=plan.config["encoder"])
    if broken:
        plan = plan.without(broken)
    lesions = lesion_targets(
        plan.annotations,
        bags.slide_ids,
        bags.coords,
        [patch_size_level0(a) for a in bags.attrs],
        Path(plan.config["features_dir"]),
    )
    out_dir = output_folder(plan.out_dir)
    if plan.folds is None:
        train_run(out_dir, bags, plan.splits[0], plan.config, lesions)
        return out_dir
    per_fold = {
        run_dir.name: train_run(run_dir, bags, split, plan.fold_config(k), lesions)
        for k, (run_dir, split) in enumerate(zip(plan.run_dirs, plan.splits))
    }
    folds_table = pd.concat([s[s["split"] == "test"].assign(fold=k) for k, s in enumerate(plan.splits)])
    write_csv(folds_table.drop(columns="split").sort_values("slide_id"), out_dir / "splits.csv")
    oof = out_of_fold(plan.run_dirs)
    write_csv(oof, out_dir / "predictions.csv")
    write_config(plan.config, out_dir)
    write_json(
        _fold_summary(per_fold, oof, plan.settings.seed, plan.settings.group_column, plan.config["split"]),
        out_dir / DONE_FILE,
    )
    return out_dir


def train_mil(
    features_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    settings: MilSettings | None = None,
    split_file: str | Path | None = None,
    folds: int | None = None,
    **overrides: Any,
) -> Path:
    """Train attention MIL on ``features_dir/<slide_id>.h5`` with labels from ``labels_csv``; return the run
    folder ``out_dir`` (with ``folds``: ``out_dir/fold_<k>/`` run folders and a summary ``metrics.json``).

    ``settings`` (or keyword overrides such as ``epochs=20, seed=1, recipe="paper"``) say how
    (:class:`MilSettings`). The protocol (``settings.protocol``, see :func:`~histotransfer.mil.plan.choose_protocol`)
    is a patient-level stratified 65/15/20 split (seeded), the user's ``split_file`` (slide_id,split), or
    ``folds``-fold patient-level cross-validation (``auto``, the default: for cohorts under 200 patients; ``folds``
    given: always). With ``annotations`` (a folder of lesion annotations, see :mod:`~histotransfer.mil.supervision`)
    the positive training slides that have one supervise the attention too. Bad labels, splits, settings,
    annotations or feature files raise HistotransferError before anything is written. Re-running with the same
    settings and inputs keeps finished runs (and folds) and redoes the rest; another run in ``out_dir`` is refused.
    """
    plan = plan_run(features_dir, labels_csv, out_dir, MilSettings.build(settings, **overrides), split_file, folds)
    if plan.finished:
        tqdm.write(f"{plan.out_dir}: already trained with these settings and inputs; kept as it is")
        return plan.out_dir
    return train_planned(plan)
