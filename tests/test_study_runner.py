"""The cell cache: finished cells are reused, a changed setting redoes only its cells, a failed cell is
recorded and its dependents are skipped while the rest goes on. The stages are replaced by small stand-ins
that write the files the real ones write, so these tests exercise only the study's own logic."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import torchrun_ranks
from histotransfer.errors import HistotransferError
from histotransfer.study import runner, work


def make_dataset(root: Path, name: str) -> dict:
    slides = root / name
    slides.mkdir(parents=True)
    for i in range(6):
        (slides / f"{name}_{i}.tif").write_bytes(b"")
    (root / f"{name}.csv").write_text("slide_id,label\n" + "".join(f"{name}_{i},{i % 2}\n" for i in range(6)))
    return {"name": name, "slides": name, "labels": f"{name}.csv"}


def write_study(root: Path, **changes) -> Path:
    study = {
        "name": "cache test",
        "datasets": [
            make_dataset(root, "a") if not (root / "a").exists() else {"name": "a", "slides": "a", "labels": "a.csv"}
        ],
        "encoders": [{"name": "resnet18", "weights": "random", "truncations": [0, 1]}],
        "seeds": [0, 1],
        "mil": {"epochs": 2},
        "finetune": {"encoders": [{"name": "resnet18", "truncation": 1}], "seeds": [0]},
        "cka": {"n_patches": 8},
    }
    for key, value in changes.items():
        study[key] = value
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture()
def stages(monkeypatch):
    """Stand-in stages recording which cells ran; ``fail`` makes the named cells raise."""
    calls: list[str] = []
    fail: set[str] = set()

    def stand_in(kind):
        def work(cell, ctx, folder):
            calls.append(cell.key)
            if cell.key in fail:
                raise HistotransferError(f"cannot read {cell.key}: broken on purpose")
            if kind == "tile":
                (folder / "patches").mkdir(exist_ok=True)
                return {"patches": f"{cell.key}/patches"}, "6 slides tiled"
            if kind == "extract":
                truncations = cell.settings["encoder"]["truncate"]
                for t in truncations:
                    (folder / "features" / f"t{t}").mkdir(parents=True, exist_ok=True)
                return {"features": {str(t): f"{cell.key}/features/t{t}" for t in truncations}}, ""
            if kind in ("mil", "finetune"):
                run = folder / "run"
                run.mkdir()
                auc = 0.6 + 0.1 * cell.seed + 0.01 * cell.encoder.truncate + (0.05 if kind == "finetune" else 0)
                (run / "metrics.json").write_text(json.dumps({"test": {"auc": auc, "n_slides": 2}}))
                with zipfile.ZipFile(run / "model.pt", "w") as model:  # the layout of a torch.save archive
                    model.writestr("model/data.pkl", b"")
                result = {"run": f"{cell.key}/run"}
                if kind == "finetune":
                    result["frozen_run"] = ctx.dep(cell, "mil")["run"]
                return result, ""
            (folder / "cka").mkdir()
            pd.DataFrame({"stage": ["stem", "layer1", "layer2"], "cka": [1.0, 0.9, 0.8]}).to_csv(
                folder / "cka" / "cka.csv", index=False
            )
            return {"csv": f"{cell.key}/cka/cka.csv", "comparison": "frozen vs fine-tuned"}, ""

        return work

    for kind in ("tile", "extract", "mil", "finetune", "cka"):
        monkeypatch.setitem(work.WORK, kind, stand_in(kind))
    return calls, fail


def markers(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("done.json")}


def statuses(records) -> Counter:
    return Counter(r["status"] for r in records)


def test_rerun_skips_finished_cells_and_leaves_them_untouched(tmp_path, stages):
    calls, _ = stages
    out = tmp_path / "out"
    study = write_study(tmp_path)
    report, records = runner.execute(runner.load_study(study), out, progress=False)
    assert statuses(records) == {"done": 1 + 1 + 4 + 1 + 1}  # one extraction cell for both truncations
    assert len(calls) == 8 and report.is_file()
    before = markers(out)
    assert len(before) == 8
    calls.clear()
    _, records = runner.execute(runner.load_study(study), out, progress=False)
    assert calls == [] and statuses(records) == {"cached": 8}
    assert markers(out) == before
    cells = pd.read_csv(out / "cells.csv")
    assert list(cells["status"]) == ["cached"] * 8
    t4 = pd.read_csv(out / "tables" / "table4_truncation.csv")
    assert list(t4["a_auc_mean"]) == pytest.approx([0.65, 0.66])  # mean over seeds 0 and 1
    t3 = pd.read_csv(out / "tables" / "table3_finetuning.csv")
    assert t3.loc[0, "a_frozen_auc_mean"] == pytest.approx(0.61)
    assert t3.loc[0, "a_finetuned_auc_mean"] == pytest.approx(0.66)


def test_changed_setting_redoes_only_its_cells(tmp_path, stages):
    calls, _ = stages
    out = tmp_path / "out"
    runner.execute(runner.load_study(write_study(tmp_path)), out, progress=False)
    before = markers(out)
    calls.clear()
    runner.execute(runner.load_study(write_study(tmp_path, mil={"epochs": 3})), out, progress=False)
    assert sorted(c.split("/")[0] for c in calls) == ["cka", "finetune"] + ["mil"] * 4
    after = markers(out)
    assert after["tile/a/done.json"] == before["tile/a/done.json"]
    assert after["extract/a/resnet18-random/done.json"] == before["extract/a/resnet18-random/done.json"]
    calls.clear()
    runner.execute(
        runner.load_study(
            write_study(
                tmp_path,
                mil={"epochs": 3},
                seeds=[0, 1, 2],
                encoders=[{"name": "resnet18", "weights": "random", "truncations": [0, 1, 3]}],
            )
        ),
        out,
        progress=False,
    )
    # the network's extraction cell takes the added truncation (the stage computes only what is missing); the
    # runs of the other truncations stay
    assert sorted(calls) == sorted(
        [
            "extract/a/resnet18-random",
            "mil/a/resnet18-random-t0/histotransfer/seed2",
            "mil/a/resnet18-random-t1/histotransfer/seed2",
            "mil/a/resnet18-random-t3/histotransfer/seed0",
            "mil/a/resnet18-random-t3/histotransfer/seed1",
            "mil/a/resnet18-random-t3/histotransfer/seed2",
        ]
    )


def test_editing_labels_retrains_but_does_not_retile(tmp_path, stages):
    calls, _ = stages
    out = tmp_path / "out"
    study = write_study(tmp_path)
    runner.execute(runner.load_study(study), out, progress=False)
    calls.clear()
    labels = tmp_path / "a.csv"
    labels.write_text(labels.read_text().replace("a_0,0", "a_0,1"))
    runner.execute(runner.load_study(study), out, progress=False)
    assert {c.split("/")[0] for c in calls} == {"mil", "finetune", "cka"}


def test_failed_cell_is_recorded_dependents_blocked_rest_done_then_retried(tmp_path, stages):
    calls, fail = stages
    out = tmp_path / "out"
    study = write_study(tmp_path)
    fail.add("mil/a/resnet18-random-t1/histotransfer/seed0")
    report, records = runner.execute(runner.load_study(study), out, progress=False)
    by_key = {r["key"]: r for r in records}
    assert by_key["mil/a/resnet18-random-t1/histotransfer/seed0"]["status"] == "failed"
    assert "broken on purpose" in by_key["mil/a/resnet18-random-t1/histotransfer/seed0"]["message"]
    for key in ("finetune/a/resnet18-random-t1/histotransfer/seed0", "cka/a/resnet18-random-t1/seed0"):
        assert by_key[key]["status"] == "blocked"
    assert (
        by_key["finetune/a/resnet18-random-t1/histotransfer/seed0"]["message"]
        == "needs mil/a/resnet18-random-t1/histotransfer/seed0, which failed"
    )
    assert statuses(records) == {"done": 5, "failed": 1, "blocked": 2}
    failed = json.loads((out / "mil/a/resnet18-random-t1/histotransfer/seed0/failed.json").read_text())
    assert "broken on purpose" in failed["reason"]
    assert "Traceback" in (out / "mil/a/resnet18-random-t1/histotransfer/seed0/error.log").read_text()
    html = report.read_text()
    assert "broken on purpose" in html and 'class="failed"' in html
    fail.clear()
    calls.clear()
    _, records = runner.execute(runner.load_study(study), out, progress=False)
    assert statuses(records) == {"cached": 5, "done": 3}
    assert not (out / "mil/a/resnet18-random-t1/histotransfer/seed0/failed.json").exists()


def test_cli_exit_codes(tmp_path, stages, capsys):
    from histotransfer.cli import main

    calls, fail = stages
    study = write_study(tmp_path)
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--check"]) == 0
    checked = capsys.readouterr().out
    assert "8 cells" in checked and "  to do: tile/a" in checked and calls == []  # each cell to do, by name
    fail.add("tile/a")
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr().out
    assert "failed tile/a: cannot read tile/a" in printed and "report:" in printed
    fail.clear()
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 0


def test_two_studies_cannot_share_an_output_folder(tmp_path, stages):
    out = tmp_path / "out"
    with runner._lock(out), pytest.raises(HistotransferError, match="another study is running"):
        runner.execute(runner.load_study(write_study(tmp_path)), out, progress=False)


@pytest.mark.slow
def test_under_torchrun_the_rank_that_finds_the_folder_locked_stops_both_with_its_one_line(tmp_path):
    """Only rank 0 takes the folder's lock; rank 1, waiting for it at the barrier, stops with its message
    instead of dying with "Connection closed by peer" and a traceback."""
    out = tmp_path / "out"
    with runner._lock(out):
        code, errors = torchrun_ranks(
            ["-m", "histotransfer", "study", str(write_study(tmp_path)), "--out", str(out)], tmp_path / "logs"
        )
    assert code != 0
    line = (
        f"histotransfer study: error: rank 0: {out}: another study is running in this folder; wait for it "
        "to finish or choose another --out"
    )
    assert [e.strip() for e in errors] == [line, line]


def test_cell_whose_outputs_were_deleted_is_redone(tmp_path, stages):
    calls, _ = stages
    out = tmp_path / "out"
    study = write_study(tmp_path)
    runner.execute(runner.load_study(study), out, progress=False)
    calls.clear()
    shutil.rmtree(out / "mil/a/resnet18-random-t0/histotransfer/seed1/run")
    _, records = runner.execute(runner.load_study(study), out, progress=False)
    assert calls == ["mil/a/resnet18-random-t0/histotransfer/seed1"]
    assert statuses(records) == {"cached": 7, "done": 1}
