"""Study file validation: every problem is named (key path, bad value, fix) before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from histotransfer.errors import HistotransferError
from histotransfer.study import load_study, plan, run_study
from histotransfer.study.grid import EncoderConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def make_dataset(root: Path, name: str = "ds", n: int = 4) -> dict:
    """A folder of (empty) slide files and a labels CSV: enough for validation, which never opens slides."""
    slides = root / name / "slides"
    slides.mkdir(parents=True)
    for i in range(n):
        (slides / f"s{i}.svs").write_bytes(b"")
    (slides / "notes.txt").write_text("not a slide")
    labels = root / name / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(n)))
    return {"name": name, "slides": f"{name}/slides", "labels": f"{name}/labels.csv"}


def write_study(root: Path, study: dict) -> Path:
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def base_study(root: Path) -> dict:
    return {
        "name": "t",
        "datasets": [make_dataset(root)],
        "encoders": [
            {"name": "resnet18", "weights": "random", "truncations": [0, 2]},
            {"name": "densenet121", "weights": "random"},
        ],
        "seeds": [0, 1],
        "mil": {"epochs": 2, "lr": "1e-3"},
        "finetune": {"encoders": [{"name": "resnet18", "truncation": 2}], "epochs": 1},
        "cka": {"n_patches": 16},
    }


def problems(root: Path, study: dict) -> str:
    with pytest.raises(HistotransferError) as info:
        load_study(write_study(root, study))
    return str(info.value)


def test_valid_study_expands_slides_and_fills_defaults(tmp_path):
    study = load_study(write_study(tmp_path, base_study(tmp_path)))
    ds = study.datasets[0]
    assert [p.name for p in ds.slides] == ["s0.svs", "s1.svs", "s2.svs", "s3.svs"]
    assert ds.labels == (tmp_path / "ds" / "labels.csv").resolve()
    assert (ds.tile.magnification, ds.tile.patch_size, ds.tile.min_tissue) == (20.0, 512, 0.5)
    assert study.encoders == (
        EncoderConfig("resnet18", "random", 0),
        EncoderConfig("resnet18", "random", 2),
        EncoderConfig("densenet121", "random", 0),
    )
    assert study.mil[0].settings.lr == pytest.approx(1e-3) and study.mil[0].settings.epochs == 2
    assert study.finetune_encoders == (EncoderConfig("resnet18", "random", 2),)
    assert study.finetune_seeds == (0, 1) and study.cka.n_patches == 16
    assert study.encoder_info["densenet121"]["family"] == "imagenet"


def test_plan_has_one_cell_per_grid_point(tmp_path):
    cells = plan(load_study(write_study(tmp_path, base_study(tmp_path))))
    kinds = [c.kind for c in cells]
    assert kinds.count("tile") == 1
    assert kinds.count("extract") == 2  # one per network and weights: resnet18's truncations share one pass
    assert kinds.count("mil") == 3 * 2
    assert kinds.count("finetune") == 2 and kinds.count("cka") == 2
    assert len({c.key for c in cells}) == len(cells)
    seen = set()
    for c in cells:  # dependencies always come first
        assert all(d.key in seen for d in c.deps)
        seen.add(c.key)


def test_top_level_tile_settings_are_dataset_defaults_that_a_dataset_overrides(tmp_path):
    study = base_study(tmp_path)
    study["tile"] = {"patch_size": 256, "min_tissue": 0.25, "workers": 2}
    study["datasets"].append({**make_dataset(tmp_path, "other"), "patch_size": 128})
    first, second = load_study(write_study(tmp_path, study)).datasets
    assert (first.tile.patch_size, first.tile.min_tissue, first.tile.workers) == (256, 0.25, 2)
    assert (second.tile.patch_size, second.tile.min_tissue) == (128, 0.25)


def test_labels_file_problems_that_training_would_refuse_are_caught_by_the_check(tmp_path):
    study = base_study(tmp_path)
    (tmp_path / "ds" / "labels.csv").write_text("slide_id,label\ns0,a\ns1,b\ns2,c\ns3,a\n")
    assert "datasets[0].labels: " in problems(tmp_path, study) and "3 classes" in problems(tmp_path, study)
    (tmp_path / "ds" / "labels.csv").write_text("slide_id;label\ns0;0\ns1;1\n")
    assert "separated by semicolons" in problems(tmp_path, study)


def test_typo_in_dataset_key_names_it_with_suggestion(tmp_path):
    study = base_study(tmp_path)
    study["datasets"][0]["lables"] = study["datasets"][0].pop("labels")
    text = problems(tmp_path, study)
    assert "datasets[0].lables: unknown key 'lables' (did you mean 'labels'?)" in text
    assert "datasets[0].labels: missing (required)" in text


def test_typo_in_top_level_and_section_keys(tmp_path):
    study = base_study(tmp_path)
    study["seed"] = study.pop("seeds")
    study["mil"]["epoch"] = 3
    text = problems(tmp_path, study)
    assert "seed: unknown key 'seed' (did you mean 'seeds'?)" in text
    assert "mil.epoch: unknown key 'epoch' (did you mean 'epochs'?)" in text
    assert "2 problem(s)" in text


def test_unknown_encoder_is_named_with_the_known_ones(tmp_path):
    study = base_study(tmp_path)
    study["encoders"][1]["name"] = "densenet12"
    text = problems(tmp_path, study)
    assert "encoders[1].name: unknown encoder 'densenet12' (did you mean 'densenet121'?)" in text
    assert "efficientnet_b3" in text and "mormont-mtl-densenet121" in text


def test_missing_labels_file_is_named(tmp_path):
    study = base_study(tmp_path)
    study["datasets"][0]["labels"] = "ds/missing.csv"
    text = problems(tmp_path, study)
    assert "datasets[0].labels: labels CSV not found: " + str((tmp_path / "ds" / "missing.csv").resolve()) in text


def test_labels_without_label_column_and_empty_slide_folder(tmp_path):
    study = base_study(tmp_path)
    (tmp_path / "ds" / "labels.csv").write_text("slide,diagnosis\ns0,1\n")
    (tmp_path / "empty").mkdir()
    study["datasets"][0]["slides"] = "empty"
    text = problems(tmp_path, study)
    assert "datasets[0].labels: " in text and "missing column(s) slide_id, label" in text
    assert "datasets[0].slides: " in text and "folder holds no slide files" in text


def test_truncation_too_deep_for_the_architecture(tmp_path):
    study = base_study(tmp_path)
    study["encoders"][0]["truncations"] = [0, 4]
    text = problems(tmp_path, study)
    assert "encoders[0].truncations[1]: truncation 4 is too deep for resnet18" in text
    assert "0..3" in text


def test_finetune_encoder_must_be_in_the_grid(tmp_path):
    study = base_study(tmp_path)
    study["finetune"]["encoders"] = [{"name": "resnet18", "truncation": 1}]
    text = problems(tmp_path, study)
    assert "finetune.encoders[0]: resnet18 with truncation 1 is not in 'encoders'" in text


def test_bad_values_and_missing_weights_file(tmp_path):
    study = base_study(tmp_path)
    study["extract"] = {"device": "gpu", "precision": "fp23"}
    study["mil"]["model"] = "gatd"
    study["encoders"][1]["weights"] = "weights/nope.safetensors"
    study["cka"]["pooling"] = "max"
    text = problems(tmp_path, study)
    assert "extract.device: 'gpu' is not a device: use auto, cpu, cuda or cuda:N" in text
    assert "extract.precision: 'fp23' is not one of fp32, bf16, fp16 (did you mean 'fp32'?)" in text
    assert "mil.model: 'gatd' is not one of histotransfer, gated (did you mean 'gated'?)" in text
    assert "encoders[1].weights: weights file for densenet121 not found" in text
    assert "cka.pooling: 'max' is not one of classifier, mean, flatten" in text


def test_histopathology_encoder_without_its_checkpoint_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path / "no_weights_here"))
    study = base_study(tmp_path)
    study["encoders"].append({"name": "ciga-simclr-resnet18"})
    text = problems(tmp_path, study)
    assert "encoders[2].weights:" in text and "ciga-simclr-resnet18" in text


def test_bad_study_fails_before_any_work(tmp_path):
    study = base_study(tmp_path)
    study["encoders"][0]["name"] = "resnet81"
    out = tmp_path / "out"
    with pytest.raises(HistotransferError, match="unknown encoder 'resnet81'"):
        run_study(write_study(tmp_path, study), out)
    assert not out.exists()


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(HistotransferError, match="not valid YAML"):
        load_study(bad)
    with pytest.raises(HistotransferError, match="study file not found"):
        load_study(tmp_path / "absent.yaml")


def test_cli_reports_problems_and_exits_2(tmp_path, capsys):
    from histotransfer.cli import main

    study = base_study(tmp_path)
    study["datasets"][0]["magnifcation"] = 20
    assert main(["study", str(write_study(tmp_path, study)), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'magnification'?" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["demo_study.yaml", "paper_study.yaml"])
def test_example_study_files_have_only_known_keys(name, tmp_path, monkeypatch):
    """The examples use only valid keys; the paper study's data paths are the only thing a user must supply."""
    text = (EXAMPLES / name).read_text()
    path = tmp_path / name
    path.write_text(text)
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path / "weights"))
    if name == "demo_study.yaml":
        study = load_study(path)
        assert study.datasets[0].demo is not None and len(study.encoders) >= 3
        return
    with pytest.raises(HistotransferError) as info:
        load_study(path)
    for line in str(info.value).splitlines()[1:]:
        assert "not found" in line, line  # data and checkpoints absent here; nothing else may be wrong
