"""Attention localisation wired into evaluate, heatmap and a run: lesion annotations on planted bags, where the
lesion patches are known by construction."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from histotransfer.annotations import load_annotation
from histotransfer.cli import main
from histotransfer.errors import HistotransferError
from histotransfer.mil import (
    annotation_files,
    attention_localisation,
    evaluate_run,
    localisation_of_run,
    read_attention,
    train_mil,
    write_heatmaps,
)
from histotransfer.mil.synthetic import planted_bags, write_feature_folder

SIDE = 256  # patch side in level-0 px
SHIFT = 64  # each lesion square is its planted patch moved right by this: 0.75 of it, 0.25 of the next patch
MASK_SLIDE, MASK_DOWNSAMPLE = "slide_001", 32
SPLIT = {
    "slide_000": "test",
    "slide_001": "test",
    "slide_002": "train",
    "slide_003": "train",
    "slide_004": "val",
    "slide_005": "train",
    "slide_006": "train",
    "slide_007": "val",
    "slide_008": "test",
    "slide_009": "train",
}


def lesion_squares(bag) -> list[tuple[int, int]]:
    """Level-0 top-left corners of the lesion squares of a bag: its planted patches shifted right."""
    return [(int(x) + SHIFT, int(y)) for x, y in bag.coords[bag.planted]]


def write_geojson(path, squares) -> None:
    features = [
        {
            "type": "Feature",
            "properties": {"classification": {"name": "Tumor"}},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x, y], [x + SIDE, y], [x + SIDE, y + SIDE], [x, y + SIDE], [x, y]]],
            },
        }
        for x, y in squares
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def write_mask(path, squares, shape) -> None:
    """The same squares as a mask image at MASK_DOWNSAMPLE with its sidecar (SIDE and SHIFT are multiples)."""
    mask = np.zeros(shape, np.uint8)
    d = MASK_DOWNSAMPLE
    for x, y in squares:
        mask[y // d : (y + SIDE) // d, x // d : (x + SIDE) // d] = 255
    cv2.imwrite(str(path), mask)
    path.with_name(path.name + ".json").write_text(json.dumps({"downsample": d}))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A one-epoch run on 10 planted bags (the first 5 positive) on grids of 256 px patches, and annotations of
    every positive slide: GeoJSON squares, one slide as a mask image with its sidecar."""
    root = tmp_path_factory.mktemp("loc")
    bags = planted_bags(10, n_patches=(12, 20), dim=8, patch_size=SIDE, seed=0)
    write_feature_folder(root / "features", bags, patch_size_level0=SIDE)
    pd.DataFrame({"slide_id": [b.slide_id for b in bags], "label": [b.label for b in bags]}).to_csv(
        root / "labels.csv", index=False
    )
    pd.DataFrame({"slide_id": list(SPLIT), "split": list(SPLIT.values())}).to_csv(root / "split.csv", index=False)
    run = train_mil(root / "features", root / "labels.csv", root / "run", epochs=1, split_file=root / "split.csv")
    annotations = root / "annotations"
    annotations.mkdir()
    for bag in bags:
        if bag.label and bag.slide_id == MASK_SLIDE:
            write_mask(annotations / f"{bag.slide_id}.png", lesion_squares(bag), (64, 64))
        elif bag.label:
            write_geojson(annotations / f"{bag.slide_id}.geojson", lesion_squares(bag))
    return {"root": root, "run": run, "bags": {b.slide_id: b for b in bags}, "annotations": annotations}


def expected_rows(attention_dir, annotations, slide_ids) -> dict[str, dict]:
    """The localisation of each slide computed here from its attention file and its annotation's overlap."""
    out = {}
    for sid in slide_ids:
        att = read_attention(attention_dir / f"{sid}.h5")
        assert att["attrs"]["patch_size_level0"] == SIDE
        overlap = load_annotation(annotations[sid]).patch_overlap(att["coords"], SIDE)
        out[sid] = attention_localisation(att["score"], overlap)
    return out


def check_rows(table: pd.DataFrame, expected: dict[str, dict], bags) -> None:
    assert sorted(table["slide_id"]) == sorted(expected)
    for row in table.to_dict("records"):
        want = expected[row["slide_id"]]
        for key, value in want.items():
            if value is None:
                assert row[key] is None or pd.isna(row[key]), key
            else:
                assert row[key] == pytest.approx(value, rel=1e-12), key
        # by construction the planted patches are the lesion patches: at least 0.75 of each is lesion, at most
        # 0.25 of any other patch (the right neighbour of a planted one)
        bag = bags[row["slide_id"]]
        assert row["n_lesion_patches"] == len(bag.planted)
        assert row["top_patch_overlap"] in (0.0, 0.25, 0.75, 1.0)


