"""The evaluation protocol: cross-validation by default for small cohorts, folds stratified by label and group,
and the pooled out-of-fold AUC of a cross-validated run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from histotransfer.cli import main
from histotransfer.errors import HistotransferError
from histotransfer.mil import train_mil
from histotransfer.mil.plan import choose_protocol
from histotransfer.mil.settings import CV_BELOW_PATIENTS, MilSettings
from histotransfer.mil.splits import check_no_leak, kfold_splits
from histotransfer.mil.synthetic import planted_bags, write_feature_folder

ENCODER = {"encoder": "resnet18", "encoder_id": "resnet18-random-t0", "truncate": 0, "weights": "random"}


pytestmark = pytest.mark.usefixtures("one_thread")


def table(n_patients: int, slides_per_patient: int = 1, positives: int | None = None) -> SimpleNamespace:
    """A label table of ``n_patients`` (half positive unless ``positives`` says how many)."""
    positives = n_patients // 2 if positives is None else positives
    rows = [
        {"slide_id": f"p{p}_s{s}", "patient_id": f"p{p}", "label": int(p < positives)}
        for p in range(n_patients)
        for s in range(slides_per_patient)
    ]
    return SimpleNamespace(frame=pd.DataFrame(rows))


def test_auto_cross_validates_below_the_stated_number_of_patients():
    auto = MilSettings()
    assert auto.protocol == "auto" and auto.folds == 5 and CV_BELOW_PATIENTS == 200
    assert choose_protocol(table(199), auto, None) == (5, "auto: 199 patients, fewer than 200")
    assert choose_protocol(table(200), auto, None) == (None, "auto: 200 patients, at least 200")
    # Patients count, not slides: 150 patients of 3 slides are still a small cohort.
    assert choose_protocol(table(150, slides_per_patient=3), auto, None)[0] == 5
    # K-fold needs K + 2 patients per class: auto lowers K for a small class, and gives up below 4.
    assert choose_protocol(table(40, positives=5), auto, None) == (
        3,
        "auto: 40 patients, fewer than 200; 3 folds, as the smaller class has 5 patients",
    )
    assert choose_protocol(table(40, positives=3), auto, None)[0] is None
    # A given split, an explicit protocol or explicit folds decide instead of the size.
    assert choose_protocol(table(50), auto, Path("split.csv"))[0] is None
    assert choose_protocol(table(50), MilSettings(split_rule="camelyon16"), None)[0] is None
    assert choose_protocol(table(50), MilSettings(protocol="split"), None)[0] is None
    assert choose_protocol(table(500), MilSettings(protocol="cv"), None)[0] == 5
    assert choose_protocol(table(500), MilSettings(folds=3), None) == (3, "auto: --folds 3 given")


def centre_cohort() -> pd.DataFrame:
    """Two centres of 50 patients: A with 38 positive (76%), B with 18 (36%); every third patient has two
    slides."""
    rows = []
    for centre, n_pos in (("A", 38), ("B", 18)):
        for p in range(50):
            rows += [
                {
                    "slide_id": f"{centre}{p}_s{s}",
                    "patient_id": f"{centre}{p}",
                    "label": int(p < n_pos),
                    "centre": centre,
                }
                for s in range(1 + (p % 3 == 0))
            ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_are_patient_disjoint_and_stratified_by_label_and_group(seed):
    frame = centre_cohort()
    splits = kfold_splits(frame, ["0", "1"], 5, seed=seed, group_column="centre")
    patients = frame.drop_duplicates("patient_id")
    tested = [s[s["split"] == "test"].drop_duplicates("patient_id") for s in splits]
    assert sorted(pd.concat(tested)["patient_id"]) == sorted(patients["patient_id"])  # each patient tested once
    for split in splits:
        check_no_leak(split)
    # Every (label, centre) stratum, label and centre is dealt to the test folds as evenly as whole patients allow:
    # 12 negatives of A give 3, 3, 2, 2, 2; 38 positives of A give 8, 8, 8, 7, 7; and so on.
    for keys in (["label", "centre"], ["label"], ["centre"]):
        counts = pd.DataFrame([t.groupby(keys).size() for t in tested]).fillna(0).astype(int)
        total = patients.groupby(keys).size()
        for key, n in total.items():
            column = counts[key].sort_values(ascending=False).tolist()
            assert column == [n // 5 + (i < n % 5) for i in range(5)], (keys, key, column)


def make_cohort(folder: Path, n_slides: int, seed: int, centres: bool = False) -> tuple[Path, Path]:
    bags = planted_bags(n_slides, n_patches=(5, 10), dim=8, seed=seed, shift=4.0, scale=5.0)
    write_feature_folder(folder / "features", bags, **ENCODER, patch_size_level0=256)
    labels = pd.DataFrame({"slide_id": [b.slide_id for b in bags], "label": [b.label for b in bags]})
    if centres:
        labels["centre"] = ["A" if i % 3 else "B" for i in range(n_slides)]
    labels.to_csv(folder / "labels.csv", index=False)
    return folder / "features", folder / "labels.csv"


def test_a_small_cohort_is_cross_validated_by_default_with_a_pooled_out_of_fold_auc(tmp_path, capsys):
    features, labels = make_cohort(tmp_path, 30, seed=4, centres=True)
    assert (
        main(
            [
                "train",
                "--features",
                str(features),
                "--labels",
                str(labels),
                "--out",
                str(tmp_path / "run"),
                "--epochs",
                "2",
                "--hidden",
                "8",
                "--group-column",
                "centre",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == {"folds": 5, "why": "auto: 30 patients, fewer than 200"}
    assert sorted(metrics["folds"]) == [f"fold_{k}" for k in range(5)]
    fold_aucs = [metrics["folds"][f"fold_{k}"]["test"]["auc"] for k in range(5)]
    assert metrics["fold_test_auc"] == fold_aucs
    assert metrics["mean"]["test"]["auc"] == pytest.approx(np.mean(fold_aucs))
    assert metrics["sd"]["test"]["auc"] == pytest.approx(np.std(fold_aucs, ddof=1))
    # The pooled AUC is sklearn's over the concatenated test predictions of the folds, one per slide.
    folds = pd.concat(pd.read_csv(run / f"fold_{k}" / "predictions.csv").query("split == 'test'") for k in range(5))
    assert sorted(folds["slide_id"]) == sorted(pd.read_csv(labels)["slide_id"])
    pooled = metrics["pooled"]["test"]
    assert pooled["auc"] == pytest.approx(roc_auc_score(folds["label"], folds["probability"]), abs=1e-12)
    assert pooled["n_slides"] == 30
    oof = pd.read_csv(run / "predictions.csv")
    assert list(oof.columns) == ["slide_id", "patient_id", "centre", "label", "probability", "fold"]
    assert oof.set_index("slide_id")["probability"].to_dict() == pytest.approx(
        folds.set_index("slide_id")["probability"].to_dict()
    )
    within = [roc_auc_score(part["label"], part["probability"]) for _, part in folds.groupby("centre")]
    assert metrics["pooled"]["groups"]["mean_within_group_auc"] == pytest.approx(np.mean(within))
    assert "protocol: 5-fold patient-level cross-validation (auto: 30 patients, fewer than 200)" in out
    assert "test AUC per fold: " + ", ".join(f"{a:.3f}" for a in fold_aucs) in out
    assert f"test  pooled out-of-fold: AUC {pooled['auc']:.3f} (95% CI" in out
    assert f"mean within-centre test AUC: pooled out-of-fold {np.mean(within):.3f}" in out


def test_single_split_stays_available_and_conflicting_options_are_one_line(tmp_path, capsys):
    features, labels = make_cohort(tmp_path, 12, seed=2)
    run = train_mil(features, labels, tmp_path / "split", epochs=1, protocol="split")
    assert (run / "model.pt").is_file() and not (run / "fold_0").exists()
    assert json.loads((run / "config.json").read_text())["split"]["why"] == "--protocol split"
    pd.DataFrame({"slide_id": pd.read_csv(labels)["slide_id"], "split": ["train", "val", "test"] * 4}).to_csv(
        tmp_path / "split.csv", index=False
    )
    with pytest.raises(HistotransferError, match="--split-file and cross-validation exclude each other"):
        train_mil(features, labels, tmp_path / "x", epochs=1, protocol="cv", split_file=tmp_path / "split.csv")
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--features",
                str(features),
                "--labels",
                str(labels),
                "--out",
                str(tmp_path / "y"),
                "--protocol",
                "split",
                "--folds",
                "3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--folds 3 with --protocol split" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def write_square_annotation(path: Path, bag, side: int) -> None:
    """The bag's planted patches as lesion squares (QuPath GeoJSON, level-0 px)."""
    features = [
        {
            "type": "Feature",
            "properties": {"classification": {"name": "Tumor"}},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]],
            },
        }
        for x, y in (tuple(int(v) for v in c) for c in bag.coords[bag.planted])
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def test_downstream_of_a_cross_validation_uses_fold_0_and_localisation_is_out_of_fold(tmp_path):
    side = 256
    bags = planted_bags(10, n_patches=(12, 20), dim=8, patch_size=side, seed=0)
    write_feature_folder(tmp_path / "features", bags, patch_size_level0=side)
    pd.DataFrame({"slide_id": [b.slide_id for b in bags], "label": [b.label for b in bags]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    run = train_mil(tmp_path / "features", tmp_path / "labels.csv", tmp_path / "run", epochs=1)
    assert json.loads((run / "metrics.json").read_text())["protocol"] == {
        "folds": 3,
        "why": "auto: 10 patients, fewer than 200; 3 folds, as the smaller class has 5 patients",
    }
    (tmp_path / "annotations").mkdir()
    for bag in bags:
        if bag.label:
            write_square_annotation(tmp_path / "annotations" / f"{bag.slide_id}.geojson", bag, side)
    from histotransfer.mil import evaluate_run, fold_dirs, localisation_of_run, model_run

    assert model_run(run) == run / "fold_0" and model_run(run / "fold_1") == run / "fold_1"
    assert [d.name for d in fold_dirs(run)] == ["fold_0", "fold_1", "fold_2"]
    result = evaluate_run(run, tmp_path / "features", tmp_path / "labels.csv")
    assert result["out_dir"] == run / "fold_0" / "evaluation"
    # Every positive slide is scored once, by the attention of the fold that tested it.
    pooled = localisation_of_run(run, tmp_path / "annotations")
    assert pooled["n_scored"] == 5 and sorted(r["slide_id"] for r in pooled["slides"]) == [
        b.slide_id for b in bags if b.label
    ]
    by_fold = {
        r["slide_id"]: r for d in fold_dirs(run) for r in localisation_of_run(d, tmp_path / "annotations")["slides"]
    }
    assert pooled["slides"] == [by_fold[r["slide_id"]] for r in pooled["slides"]]
    with pytest.raises(HistotransferError, match="scored on its test folds only"):
        localisation_of_run(run, tmp_path / "annotations", split=None)


def test_study_tables_show_the_pooled_auc_and_the_within_group_auc_beside_it(tmp_path):
    from histotransfer.study.grid import EncoderConfig
    from histotransfer.study.runs import mil_runs
    from histotransfer.study.tables import build_tables, display_table

    enc = EncoderConfig("resnet18", "random", 0)
    records = []
    for seed, (pooled, within) in enumerate([(0.70, 0.50), (0.80, 0.60)]):
        rel = f"mil/multi/{enc.key}/seed{seed}/run"
        (tmp_path / rel).mkdir(parents=True)
        fold = {"test": {"auc": 0.9, "n_slides": 20}}
        metrics = {
            "protocol": {"folds": 5, "why": "auto"},
            "folds": {"fold_0": fold},
            "mean": {"test": {"auc": 0.75}},
            "sd": {"test": {"auc": 0.1}},
            "pooled": {"test": {"auc": pooled, "n_slides": 100}, "groups": {"mean_within_group_auc": within}},
        }
        (tmp_path / rel / "metrics.json").write_text(json.dumps(metrics))
        records.append({"kind": "mil", "dataset": "multi", "encoder": enc.spec(), "seed": seed, "result": {"run": rel}})
    mil = mil_runs(tmp_path, records, {})
    assert mil[["auc", "n_slides", "protocol", "fold_auc_mean", "fold_auc_sd", "within_group_auc"]].values.tolist() == [
        [0.70, 100, "5-fold CV", 0.75, 0.1, 0.50],
        [0.80, 100, "5-fold CV", 0.75, 0.1, 0.60],
    ]
    table = build_tables(mil, mil.iloc[0:0], [enc], [], ["multi"], {})["table1_architectures"]
    shown = display_table("table1_architectures", table, ["multi"])
    assert shown[["multi", "multi: within-group"]].values.tolist() == [["0.750 ± 0.071 (n=100)", "0.550 ± 0.071"]]
