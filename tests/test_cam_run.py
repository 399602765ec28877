"""``histotransfer cam`` on tiny tiled demo slides: the stage's grid and its microns per cell, maps equal to
Grad-CAM computed here on the same patches, CAM localisation against the demo's lesion masks, resume, and the
inputs it refuses (a replaced slide, an encoder that does not reproduce the run, a missing run, bad options)."""

from __future__ import annotations

import json
import shutil

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from histotransfer.analysis import grad_cam, read_cam_file, write_cams
from histotransfer.annotations import load_annotation
from histotransfer.cli import main
from histotransfer.demo_slides import make_demo_slides
from histotransfer.errors import HistotransferError
from histotransfer.features import extract_features, read_feature_file
from histotransfer.finetune import finetune, run_encoder
from histotransfer.mil import cam_localisation, load_run_model, read_attention, run_fingerprint, train_mil
from histotransfer.patches import PatchReader, read_patch_file, tile_slides
from histotransfer.slide import open_slide

TOP_K = 3
INPUT = 32  # 64 px patches at 10x read at 32 px: resnet18 up to layer1 (stride 4) gives 8 x 8 cells
GRID = 8
UM_PER_CELL = 64 * 1.0 / GRID  # a 64 px patch at 10x (1 um/px) is 64 um wide


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """6 demo slides (3 positive) tiled at 10x into 64 px patches, features of a random resnet18 cut after
    layer1 at 32 px, a 2-epoch MIL run with one slide of each class per split, and its CAMs (top 3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cam_run")
    demo = make_demo_slides(root, n_slides=6, seed=0, size=1024, mpp=0.5)
    tiling = tile_slides(demo.slides, root / "tiles", magnification=10, patch_size=64)
    features = extract_features(
        tiling.folder, root, "resnet18", "random", truncate=3, input_size=INPUT, batch_size=64, workers=0, device="cpu"
    )
    labels = pd.read_csv(demo.labels_csv, dtype={"slide_id": str})
    pos = sorted(labels.loc[labels["label"] == 1, "slide_id"])
    neg = sorted(labels.loc[labels["label"] == 0, "slide_id"])
    split = {pos[0]: "train", neg[0]: "train", pos[1]: "val", neg[1]: "val", pos[2]: "test", neg[2]: "test"}
    pd.DataFrame({"slide_id": list(split), "split": list(split.values())}).to_csv(root / "split.csv", index=False)
    run = train_mil(features, demo.labels_csv, root / "run", epochs=2, seed=0, split_file=root / "split.csv")
    cams = write_cams(run, root / "cam", top_k=TOP_K, device="cpu", annotations_dir=root / "lesion_masks")
    yield {
        "root": root,
        "run": run,
        "cams": cams,
        "pos": pos,
        "neg": neg,
        "features": features,
        "masks": root / "lesion_masks",
        "labels": demo.labels_csv,
    }
    torch.set_num_threads(threads)


def test_cam_files_have_the_stage_grid_and_state_microns_per_cell(study):
    out = study["cams"].folder
    slides = sorted(study["pos"] + study["neg"])
    report = pd.read_csv(out / "cams.csv", dtype={"slide_id": str})
    assert sorted(report["slide_id"]) == slides and set(report["status"]) == {"ok"}
    assert set(report["grid"]) == {f"{GRID}x{GRID}"} and np.allclose(report["um_per_cell"], UM_PER_CELL)
    for sid in slides:
        cam = read_cam_file(out / f"{sid}.h5")
        attrs = cam["attrs"]
        assert cam["cam"].shape == cam["raw"].shape == (TOP_K, GRID, GRID)
        assert list(attrs["grid"]) == [GRID, GRID] and attrs["stage"] == "layer1"
        # microns per cell = patch side in microns / grid, from the patch file's level-0 side and mpp
        assert attrs["patch_size_level0"] == 128 and attrs["mpp"] == 0.5
        assert attrs["um_per_cell"] == pytest.approx(128 * 0.5 / GRID) == UM_PER_CELL
        assert attrs["feature_gap"] < 1e-4 and attrs["target_class"] == 1
        np.testing.assert_array_equal(cam["rank"], np.arange(1, TOP_K + 1))
        for name in (f"{sid}_cam.png", f"{sid}_slide.png"):
            image = cv2.imread(str(out / name))
            assert image is not None and image.shape[0] > 50, name
    summary = json.loads((out / "cam.json").read_text())
    assert summary["resolution"]["grid"] == [GRID, GRID] and summary["resolution"]["input_size"] == INPUT
    assert summary["resolution"]["um_per_cell"] == pytest.approx(UM_PER_CELL)
    assert summary["settings"]["top_k"] == TOP_K and summary["run_kind"] == "mil"


def test_maps_equal_grad_cam_computed_directly_on_the_same_patches(study):
    sid = study["pos"][0]
    run = study["run"]
    att = read_attention(run / "attention" / f"{sid}.h5")
    top = np.argsort(-att["score"].astype(np.float64), kind="stable")[:TOP_K]
    bag = read_feature_file(study["features"] / f"{sid}.h5")
    patches = read_patch_file(bag.attrs["patch_file"])
    with open_slide(bag.attrs["slide_path"], mpp=patches.spec.mpp) as slide:
        reader = PatchReader(slide, patches.spec)
        pixels = np.stack(
            [
                cv2.resize(reader.read(int(x), int(y)), (INPUT, INPUT), interpolation=cv2.INTER_AREA)
                for x, y in bag.coords[top]
            ]
        )
    encoder, head = run_encoder(run), load_run_model(run)
    x = encoder.preprocess(torch.from_numpy(pixels), torch.device("cpu"))
    direct = grad_cam(encoder, head, x, slide_features=bag.features, rows=top)

    cam = read_cam_file(study["cams"].folder / f"{sid}.h5")
    np.testing.assert_array_equal(cam["coords"], bag.coords[top])
    np.testing.assert_array_equal(cam["row"], top)
    np.testing.assert_allclose(cam["cam"], direct.maps, rtol=0, atol=1e-7)
    np.testing.assert_allclose(cam["raw"], direct.raw, rtol=0, atol=1e-7)
    assert cam["attrs"]["logit"] == pytest.approx(direct.logit, abs=1e-6)
    assert direct.maps.max() > 0


def test_cam_localisation_of_the_positive_slides_and_a_slide_without_annotation(study, tmp_path):
    out = study["cams"].folder
    report = pd.read_csv(out / "cams.csv", dtype={"slide_id": str}).set_index("slide_id")
    games = []
    for sid in study["pos"]:
        cam = read_cam_file(out / f"{sid}.h5")
        # the demo masks load through their sidecar (downsample 16), with no downsample given here
        expected = cam_localisation(cam["cam"], cam["coords"], 128, load_annotation(study["masks"] / f"{sid}.png"))
        if expected["cam_mass"] is None:  # all-zero maps: no mass to share out
            assert np.isnan(report.loc[sid, "cam_mass"])
        else:
            assert report.loc[sid, "cam_mass"] == pytest.approx(expected["cam_mass"], rel=1e-12)
        assert report.loc[sid, "lesion_area_share"] == pytest.approx(expected["lesion_area_share"], rel=1e-12)
        assert report.loc[sid, "n_pointing"] == expected["n_pointing"]
        if expected["pointing_game"] is not None:
            assert report.loc[sid, "pointing_game"] == pytest.approx(expected["pointing_game"])
            assert report.loc[sid, "pointing_chance"] == pytest.approx(expected["pointing_chance"])
            games.append(expected["pointing_game"])
    assert report.loc[study["neg"], "cam_mass"].isna().all()  # negative slides are not scored
    loc = json.loads((out / "cam.json").read_text())["localisation"]
    assert loc["n_positive"] == 3 and loc["n_scored"] == 3 and loc["unannotated"] == []
    assert loc["cohort"]["pointing_game"]["mean"] == pytest.approx(np.mean(games))

    # without one positive slide's annotation: everything is reused, that slide is not scored, the count says so
    partial = tmp_path / "masks"
    shutil.copytree(study["masks"], partial)
    missing = study["pos"][1]
    (partial / f"{missing}.png").unlink()
    again = write_cams(
        study["run"], shutil.copytree(out, tmp_path / "cam"), top_k=TOP_K, device="cpu", annotations_dir=partial
    )
    assert {r.status for r in again.results} == {"skipped"}
    loc = again.summary["localisation"]
    assert loc["n_positive"] == 3 and loc["n_scored"] == 2 and loc["unannotated"] == [missing]
    row = pd.read_csv(tmp_path / "cam" / "cams.csv", dtype={"slide_id": str}).set_index("slide_id").loc[missing]
    assert not row["annotated"] and pd.isna(row["cam_mass"])


def test_resume_skips_done_slides_and_redoes_a_removed_one(study, tmp_path):
    out = shutil.copytree(study["cams"].folder, tmp_path / "cam")
    redo = study["neg"][0]
    (out / f"{redo}.h5").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    again = write_cams(study["run"], out, top_k=TOP_K, device="cpu", batch_size=2)  # batch size: runtime only
    status = {r.slide_id: r.status for r in again.results}
    assert status.pop(redo) == "ok" and set(status.values()) == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5") if p.name in kept} == kept
    np.testing.assert_allclose(
        read_cam_file(out / f"{redo}.h5")["cam"],
        read_cam_file(study["cams"].folder / f"{redo}.h5")["cam"],
        rtol=0,
        atol=1e-7,
    )
    with pytest.raises(HistotransferError, match=r"holds CAMs made differently .*top_k \(3 vs 2\)"):
        write_cams(study["run"], out, top_k=2, device="cpu")


def test_a_slide_replaced_by_another_image_is_refused(study, tmp_path, capsys):
    moved = shutil.copytree(study["root"] / "slides", tmp_path / "slides")
    impostor, other = study["pos"][0], study["neg"][0]
    shutil.copyfile(moved / f"{other}.tif", moved / f"{impostor}.tif")
    code = main(
        [
            "cam",
            "--run",
            str(study["run"]),
            "--out",
            str(tmp_path / "cam"),
            "--slides",
            str(moved),
            "--slide-ids",
            impostor,
            other,
            "--top-k",
            "2",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and f"failed {impostor}" in err
    report = pd.read_csv(tmp_path / "cam" / "cams.csv", dtype={"slide_id": str}).set_index("slide_id")
    assert report.loc[impostor, "status"] == "error" and "is not the slide" in report.loc[impostor, "message"]
    assert report.loc[other, "status"] == "ok"
    assert not (tmp_path / "cam" / f"{impostor}.h5").exists()


def test_an_encoder_that_does_not_reproduce_the_run_is_refused(study, tmp_path):
    run = shutil.copytree(study["run"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["encoder"]["input_size"] = 64  # the features were made at 32 px
    (run / "config.json").write_text(json.dumps(config))
    for path in (run / "attention").glob("*.h5"):  # the attention stays the run's: only the encoder differs
        with h5py.File(path, "r+") as f:
            f.attrs["run_fingerprint"] = run_fingerprint(run)
    with pytest.raises(HistotransferError, match="does not reproduce the run's features"):
        write_cams(run, tmp_path / "cam", top_k=2, device="cpu", slide_ids=[study["neg"][0]])


def test_the_command_states_the_resolution_and_refuses_a_bad_run_in_one_line(study, tmp_path, capsys):
    base = ["cam", "--out", str(tmp_path / "cam"), "--device", "cpu"]
    assert main([*base, "--run", str(study["run"]), "--slide-ids", study["neg"][1], "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{GRID}x{GRID} cells per patch ({INPUT} px input) = 8 um per cell" in out and "cam: 1 done" in out

    for args, needle in (
        (["--run", str(tmp_path / "missing")], "no config.json"),
        (["--run", str(study["run"]), "--top-k", "0"], "--top-k"),
        (["--run", str(study["run"]), "--target-class", "2"], "--target-class"),
        (["--run", str(study["run"]), "--slide-ids", "nope"], "--slide-ids: nope"),
    ):
        code = main([*base[:1], "--out", str(tmp_path / "other"), *base[3:], *args])
        err = capsys.readouterr().err
        assert code == 2, args
        assert err.startswith("histotransfer cam: error:") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "other").exists()


def test_cams_of_a_finetuned_run_use_its_finetuned_encoder(study, tmp_path):
    ft = finetune(
        study["run"], tmp_path / "ft", top_k=2, epochs=2, lr=1e-3, device="cpu", batch_slides=2, freeze_stages=0
    )
    assert json.loads((ft / "comparison.json").read_text())["selection"]["kept"] == "finetuned"
    sid = study["pos"][2]
    done = write_cams(ft, tmp_path / "cam", top_k=2, device="cpu", slide_ids=[sid])
    assert [r.status for r in done.results] == ["ok"] and done.summary["run_kind"] == "finetune"
    frozen = read_cam_file(study["cams"].folder / f"{sid}.h5")["cam"][:2]
    tuned = read_cam_file(tmp_path / "cam" / f"{sid}.h5")
    assert tuned["attrs"]["feature_gap"] < 1e-4 and not np.allclose(tuned["cam"], frozen)
