"""Which lever makes attention MIL learn the lesion rather than the centre? The default and each candidate side by
side on a confounded two-centre cohort of generated demo slides, by patient-level 5-fold cross-validation.

Each seed generates a cohort of two centres that differ in stain (``--stain-shift``) and in prevalence
(``prevalence_shift`` 0.5: about 75% positive slides at the first centre, 25% at the second), with one or two
small lesions per positive slide (``lesion_radius`` 0.03 of the slide's side: a lesion fills at most about a
sixth of a 128 px patch at 20x). Features: ResNet18 (random weights) up to layer2, patches shrunk to 32 px, so
the lesions' large nuclei are a few pixels across and the centre's colour is the easier signal. Every lever is
trained on the same folds (stratified by label and centre) and scored on the out-of-fold predictions:

* ``pooled_auc``: AUC over all slides; ``within_auc``: the mean of the two centres' own AUCs (what the model
  knows beyond the centre); ``top_in_lesion``: the share of positive slides whose top-attended patch overlaps a
  lesion (the generator's lesion masks), beside ``chance``: the share a random patch would give.

Levers (``--levers``):

* ``default``: ``histotransfer train`` as it is (standardised features, epoch by validation AUC).
* ``balance-groups``: ``--balance groups`` (``mil.train.balance_weights``): each epoch draws the training slides
  so that every label x centre cell weighs the same.
* ``loss-weights``: the same cell weights on each slide's loss instead of on the draw.
* ``group-standardize``: features z-scored with their own centre's training statistics.
* ``lesion-attention``: ``histotransfer train --annotations`` (``MilSettings.annotations``): the lesion masks of
  the positive training slides as instance labels, a binary cross-entropy of each patch's attention score against
  whether it touches the lesion, added to the slide's loss at ``--attention-weight`` (default 1); negative slides
  get the slide loss only (what a cohort with lesion annotations allows).

``--cohorts unconfounded`` measures on cohorts with no prevalence difference between the centres instead, on
which a lever must not lower the AUC. This is a measurement, not a test: it prints the numbers, whichever way
they go. ``--work DIR`` keeps the cohorts and features for a re-run (default: a temporary folder).

Run: ``.venv/bin/python benchmarks/bench_lesion_levers.py [--seeds 0 1 2 3 4] [--cohorts unconfounded]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from histotransfer.annotations import load_annotation
from histotransfer.demo_slides import make_demo_slides
from histotransfer.features import extract_features
from histotransfer.mil.bags import feature_stats, load_bags, patch_size_level0
from histotransfer.mil.labels import feature_files
from histotransfer.mil.models import AttentionMIL, predict
from histotransfer.mil.settings import MilSettings
from histotransfer.mil.splits import kfold_splits
from histotransfer.mil.supervision import lesion_targets
from histotransfer.mil.train import balance_weights, fit, seeded, selection_key, validation_scores
from histotransfer.patches import tile_slides

LEVERS = ("default", "balance-groups", "loss-weights", "group-standardize", "lesion-attention")
TILING = {"magnification": 20, "patch_size": 128, "min_region_um2": 2000.0}
FOLDS, EPOCHS, LR = 5, 20, 1e-3
COHORTS = {"confounded": 0.5, "unconfounded": 0.0}  # the demo generator's prevalence_shift


class Cohort:
    """A generated two-centre cohort's bags, labels, centres, each patch's lesion fraction, and the attention
    targets that ``--annotations`` derives from the positive slides' lesion masks."""

    def __init__(
        self,
        root: Path,
        seed: int,
        n: int,
        stain_shift: float,
        prevalence_shift: float,
        lesion_radius: float,
        input_size: int,
    ):
        demo = make_demo_slides(
            root / "demo",
            n_slides=n,
            seed=seed,
            size=2048,
            centres=2,
            stain_shift=stain_shift,
            prevalence_shift=prevalence_shift,
            lesion_radius=lesion_radius,
        )
        run = tile_slides(demo.slides, root / "tiles", **TILING)
        folder = extract_features(
            run.patches, None, "resnet18", "random", 2, input_size=input_size, device="cpu", workers=0
        )
        assert isinstance(folder, Path)
        labels = pd.read_csv(demo.labels_csv).merge(pd.read_csv(demo.centres_csv)[["slide_id", "centre"]])
        files = feature_files(folder)
        bags, _ = load_bags({s: files[s] for s in labels["slide_id"] if s in files})
        self.frame = labels.set_index("slide_id").loc[bags.slide_ids].reset_index()
        self.features = bags.features
        self.y = self.frame["label"].to_numpy(dtype=int)
        self.centre = self.frame["centre"].to_numpy(dtype=str)
        self.overlap = [
            load_annotation(demo.lesion_masks[s]).patch_overlap(c, float(patch_size_level0(a) or 0))
            for s, c, a in zip(bags.slide_ids, bags.coords, bags.attrs, strict=True)
        ]
        self.dim = bags.dim
        positive = self.frame.loc[self.frame["label"] == 1, "slide_id"]
        self.lesion = lesion_targets(
            {s: demo.lesion_masks[s] for s in positive},
            bags.slide_ids,
            bags.coords,
            [patch_size_level0(a) for a in bags.attrs],
            folder,
        )


