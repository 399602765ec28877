"""``histotransfer demo``: the whole pipeline on generated demo slides, end to end.

Generates a small seeded set of synthetic pyramidal TIFF slides (half of them carry lesions, whose true masks serve
as annotations), then runs every stage on them (tiling, feature extraction, attention MIL and how well its attention
finds the lesions, heatmaps, Grad-CAM inside the attended patches of a positive test slide, top-k fine-tuning, CKA),
printing what each stage did and where its results are. Everything runs offline on the CPU in a few minutes, so the
encoder is a seeded random-init ResNet18 truncated by two stages at 64 px input: the numbers show the pipeline
works, not which encoder is best (``histotransfer study`` answers that on real slides).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from .settings import Seed, StageSettings, add_options, from_args

if TYPE_CHECKING:
    import pandas as pd

ENCODER, TRUNCATE, INPUT_SIZE, PATCH_SIZE = "resnet18", 2, 64, 256
CAM_TOP_K = 8
# Half the slides carry lesions, and a patient-level train/val/test split needs three patients of each class.
MIN_SLIDES = 6


class DemoSettings(StageSettings):
    """What the demo generates: how many slides, from which seed."""

    stage: ClassVar[str] = "demo"

    n_slides: int = Field(
        16,
        ge=MIN_SLIDES,
        le=1000,
        description=f"number of demo slides, half with lesions (at least {MIN_SLIDES}: a "
        "patient-level train/val/test split needs three patients of each class)",
    )
    seed: Seed = Field(0, description="seed of the demo slides and weights")


class _Stage:
    """Prints a stage's title, then its duration and output folder."""

    def __init__(self, title: str, where: Path):
        self.title, self.where = title, where

    def __enter__(self) -> None:
        print(f"\n== {self.title}", flush=True)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            print(f"   {time.perf_counter() - self.t0:.1f} s -> {self.where}", flush=True)


def _cam_slide(split: pd.DataFrame) -> str:
    """The first positive test slide of a run's split (a positive slide of any split if the test has none)."""
    positives = split[split["label"] == 1].sort_values("slide_id")
    test = positives[positives["split"] == "test"]
    return str((test if len(test) else positives)["slide_id"].iloc[0])


def _auc(metrics: dict, split: str) -> str:
    m = metrics.get(split) or {}
    return "n/a" if m.get("auc") is None else f"{m['auc']:.3f} (n={m['n_slides']})"


def _cv_summary(metrics: dict) -> str:
    """A cross-validation's test AUCs in one line (one split's validation and test AUC for a run of one split)."""
    if "pooled" not in metrics:
        return f"validation AUC {_auc(metrics, 'val')}, test AUC {_auc(metrics, 'test')}"
    mean, sd = metrics["mean"]["test"]["auc"], metrics["sd"]["test"]["auc"]
    folds = ", ".join("n/a" if a is None else f"{a:.3f}" for a in metrics["fold_test_auc"])
    over = "n/a" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")
    return (
        f"{metrics['protocol']['folds']} folds ({metrics['protocol']['why']}), test AUC per fold {folds}; mean ± "
        f"sd {over}; pooled out of fold {_auc(metrics['pooled'], 'test')}"
    )