def test_annotation_folder_lists_geojson_and_masks_but_not_sidecars(study, tmp_path):
    files = annotation_files(study["annotations"])
    assert sorted(files) == ["slide_000", "slide_001", "slide_002", "slide_003", "slide_004"]
    assert files[MASK_SLIDE].suffix == ".png"
    # the mask (read at its sidecar's downsample) gives the same patch overlaps as the same squares in GeoJSON
    bag = study["bags"][MASK_SLIDE]
    write_geojson(tmp_path / "same.geojson", lesion_squares(bag))
    overlap = load_annotation(files[MASK_SLIDE]).patch_overlap(bag.coords, SIDE)
    np.testing.assert_allclose(overlap, load_annotation(tmp_path / "same.geojson").patch_overlap(bag.coords, SIDE))
    others = np.setdiff1d(np.arange(len(bag.coords)), bag.planted)
    assert (overlap[bag.planted] >= 0.75).all() and (overlap[others] <= 0.25).all()

    shutil.copytree(study["annotations"], tmp_path / "twice")
    write_geojson(tmp_path / "twice" / f"{MASK_SLIDE}.geojson", [(0, 0)])
    with pytest.raises(HistotransferError, match="two annotations of slide slide_001"):
        annotation_files(tmp_path / "twice")
    with pytest.raises(HistotransferError, match="no such annotations folder"):
        annotation_files(tmp_path / "missing")


def test_evaluate_scores_the_attention_of_annotated_positive_slides(study, tmp_path):
    root = study["root"]
    result = evaluate_run(
        study["run"], root / "features", root / "labels.csv", tmp_path, annotations_dir=study["annotations"]
    )
    positives = [s for s, b in study["bags"].items() if b.label]
    files = annotation_files(study["annotations"])
    expected = expected_rows(tmp_path / "attention", files, positives)
    table = pd.read_csv(tmp_path / "localisation.csv", dtype={"slide_id": str})
    check_rows(table, expected, study["bags"])

    # attention mass by hand: softmax of the stored scores over the planted patches
    bag = study["bags"]["slide_003"]
    score = read_attention(tmp_path / "attention" / "slide_003.h5")["score"].astype(np.float64)
    mass = table.set_index("slide_id").loc["slide_003", "attention_mass"]
    assert mass == pytest.approx(softmax(score)[bag.planted].sum(), rel=1e-9)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    loc = metrics["localisation"]
    assert loc == json.loads(json.dumps(result["localisation"]))
    assert loc["n_positive"] == 5 and loc["n_scored"] == 5 and loc["unannotated"] == []
    for key in ("top_patch_hit", "attention_mass", "lesion_patch_share"):
        assert loc["cohort"][key]["mean"] == pytest.approx(np.mean([float(e[key]) for e in expected.values()]))
        assert loc["cohort"][key]["n"] == 5
    assert "all" in metrics  # the slide-level metrics stay


