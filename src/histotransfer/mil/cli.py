"""``histotransfer train``, ``evaluate`` and ``heatmap``: thin wrappers over the MIL API."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ..batch import BatchReport
from ..slide import slide_id_of
from .evaluate import evaluate_run
from .heatmap import OBJECT_TYPES, SCALES, VALUES, slide_paths, write_heatmaps
from .models import VARIANTS
from .train import train_mil


def _fmt(m: dict) -> str:
    if m.get("auc") is None:
        return f"AUC n/a (one class), accuracy {m['accuracy']:.3f}, n={m['n_slides']}"
    return (f"AUC {m['auc']:.3f} (95% CI {m['auc_ci_low']:.3f}-{m['auc_ci_high']:.3f}), "
            f"accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}, n={m['n_slides']}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train an attention-MIL slide classifier on a folder of feature files",
        description="Train attention MIL on features/<encoder_id>/<slide_id>.h5 (ours, CLAM's or TRIDENT's) "
                    "with a patient-level split; writes a run folder (model.pt, predictions, metrics, "
                    "attention). Re-running with the same settings keeps a finished run.")
    p.add_argument("--features", required=True, type=Path, help="folder of <slide_id>.h5 feature files")
    p.add_argument("--labels", required=True, type=Path, help="CSV: slide_id,label[,patient_id]")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--model", default="histotransfer", choices=VARIANTS,
                   help="histotransfer: the paper's network; gated: Ilse's gated attention (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="default: %(default)s (the paper's)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the training (default: %(default)s)")
    p.add_argument("--split-file", type=Path, default=None,
                   help="CSV slide_id,split (train/val/test) to use instead of the 65/15/20 patient split")
    p.add_argument("--folds", type=int, default=None,
                   help="patient-level k-fold cross-validation: RUN/fold_<k>/ runs and a summary metrics.json")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="feed raw features (the paper); default z-scores them with train-split statistics")
    p.add_argument("--early-stopping", type=int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs without a better validation AUC")
    p.add_argument("--hidden", type=int, default=None, help="width of the first layer (default: 256)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after the hidden layers (default: 0)")
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "evaluate", help="predict slides with a trained MIL run (metrics when labels are given)",
        description="Apply a run's model to a folder of feature files: predictions.csv, attention/ and, with "
                    "--labels, metrics.json (slide-level AUC with 95%% CI, accuracy, balanced accuracy, F1).")
    p.add_argument("--run", required=True, type=Path, help="run folder written by `histotransfer train`")
    p.add_argument("--features", required=True, type=Path, help="folder of <slide_id>.h5 feature files")
    p.add_argument("--labels", type=Path, default=None, help="CSV slide_id,label[,patient_id] of those slides")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/evaluation)")
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser(
        "heatmap", help="attention heatmaps (PNG) and QuPath GeoJSON of slides",
        description="For each slide: <slide_id>.png (attention over the thumbnail, with a legend strip stating "
                    "the value, the scale and its range) and <slide_id>.geojson (one square per patch in level-0 "
                    "pixels with the attention as measurements; import in QuPath with File > Import objects). "
                    "The attention is the run's (RUN/attention), what `histotransfer evaluate` wrote "
                    "(RUN/evaluation/attention or --attention), or computed from --features.")
    p.add_argument("--run", required=True, type=Path, help="run folder written by `histotransfer train`")
    p.add_argument("--slides", required=True, nargs="+", type=Path, help="slide files or folders of slides")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--attention", type=Path, default=None,
                   help="folder of <slide_id>.h5 attention files written by `histotransfer evaluate --out` "
                        "(default: RUN/attention, then RUN/evaluation/attention)")
    p.add_argument("--features", type=Path, default=None,
                   help="feature folder of slides to run through the model instead (default: stored attention)")
    p.add_argument("--patches", type=Path, default=None,
                   help="folder of <slide_id>.h5 patch files (ours, CLAM's or TRIDENT's) that record the patch "
                        "side when the attention and feature files do not")
    p.add_argument("--patch-size-level0", type=int, default=None,
                   help="patch side in level-0 pixels (default: from the attention, feature or patch file attrs)")
    p.add_argument("--value", default="score", choices=VALUES,
                   help="score: raw pre-softmax attention, the same for the same tissue in any slide; weight: "
                        "softmax weight x number of patches (1 = uniform) (default: %(default)s)")
    p.add_argument("--scale", default="cohort", choices=SCALES,
                   help="cohort: one colour range for all slides of this call, so colours compare across "
                        "slides; slide: each slide's own range (default: %(default)s)")
    p.add_argument("--mpp", type=float, default=None, help="level-0 microns per pixel for slides without it")
    p.add_argument("--max-side", type=int, default=2048, help="thumbnail size (default: %(default)s)")
    p.add_argument("--object-type", default="detection", choices=OBJECT_TYPES,
                   help="QuPath object type of the patch squares (default: %(default)s)")
    p.set_defaults(func=_heatmap)


def _train(args: argparse.Namespace) -> int:
    run = train_mil(args.features, args.labels, args.out, model=args.model, epochs=args.epochs, lr=args.lr,
                    seed=args.seed, split_file=args.split_file, folds=args.folds, standardize=args.standardize,
                    early_stopping=args.early_stopping, hidden=args.hidden, dropout=args.dropout)
    metrics = json.loads((run / "metrics.json").read_text())
    if args.folds is None:
        for name in ("val", "test"):
            print(f"{name:5s} {_fmt(metrics[name])}")
    else:
        for name in ("val", "test"):
            mean, sd = metrics["mean"][name]["auc"], metrics["sd"][name]["auc"]
            shown = "n/a" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")
            print(f"{name:5s} AUC over {args.folds} folds: {shown}")
    print(f"run: {run}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run, args.features, args.labels, args.out)
    print(f"predicted {len(result['predictions'])} slide(s)")
    if result["metrics"] is not None:
        print(_fmt(result["metrics"]))
    print(f"out: {result['out_dir']}")
    return 0


def _heatmap(args: argparse.Namespace) -> int:
    write_heatmaps(args.run, args.slides, args.out, features_dir=args.features, attention_dir=args.attention,
                   patches_dir=args.patches, patch_size_level0=args.patch_size_level0, mpp=args.mpp,
                   max_side=args.max_side, object_type=args.object_type, scale=args.scale, value=args.value)
    ids = {slide_id_of(p) for p in slide_paths(args.slides)}
    rows = [r for r in BatchReport(args.out / "heatmaps.csv").rows.values() if r.slide_id in ids]
    counts = Counter(r.status for r in rows)
    print("heatmaps: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    failed = [r.slide_id for r in rows if r.status == "error"]
    if failed:  # each reason was printed as the slide failed; it is also in heatmaps.csv
        print(f"failed: {', '.join(failed)} (reasons above and in {args.out / 'heatmaps.csv'})")
    print(f"out: {args.out}")
    return 1 if failed else 0
