"""Top-k fine-tuning end to end on real tiled demo slides: run files, frozen vs fine-tuned, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histotransfer._io import HOST
from histotransfer.analysis import compare_encoders
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder
from histotransfer.errors import HistotransferError
from histotransfer.features import extract_features, read_feature_file
from histotransfer.finetune import finetune, run_encoder, save_encoder, select_top_k
from histotransfer.finetune.data import topk_slides
from histotransfer.finetune.model import EndToEndMIL
from histotransfer.finetune.settings import FinetuneSettings
from histotransfer.finetune.train import describe_selection, fit_end_to_end, selection_record
from histotransfer.mil import evaluate_run, load_run_model, train_mil
from histotransfer.mil.rundir import read_attention
from histotransfer.patches.tiling import tile_slides
from histotransfer.runtime import Ranks

SPLIT = {
    "demo_01": "train",
    "demo_02": "train",
    "demo_05": "train",
    "demo_06": "train",
    "demo_08": "train",
    "demo_10": "train",
    "demo_03": "val",
    "demo_09": "val",
    "demo_07": "val",
    "demo_12": "val",
    "demo_04": "test",
    "demo_11": "test",
}
FT = dict(top_k=6, epochs=2, lr=1e-4, device="cpu", freeze_stages=1, batch_slides=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """12 demo slides tiled at 10x into 64 px patches, features of a random resnet18 cut after layer2 (saved
    as a weights file, as users' own checkpoints are) at 32 px, and a 3-epoch MIL run."""
    root = tmp_path_factory.mktemp("ft_study")
    demo = make_demo_slides(root, n_slides=12, seed=0, size=1024, mpp=0.5)
    tiling = tile_slides(demo.slides, root / "tiles", magnification=10, patch_size=64)
    torch.manual_seed(0)
    full = create_encoder("resnet18", "random", 0)
    weights = save_encoder(full, root / "resnet18_seed0.pt")
    features = extract_features(
        tiling.folder, root, "resnet18", str(weights), truncate=2, input_size=32, batch_size=64, workers=0, device="cpu"
    )
    split_file = root / "split.csv"
    pd.DataFrame({"slide_id": list(SPLIT), "split": list(SPLIT.values())}).to_csv(split_file, index=False)
    run = train_mil(features, demo.labels_csv, root / "run", epochs=3, seed=0, split_file=split_file)
    return {"root": root, "run": run, "patches": tiling.patches, "slides": root / "slides", "labels": demo.labels_csv}


def test_top_k_of_a_trained_run_are_the_highest_attention_scores(study):
    df = select_top_k(study["run"], k=5)
    assert set(df["split"]) == {"train", "val"}
    assert set(df["slide_id"]) == {s for s, v in SPLIT.items() if v != "test"}
    for sid, group in df.groupby("slide_id"):
        att = read_attention(study["run"] / "attention" / f"{sid}.h5")
        order = sorted(range(len(att["score"])), key=lambda i: (-float(att["score"][i]), i))[:5]
        np.testing.assert_array_equal(group[["x", "y"]].to_numpy(), att["coords"][order])
        np.testing.assert_array_equal(group["score"].to_numpy(), att["score"][order].astype(np.float64))


@pytest.fixture(scope="module")
def tuned(study):
    out = study["root"] / "ft"
    assert finetune(study["run"], out, **FT) == out
    return out


def test_finetune_end_to_end_writes_frozen_and_finetuned_side_by_side(study, tuned):
    out = tuned
    for name in (
        "config.json",
        "splits.csv",
        "model.pt",
        "predictions.csv",
        "metrics.json",
        "history.csv",
        "roc.png",
        "encoder.pt",
        "comparison.json",
        "topk.csv",
    ):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()
    assert len(list((out / "attention").glob("*.h5"))) == len(SPLIT)

    comparison = json.loads((out / "comparison.json").read_text())
    frozen = json.loads((study["run"] / "metrics.json").read_text())
    tuned = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        row = comparison["splits"][split]
        assert row["frozen"] == frozen[split] and row["frozen_auc"] == frozen[split]["auc"]
        assert row["finetuned"] == tuned[split] and row["finetuned_auc"] == tuned[split]["auc"]
        assert tuned[split]["n_slides"] == sum(v == split for v in SPLIT.values())

    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2] and history["selected"].sum() == 1
    assert not history.loc[history["epoch"] == 0, "selected"].item()
    assert comparison["selection"] == selection_record(history)
    assert comparison["selection"]["kept"] == "finetuned" and comparison["selected_epoch"] > 0
    topk = pd.read_csv(out / "topk.csv")
    assert topk.groupby("slide_id").size().max() == 6

    # encoder.pt: frozen stages keep the run's weights bit for bit, trained ones moved
    before, after = run_encoder(study["run"]).state_dict(), run_encoder(out).state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same if key.startswith(("body.stem", "body.layer1")) else True
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("body.layer2"))

    # the re-extracted features are the fine-tuned encoder's, and evaluating them reproduces the test metrics
    config = json.loads((out / "config.json").read_text())
    assert config["encoder"]["weights_sha256"] and config["encoder"]["truncate"] == 2
    ev = evaluate_run(out, config["features_dir"], study["labels"], out_dir=study["root"] / "ft_eval")
    preds = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str})
    merged = preds.merge(ev["predictions"], on="slide_id", suffixes=("", "_ev"))
    np.testing.assert_allclose(merged["probability"], merged["probability_ev"], atol=1e-6)
    assert load_run_model(out).in_dim == 128

    # frozen stages are untouched: their CKA is 1
    cka = compare_encoders(study["run"], out, study["patches"], study["root"] / "cka", n_patches=30, device="cpu")
    assert list(cka["stage"]) == ["stem", "layer1", "layer2"]
    assert cka["cka"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert cka["cka"].iloc[1] == pytest.approx(1.0, abs=1e-6)
    assert cka["cka"].iloc[2] < 1.0

    # a finished run is kept; other settings in the same folder are refused
    mtime = (out / "metrics.json").stat().st_mtime_ns
    finetune(study["run"], out, **FT)
    assert (out / "metrics.json").stat().st_mtime_ns == mtime
    with pytest.raises(HistotransferError, match=r"differs in: finetune.lr \(0.0001 vs 0.001\)"):
        finetune(study["run"], out, **{**FT, "lr": 1e-3})


def test_resumed_training_equals_uninterrupted(study, tmp_path):
    run = study["run"]
    config = json.loads((run / "config.json").read_text())
    splits = pd.read_csv(run / "splits.csv", dtype={"slide_id": str})
    topk = select_top_k(run, k=3, out_path=tmp_path / "topk.csv")
    slides, broken = topk_slides(topk, dict(zip(splits["slide_id"], splits["label"])), Path(config["features_dir"]))
    assert not broken
    train = [s for s in slides if SPLIT[s.job.slide_id] == "train"]
    val = [s for s in slides if SPLIT[s.job.slide_id] == "val"]

    def fit(epochs: int, ckpt):
        model = EndToEndMIL(run_encoder(run), load_run_model(run), freeze_stages=0)
        cfg = FinetuneSettings(epochs=epochs, lr=1e-4, batch_slides=2)
        return fit_end_to_end(model, train, val, cfg, 32, torch.device("cpu"), Ranks(), ckpt)

    straight = fit(2, tmp_path / "a.pt")
    fit(1, tmp_path / "b.pt")  # "killed" after epoch 1: its checkpoint is all that is left
    resumed = fit(2, tmp_path / "b.pt")
    assert list(resumed.history["epoch"]) == [0, 1, 2]
    assert straight.selected_epoch == resumed.selected_epoch
    pd.testing.assert_frame_equal(straight.history.drop(columns="seconds"), resumed.history.drop(columns="seconds"))
    for key, value in straight.state.items():
        torch.testing.assert_close(resumed.state[key], value, rtol=0, atol=1e-6)


def _topk_bags(study, tmp_path, k: int = 3):
    run = study["run"]
    config = json.loads((run / "config.json").read_text())
    splits = pd.read_csv(run / "splits.csv", dtype={"slide_id": str})
    topk = select_top_k(run, k=k, out_path=tmp_path / "topk.csv")
    slides, _ = topk_slides(topk, dict(zip(splits["slide_id"], splits["label"])), Path(config["features_dir"]))
    return (
        [s for s in slides if SPLIT[s.job.slide_id] == "train"],
        [s for s in slides if SPLIT[s.job.slide_id] == "val"],
    )


def test_fine_tuning_that_hurts_keeps_the_frozen_start(study, tmp_path):
    train, val = _topk_bags(study, tmp_path)
    model = EndToEndMIL(run_encoder(study["run"]), load_run_model(study["run"]), freeze_stages=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneSettings(epochs=1, lr=3e-2, batch_slides=2)  # steps this large wreck the network
    result = fit_end_to_end(model, train, val, cfg, 32, torch.device("cpu"), Ranks(), tmp_path / "ckpt.pt")
    history = result.history.set_index("epoch")
    assert history.loc[0, "val_auc"] == 1.0 and history.loc[1, "val_auc"] == 0.0
    assert result.selected_epoch == 0 and list(result.history["selected"]) == [True, False]
    for key, value in start.items():
        assert torch.equal(result.state[key], value), key
    record = selection_record(result.history)
    assert record["kept"] == "frozen" and record["selected_epoch"] == 0
    assert record["frozen_val_auc"] == pytest.approx(history.loc[0, "val_auc"])
    assert record["best_finetuned_epoch"] == 1 and record["best_finetuned_val_auc"] == 0.0
    assert "did not beat the frozen start" in describe_selection(record)


@pytest.mark.slow
def test_a_run_whose_fine_tuning_hurts_keeps_the_frozen_model_and_says_so(study, tmp_path, capsys):
    out = finetune(study["run"], tmp_path / "ft", **{**FT, "top_k": 3, "epochs": 1, "lr": 3e-2, "freeze_stages": 0})
    assert "did not beat the frozen start" in capsys.readouterr().out
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["selected_epoch"] == 0 and comparison["selection"]["kept"] == "frozen"
    before, after = run_encoder(study["run"]).state_dict(), run_encoder(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for split, row in comparison["splits"].items():  # the frozen model, re-extracted: the frozen run's AUC
        assert row["finetuned_auc"] == pytest.approx(row["frozen_auc"], abs=1e-9), split


def test_bad_requests_are_refused(study, tmp_path):
    with pytest.raises(HistotransferError, match="not a run folder"):
        finetune(tmp_path, tmp_path / "out", device="cpu")
    with pytest.raises(HistotransferError, match="CUDA GPU only"):
        finetune(study["run"], tmp_path / "out", precision="bf16", device="cpu")
    with pytest.raises(HistotransferError, match="freeze_stages=3"):
        finetune(study["run"], tmp_path / "out", **{**FT, "freeze_stages": 3})
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_second_finetune_into_a_folder_in_use_is_refused_before_training(study, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / ".finetune.lock").write_text(f"{HOST} {os.getpid()}\n")  # a live process holds the folder
    with pytest.raises(HistotransferError, match=r"another fine-tuning is writing into this folder \(.* pid "):
        finetune(study["run"], out, **FT)
    assert sorted(p.name for p in out.iterdir()) == [".finetune.lock"]  # nothing trained or written


def test_slides_override_and_a_broken_slide_is_reported_and_skipped(study, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in study["slides"].glob("*.tif"):
        if p.stem != "demo_05":  # not in the folder: found at its recorded path
            (moved / p.name).symlink_to(p)
    (moved / "demo_02.tif").unlink()
    (moved / "demo_02.tif").write_bytes(b"II*\x00 not a slide")  # a broken training slide
    run = study["run"]
    topk = select_top_k(run, k=3, out_path=tmp_path / "topk.csv")
    splits = pd.read_csv(run / "splits.csv", dtype={"slide_id": str})
    labels = dict(zip(splits["slide_id"], splits["label"]))
    features_dir = Path(json.loads((run / "config.json").read_text())["features_dir"])
    with pytest.warns(UserWarning, match="demo_02"):
        slides, broken = topk_slides(topk, labels, features_dir, moved)
    assert list(broken) == ["demo_02"] and "demo_02.tif" in broken["demo_02"]
    paths = {s.job.slide_id: s.job.slide_path for s in slides}
    assert len(paths) == 9 and "demo_02" not in paths
    assert paths["demo_05"] == str(study["slides"] / "demo_05.tif")
    assert all(p.startswith(str(moved)) for sid, p in paths.items() if sid != "demo_05")
    only = [moved / "demo_01.tif"]
    slides, broken = topk_slides(topk, labels, features_dir, only)
    assert not broken and {s.job.slide_id: s.job.slide_path for s in slides}["demo_01"] == str(only[0])


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_two_slides_per_step(study, tuned):
    """torchrun --nproc-per-node 2 (gloo, CPU) with two slides per step (one per rank) averages the gradients of
    the two slides: the same model as one process taking two slides per step."""
    root, single = study["root"], tuned
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "histotransfer",
        "finetune",
        "--run-dir",
        str(study["run"]),
        "--out",
        str(root / "ft_ddp"),
        "--top-k",
        "6",
        "--epochs",
        "2",
        "--lr",
        "1e-4",
        "--device",
        "cpu",
        "--freeze-stages",
        "1",
        "--batch-slides",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(root / "ft_ddp" / "model.pt", weights_only=True)["state_dict"]
    # The attention's output bias shifts every score of a bag equally, which the softmax ignores: its gradient
    # is zero up to rounding, and Adam scales that rounding noise up to full lr-sized steps.
    assert torch.all((a["attention_w.bias"] - b["attention_w.bias"]).abs() <= 2 * FT["epochs"] * FT["lr"])
    for key in set(a) - {"attention_w.bias"}:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    ea = torch.load(single / "encoder.pt", weights_only=True)
    eb = torch.load(root / "ft_ddp" / "encoder.pt", weights_only=True)
    for key in ea:
        torch.testing.assert_close(eb[key], ea[key], rtol=1e-4, atol=1e-5)
    history_a = pd.read_csv(single / "history.csv")
    history_b = pd.read_csv(root / "ft_ddp" / "history.csv")
    np.testing.assert_allclose(history_b["train_loss"], history_a["train_loss"], rtol=1e-4)
    for h5 in (root / "ft_ddp" / "features").rglob("*.h5"):
        assert read_feature_file(h5).features.shape[1] == 128
    config = json.loads((root / "ft_ddp" / "config.json").read_text())
    assert config["settings"]["batch_slides"] == 2 == FT["batch_slides"]  # the same settings as one process


@pytest.mark.parametrize(
    "encoder, tiled, fed, expected",
    [
        ("resnet18", 256, 256, None),  # a CNN fed at the tiled size: the default
        ("resnet18", 256, 64, 64),  # resized
        ("uni", 32, 32, 32),  # a ViT fed at its tiled size, not its own 224: must be said
        ("uni", 512, 224, None),  # a ViT at its own size: the default
    ],
)
def test_re_extraction_feeds_the_size_the_run_was_made_at(encoder, tiled, fed, expected):
    from types import SimpleNamespace

    from histotransfer.finetune.run import _extraction_size

    slide = SimpleNamespace(job=SimpleNamespace(spec=SimpleNamespace(patch_size=tiled)))
    assert _extraction_size({"encoder": encoder, "input_size": fed}, slide) == expected
