"""``--balance groups``: every label x group cell of the training split weighs the same in what the model sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histotransfer.mil import train_mil
from histotransfer.mil.settings import MilSettings
from histotransfer.mil.synthetic import planted_bags, write_feature_folder
from histotransfer.mil.train import balance_weights, epoch_order, training_weights

ENCODER = {"encoder": "resnet18", "encoder_id": "resnet18-random-t2", "truncate": 2, "weights": "random"}


pytestmark = pytest.mark.usefixtures("one_thread")


def two_centres() -> tuple[np.ndarray, np.ndarray]:
    """50 + 50 slides, 76% positive at centre A and 36% at centre B."""
    labels = np.array([1] * 38 + [0] * 12 + [1] * 18 + [0] * 32)
    return labels, np.array(["A"] * 50 + ["B"] * 50)


def test_every_label_group_cell_gets_the_same_total_weight() -> None:
    labels, groups = two_centres()
    weights = balance_weights(labels, groups)
    assert weights is not None
    cells = pd.DataFrame({"label": labels, "group": groups, "w": weights}).groupby(["label", "group"])["w"]
    assert cells.sum().to_numpy() == pytest.approx([25.0] * 4)  # 100 slides / 4 cells
    assert (cells.nunique() == 1).all()  # equal within a cell
    assert weights.sum() == pytest.approx(len(labels))


def test_a_group_without_one_class_keeps_the_other_cells_equal() -> None:
    weights = balance_weights(np.array([1, 1, 1, 0, 1, 0, 0]), np.array(list("AAAABBB")))
    assert weights is not None
    cells = pd.DataFrame({"w": weights, "cell": ["A1"] * 3 + ["A0", "B1", "B0", "B0"]}).groupby("cell")["w"].sum()
    assert cells.to_numpy() == pytest.approx([7 / 4] * 4)


def test_without_groups_nothing_is_weighted() -> None:
    assert balance_weights(np.array([0, 1, 1]), None) is None
    split = pd.DataFrame({"slide_id": ["a", "b", "c"], "label": [0, 1, 1], "split": "train", "centre": list("xyy")})
    assert training_weights(split, MilSettings(balance="groups")) is None
    assert training_weights(split, MilSettings(group_column="centre")) is None
    weights = training_weights(split, MilSettings(balance="groups", group_column="centre"))
    assert weights == pytest.approx([1.5, 1.5 / 2, 1.5 / 2])  # cells (0, x) and (1, y) weigh 1.5 each


def test_the_default_order_is_the_plain_shuffle_and_weights_even_out_the_cells() -> None:
    assert (epoch_order(9, np.random.default_rng(3)) == np.random.default_rng(3).permutation(9)).all()
    labels, groups = two_centres()
    rng = np.random.default_rng(0)
    drawn = np.concatenate([epoch_order(len(labels), rng, balance_weights(labels, groups)) for _ in range(400)])
    cell = np.char.add(groups[drawn], labels[drawn].astype(str))
    shares = pd.Series(cell).value_counts(normalize=True)
    assert shares.to_numpy() == pytest.approx([0.25] * 4, abs=0.01)


def cohort(root: Path, centres: bool) -> tuple[Path, Path]:
    bags = planted_bags(24, n_patches=(4, 8), dim=8, seed=1)
    write_feature_folder(root / "features", bags, **ENCODER, patch_size_level0=256)
    table = pd.DataFrame({"slide_id": [b.slide_id for b in bags], "label": [b.label for b in bags]})
    if centres:  # positives mostly at A
        table["centre"] = ["A" if (i % 4 != 0) == bool(b.label) else "B" for i, b in enumerate(bags)]
    table.to_csv(root / "labels.csv", index=False)
    return root / "features", root / "labels.csv"


@pytest.mark.slow
def test_balance_groups_without_a_group_column_trains_the_very_same_model(tmp_path: Path) -> None:
    features, labels = cohort(tmp_path, centres=False)
    plain = train_mil(features, labels, tmp_path / "plain", epochs=3, seed=0, hidden=8, protocol="split")
    balanced = train_mil(
        features, labels, tmp_path / "balanced", epochs=3, seed=0, hidden=8, balance="groups", protocol="split"
    )
    for name in ("predictions.csv", "history.csv"):
        a, b = pd.read_csv(plain / name), pd.read_csv(balanced / name)
        pd.testing.assert_frame_equal(
            a.drop(columns="seconds", errors="ignore"), b.drop(columns="seconds", errors="ignore")
        )


@pytest.mark.slow
def test_balance_groups_with_a_group_column_changes_what_is_drawn(tmp_path: Path) -> None:
    features, labels = cohort(tmp_path, centres=True)
    plain = train_mil(
        features, labels, tmp_path / "plain", epochs=2, seed=0, hidden=8, group_column="centre", protocol="split"
    )
    balanced = train_mil(
        features,
        labels,
        tmp_path / "balanced",
        epochs=2,
        seed=0,
        hidden=8,
        group_column="centre",
        balance="groups",
        protocol="split",
    )
    assert not np.allclose(
        pd.read_csv(plain / "history.csv")["train_loss"], pd.read_csv(balanced / "history.csv")["train_loss"]
    )
    assert '"balance": "groups"' in (balanced / "config.json").read_text()


def test_the_default_leaves_earlier_fingerprints_alone() -> None:
    assert "balance" not in MilSettings().result_settings()
    assert MilSettings(balance="groups").result_settings()["balance"] == "groups"
