"""``histotransfer train``, ``evaluate`` and ``heatmap``: thin wrappers over the MIL API."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from ..settings import add_options, from_args
from .settings import SMALL_SPLIT, HeatmapSettings, MilSettings


def _fmt(m: dict) -> str:
    n = m["n_slides"]
    if n == 0:
        return "no slides in this split"
    small = f" (only {n} slide{'' if n == 1 else 's'}: too few for a stable AUC)" if n < SMALL_SPLIT else ""
    if m.get("auc") is None:
        return f"AUC n/a (one class), accuracy {m['accuracy']:.3f}, n={n}{small}"
    return (
        f"AUC {m['auc']:.3f} (95% CI {m['auc_ci_low']:.3f}-{m['auc_ci_high']:.3f}), "
        f"accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}, n={n}{small}"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an attention-MIL slide classifier on a folder of feature files",
        description="Train attention MIL on features/<encoder_id>/<slide_id>.h5 (ours, CLAM's or TRIDENT's) "
        "with a patient-level split, or with patient-level K-fold cross-validation (RUN/fold_<k>/ runs, "
        "out-of-fold predictions and a summary metrics.json; the default below 200 patients, see "
        "--protocol); writes a run folder (config.json, model.pt, predictions, metrics, attention). "
        "Re-running with the same settings and inputs keeps a finished run.",
    )
    p.add_argument("--features", required=True, type=Path, help="folder of <slide_id>.h5 feature files")
    p.add_argument(
        "--labels",
        required=True,
        type=Path,
        help="CSV: slide_id,label[,patient_id,...] (further columns such as centre are kept)",
    )
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    add_options(p, MilSettings)
    p.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="CSV slide_id,split (train/val/test) to use instead of the 65/15/20 patient split",
    )
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "evaluate",
        help="predict slides with a trained MIL run (metrics when labels are given)",
        description="Apply a run's model to a folder of feature files: predictions.csv, attention/, "
        "evaluation.json and, with --labels, metrics.json (slide-level AUC with 95% CI, accuracy, "
        "balanced accuracy, F1).",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder written by `histotransfer train`")
    p.add_argument("--features", required=True, type=Path, help="folder of <slide_id>.h5 feature files")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="CSV slide_id,label[,patient_id,...] of those slides (further columns are kept in predictions.csv)",
    )
    p.add_argument(
        "--group-column",
        default=None,
        metavar="COLUMN",
        help="a column of --labels (e.g. centre): metrics per group and the mean within-group AUC",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/evaluation)")
    _annotation_options(
        p,
        "score the attention of each positive slide that has one (needs --labels): "
        "localisation.csv and the localisation key of metrics.json",
    )
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser(
        "heatmap",
        help="attention heatmaps (PNG) and QuPath GeoJSON of slides",
        description="For each slide: <slide_id>.png (attention over the thumbnail, with a legend strip stating "
        "the value, the scale and its range) and <slide_id>.geojson (one square per patch in level-0 "
        "pixels with the attention as measurements; import in QuPath with File > Import objects). "
        "The attention is the run's (RUN/attention), what `histotransfer evaluate` wrote "
        "(RUN/evaluation/attention or --attention), or computed from --features.",
    )
    p.add_argument("--run", required=True, type=Path, help="run folder written by `histotransfer train`")
    p.add_argument("--slides", required=True, nargs="+", type=Path, help="slide files or folders of slides")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--attention",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of <slide_id>.h5 attention files written by `histotransfer evaluate --out` "
        "(default: RUN/attention, then RUN/evaluation/attention)",
    )
    p.add_argument(
        "--features",
        type=Path,
        default=None,
        help="feature folder of slides to run through the model instead (default: stored attention)",
    )
    p.add_argument(
        "--patches",
        type=Path,
        default=None,
        help="folder of <slide_id>.h5 patch files (ours, CLAM's or TRIDENT's) that record the patch "
        "side when the attention and feature files do not",
    )
    p.add_argument(
        "--value",
        default="score",
        choices=("score", "weight"),
        help="score: raw pre-softmax attention, the same for the same tissue in any slide; weight: "
        "softmax weight x number of patches (1 = uniform) (default: %(default)s)",
    )
    p.add_argument(
        "--scale",
        default="cohort",
        choices=("cohort", "slide"),
        help="cohort: one colour range for all slides of this call, so colours compare across "
        "slides; slide: each slide's own range (default: %(default)s)",
    )
    p.add_argument(
        "--object-type",
        default="detection",
        choices=("detection", "annotation"),
        help="QuPath object type of the patch squares (default: %(default)s)",
    )
    add_options(p, HeatmapSettings)
    _annotation_options(
        p,
        "outline each annotated slide's lesion and score the attention of the positive ones "
        "(by the run's split; slides it never saw: an annotation holding a lesion) in the "
        "legend and localisation.csv",
    )
    p.set_defaults(func=_heatmap)


def _annotation_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--annotations",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of lesion annotations, <slide_id>.geojson (QuPath, level-0 pixels) or a "
        f'<slide_id>.png mask with <slide_id>.png.json holding {{"downsample": D}}: {what}',
    )
    p.add_argument(
        "--lesion-threshold",
        type=float,
        default=0.5,
        metavar="X",
        help="lesion fraction of a patch's area that makes it a lesion patch (default: %(default)s)",
    )


def _train(args: argparse.Namespace) -> int:
    from .plan import plan_run
    from .shortcut import describe_shortcut

    t0 = time.perf_counter()
    plan = plan_run(args.features, args.labels, args.out, from_args(MilSettings, args), args.split_file)
    print(f"positive class: {plan.config['positive_class']!r} (AUC and probabilities are of this class)")
    kept = plan.finished
    if kept:
        print(f"{plan.out_dir}: already trained with these settings and inputs; kept as it is")
    else:
        from .train import train_planned

        train_planned(plan)
    metrics = json.loads((plan.out_dir / "metrics.json").read_text())
    column = plan.settings.group_column
    if plan.folds is None:
        split = plan.config["split"]
        print(f"protocol: one train/val/test split ({split.get('why') or 'split ' + split['method']})")
        for name in ("val", "test"):
            print(f"{name:5s} {_fmt(metrics[name])}")
        within = {name: g["mean_within_group_auc"] for name, g in (metrics.get("groups") or {}).items()}
        if within:
            print(f"mean within-{column} AUC: " + ", ".join(f"{n} {_auc(within.get(n))}" for n in ("val", "test")))
    else:
        _print_cv(metrics, column)
    if metrics.get("shortcut"):
        print(f"shortcut check: {describe_shortcut(metrics['shortcut'])}")
    print(
        f"train: {'kept (done before)' if kept else 'done'} in {time.perf_counter() - t0:.1f} s; run in {plan.out_dir}"
    )
    return 0


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _mean_sd(mean: float | None, sd: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")


def _print_cv(metrics: dict, column: str | None) -> None:
    """A cross-validation's summary: each fold's test AUC, their mean ± sd, the pooled out-of-fold AUC and, with a
    group column, the within-group AUC beside it."""
    protocol = metrics["protocol"]
    print(f"protocol: {protocol['folds']}-fold patient-level cross-validation ({protocol['why']})")
    print("test AUC per fold: " + ", ".join(_auc(a) for a in metrics["fold_test_auc"]))
    for name in ("val", "test"):
        print(
            f"{name:5s} AUC over {protocol['folds']} folds: mean ± sd "
            f"{_mean_sd(metrics['mean'][name]['auc'], metrics['sd'][name]['auc'])}"
        )
    print(f"test  pooled out-of-fold: {_fmt(metrics['pooled']['test'])}")
    if column is not None and "groups" in metrics["pooled"]:
        within = metrics["pooled"]["groups"]["mean_within_group_auc"]
        over = (metrics.get("mean_within_group_auc") or {}).get("test")
        print(
            f"mean within-{column} test AUC: pooled out-of-fold {_auc(within)} (pooled over {column}s "
            f"{_auc(metrics['pooled']['test']['auc'])}), mean over folds {_auc(over)}"
        )


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import describe_localisation, evaluate_run
    from .shortcut import describe_shortcut

    t0 = time.perf_counter()
    result = evaluate_run(
        args.run,
        args.features,
        args.labels,
        args.out,
        annotations_dir=args.annotations,
        threshold=args.lesion_threshold,
        group_column=args.group_column,
    )
    print(f"predicted {len(result['predictions'])} slide(s); positive class {result['positive_class']!r}")
    if result["metrics"] is not None:
        print(_fmt(result["metrics"]))
    if result["groups"] is not None:
        print(
            f"mean within-{args.group_column} AUC {_auc(result['groups']['mean_within_group_auc'])} "
            f"({result['groups']['groups_with_auc']} group(s) with both classes)"
        )
    if result["shortcut"] is not None:
        print(f"shortcut check: {describe_shortcut(result['shortcut'])}")
    if result["localisation"] is not None:
        print(f"attention localisation: {describe_localisation(result['localisation'])}")
    print(f"evaluate: done in {time.perf_counter() - t0:.1f} s; outputs in {result['out_dir']}")
    return 0


def _print_heatmap_localisation(path: Path, n_slides: int) -> None:
    """One line per slide whose attention localisation was scored, after how many were scored."""

    from .._read import read_csv
    from .evaluate import describe_slide_localisation

    table = read_csv(path)
    print(
        f"attention localisation: scored {len(table)} of {n_slides} slide(s) (the others: no annotation, or "
        f"not positive); {path}"
    )
    for row in table.to_dict("records"):
        print(f"  {row['slide_id']}: lesion: {describe_slide_localisation(row)}")


def _heatmap(args: argparse.Namespace) -> int:
    from ..batch import BatchReport
    from ..slide import list_slides
    from .heatmap import write_heatmaps

    t0 = time.perf_counter()
    sizes = from_args(HeatmapSettings, args)
    write_heatmaps(
        args.run,
        args.slides,
        args.out,
        features_dir=args.features,
        attention_dir=args.attention,
        patches_dir=args.patches,
        patch_size_level0=sizes.patch_size_level0,
        mpp=sizes.mpp,
        max_side=sizes.max_side,
        object_type=args.object_type,
        scale=args.scale,
        value=args.value,
        annotations_dir=args.annotations,
        threshold=args.lesion_threshold,
    )
    ids = {e.slide_id for e in list_slides(args.slides)}
    rows = [r for r in BatchReport(args.out / "heatmaps.csv").rows.values() if r.slide_id in ids]
    counts = Counter(r.status for r in rows)
    print("heatmaps: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if args.annotations is not None:
        _print_heatmap_localisation(args.out / "localisation.csv", len(rows))
    failed = [r.slide_id for r in rows if r.status == "error"]
    if failed:  # each reason was printed as the slide failed; it is also in heatmaps.csv
        print(f"failed: {', '.join(failed)} (reasons above and in {args.out / 'heatmaps.csv'})")
    print(f"heatmap: finished in {time.perf_counter() - t0:.1f} s; outputs in {args.out}")
    return 1 if failed else 0