def test_a_positive_slide_without_annotation_is_not_scored_and_the_count_says_so(study, tmp_path, capsys):
    root = study["root"]
    partial = tmp_path / "annotations"
    shutil.copytree(study["annotations"], partial)
    (partial / "slide_002.geojson").unlink()
    code = main(
        [
            "evaluate",
            "--run",
            str(study["run"]),
            "--features",
            str(root / "features"),
            "--labels",
            str(root / "labels.csv"),
            "--out",
            str(tmp_path / "ev"),
            "--annotations",
            str(partial),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "scored 4 of 5 positive slide(s) (1 without annotation: slide_002)" in out
    table = pd.read_csv(tmp_path / "ev" / "localisation.csv", dtype={"slide_id": str})
    assert "slide_002" not in set(table["slide_id"]) and len(table) == 4
    loc = json.loads((tmp_path / "ev" / "metrics.json").read_text())["localisation"]
    assert loc["n_scored"] == 4 and loc["unannotated"] == ["slide_002"]
    assert loc["cohort"]["attention_mass"]["n"] == 4

    # evaluating again without annotations leaves no stale localisation behind
    evaluate_run(study["run"], root / "features", root / "labels.csv", tmp_path / "ev")
    assert not (tmp_path / "ev" / "localisation.csv").exists()
    assert "localisation" not in json.loads((tmp_path / "ev" / "metrics.json").read_text())


def test_annotations_need_labels_and_a_valid_threshold(study, tmp_path):
    root = study["root"]
    with pytest.raises(HistotransferError, match="needs --labels"):
        evaluate_run(study["run"], root / "features", None, tmp_path, annotations_dir=study["annotations"])
    with pytest.raises(HistotransferError, match="lesion threshold 0"):
        evaluate_run(
            study["run"],
            root / "features",
            root / "labels.csv",
            tmp_path,
            annotations_dir=study["annotations"],
            threshold=0,
        )
    assert not (tmp_path / "attention").exists()


def test_localisation_of_a_run_for_the_study(study):
    files = annotation_files(study["annotations"])
    test = localisation_of_run(study["run"], study["annotations"])
    assert test["split"] == "test" and test["n_positive"] == 2 and test["n_scored"] == 2
    check_rows(
        pd.DataFrame(test["slides"]),
        expected_rows(study["run"] / "attention", files, ["slide_000", "slide_001"]),
        study["bags"],
    )
    every = localisation_of_run(study["run"], study["annotations"], split=None)
    assert every["split"] == "all" and every["n_positive"] == 5 and every["n_scored"] == 5
    assert {r["slide_id"]: r["split"] for r in every["slides"]} == {s: SPLIT[s] for s in files}
    masses = [r["attention_mass"] for r in every["slides"]]
    assert every["cohort"]["attention_mass"]["mean"] == pytest.approx(np.mean(masses))
    with pytest.raises(HistotransferError, match="split 'tests'"):
        localisation_of_run(study["run"], study["annotations"], split="tests")


def test_heatmap_outlines_the_lesion_and_scores_positive_slides(study, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    rng = np.random.default_rng(0)
    for sid in ("slide_003", "slide_007"):  # a positive and a negative slide of the run
        cv2.imwrite(str(slides / f"{sid}.png"), rng.integers(120, 255, (1280, 1280, 3), dtype=np.uint8))
    write_heatmaps(study["run"], [slides], tmp_path / "plain", mpp=0.5, max_side=640)
    code = main(
        [
            "heatmap",
            "--run",
            str(study["run"]),
            "--slides",
            str(slides),
            "--out",
            str(tmp_path / "hm"),
            "--mpp",
            "0.5",
            "--max-side",
            "640",
            "--annotations",
            str(study["annotations"]),
        ]
    )
    assert code == 0
    assert "scored 1 of 2 slide(s)" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "hm" / "localisation.csv", dtype={"slide_id": str})
    files = annotation_files(study["annotations"])
    check_rows(table, expected_rows(study["run"] / "attention", files, ["slide_003"]), study["bags"])
    # the annotated slide differs from the plain heatmap by its outline (and legend), the other not at all
    for sid, changed in (("slide_003", True), ("slide_007", False)):
        plain = cv2.imread(str(tmp_path / "plain" / f"{sid}.png"))[:, :640]
        outlined = cv2.imread(str(tmp_path / "hm" / f"{sid}.png"))[:, :640]
        assert (not np.array_equal(plain, outlined)) == changed


def test_localisation_lines_name_the_scored_slides_and_the_cohort_means():
    from histotransfer.analysis import describe_cam_localisation
    from histotransfer.mil import describe_localisation

    summary = {
        "n_scored": 2,
        "n_positive": 3,
        "unannotated": ["s9"],
        "threshold": 0.5,
        "n_with_lesion_patch": 1,
        "cohort": {
            "top_patch_touches": {"mean": 1.0},
            "touching_share": {"mean": 0.375},
            "top_patch_overlap": {"mean": 0.4},
            "mean_overlap": {"mean": 0.1},
            "attention_overlap": {"mean": 0.3},
            "auc_touching": {"mean": 0.9},
            "top_patch_hit": {"mean": 0.5},
            "attention_mass": {"mean": 0.25},
            "auc": None,
            "lesion_patch_share": {"mean": 0.125},
            "pointing_game": {"mean": 1.0},
            "pointing_chance": {"mean": 0.2},
            "cam_mass": {"mean": 0.75},
            "lesion_area_share": {"mean": 0.1},
        },
    }
    head = "scored 2 of 3 positive slide(s) (1 without annotation: s9)"
    assert describe_localisation(summary) == (
        f"{head}: top patch touches the lesion 1.000 (random patch 0.375), its lesion share 0.400 (random patch "
        "0.100), attention-weighted lesion share 0.300 (uniform 0.100), patch AUC touching vs not 0.900 (chance "
        "0.5); lesion patches (>= 0.5 lesion, on 1 slide(s)): top patch on one 0.500 (random patch 0.125), "
        "attention mass on them 0.250 (uniform 0.125), patch AUC n/a"
    )
    assert describe_cam_localisation(summary) == (
        f"{head}: pointing game 1.000 (random cell 0.200), CAM mass on lesion 0.750 (uniform 0.100)"
    )
    none = {**summary, "n_scored": 0, "unannotated": []}
    assert describe_localisation(none) == describe_cam_localisation(none) == "scored 0 of 3 positive slide(s)"
