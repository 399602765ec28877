"""Plan a study: the grid of cells (per dataset, demo slides -> tiling -> extractions -> MIL runs -> CAMs ->
fine-tuning -> CKA), each with the settings and file identities that make its cache key."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import file_sha256
from ..analysis.settings import CkaSettings
from ..finetune.settings import FinetuneSettings
from .cells import Cell, settings_hash
from .grid import Dataset, EncoderConfig, Study, stain_suffix


def plan(study: Study) -> list[Cell]:
    """Every cell of the study, dependencies before dependents."""
    cells: list[Cell] = []
    for ds in study.datasets:
        demo = None
        if ds.demo is not None:
            demo = resumable(Cell("demo", f"demo/{ds.name}", dict(ds.demo), dataset=ds.name))
            cells.append(demo)
        tiling = ds.tile.result_settings()
        # Tiling skips slides already tiled with the same settings and re-tiles the others by itself; a slide
        # file changed in place (another size or time) changes the cell.
        tile = Cell(
            "tile",
            f"tile/{ds.name}",
            {"slides": [file_id_cheap(p) for p in ds.slides], **tiling},
            deps=(demo,) if demo else (),
            dataset=ds.name,
            resume_key=None,
        )
        cells.append(tile)
        for stain in study.stains:
            cells += stain_cells(study, ds, stain, tile, demo)
    return cells


def stain_cells(study: Study, ds: Dataset, stain: str, tile: Cell, demo: Cell | None) -> list[Cell]:
    """The cells of one dataset and one value of the stain axis: extractions, MIL runs, CAMs, fine-tuning,
    CKA."""
    cells: list[Cell] = []
    tiling = ds.tile.result_settings()
    extract = {**study.extract_for(stain).result_settings(), **reference_id(study, stain)}
    suffix = stain_suffix(stain)
    # One extraction cell per network and weights: every truncation of it comes from one pass over the patches.
    # It skips finished slides and truncations, so it resumes (and takes an added truncation) while the
    # network, weights and tiling settings stay. A configuration of an exact number of blocks is a cell of its own.
    extracts: dict[EncoderConfig, Cell] = {}
    for (name, weights, blocks), group in by_network(study.encoders).items():
        if blocks is None:
            encoder: dict[str, Any] = {"name": name, "weights": weights, "truncate": sorted(e.truncate for e in group)}
            network = group[0].key.rsplit("-t", 1)[0]
        else:
            encoder, network = group[0].spec(), group[0].key
        settings = {"encoder": encoder, **extract}
        cell = Cell(
            "extract",
            f"extract/{ds.name}/{network}{suffix}",
            settings,
            deps=(tile,),
            dataset=ds.name,
            encoder=group[0],
            stain=stain,
            resume_key=settings_hash([{k: v for k, v in settings.items() if k != "encoder"}, name, weights, tiling]),
        )
        extracts.update(dict.fromkeys(group, cell))
        cells.append(cell)
    labels = {"labels": file_id(ds.labels), "split_file": file_id(ds.split_file)}
    mils: dict[tuple[EncoderConfig, str, int], Cell] = {}
    for enc in study.encoders:
        for variant in study.mil:
            for seed in study.seeds:
                mil = ds.mil(variant.settings, seed).result_settings()
                # The run depends on its truncation's features only: adding a truncation to the network's
                # extraction cell must not retrain the others.
                features = settings_hash([{"encoder": enc.spec(), **extract}, tile.hash])
                mils[enc, variant.name, seed] = resumable(
                    Cell(
                        "mil",
                        f"mil/{ds.name}/{enc.key}{suffix}/{variant.name}/seed{seed}",
                        {**labels, **mil, "features": features},
                        deps=(extracts[enc],) + ((demo,) if demo else ()),
                        dataset=ds.name,
                        encoder=enc,
                        seed=seed,
                        variant=variant.name,
                        stain=stain,
                        hashed=(demo,) if demo else (),
                    )
                )
                cells.append(mils[enc, variant.name, seed])
    if study.cam is not None and (ds.demo is not None or ds.annotations is not None):
        cam = study.cam.result_settings()
        for enc in study.encoders:
            for seed in study.seeds:
                cells.append(
                    resumable(
                        Cell(
                            "cam",
                            f"cam/{ds.name}/{enc.key}{suffix}/{study.mil[0].name}/seed{seed}",
                            cam,
                            deps=(mils[enc, study.mil[0].name, seed], tile),
                            dataset=ds.name,
                            encoder=enc,
                            seed=seed,
                            variant=study.mil[0].name,
                            stain=stain,
                        )
                    )
                )
    finetunes: dict[tuple[EncoderConfig, int], Cell] = {}
    if study.finetune is not None:
        for enc in study.finetune_encoders:
            for seed in study.finetune_seeds:
                settings = FinetuneSettings.build(study.finetune, seed=seed).result_settings()
                finetunes[enc, seed] = resumable(
                    Cell(
                        "finetune",
                        f"finetune/{ds.name}/{enc.key}{suffix}/{study.finetune_mil}/seed{seed}",
                        settings,
                        deps=(mils[enc, study.finetune_mil, seed], tile),
                        dataset=ds.name,
                        encoder=enc,
                        seed=seed,
                        variant=study.finetune_mil,
                        stain=stain,
                    )
                )
                cells.append(finetunes[enc, seed])
    if study.cka is not None:
        if study.cka_finetuned:
            for (enc, seed), ft_cell in finetunes.items():
                cka = cka_settings(study, seed, stain).result_settings()
                cells.append(
                    Cell(
                        "cka",
                        f"cka/{ds.name}/{enc.key}{suffix}/seed{seed}",
                        {**cka, **reference_id(study, stain), "comparison": "finetuned"},
                        deps=(ft_cell, tile),
                        dataset=ds.name,
                        encoder=enc,
                        seed=seed,
                        stain=stain,
                    )
                )
        for a, b in study.cka_pairs:
            cka = cka_settings(study, study.seeds[0], stain).result_settings()
            cells.append(
                Cell(
                    "cka",
                    f"cka/{ds.name}/pair-{a.key}--{b.key}{suffix}",
                    {**cka, **reference_id(study, stain), "comparison": "pair", "a": a.spec(), "b": b.spec()},
                    deps=(tile,),
                    dataset=ds.name,
                    encoder=a,
                    seed=study.seeds[0],
                    stain=stain,
                )
            )
    return cells


def by_network(encoders: Sequence[EncoderConfig]) -> dict[tuple[str, str, int | None], list[EncoderConfig]]:
    """The grid's configurations grouped by network, weights and exact number of blocks (None: the network's
    truncations, extracted together), in the study's order."""
    groups: dict[tuple[str, str, int | None], list[EncoderConfig]] = {}
    for enc in encoders:
        groups.setdefault((enc.name, enc.weights, enc.blocks), []).append(enc)
    return groups


