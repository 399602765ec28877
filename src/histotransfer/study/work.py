"""A study cell's work: what each kind of cell (demo, tile, extract, mil, cam, finetune, cka) runs, given the
results of the cells it depends on, and the result it records for the cells after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._io import h5_files, write_csv, write_json
from .._read import read_csv
from ..errors import HistotransferError
from ..finetune.settings import FinetuneSettings
from ..runtime import Ranks
from ..slide import slide_id_of
from .cells import Cell
from .grid import Dataset, EncoderConfig, Study
from .planner import cka_settings

LOCALISATION_FILE = "localisation.json"


def relative(path: str | Path, out_dir: Path) -> str:
    """``path`` as a result records it: relative to the study folder."""
    return Path(path).resolve().relative_to(out_dir.resolve()).as_posix()


class Context:
    """What a cell's work needs: the study, the output folder and finished dependencies' results."""

    def __init__(self, study: Study, out_dir: Path):
        self.study = study
        self.out = out_dir
        self.results: dict[str, dict[str, Any]] = {}
        self.together = False  # the running cell is run by every rank of a torchrun job together

    @property
    def ranks(self) -> Ranks | None:
        """What a stage that can use several processes is given: the job's ranks (None: join them) when the
        cell runs on all of them, else this process alone."""
        return None if self.together else Ranks()

    def dataset(self, cell: Cell) -> Dataset:
        return next(d for d in self.study.datasets if d.name == cell.dataset)

    def dep(self, cell: Cell, kind: str) -> dict[str, Any]:
        """The result of the cell's dependency of ``kind`` (the grid gives each cell those its stage reads)."""
        for d in cell.deps:
            if d.kind == kind:
                return self.results[d.key]
        raise KeyError(f"{cell.key} has no {kind} dependency")

    def path(self, rel: str) -> Path:
        return self.out / rel

    def demo(self, cell: Cell) -> dict[str, Any] | None:
        """The result of the demo cell a cell depends on, directly or through its dependencies."""
        for d in cell.deps:
            found = self.results[d.key] if d.kind == "demo" else self.demo(d)
            if found is not None:
                return found
        return None

    def annotations(self, cell: Cell) -> Path | None:
        """The dataset's lesion annotations (a demo dataset's lesion masks), None when it has none."""
        demo = self.demo(cell)
        return self.path(demo["annotations"]) if demo is not None else self.dataset(cell).annotations

    def slides_and_labels(self, cell: Cell) -> tuple[list[Path], Path | None]:
        ds = self.dataset(cell)
        demo = self.demo(cell)
        if demo is not None:
            return [self.path(p) for p in demo["slides"]], self.path(demo["labels"])
        return list(ds.slides), ds.labels