def fit_weighted(
    model: AttentionMIL,
    bags: list[torch.Tensor],
    y: np.ndarray,
    val: tuple[list[torch.Tensor], np.ndarray],
    seed: int,
    loss_weights: np.ndarray,
) -> None:
    """``mil.train.fit``'s loop (Adam, one slide per step, epoch by validation AUC) with per-slide loss weights;
    loads the kept epoch into ``model``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    targets = [torch.tensor([int(v)]) for v in y]
    best: tuple[tuple[float, ...], dict[str, torch.Tensor]] | None = None
    for _ in range(EPOCHS):
        model.train()
        for i in rng.permutation(len(bags)):
            logits, _ = model(bags[i])
            loss = F.cross_entropy(logits, targets[i]) * float(loss_weights[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        key = selection_key(validation_scores(predict(model, val[0])[0], val[1]), "auc")
        if best is None or key > best[0]:
            best = (key, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert best is not None
    model.load_state_dict(best[1])


def group_standardized(c: Cohort, train: list[int]) -> list[torch.Tensor]:
    """Every bag z-scored with its centre's training-patch statistics (std floored as the model does)."""
    out = list(c.features)
    for centre in np.unique(c.centre):
        mean, std = feature_stats([c.features[i] for i in train if c.centre[i] == centre])
        std = np.maximum(std, 0.3 * np.median(std[std > 0]))
        m, s = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        for i in np.flatnonzero(c.centre == centre):
            out[i] = ((c.features[i] - m) / s).contiguous()
    return out


def train_fold(c: Cohort, lever: str, ids: dict[str, list[int]], seed: int) -> tuple[AttentionMIL, list[torch.Tensor]]:
    """One fold's model trained with ``lever``, and the bags it reads (re-standardised for group-standardize)."""
    train, val = ids["train"], ids["val"]
    bags = group_standardized(c, train) if lever == "group-standardize" else c.features
    cells = balance_weights(c.y[train], c.centre[train])
    with seeded(seed):
        model = AttentionMIL(c.dim, 2)
        if lever != "group-standardize":
            model.set_standardization(*feature_stats([bags[i] for i in train]))
        tr, va = ([bags[i] for i in train], c.y[train]), ([bags[i] for i in val], c.y[val])
        if lever == "loss-weights":
            assert cells is not None
            fit_weighted(model, *tr, va, seed, cells)
        else:
            ids = c.frame["slide_id"]
            lesions = (
                [torch.from_numpy(c.lesion[ids[i]]) if ids[i] in c.lesion else None for i in train]
                if lever == "lesion-attention"
                else None
            )
            result = fit(
                model,
                tr,
                va,
                EPOCHS,
                LR,
                seed,
                desc=lever,
                weights=cells if lever == "balance-groups" else None,
                lesions=lesions,
                attention_weight=MilSettings().attention_weight,
            )
            model.load_state_dict(result.state)
    return model, bags


