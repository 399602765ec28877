"""Lesion annotations supervising the MIL attention (``histotransfer train --annotations``): the loss term, its
effect on a generated cohort, the run's record, and bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from histotransfer.cli import main
from histotransfer.errors import HistotransferError
from histotransfer.features import extract_features
from histotransfer.mil import MilSettings, read_attention, train_mil
from histotransfer.mil.labels import read_labels
from histotransfer.mil.models import AttentionMIL
from histotransfer.mil.plan import plan_run
from histotransfer.mil.synthetic import planted_bags, write_feature_folder
from histotransfer.mil.train import attention_loss, train_epoch
from histotransfer.patches import tile_slides
from histotransfer.study.checks import Checker

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 256


def test_attention_loss_is_the_mean_binary_cross_entropy_of_the_scores():
    scores = torch.tensor([0.0, 2.0, -1.0])
    lesion = torch.tensor([1.0, 0.0, 0.0])
    # -log sigmoid(0), -log(1 - sigmoid(2)), -log(1 - sigmoid(-1)), averaged over the three patches
    expected = (math.log(2) + math.log(1 + math.exp(2)) + math.log(1 + math.exp(-1))) / 3
    assert attention_loss(scores, lesion).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.0444459, rel=1e-6)


def test_an_annotated_slide_adds_the_weighted_attention_loss_to_its_cross_entropy():
    torch.manual_seed(0)
    model = AttentionMIL(4)
    bags = [torch.randn(5, 4), torch.randn(3, 4)]
    targets = [torch.tensor([1]), torch.tensor([0])]
    lesion = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
    with torch.no_grad():
        model.eval()
        logits, scores = model(bags[0])
        cross_entropy = F.cross_entropy(logits, targets[0]).item()
        s = scores.double().numpy()
        t = lesion.double().numpy()
        by_hand = float(np.mean(np.logaddexp(0, s) - t * s))  # BCE with logits, written out
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    supervised = train_epoch(model, bags, targets, np.array([0]), optimizer, [lesion, None], attention_weight=0.5)
    plain = train_epoch(model, bags, targets, np.array([0]), optimizer)
    assert supervised == pytest.approx(cross_entropy + 0.5 * by_hand, rel=1e-5)
    assert plain == pytest.approx(cross_entropy, rel=1e-6)
    # the unannotated slide (None) gets its cross-entropy only
    assert train_epoch(model, bags, targets, np.array([1]), optimizer, [lesion, None]) == pytest.approx(
        train_epoch(model, bags, targets, np.array([1]), optimizer), rel=1e-7
    )


@pytest.fixture(scope="module")
def demo_features(small_demo_slides, tmp_path_factory):
    """The four demo slides tiled and encoded (random ResNet18 to layer 2 on 32 px patches), as the lever
    benchmark does, with a split that trains on all of them."""
    root = tmp_path_factory.mktemp("supervision")
    demo = small_demo_slides
    run = tile_slides(demo.slides, root / "tiles", magnification=20, patch_size=128, min_region_um2=2000.0)
    folder = extract_features(run.patches, None, "resnet18", "random", 2, input_size=32, device="cpu", workers=0)
    labels = pd.read_csv(demo.labels_csv)
    pd.DataFrame({"slide_id": labels["slide_id"], "split": "train"}).to_csv(root / "split.csv", index=False)
    return {
        "root": root,
        "features": folder,
        "labels": demo.labels_csv,
        "split": root / "split.csv",
        "annotations": next(iter(demo.lesion_masks.values())).parent,
    }


def lesion_attention_mass(run, annotations, slide_ids) -> float:
    """Mean softmax attention on the patches touching the lesion, over ``slide_ids``."""
    from histotransfer.annotations import load_annotation

    masses = []
    for sid in slide_ids:
        att = read_attention(run / "attention" / f"{sid}.h5")
        touching = (
            load_annotation(annotations / f"{sid}.png").patch_overlap(
                att["coords"], float(att["attrs"]["patch_size_level0"])
            )
            > 0
        )
        w = np.exp(att["score"] - att["score"].max())
        masses.append(float(w[touching].sum() / w.sum()))
    return float(np.mean(masses))


@pytest.mark.slow
def test_annotations_move_the_attention_onto_the_lesion(demo_features):
    d = demo_features
    table = read_labels(d["labels"], d["features"])
    positives = list(table.frame.loc[table.frame["label"] == 1, "slide_id"])
    assert len(positives) == 2
    runs = {}
    for name, extra in (("plain", {}), ("supervised", {"annotations": d["annotations"]})):
        runs[name] = train_mil(
            d["features"], d["labels"], d["root"] / name, split_file=d["split"], epochs=5, seed=0, **extra
        )
    plain = lesion_attention_mass(runs["plain"], d["annotations"], positives)
    supervised = lesion_attention_mass(runs["supervised"], d["annotations"], positives)
    # the demo's lesions are large and unconfounded, so even the plain run attends to them (about 0.79); the
    # supervised run, same seed and folds, puts more on them (about 0.86); unsupervised, the two runs are equal
    assert supervised > plain + 0.03, (plain, supervised)
    config = json.loads((runs["supervised"] / "config.json").read_text())
    assert sorted(config["inputs"]["annotations"]) == positives  # the negatives' (empty) masks are not used


@pytest.fixture
def planted(tmp_path):
    """Ten planted bags (the first five positive) and GeoJSON annotations of slides 000 and 001."""
    bags = planted_bags(10, n_patches=(12, 20), dim=8, patch_size=SIDE, seed=0)
    write_feature_folder(tmp_path / "features", bags, patch_size_level0=SIDE)
    pd.DataFrame({"slide_id": [b.slide_id for b in bags], "label": [b.label for b in bags]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    (tmp_path / "annotations").mkdir()
    for bag in bags[:2]:
        x, y = (int(v) for v in bag.coords[bag.planted[0]])
        square = [[x, y], [x + SIDE, y], [x + SIDE, y + SIDE], [x, y + SIDE], [x, y]]
        (tmp_path / "annotations" / f"{bag.slide_id}.geojson").write_text(
            json.dumps({"type": "Polygon", "coordinates": [square]})
        )
    return tmp_path


def test_the_run_records_the_annotations_and_refuses_a_run_made_without(planted):
    p = planted
    plain = plan_run(p / "features", p / "labels.csv", p / "run", MilSettings(epochs=1))
    supervised = plan_run(
        p / "features",
        p / "labels.csv",
        p / "run",
        MilSettings(epochs=1, annotations=p / "annotations", attention_weight=0.5),
    )
    assert plain.folds is not None  # ten patients: cross-validation
    assert plain.config["settings"]["annotations"] is None
    assert supervised.config["settings"]["annotations"] == str((p / "annotations").resolve())
    assert supervised.config["settings"]["attention_weight"] == 0.5
    assert sorted(supervised.config["inputs"]["annotations"]) == ["slide_000", "slide_001"]
    assert "annotations" not in plain.config["inputs"]
    assert plain.settings.fingerprint() != supervised.settings.fingerprint()
    # off (the default), the options stay out of the fingerprint: runs and study cells of before are kept
    assert not {"annotations", "attention_weight"} & set(plain.settings.result_settings())
    train_mil(p / "features", p / "labels.csv", p / "run", epochs=1)
    with pytest.raises(HistotransferError, match=r"settings\.annotations"):
        train_mil(p / "features", p / "labels.csv", p / "run", epochs=1, annotations=p / "annotations")
    run = train_mil(p / "features", p / "labels.csv", p / "supervised", epochs=1, annotations=p / "annotations")
    for fold in sorted(run.glob("fold_*")):
        assert json.loads((fold / "config.json").read_text())["settings"]["annotations"] is not None
    # changed annotation content is a different run
    (p / "annotations" / "slide_001.geojson").write_text(
        json.dumps({"type": "Polygon", "coordinates": [[[1, 1], [9, 1], [9, 9], [1, 9], [1, 1]]]})
    )
    with pytest.raises(HistotransferError, match=r"inputs\.annotations"):
        train_mil(p / "features", p / "labels.csv", p / "supervised", epochs=1, annotations=p / "annotations")


def test_a_missing_annotation_folder_is_one_line_naming_it(planted, capsys):
    missing = planted / "nowhere"
    code = main(
        [
            "train",
            "--features",
            str(planted / "features"),
            "--labels",
            str(planted / "labels.csv"),
            "--out",
            str(planted / "run"),
            "--annotations",
            str(missing),
            "--epochs",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and str(missing) in err and "Traceback" not in err
    assert not (planted / "run").exists()


def test_an_annotation_of_no_labelled_slide_is_warned_once(planted):
    for name in ("slide_999", "other"):
        (planted / "annotations" / f"{name}.geojson").write_text(
            json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]})
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_run(
            planted / "features",
            planted / "labels.csv",
            planted / "run",
            MilSettings(epochs=1, annotations=planted / "annotations"),
        )
    messages = [str(w.message) for w in caught if "match no labelled slide" in str(w.message)]
    assert len(messages) == 1 and "other" in messages[0] and "slide_999" in messages[0]
    assert sorted(plan.annotations) == ["slide_000", "slide_001"]


def test_annotations_of_no_positive_training_slide_are_refused(planted):
    for path in (planted / "annotations").iterdir():
        path.unlink()
    (planted / "annotations" / "slide_009.geojson").write_text(
        json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [SIDE, 0], [SIDE, SIDE], [0, SIDE], [0, 0]]]})
    )  # slide_009 is negative
    with pytest.raises(HistotransferError, match="none of its 1 annotation") as info:
        train_mil(
            planted / "features", planted / "labels.csv", planted / "run", epochs=1, annotations=planted / "annotations"
        )
    assert "\n" not in str(info.value) and str((planted / "annotations").resolve()) in str(info.value)
    assert not (planted / "run").exists()


def test_a_study_refuses_annotations_in_its_mil_section(tmp_path):
    checker = Checker(tmp_path)
    checker.mil({"annotations": "lesions"})
    assert any("mil.annotations" in p and "histotransfer train --annotations" in p for p in checker.problems)