def _run_demo(cell: Cell, ctx: Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..demo_slides import make_demo_slides

    demo = make_demo_slides(
        folder, n_slides=cell.settings["n_slides"], seed=cell.settings["seed"], size=cell.settings["size"]
    )
    return {
        "slides": [relative(p, ctx.out) for p in demo.slides],
        "labels": relative(demo.labels_csv, ctx.out),
        "annotations": relative(folder / "lesion_masks", ctx.out),
    }, f"{len(demo.slides)} demo slides"


def _run_tile(cell: Cell, ctx: Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..patches import tile_slides

    ds = ctx.dataset(cell)
    slides, _ = ctx.slides_and_labels(cell)
    run = tile_slides(slides, folder, ds.tile)
    keep = {slide_id_of(p) for p in slides}
    for stale in h5_files(run.patches):  # slides no longer in the dataset
        if stale.stem not in keep:
            stale.unlink()
    bad = [r for r in run.results if r.status == "error"]
    ok = [r for r in run.results if r.status in ("ok", "skipped") and r.n_patches > 0]
    if not ok:
        first = bad[0].message if bad else "no tissue found in any slide"
        raise HistotransferError(
            f"no slide of dataset '{ds.name}' was tiled ({first}); see {run.folder / 'tiling.csv'}"
        )
    message = f"{len(ok)} slides tiled, {sum(r.n_patches for r in ok)} patches"
    if len(ok) < len(run.results):
        message += f"; {len(run.results) - len(ok)} slide(s) without patches or failed (see tiling.csv)"
    return {"patches": relative(run.patches, ctx.out)}, message


def _run_extract(cell: Cell, ctx: Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..features import extract_features

    enc = cell.settings["encoder"]
    patches = ctx.path(ctx.dep(cell, "tile")["patches"])
    blocks = enc.get("blocks")
    done = extract_features(
        patches,
        folder,
        enc["name"],
        enc["weights"],
        enc["truncate"] if blocks is not None else list(enc["truncate"]),
        ctx.study.extract_for(cell.stain),
        ranks=ctx.ranks,
        blocks=blocks,
    )
    folders = done if isinstance(done, dict) else {enc["truncate"]: done}  # blocks: one folder, truncate 0
    tiled = {p.stem for p in h5_files(patches)}
    counts = {}
    for truncate, features in folders.items():
        for stale in h5_files(features):  # slides no longer tiled
            if stale.stem not in tiled:
                stale.unlink()
        counts[truncate] = len(h5_files(features))
        if counts[truncate] == 0:
            raise HistotransferError(f"no slide's features were extracted; see {features / 'extract.csv'}")
    names = {t: f"t{t}" if blocks is None else f"b{blocks}" for t in counts}
    shown = ", ".join(f"{names[t]}: {n}" for t, n in counts.items())
    return {"features": {str(t): relative(f, ctx.out) for t, f in folders.items()}}, f"slides per truncation: {shown}"


def _labels_with_features(labels: Path, features: Path, folder: Path) -> tuple[Path, str]:
    """The labels restricted to slides that have features, so one slide lost upstream is skipped, not fatal."""
    df = read_csv(labels, text=True, kind="label")
    have = {p.stem for p in h5_files(features)}
    missing = sorted(set(df["slide_id"].str.strip()) - have)
    if not missing:
        return labels, ""
    kept = folder / "labels_used.csv"
    write_csv(df[df["slide_id"].str.strip().isin(have)], kept)
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return kept, f"{len(missing)} labelled slide(s) without features skipped: {shown}"


def _run_mil(cell: Cell, ctx: Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..mil import train_mil

    ds = ctx.dataset(cell)
    assert cell.encoder is not None
    features = ctx.path(ctx.dep(cell, "extract")["features"][str(cell.encoder.truncate)])
    _, labels = ctx.slides_and_labels(cell)
    assert labels is not None and cell.seed is not None
    labels_used, note = _labels_with_features(labels, features, folder)
    variant = next(v for v in ctx.study.mil if v.name == cell.variant)
    run = Path(
        train_mil(features, labels_used, folder / "run", ds.mil(variant.settings, cell.seed), split_file=ds.split_file)
    )
    result = {"run": relative(run, ctx.out)}
    folds = json.loads((run / "metrics.json").read_text()).get("protocol")
    if folds is not None:
        note = "; ".join(filter(None, [f"{folds['folds']}-fold cross-validation", note]))
    annotations = ctx.annotations(cell)
    if annotations is not None:
        from ..mil import localisation_of_run

        write_json(localisation_of_run(run, annotations), folder / LOCALISATION_FILE)
        result["localisation"] = relative(folder / LOCALISATION_FILE, ctx.out)
    return result, note


def _run_cam(cell: Cell, ctx: Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..analysis import CamSettings, write_cams
    from ..mil import model_run, run_splits

    run = model_run(ctx.path(ctx.dep(cell, "mil")["run"]))  # a cross-validation: its fold 0
    annotations = ctx.annotations(cell)
    splits = run_splits(run)
    # The slides CAMs are scored on: the run's positive test slides (the attention localisation's too).
    ids = sorted(splits.loc[(splits["split"] == "test") & (splits["label"].astype(int) == 1), "slide_id"])
    slides, _ = ctx.slides_and_labels(cell)
    assert ctx.study.cam is not None
    cams = write_cams(
        run,
        folder / "cam",
        CamSettings.build(ctx.study.cam, device=ctx.study.extract.device),
        slides=slides,
        annotations_dir=annotations,
        slide_ids=ids,
    )
    return {"cams": relative(cams.folder / "cam.json", ctx.out)}, f"{len(ids)} positive test slide(s)"


def _run_finetune(cell: Cell, ctx: Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..finetune import finetune
    from ..mil import model_run

    assert ctx.study.finetune is not None and cell.seed is not None
    frozen = relative(model_run(ctx.path(ctx.dep(cell, "mil")["run"])), ctx.out)  # a cross-validation: its fold 0
    slides, _ = ctx.slides_and_labels(cell)
    settings = FinetuneSettings.build(
        ctx.study.finetune, seed=cell.seed, extract_batch_size=ctx.study.extract.batch_size
    )
    run = Path(finetune(ctx.path(frozen), folder / "run", slides, settings, ranks=ctx.ranks))
    return {"run": relative(run, ctx.out), "frozen_run": frozen, "encoder": relative(run / "encoder.pt", ctx.out)}, ""


def _run_cka(cell: Cell, ctx: Context, folder: Path) -> tuple[dict[str, Any], str]:
    from ..analysis import compare_encoders

    assert cell.encoder is not None and cell.seed is not None
    patches = ctx.path(ctx.dep(cell, "tile")["patches"])
    if cell.settings["comparison"] == "finetuned":
        a: Any = cell.encoder.spec()
        b: Any = ctx.path(ctx.dep(cell, "finetune")["run"])
        comparison = f"{cell.encoder.label}: frozen vs fine-tuned"
    else:
        a, b = cell.settings["a"], cell.settings["b"]
        comparison = f"{EncoderConfig(**cell.settings['a']).label} vs {EncoderConfig(**cell.settings['b']).label}"
    compare_encoders(a, b, patches, folder / "cka", cka_settings(ctx.study, cell.seed, cell.stain), ranks=ctx.ranks)
    return {"csv": relative(folder / "cka" / "cka.csv", ctx.out), "comparison": comparison}, ""


WORK = {
    "demo": _run_demo,
    "tile": _run_tile,
    "extract": _run_extract,
    "mil": _run_mil,
    "cam": _run_cam,
    "finetune": _run_finetune,
    "cka": _run_cka,
}