def cross_validate(c: Cohort, lever: str, seed: int) -> dict[str, float]:
    """Out-of-fold probabilities and top patches of every slide; the scores the module docstring lists."""
    splits = kfold_splits(
        c.frame[["slide_id", "patient_id", "label", "centre"]], ["0", "1"], FOLDS, seed, group_column="centre"
    )
    pos = {s: i for i, s in enumerate(c.frame["slide_id"])}
    prob, hit = np.zeros(len(c.y)), np.zeros(len(c.y), dtype=bool)
    for split in splits:
        ids = {n: [pos[s] for s in split.loc[split["split"] == n, "slide_id"]] for n in ("train", "val", "test")}
        model, bags = train_fold(c, lever, ids, seed)
        probs, scores = predict(model, [bags[i] for i in ids["test"]])
        for j, i in enumerate(ids["test"]):
            prob[i], hit[i] = probs[j, 1], c.overlap[i][int(np.argmax(scores[j]))] > 0
    positive = c.y == 1
    return {
        "pooled_auc": float(roc_auc_score(c.y, prob)),
        "within_auc": float(
            np.mean([roc_auc_score(c.y[c.centre == g], prob[c.centre == g]) for g in np.unique(c.centre)])
        ),
        "top_in_lesion": float(hit[positive].mean()),
        "chance": float(np.mean([(c.overlap[i] > 0).mean() for i in np.flatnonzero(positive)])),
    }


def centre_only_auc(c: Cohort) -> float:
    """The AUC of scoring each slide by its centre alone (the better of the two signs)."""
    auc = roc_auc_score(c.y, c.centre == c.centre[0])
    return float(max(auc, 1 - auc))


def mean_sd(values: pd.Series) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=100, help="slides per cohort")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS))
    parser.add_argument("--stain-shift", type=float, default=0.6, help="strength of the centres' stain difference")
    parser.add_argument("--lesion-radius", type=float, default=0.03, help="a lesion's size, fraction of the slide")
    parser.add_argument("--input-size", type=int, default=32, help="encoder input side")
    parser.add_argument(
        "--cohorts",
        nargs="+",
        choices=list(COHORTS),
        default=["confounded"],
        help="unconfounded: cohorts without a prevalence difference between the centres",
    )
    parser.add_argument("--work", type=Path, help="keep cohorts and features here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        work = args.work or Path(tmp)
        for name in args.cohorts:
            for seed in args.seeds:
                t0 = time.perf_counter()
                c = Cohort(
                    work / f"{name}-seed{seed}",
                    seed,
                    args.slides,
                    args.stain_shift,
                    COHORTS[name],
                    args.lesion_radius,
                    args.input_size,
                )
                print(
                    f"{name} seed {seed}: {len(c.y)} slides, centre-only AUC {centre_only_auc(c):.3f}, "
                    f"cohort ready in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                for lever in args.levers:
                    t0 = time.perf_counter()
                    rows.append(
                        {
                            "cohort": name,
                            "seed": seed,
                            "lever": lever,
                            **cross_validate(c, lever, seed),
                            "seconds": round(time.perf_counter() - t0, 1),
                        }
                    )
                    print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    table = pd.DataFrame(rows)
    columns = ["pooled_auc", "within_auc", "top_in_lesion", "chance"]
    print(f"\nmean ± sd over seeds {' '.join(map(str, args.seeds))} ({FOLDS}-fold out-of-fold predictions):")
    print(table.groupby(["cohort", "lever"], sort=False)[columns].agg(mean_sd).to_string())
    base = table[table["lever"] == "default"].set_index(["cohort", "seed"])[columns[:3]]
    for lever in args.levers[1:] if args.levers[0] == "default" else []:
        gain = table[table["lever"] == lever].set_index(["cohort", "seed"])[columns[:3]] - base
        for name, g in gain.groupby(level="cohort", sort=False):
            print(
                f"{name}: {lever} - default: "
                + ", ".join(f"{k} {g[k].mean():+.3f} (worst seed {g[k].min():+.3f})" for k in columns[:3])
            )


if __name__ == "__main__":
    main()