def run_demo(out_dir: str | Path, n_slides: int = 16, seed: int = 0) -> Path:
    """Run the pipeline on demo slides under ``out_dir``; return the demo folder."""
    DemoSettings.build(n_slides=n_slides, seed=seed)
    from ._read import read_csv
    from .analysis import compare_encoders, describe_cam_localisation, write_cams
    from .batch import summarize
    from .demo_slides import make_demo_slides
    from .features import extract_features
    from .finetune import finetune
    from .mil import describe_localisation, localisation_of_run, model_run, train_mil, write_heatmaps
    from .patches import tile_slides

    out = Path(out_dir).resolve()
    with _Stage(f"1/8 demo slides: {n_slides} synthetic 40x pyramidal TIFFs (seed {seed})", out / "demo_slides"):
        demo = make_demo_slides(out / "demo_slides", n_slides=n_slides, seed=seed)

    with _Stage(f"2/8 tiling: Otsu tissue mask, {PATCH_SIZE} px patches at 20x, >= 50% tissue", out / "tiles"):
        tiling = tile_slides(demo.slides, out / "tiles", magnification=20.0, patch_size=PATCH_SIZE)
        print("   " + summarize(tiling.results, "tiling", outputs=tiling.folder))

    with _Stage(
        f"3/8 features: {ENCODER} truncated by {TRUNCATE}, {INPUT_SIZE} px input, weights: random init "
        "(fixed seed; the demo downloads nothing)",
        tiling.folder / "features",
    ):
        features_dir = extract_features(
            tiling.folder, None, ENCODER, weights="random", truncate=TRUNCATE, input_size=INPUT_SIZE, workers=0
        )

    with _Stage(
        "4/8 attention MIL: patient-level cross-validation (the protocol of cohorts under 200 patients), 20 epochs",
        out / "mil",
    ):
        cv = train_mil(features_dir, demo.labels_csv, out / "mil", seed=seed)
        metrics = json.loads((cv / "metrics.json").read_text())
        print(f"   {_cv_summary(metrics)}")
        lesions = next(iter(demo.lesion_masks.values())).parent
        print(
            "   attention on the positive slides' lesions, out of fold: "
            f"{describe_localisation(localisation_of_run(cv, lesions))}"
        )
        run = model_run(cv)  # the next stages apply one model: fold 0's, on its own test split

    with _Stage(
        f"5/8 attention heatmaps (PNG + QuPath GeoJSON) of the test slides of {run.name}, lesions outlined",
        out / "heatmaps",
    ):
        split = read_csv(run / "splits.csv", missing=False)
        test_ids = set(split.loc[split["split"] == "test", "slide_id"])
        slides = [s for s in demo.slides if s.stem in test_ids][:4]
        write_heatmaps(run, slides, out / "heatmaps", annotations_dir=lesions)

    positive = _cam_slide(split)
    with _Stage(f"6/8 Grad-CAM inside the top-{CAM_TOP_K} attended patches of positive slide {positive}", out / "cam"):
        cams = write_cams(
            run, out / "cam", top_k=CAM_TOP_K, device="cpu", annotations_dir=lesions, slide_ids=[positive]
        )
        res = cams.summary["resolution"]
        print(
            f"   {res['grid'][0]}x{res['grid'][1]} cells at {res['stage']}, {res['um_per_cell']:.3g} um per cell; "
            f"{describe_cam_localisation(cams.summary['localisation'])}"
        )
        print(f"   figure: {cams.folder / (positive + '_cam.png')}")

    with _Stage("7/8 fine-tuning on the top-16 attended patches per slide (2 epochs, lr 1e-5)", out / "finetune"):
        ft = finetune(run, out / "finetune", top_k=16, epochs=2, lr=1e-5, device="cpu", seed=seed)
        test = json.loads((ft / "comparison.json").read_text())["splits"]["test"]
        print(f"   test AUC: frozen {test['frozen_auc']:.3f}, fine-tuned {test['finetuned_auc']:.3f}")

    n_patches = min(500, sum(r.n_patches for r in tiling.results))  # the demo's few slides may hold fewer
    with _Stage(f"8/8 CKA per stage, frozen vs fine-tuned encoder ({n_patches} patches)", out / "cka"):
        cka = compare_encoders(run, ft, tiling.folder, out / "cka", n_patches=n_patches, device="cpu")
        for row in cka.itertuples():
            print(f"   {row.stage:<10} CKA {row.cka:.4f}")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on generated demo slides",
        description="Generate small synthetic pyramidal TIFF slides (half with lesions) and run every "
        "stage on them: tiling, features, attention MIL (with its lesion localisation), "
        "heatmaps, Grad-CAM, fine-tuning, CKA. "
        "Runs offline on a CPU in a few minutes; prints what each stage did.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    add_options(p, DemoSettings)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    s = from_args(DemoSettings, args)
    out = run_demo(args.out, s.n_slides, s.seed)
    print(f"\ndemo finished: results under {out}")
    return 0
