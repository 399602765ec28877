"""Does stain normalisation keep a MIL model from reading the centre? Raw, Reinhard and Macenko side by side.

A two-centre cohort of generated demo slides where the centre gives the label away: every positive patient is
stained at the first centre and every negative one at the second (``prevalence_shift=1``, haematoxylin and
eosin shifted by ``--stain-shift``), lesions planted in the positives. A MIL model is trained on it with each
stain normalisation (the same reference patch), then evaluated on a second cohort from the same two centres
in which both centres hold both classes (``prevalence_shift=0``). On that cohort a model that learned the
centre's colour ranks slides well across centres only by chance and not at all within a centre; one that
learned the lesions ranks them within each centre too. Printed per seed and normalisation: the training run's
shortcut check (colour-only AUC of its slides), the evaluation AUC and its mean within-centre AUC; then the
means over seeds.

Patches go to the encoder at their tiled size (128 px): a patch is normalised only when it holds at least 500
stained pixels (``features.stain``), which the pale demo stroma reaches at that size but mostly not when shrunk
to 32 px. This is a measurement, not a test: it prints the numbers, whichever way they go.

Run: ``.venv/bin/python benchmarks/bench_stain_shortcut.py [--slides 24 --seeds 0 1 2 --input-size 128]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from histotransfer.demo_slides import make_demo_slides
from histotransfer.features import extract_features
from histotransfer.mil import evaluate_run, train_mil
from histotransfer.patches import read_patch_file, tile_slides
from histotransfer.slide import open_slide

METHODS = ("none", "reinhard", "macenko")
TILING = {"magnification": 40, "patch_size": 128, "min_region_um2": 2000.0}


def cohort(folder: Path, n: int, seed: int, stain_shift: float, prevalence_shift: float,
           prefix: str) -> tuple[Path, Path]:
    """Demo slides of two centres (ids prefixed, so two cohorts never share a slide id), tiled; returns the
    patch folder and labels.csv with the centre column."""
    demo = make_demo_slides(folder / "demo", n_slides=n, seed=seed, size=1024, centres=2,
                            stain_shift=stain_shift, prevalence_shift=prevalence_shift)
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


def reference_patch(patches: Path, out: Path) -> Path:
    """The middle patch of the first slide of a cohort, as the stain reference image."""
    first = read_patch_file(sorted(patches.glob("*.h5"))[0])
    x, y = first.coords[len(first.coords) // 2]
    with open_slide(first.spec.slide_path) as slide:
        rgb = slide.read_region((int(x), int(y)), 0, (256, 256))
    cv2.imwrite(str(out), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return out


def one_seed(root: Path, seed: int, args: argparse.Namespace) -> list[dict]:
    train_patches, train_labels = cohort(root / "train", args.slides, seed, args.stain_shift, 1.0, "train_")
    test_patches, test_labels = cohort(root / "test", args.slides, seed + 1000, args.stain_shift, 0.0, "test_")
    ref = reference_patch(train_patches, root / "reference.png")
    rows = []
    for method in METHODS:
        stain = {} if method == "none" else {"stain_norm": method, "stain_ref": str(ref)}
        common = {"input_size": args.input_size, "device": "cpu", "workers": 0, **stain}
        t0 = time.perf_counter()
        train_features = extract_features(train_patches, root / "train", "resnet18", "random", 2, **common)
        test_features = extract_features(test_patches, root / "test", "resnet18", "random", 2, **common)
        run = train_mil(train_features, train_labels, root / f"run-{method}", epochs=args.epochs, seed=seed,
                        group_column="centre")
        result = evaluate_run(run, test_features, test_labels, root / f"eval-{method}", group_column="centre")
        shortcut = json.loads((run / "metrics.json").read_text())["shortcut"]
        rows.append({"seed": seed, "stain": method, "train_colour_auc": shortcut["colour_auc"],
                     "eval_auc": result["metrics"]["auc"],
                     "eval_within_centre_auc": result["groups"]["mean_within_group_auc"],
                     "eval_colour_auc": result["shortcut"]["colour_auc"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=24, help="slides per cohort")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stain-shift", type=float, default=0.6)
    parser.add_argument("--input-size", type=int, default=128, help="encoder input side")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stain-") as tmp:
        for seed in args.seeds:
            rows += one_seed(Path(tmp) / f"seed{seed}", seed, args)
    table = pd.DataFrame(rows)
    print("\nmeans over seeds " + " ".join(map(str, args.seeds)) + ":")
    print(table.groupby("stain", sort=False)[["train_colour_auc", "eval_auc", "eval_within_centre_auc"]]
          .mean().round(3).to_string())
    means = table.groupby("stain")["eval_within_centre_auc"].mean()
    for method in METHODS[1:]:
        print(f"within-centre AUC, {method} - none: {means[method] - means['none']:+.3f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
