"""Tables I-IV, figures and report.html from synthetic run folders: every number must match its metrics.json."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histotransfer.study.figures import draw_figures
from histotransfer.study.grid import EncoderConfig
from histotransfer.study.report import write_report
from histotransfer.study.runs import cka_stages, finetune_runs, localisation_runs, mil_runs
from histotransfer.study.tables import build_tables, display_table, localisation_table, to_markdown, write_tables

INFO = {
    "resnet18": {"family": "imagenet", "weights": {"imagenet": {"imagenet_top1": 69.758}}},
    "densenet121": {"family": "imagenet", "weights": {"imagenet": {"imagenet_top1": 74.434}}},
    "ciga-simclr-resnet18": {"family": "histopathology", "weights": {"pretrained": {"imagenet_top1": None}}},
}
R18 = [EncoderConfig("resnet18", "random", k) for k in (0, 1, 2)]
D121 = EncoderConfig("densenet121", "imagenet", 0)
CIGA = EncoderConfig("ciga-simclr-resnet18", "pretrained", 0)
ENCODERS = (*R18, D121, CIGA)
DATASETS = ["alpha", "beta"]
SEEDS = [0, 1, 2]


def write_metrics(run: Path, auc: float | None, n_slides: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    test = {
        "auc": auc,
        "auc_ci_low": None,
        "auc_ci_high": None,
        "accuracy": 0.5,
        "balanced_accuracy": 0.5,
        "f1": 0.5,
        "n_slides": n_slides,
    }
    (run / "metrics.json").write_text(json.dumps({"train": dict(test, n_slides=30), "val": test, "test": test}))


def synthetic_study(out: Path) -> list[dict]:
    """MIL runs for every (dataset, encoder, seed) but densenet121 on beta (as if failed), a NaN AUC for
    ciga seed 2 on alpha, fine-tuning of resnet18 truncate 1, and CKA of it: the records the runner keeps."""
    rng = np.random.default_rng(0)
    records = []
    for ds in DATASETS:
        for enc in ENCODERS:
            if enc == D121 and ds == "beta":
                continue
            for seed in SEEDS:
                rel = f"mil/{ds}/{enc.key}/seed{seed}/run"
                auc = None if (enc == CIGA and ds == "alpha" and seed == 2) else float(rng.uniform(0.5, 1.0))
                write_metrics(out / rel, auc, 12 if ds == "alpha" else 9)
                records.append(
                    {"kind": "mil", "dataset": ds, "encoder": enc.spec(), "seed": seed, "result": {"run": rel}}
                )
        for seed in SEEDS[:2]:
            rel = f"finetune/{ds}/{R18[1].key}/seed{seed}/run"
            write_metrics(out / rel, float(rng.uniform(0.5, 1.0)), 12 if ds == "alpha" else 9)
            records.append(
                {
                    "kind": "finetune",
                    "dataset": ds,
                    "encoder": R18[1].spec(),
                    "seed": seed,
                    "result": {"run": rel, "frozen_run": f"mil/{ds}/{R18[1].key}/seed{seed}/run"},
                }
            )
            csv = out / f"cka/{ds}/{R18[1].key}/seed{seed}/cka/cka.csv"
            csv.parent.mkdir(parents=True)
            pd.DataFrame(
                {
                    "stage": ["stem", "layer1", "layer2", "layer3"],
                    "cka": [1.0, 0.99, 0.9 - 0.1 * seed, 0.7],
                    "baseline": [0.5, 0.4, 0.3, 0.2],
                    "baseline_sd": [0.05, 0.04, 0.03, 0.02],
                }
            ).to_csv(csv, index=False)
            records.append(
                {
                    "kind": "cka",
                    "dataset": ds,
                    "encoder": R18[1].spec(),
                    "seed": seed,
                    "result": {"csv": str(csv.relative_to(out)), "comparison": "r18 frozen vs fine-tuned"},
                }
            )
    return records


def file_aucs(out: Path, ds: str, enc: EncoderConfig, kind: str = "mil") -> list[float]:
    """The test AUCs of one configuration straight from the metrics files (None excluded)."""
    aucs = []
    for seed in SEEDS:
        path = out / f"{kind}/{ds}/{enc.key}/seed{seed}/run/metrics.json"
        if path.exists():
            auc = json.loads(path.read_text())["test"]["auc"]
            if auc is not None:
                aucs.append(auc)
    return aucs


@pytest.fixture()
def built(tmp_path):
    records = synthetic_study(tmp_path)
    mil = mil_runs(tmp_path, records, INFO)
    ft = finetune_runs(tmp_path, records, INFO)
    tables = build_tables(mil, ft, ENCODERS, (R18[1],), DATASETS, INFO)
    return tmp_path, records, mil, ft, tables


def test_long_table_matches_every_metrics_file(built):
    out, records, mil, _, _ = built
    assert len(mil) == sum(r["kind"] == "mil" for r in records) == 27
    for row in mil.itertuples():
        test = json.loads((out / row.run / "metrics.json").read_text())["test"]
        assert row.n_slides == test["n_slides"]
        assert (np.isnan(row.auc) and test["auc"] is None) or row.auc == test["auc"]


def test_table1_rows_columns_and_values(built):
    out, _, _, _, tables = built
    t1 = tables["table1_architectures"]
    assert list(zip(t1["encoder"], t1["weights"])) == [("resnet18", "random"), ("densenet121", "imagenet")]
    # Only ImageNet weights carry an ImageNet accuracy: resnet18 here has random weights.
    assert t1["imagenet_top1"].isna().tolist() == [True, False] and t1["imagenet_top1"].iloc[1] == 74.434
    for ds in DATASETS:
        for col in ("auc_mean", "auc_sd", "n_seeds", "n_slides"):
            assert f"{ds}_{col}" in t1.columns
    for i, enc in enumerate([R18[0], D121]):
        for ds in DATASETS:
            aucs = file_aucs(out, ds, enc)
            if not aucs:
                assert np.isnan(t1.loc[i, f"{ds}_auc_mean"]) and t1.loc[i, f"{ds}_n_seeds"] == 0
                continue
            assert t1.loc[i, f"{ds}_auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-12)
            assert t1.loc[i, f"{ds}_auc_sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
            assert t1.loc[i, f"{ds}_n_seeds"] == 3
            assert t1.loc[i, f"{ds}_n_slides"] == (12 if ds == "alpha" else 9)


def test_table2_skips_nan_auc_and_table4_lists_every_truncation(built):
    out, _, _, _, tables = built
    t2 = tables["table2_histopathology_encoders"]
    assert list(t2["encoder"]) == ["ciga-simclr-resnet18"]
    alpha = file_aucs(out, "alpha", CIGA)
    assert len(alpha) == 2 and t2.loc[0, "alpha_n_seeds"] == 2
    assert t2.loc[0, "alpha_auc_mean"] == pytest.approx(np.mean(alpha), abs=1e-12)
    t4 = tables["table4_truncation"]
    assert list(zip(t4["encoder"], t4["truncate"])) == [("resnet18", 0), ("resnet18", 1), ("resnet18", 2)]
    for i, enc in enumerate(R18):
        assert t4.loc[i, "beta_auc_mean"] == pytest.approx(np.mean(file_aucs(out, "beta", enc)), abs=1e-12)


def test_table3_frozen_and_finetuned_from_the_same_seeds(built):
    out, _, _, _, tables = built
    t3 = tables["table3_finetuning"]
    assert len(t3) == 1 and t3.loc[0, "truncate"] == 1
    for ds in DATASETS:
        tuned = file_aucs(out, ds, R18[1], kind="finetune")
        frozen = file_aucs(out, ds, R18[1])[: len(tuned)]  # only the fine-tuned seeds (0, 1)
        assert t3.loc[0, f"{ds}_finetuned_auc_mean"] == pytest.approx(np.mean(tuned), abs=1e-12)
        assert t3.loc[0, f"{ds}_frozen_auc_mean"] == pytest.approx(np.mean(frozen), abs=1e-12)
        assert t3.loc[0, f"{ds}_frozen_auc_sd"] == pytest.approx(np.std(frozen, ddof=1), abs=1e-12)
        assert t3.loc[0, f"{ds}_n_seeds"] == 2


def test_markdown_and_csv_files(built):
    out, _, mil, ft, tables = built
    shown = write_tables(out / "tables", tables, DATASETS, {"runs_mil": mil, "runs_finetune": ft})
    for name in tables:
        csv = pd.read_csv(out / "tables" / f"{name}.csv")
        assert len(csv) == len(tables[name])
        assert (out / "tables" / f"{name}.md").read_text().count("\n|") >= len(tables[name]) + 1
    t1 = shown["table1_architectures"]
    assert list(t1.columns) == ["Encoder", "Weights", "ImageNet top-1 (%)", "Stain", "MIL recipe", "alpha", "beta"]
    aucs = file_aucs(out, "alpha", D121)
    assert t1.loc[1, "alpha"] == f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f} (n=12)"
    assert t1.loc[1, "beta"] == "–"  # densenet121 never finished on beta
    md = (out / "tables" / "table1_architectures.md").read_text()
    assert f"| densenet121 | imagenet | 74.4 | none |  | {t1.loc[1, 'alpha']} | – |" in md
    t3 = display_table("table3_finetuning", tables["table3_finetuning"], DATASETS)
    assert list(t3.columns) == [
        "Encoder",
        "Weights",
        "Truncation",
        "Stain",
        "MIL recipe",
        "alpha: frozen",
        "alpha: fine-tuned",
        "beta: frozen",
        "beta: fine-tuned",
    ]
    assert pd.read_csv(out / "tables" / "runs_mil.csv")["auc"].notna().sum() == 26


def test_markdown_escapes_pipes():
    md = to_markdown(pd.DataFrame({"a|b": ["x|y"], "c": [1]}))
    assert md.splitlines()[0] == "| a\\|b | c |" and md.splitlines()[2] == "| x\\|y | 1 |"


def test_figures_drawn_from_runs_and_skipped_without_data(built, tmp_path):
    import matplotlib.image as mpimg

    out, records, mil, _, _ = built
    cka = cka_stages(out, records)
    assert list(cka.loc[cka["seed"] == 1, "cka"][:4]) == [1.0, 0.99, 0.8, 0.7]
    assert list(cka.loc[cka["seed"] == 1, "baseline_sd"][:4]) == [0.05, 0.04, 0.03, 0.02]  # the baseline's band
    assert list(cka.columns[7:9]) == ["baseline", "baseline_sd"]
    figures = draw_figures(out / "figures", mil, cka)
    assert [f.name for f in figures] == ["cka_per_stage", "auc_vs_imagenet_top1", "auc_vs_truncation"]
    for fig in figures:
        img = mpimg.imread(fig.path)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01
    empty = draw_figures(tmp_path / "empty_figs", mil.iloc[0:0], cka.iloc[0:0])
    assert all(f.path is None and f.missing for f in empty)
    assert not (tmp_path / "empty_figs").exists()


STUDY_TEXT = "name: synthetic\n# a comment with <script>alert('x')</script> & friends\n"


@pytest.fixture()
def report(built):
    out, records, mil, ft, tables = built
    shown = write_tables(out / "tables", tables, DATASETS, {"runs_mil": mil, "runs_finetune": ft})
    figures = draw_figures(out / "figures", mil, cka_stages(out, records))
    cells = [
        {
            "kind": r["kind"],
            "key": str(Path(r["result"].get("run") or r["result"]["csv"]).parent),
            "status": "done",
            "seconds": 1.5,
            "message": "",
        }
        for r in records
    ]
    for c in cells:
        c["folder"] = c["key"]
    cells.append(
        {
            "kind": "extract",
            "key": "extract/beta/densenet121-imagenet-t0",
            "folder": "extract/beta/densenet121-imagenet-t0",
            "status": "failed",
            "seconds": 0.1,
            "message": "slide <b>x</b> unreadable",
        }
    )
    (out / cells[-1]["folder"]).mkdir(parents=True)
    (out / cells[-1]["folder"] / "error.log").write_text("Traceback ...")
    path = write_report(out / "report.html", "Synthetic <study>", out / "study.yaml", STUDY_TEXT, shown, figures, cells)
    return path, figures, cells


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "table":
            self.tables += 1


def test_report_is_self_contained_with_figures_tables_and_links(report):
    path, figures, cells = report
    text = path.read_text()
    page = _Page()
    page.feed(text)
    assert len(page.images) == 3
    for src, fig in zip(page.images, figures):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :]) == fig.path.read_bytes()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert page.tables == 4 + 2  # Tables I-IV, the cells, the versions
    for href in page.links:  # every link is relative and points at a file or folder of the study
        assert not href.startswith(("/", "file:")) and (path.parent / href).exists(), href
    assert sum(h.endswith("/") for h in page.links) == len(cells)
    assert "extract/beta/densenet121-imagenet-t0/error.log" in page.links
    assert "&lt;script&gt;alert" in text and "<script>alert" not in text
    assert "slide &lt;b&gt;x&lt;/b&gt; unreadable" in text and "Synthetic &lt;study&gt;" in text
    assert "torchvision" in text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    if os.environ.get("HISTOTRANSFER_TEST_INSTALL_CHROMIUM") == "1" and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, capture_output=True, timeout=900)
        return shutil.which("chromium")
    return None


PROBE = """<script>
window.addEventListener("load", () => {
  const shown = (e) => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const imgs = [...document.images];
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0 && shown(i)).length;
  const tables = [...document.querySelectorAll("table")].filter(shown).length;
  document.title = `probe images=${ok}/${imgs.length} tables=${tables}`;
});
</script>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "chromium is not installed (apt-get install -y chromium; or set "
            "HISTOTRANSFER_TEST_INSTALL_CHROMIUM=1 to let this test install it as root)"
        )
    path, _, _ = report
    probed = path.with_name("probed.html")
    probed.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--window-size=1280,3000",
    ]
    dom = subprocess.run([*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(probe[^<]*)</title>", dom.stdout)
    assert title, f"page did not load: {dom.stderr[-2000:]}"
    assert title.group(1) == "probe images=3/3 tables=6"
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (3000, 1280) and pixels[..., :3].std() > 0.05


def test_table2_pairs_each_histopathology_encoder_with_the_imagenet_encoder_of_its_architecture():
    from histotransfer.study.tables import histopathology_pairs

    info = {
        "resnet18": {"family": "imagenet", "architecture": "resnet18"},
        "densenet121": {"family": "imagenet", "architecture": "densenet121"},
        "ciga-simclr-resnet18": {"family": "histopathology", "architecture": "resnet18"},
        "mormont-mtl-densenet121": {"family": "histopathology", "architecture": "densenet121"},
        "vit_large_patch16_224": {"family": "imagenet", "architecture": "ViT-L/16"},
        "phikon-v2": {"family": "histopathology", "architecture": "ViT-L/16 (DINOv2)"},
        "virchow2": {"family": "histopathology", "architecture": "ViT-H/14, 4 registers, SwiGLU"},
    }
    r18, d121 = EncoderConfig("resnet18", "imagenet", 0), EncoderConfig("densenet121", "imagenet", 0)
    vitl = EncoderConfig("vit_large_patch16_224", "imagenet", 0)
    ciga = EncoderConfig("ciga-simclr-resnet18", "pretrained", 0)
    mormont = EncoderConfig("mormont-mtl-densenet121", "pretrained", 0)
    phikon, virchow = EncoderConfig("phikon-v2", "pretrained", 0), EncoderConfig("virchow2", "pretrained", 0)
    rows = histopathology_pairs(
        [r18, d121, vitl, EncoderConfig("resnet18", "imagenet", 2), ciga, mormont, phikon, virchow], info
    )
    assert rows == [
        (r18, "ImageNet"),
        (ciga, "histopathology"),
        (d121, "ImageNet"),
        (mormont, "histopathology"),
        (vitl, "ImageNet"),
        (phikon, "histopathology"),
        (virchow, "histopathology"),
    ]


def test_table5_means_the_localisation_of_each_configuration_over_seeds(tmp_path):
    """Table V from hand-made localisation.json and cam.json files: means over seeds, slide counts, the CAM
    scores joined to their own run (same dataset, configuration, stain, recipe and seed)."""
    records = []
    # top_patch_touches, touching_share, top_patch_hit, auc_touching per seed
    scores = {0: (1.0, 0.2, 0.5, 0.9), 1: (0.5, 0.4, 0.0, None)}
    for seed, (touch, share, hit, auc) in scores.items():
        rel = f"mil/alpha/{R18[2].key}/histotransfer/seed{seed}/localisation.json"
        (tmp_path / rel).parent.mkdir(parents=True)
        cohort = {
            "top_patch_touches": {"mean": touch, "n": 4},
            "touching_share": {"mean": share, "n": 4},
            "top_patch_hit": {"mean": hit, "n": 4},
            "auc_touching": {"mean": auc, "n": 4 if auc else 0},
        }
        (tmp_path / rel).write_text(json.dumps({"n_scored": 4 + seed, "cohort": cohort}))
        records.append(
            {
                "kind": "mil",
                "dataset": "alpha",
                "config": R18[2].key,
                "encoder": R18[2].spec(),
                "recipe": "histotransfer",
                "stain": "none",
                "seed": seed,
                "result": {"localisation": rel},
            }
        )
    cam = f"cam/alpha/{R18[2].key}/histotransfer/seed1/cam/cam.json"
    (tmp_path / cam).parent.mkdir(parents=True)
    (tmp_path / cam).write_text(
        json.dumps(
            {
                "localisation": {
                    "cohort": {
                        "pointing_game": {"mean": 0.75},
                        "pointing_chance": {"mean": 0.25},
                        "cam_mass": {"mean": 0.3},
                    }
                },
                "resolution": {"um_per_cell": 16.0},
            }
        )
    )
    records.append(
        {
            "kind": "cam",
            "dataset": "alpha",
            "config": R18[2].key,
            "encoder": R18[2].spec(),
            "recipe": "histotransfer",
            "stain": "none",
            "seed": 1,
            "result": {"cams": cam},
        }
    )
    runs = localisation_runs(tmp_path, records, INFO)
    assert runs["seed"].tolist() == [0, 1] and runs["pointing_game"].isna().tolist() == [True, False]
    table = localisation_table(runs, ["alpha"])
    row = table.iloc[0]
    assert (row["encoder"], row["truncate"], row["stain"], row["recipe"]) == ("resnet18", 2, "none", "histotransfer")
    assert row["alpha_n_scored"] == "4-5"
    assert row["alpha_top_patch_touches"] == pytest.approx(0.75)
    assert row["alpha_top_patch_touches_chance"] == pytest.approx(0.3)  # the chance level, also over seeds
    assert row["alpha_top_patch_hit"] == pytest.approx(0.25) and np.isnan(row["alpha_top_patch_hit_chance"])
    assert row["alpha_auc_touching"] == pytest.approx(0.9)  # a seed without an AUC does not count
    assert (row["alpha_pointing_game"], row["alpha_cam_mass"], row["alpha_um_per_cell"]) == (0.75, 0.3, 16.0)
    assert row["alpha_pointing_game_chance"] == 0.25
    shown = display_table("table5_localisation", table, ["alpha"])
    assert list(shown.columns[:5]) == ["Encoder", "Weights", "Truncation", "Stain", "MIL recipe"]
    assert shown["alpha: top patch touches lesion"].tolist() == ["0.750 (0.300)"]
    assert shown["alpha: CAM pointing game"].tolist() == ["0.750 (0.250)"]
    assert shown["alpha: patch AUC"].tolist() == ["0.900"]


def test_a_transformer_cut_to_blocks_is_its_own_row_never_the_full_network(tmp_path):
    """A `blocks` configuration keeps its AUCs apart from the full network's: not in Table I, in Table IV with
    its depth, and out of the truncation figure's axis."""
    vit = EncoderConfig("uni", "pretrained", 0)
    cut = EncoderConfig("uni", "pretrained", 0, blocks=10)
    info = {"uni": {"family": "histopathology", "weights": {"pretrained": {"imagenet_top1": None}}}}
    records = []
    for cfg, auc in ((vit, 0.9), (cut, 0.6)):
        rel = f"mil/alpha/{cfg.key}/seed0/run"
        write_metrics(tmp_path / rel, auc, 12)
        records.append({"kind": "mil", "dataset": "alpha", "encoder": cfg.spec(), "seed": 0, "result": {"run": rel}})
    mil = mil_runs(tmp_path, records, info)
    assert mil["config"].tolist() == ["uni-pretrained-t0", "uni-pretrained-b10"]
    tables = build_tables(mil, finetune_runs(tmp_path, [], info), (vit, cut), (), ["alpha"], info)
    t2 = tables["table2_histopathology_encoders"]
    assert t2["alpha_auc_mean"].tolist() == [0.9]  # the full network only, its own AUC
    t4 = tables["table4_truncation"]
    assert t4["alpha_auc_mean"].tolist() == [0.9, 0.6]
    assert display_table("table4_truncation", t4, ["alpha"])["Truncation"].tolist() == [0, "10 blocks"]