def reference_id(study: Study, stain: str) -> dict[str, Any]:
    """The stain reference's contents as a cache key (editing the reference redoes the cells that use it)."""
    if stain == "none" or study.stain_ref is None:
        return {}
    path = Path(study.stain_ref)
    if path.is_file():
        return {"stain_ref_id": file_sha256(path)}
    if path.is_dir():
        return {"stain_ref_id": [[p.name, file_sha256(p)] for p in sorted(path.iterdir()) if p.is_file()]}
    return {"stain_ref_id": file_id_cheap(Path(study.stain_ref.rsplit("@", 1)[0]))}  # a slide region


def cka_settings(study: Study, seed: int, stain: str) -> CkaSettings:
    """The study's CKA settings for one seed, on patches prepared (resized, stain-normalised) as the study
    extracted them."""
    assert study.cka is not None
    ex = study.extract_for(stain)
    shared = {"batch_size": ex.batch_size, "device": ex.device, "workers": ex.workers or 0, "input_size": ex.input_size}
    overrides = {k: v for k, v in shared.items() if k not in study.cka.model_fields_set}
    return CkaSettings.build(
        study.cka, seed=seed, stain_norm=ex.stain_norm, stain_ref=ex.stain_ref, stain_scope=ex.stain_scope, **overrides
    )


def file_id_cheap(path: Path) -> list[Any]:
    """A slide file's identity for cache keys without reading it: path, size and modification time."""
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def resumable(cell: Cell) -> Cell:
    """A cell whose stage resumes its own partial work when re-run with the very same settings."""
    cell.resume_key = cell.hash
    return cell


def file_id(path: Path | None) -> str | None:
    """A file's identity for cache keys: its content hash, so editing labels retrains."""
    return None if path is None else file_sha256(path)
