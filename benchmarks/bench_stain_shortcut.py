"""Does stain normalisation keep a MIL model from reading the centre? Raw, Reinhard and Macenko side by side,
each estimating the source stain per slide and per patch, at two strengths of the centres' stain difference.

A two-centre cohort of generated demo slides where the centre gives the label away: every positive patient is
stained at the first centre and every negative one at the second (``prevalence_shift=1``, haematoxylin and
eosin scaled by ``1 -/+ stain_shift``), lesions planted in the positives. A MIL model is trained on it with
each stain normalisation, then evaluated on a second cohort from the same two centres in which both centres
hold both classes (``prevalence_shift=0``). On that cohort a model that learned the centre's colour ranks
slides well across centres only by chance and not at all within a centre; one that learned the lesions ranks
them within each centre too. Printed per strength, seed and normalisation: the training run's shortcut check
(colour-only AUC of its slides), the evaluation AUC and its mean within-centre AUC; then the means over seeds,
each normalisation's per-slide and per-patch scope side by side (``--scope`` runs one).

The stain reference is the training cohort's average tissue: each training slide's patch most covered by
tissue, fitted as one set (a single patch would bring its own mix of tissue, lesion and glass into the target).
Patches go to the encoder at their tiled size (128 px): per patch, a patch is normalised only when it holds at
least 500 stained pixels (``histotransfer.stain``), which the pale demo stroma reaches at that size but mostly not
when shrunk to 32 px. ``--stain-shift 0.6`` leaves each centre 0.4 of one stain (a fourfold difference between
the centres); 0.3 is the demo slides' default. This is a measurement, not a test: it prints the numbers,
whichever way they go.

At 128 px a model on raw features still ranks each centre's slides perfectly: the lesions are plain enough to
read beside the centre's colour. ``--input-size 32 --stain-shift 0.6 --scope slide`` is the setting where they
are not: shrunk to 32 px the lesions' large nuclei are a few pixels across, the raw model leans on the centre's
colour and ranks slides within a centre below 1, and per-slide normalisation (whose source estimate pools many
patches of the slide, so it runs at 32 px too) shows whether it gives the within-centre ranking back.

Run: ``.venv/bin/python benchmarks/bench_stain_shortcut.py [--slides 24 --seeds 0 1 2 --stain-shift 0.6 0.3]``;
``... --input-size 32 --stain-shift 0.6 --scope slide`` for the within-centre setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histotransfer.demo_slides import make_demo_slides
from histotransfer.features import extract_features
from histotransfer.mil import evaluate_run, train_mil
from histotransfer.patches import tile_slides
from histotransfer.stain import write_reference_patches

METHODS = ("none", "reinhard", "macenko")
SCOPES = ("slide", "patch")
TILING = {"magnification": 40, "patch_size": 128, "min_region_um2": 2000.0}


def cohort(
    folder: Path, n: int, seed: int, stain_shift: float, prevalence_shift: float, prefix: str
) -> tuple[Path, Path]:
    """Demo slides of two centres (ids prefixed, so two cohorts never share a slide id), tiled; returns the
    patch folder and labels.csv with the centre column."""
    demo = make_demo_slides(
        folder / "demo",
        n_slides=n,
        seed=seed,
        size=1024,
        centres=2,
        stain_shift=stain_shift,
        prevalence_shift=prevalence_shift,
    )
    (folder / "slides").mkdir(parents=True, exist_ok=True)
    slides = []
    for path in demo.slides:
        slides.append(folder / "slides" / f"{prefix}{path.name}")
        slides[-1].unlink(missing_ok=True)
        slides[-1].symlink_to(path)
    run = tile_slides(slides, folder / "tiles", **TILING)
    labels = pd.read_csv(demo.labels_csv).merge(pd.read_csv(demo.centres_csv)[["slide_id", "centre"]])
    labels["slide_id"] = prefix + labels["slide_id"]
    labels["patient_id"] = prefix + labels["patient_id"]
    tiled = {r.slide_id for r in run.results if r.status in ("ok", "skipped")}
    labels = labels[labels["slide_id"].isin(tiled)]
    labels.to_csv(folder / "labels.csv", index=False)
    return run.patches, folder / "labels.csv"


def one_seed(root: Path, seed: int, shift: float, args: argparse.Namespace) -> list[dict]:
    train_patches, train_labels = cohort(root / "train", args.slides, seed, shift, 1.0, "train_")
    test_patches, test_labels = cohort(root / "test", args.slides, seed + 1000, shift, 0.0, "test_")
    ref = write_reference_patches(train_patches, root / "reference")
    rows = []
    for method, scope in [("none", "-")] + [(m, s) for m in METHODS[1:] for s in args.scope]:
        stain = {} if method == "none" else {"stain_norm": method, "stain_ref": str(ref), "stain_scope": scope}
        common = {"input_size": args.input_size, "device": "cpu", "workers": 0, **stain}
        name = method if method == "none" else f"{method}-{scope}"
        t0 = time.perf_counter()
        train_features = extract_features(train_patches, root / "train", "resnet18", "random", 2, **common)
        test_features = extract_features(test_patches, root / "test", "resnet18", "random", 2, **common)
        run = train_mil(
            train_features, train_labels, root / f"run-{name}", epochs=args.epochs, seed=seed, group_column="centre"
        )
        result = evaluate_run(run, test_features, test_labels, root / f"eval-{name}", group_column="centre")
        shortcut = json.loads((run / "metrics.json").read_text())["shortcut"]
        rows.append(
            {
                "shift": shift,
                "seed": seed,
                "stain": method,
                "scope": scope,
                "train_colour_auc": shortcut["colour_auc"],
                "eval_auc": result["metrics"]["auc"],
                "eval_within_centre_auc": result["groups"]["mean_within_group_auc"],
                "eval_colour_auc": result["shortcut"]["colour_auc"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=24, help="slides per cohort")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--stain-shift",
        type=float,
        nargs="+",
        default=[0.6, 0.3],
        help="strengths of the centres' stain difference, each measured in turn",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=128,
        help="encoder input side (32 with --scope slide: raw features lose the lesions' detail)",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--scope",
        nargs="+",
        choices=SCOPES,
        default=list(SCOPES),
        help="where the normalisations estimate the source stain (default: both)",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stain-") as tmp:
        for shift in args.stain_shift:
            for seed in args.seeds:
                rows += one_seed(Path(tmp) / f"shift{shift}-seed{seed}", seed, shift, args)
    table = pd.DataFrame(rows)
    print("\nmeans over seeds " + " ".join(map(str, args.seeds)) + ":")
    columns = ["train_colour_auc", "eval_auc", "eval_within_centre_auc"]
    print(table.groupby(["shift", "stain", "scope"], sort=False)[columns].mean().round(3).to_string())
    means = table.groupby(["shift", "stain", "scope"])[["eval_auc", "eval_within_centre_auc"]].mean()
    for shift in args.stain_shift:
        raw = means.loc[(shift, "none", "-")]
        for method in METHODS[1:]:
            for scope in args.scope:
                gain = means.loc[(shift, method, scope)] - raw
                print(
                    f"stain shift {shift}: {method} per {scope} - none: evaluation AUC {gain['eval_auc']:+.3f}, "
                    f"within-centre AUC {gain['eval_within_centre_auc']:+.3f}"
                )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
