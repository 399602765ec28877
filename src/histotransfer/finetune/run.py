"""Fine-tune a run's encoder end to end on its top-attended patches, re-extract, and evaluate at slide level.

The pipeline of the paper's Table III, resumable phase by phase:

1. **Top-k.** Each train/val slide's k patches with the highest pre-softmax attention score in the frozen run
   (``topk.csv``).
2. **Training.** The run's encoder (same architecture, truncation and weights, checked against the run's
   features) with the run's MIL head on top, trained end to end on the top-k bags (``model.EndToEndMIL``,
   ``train.fit_end_to_end``); the epoch with the best validation AUC on top-k bags is kept.
3. **Re-extraction.** Every patch of every slide through the fine-tuned encoder, by the extraction code path
   itself with ``encoder.pt`` as the weights file (``FT_RUN/features/<encoder_id>/``).
4. **Evaluation.** The fine-tuned MIL head on all patches of each slide: the same run files as ``train``
   (``config.json``, ``splits.csv``, ``model.pt``, ``predictions.csv``, ``metrics.json``, ``history.csv``,
   ``roc.png``, ``attention/``) plus ``encoder.pt`` and ``comparison.json`` (frozen vs fine-tuned per split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import __version__
from .._io import ItemLock, file_sha256, output_folder, remove_stale_temps, write_csv, write_json
from .._read import read_csv
from ..encoders import Preprocessing, create_encoder, encoder_info, encoder_spec
from ..errors import HistotransferError
from ..features import (
    PatchBatches,
    SlideJob,
    encoder_attrs,
    extract_features,
    normalise_pixels,
    read_feature_attrs,
    read_feature_file,
)
from ..mil import (
    SPLITS,
    check_inputs,
    config_differences,
    feature_files,
    feature_fingerprint,
    load_bags,
    load_run_model,
    model_run,
    read_checkpoint,
    read_config,
    run_finished,
    save_model,
    write_config,
    write_run_outputs,
)
from ..runtime import Ranks, check_precision, joined, resolve_device
from ..stain import StainNormalizer, recorded_normalizer, write_stain_target
from .data import SlidesArg, TopKSlide, topk_slides
from .encoder_io import ENCODER_FILE, encoder_from_attrs, save_encoder
from .model import EndToEndMIL, check_lora, lora_of, merge_lora
from .settings import FinetuneSettings
from .topk import read_splits, select_top_k
from .train import augmentation_record, describe_selection, fit_end_to_end, selection_record, slide_sources

CHECKPOINT_FILE = "checkpoint.pt"
DONE_FILE = "comparison.json"
STAIN_FILE = "stain_target.json"  # the run's stain normalisation, which re-extraction loads as its reference
# Largest relative difference tolerated between the run's stored features and the rebuilt encoder's output
# for the same pixels: float32 rounding across devices (TF32 convolutions on GPUs) stays far below it, while
# other weights, pixels or input sizes give differences of order 1.
REPRODUCE_TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 5e-2}


def _input_prep(attrs: dict[str, Any]) -> Preprocessing:
    """How the run's features were made from the patches: the encoder's preprocessing record at the input size
    they used (none recorded: the tiled size, no resizing)."""
    size = attrs.get("input_size")
    return encoder_spec(attrs["encoder"]).preprocessing.at(None if size is None else int(size))


def _extraction_size(attrs: dict[str, Any], slide: TopKSlide) -> int | None:
    """The ``input_size`` that makes re-extraction feed the pixels the run's features were made from: None
    where extraction's default (the encoder's own size, else the tiled size) gives them, so the fine-tuned
    folder is named as the frozen one."""
    size = attrs.get("input_size")
    if size is None:
        return None
    default = encoder_spec(attrs["encoder"]).preprocessing.input_size or slide.job.spec.patch_size
    return None if int(size) == default else int(size)


@torch.no_grad()
def check_reproduces(
    model: EndToEndMIL,
    slide: TopKSlide,
    input_size: Preprocessing,
    device: torch.device,
    stain: StainNormalizer | None = None,
) -> float:
    """Relative max difference between the run's stored features of a few of ``slide``'s patches and the
    rebuilt encoder's (on pixels normalised with ``stain``, the run's, per slide with the slide's recorded source
    estimate); raises when it is beyond float rounding (other weights, slides, input size or stain
    normalisation)."""
    bag = read_feature_file(slide.feature_file)
    rows = {(int(x), int(y)): i for i, (x, y) in enumerate(bag.coords)}
    coords = slide.job.coords[:4]
    stored = bag.features[[rows[(int(x), int(y))] for x, y in coords]]
    job = SlideJob(slide.job.slide_id, slide.job.slide_path, slide.job.patch_file, coords, slide.job.spec)
    item = PatchBatches([job], len(coords), input_size)[0]
    if item.error:
        raise HistotransferError(item.error)
    model.eval()
    pixels = normalise_pixels(item.pixels, stain, device, slide_sources([slide], stain)[0])
    mine = model.features(model.encoder.preprocess(pixels, device)).float().cpu().numpy()
    err = float(np.abs(mine - stored).max() / max(float(np.abs(stored).max()), 1e-6))
    tol = REPRODUCE_TOLERANCE.get(str(bag.attrs.get("precision", "fp32")), 5e-2)
    if bag.attrs.get("dtype") == "float16":
        tol = max(tol, 5e-2)
    if err > tol:
        raise HistotransferError(
            f"{slide.feature_file}: the rebuilt encoder does not reproduce the run's features for the same "
            f"patches (relative difference {err:.3g}); the slides (--slides), the weights file, the patch files or "
            "the stain normalisation differ from those the run was made with."
        )
    return err


def _train_phase(
    run_dir: Path,
    out: Path,
    train: list[TopKSlide],
    val: list[TopKSlide],
    run_config: dict,
    s: FinetuneSettings,
    input_size: Preprocessing,
    device: torch.device,
    ranks: Ranks,
) -> None:
    """Train and write ``encoder.pt``, ``model.pt`` and ``history.csv`` (the last marks the phase done)."""
    source = run_dir / "config.json"
    # An encoder of an exact number of blocks trains as a view of the quarter stages holding them (``network``,
    # sharing its modules), whose layout encoder.pt is written from.
    network = encoder_from_attrs(run_config["encoder"], source)
    encoder = network.with_blocks(run_config["encoder"].get("blocks"))
    stain = recorded_normalizer(run_config["encoder"], source)
    head = load_run_model(run_dir)
    model = EndToEndMIL(encoder, head, s.freeze_stages, s.grad_checkpointing, lora_of(s)).to(device)
    check_reproduces(model, train[0], input_size, device, stain)
    result = fit_end_to_end(model, train, val, s, input_size, device, ranks, out / CHECKPOINT_FILE, stain)
    model.load_state_dict(result.state)
    if ranks.rank == 0:
        tqdm.write(f"finetune: {describe_selection(selection_record(result.history))}")
        model.cpu()
        if model.lora_layers:
            merge_lora(encoder)  # encoder.pt holds the network's own layers, the low-rank updates folded in
        base = encoder_from_attrs({**run_config["encoder"], "truncate": 0}, source)
        save_encoder(network, out / ENCODER_FILE, base)
        reloaded = create_encoder(
            encoder.name, str(out / ENCODER_FILE), encoder.truncate, blocks=encoder.blocks
        ).state_dict()
        if any(not torch.equal(v, reloaded[k]) for k, v in encoder.state_dict().items()):
            raise HistotransferError(f"{out / ENCODER_FILE}: does not load back as the fine-tuned encoder.")
        classes = read_checkpoint(run_dir)["classes"]
        save_model(head, out / "model.pt", classes, result.selected_epoch)
        write_csv(result.history, out / "history.csv")
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    ranks.barrier()


def _patches_dir(slides: list[TopKSlide]) -> Path:
    folders = {s.job.patch_file.resolve().parent for s in slides}
    if len(folders) != 1:
        raise HistotransferError(
            f"the run's patch files lie in several folders ({', '.join(map(str, folders))}); "
            "re-extraction needs them in one patch folder."
        )
    return folders.pop()


def _evaluate_phase(
    run_dir: Path, out: Path, features_dir: Path, splits: pd.DataFrame, config: dict, unreadable: dict[str, str]
) -> dict[str, Any]:
    """Predict every slide of the split from its re-extracted features; write the run files."""
    head = load_run_model(out)
    files = feature_files(features_dir)
    missing = {s: f"{features_dir / (s + '.h5')}: not extracted" for s in splits["slide_id"] if s not in files}
    bags, broken = load_bags({s: files[s] for s in splits["slide_id"] if s in files}, expect_dim=head.in_dim)
    unreadable = {**unreadable, **missing, **broken}
    kept = splits[splits["slide_id"].isin(bags.slide_ids)]
    selected = int(read_checkpoint(out)["selected_epoch"])
    selection = selection_record(read_csv(out / "history.csv"))
    what = (
        f"fine-tuned {config['encoder'].get('encoder', '')} + attention MIL, epoch {selected}"
        if selected
        else f"{config['encoder'].get('encoder', '')} + attention MIL, frozen start kept (no epoch beat it)"
    )
    config = {
        **config,
        "unreadable_slides": unreadable,
        "inputs": {**config["inputs"], "features": dict(zip(bags.slide_ids, bags.fingerprints))},
    }
    write_config(config, out)
    group = (read_config(run_dir).get("settings") or {}).get("group_column")
    metrics = write_run_outputs(
        out, head, bags, kept, config["seed"], what, config["positive_class"], group if group in kept.columns else None
    )
    frozen = json.loads((run_dir / "metrics.json").read_text())
    comparison = {
        "frozen_run": str(run_dir.resolve()),
        "finetuned_run": str(out.resolve()),
        "selected_epoch": selected,
        "selection": selection,
        "positive_class": config["positive_class"],
        "splits": {
            name: {
                "frozen_auc": frozen.get(name, {}).get("auc"),
                "finetuned_auc": metrics[name]["auc"],
                "frozen": frozen.get(name),
                "finetuned": metrics[name],
            }
            for name in SPLITS
        },
    }
    write_json(comparison, out / DONE_FILE)
    return comparison


def _source_fingerprint(run_dir: Path) -> dict[str, Any]:
    """What identifies the frozen run being fine-tuned: its config's inputs and its model file."""
    return {
        "run": str(run_dir.resolve()),
        "model_sha256": file_sha256(run_dir / "model.pt"),
        "inputs": read_config(run_dir).get("inputs"),
    }


def _guard(out: Path, request: dict[str, Any]) -> bool:
    """True when ``out`` holds this finished fine-tuning; an error naming what differs when it holds another."""
    if not (out / "config.json").is_file():
        return False
    old = read_config(out).get("finetune") or {}
    diff = config_differences({"finetune": old}, {"finetune": request})
    if diff:
        raise HistotransferError(
            f"{out}: holds a fine-tuning made differently (differs in: {'; '.join(diff)}); "
            "choose another --out or delete that folder."
        )
    return run_finished(out, DONE_FILE)


def finetune(
    run_dir: str | Path,
    out_dir: str | Path,
    slides: SlidesArg = None,
    settings: FinetuneSettings | None = None,
    ranks: Ranks | None = None,
    **overrides: Any,
) -> Path:
    """Fine-tune the encoder of MIL run ``run_dir`` end to end on its top-k patches; write ``out_dir``.

    ``settings`` (or keyword overrides such as ``top_k=64, epochs=20, lr=1e-5``) say how
    (:class:`FinetuneSettings`). ``slides`` (a folder or a list of files) says where the slide files are when
    they moved since tiling. Selection on the validation AUC of top-k bags. Then every slide is re-extracted
    with the fine-tuned encoder and evaluated at slide level. Under ``torchrun`` training runs data-parallel
    (DDP) and re-extraction is sharded. Re-running resumes (training by epoch, extraction by slide); an
    ``out_dir`` holding a fine-tuning of another run or with other settings is refused. Returns ``out_dir``.
    """
    s = FinetuneSettings.build(settings, **overrides)
    run_dir, out = Path(model_run(run_dir)), Path(out_dir)
    dev = resolve_device(s.device)
    # One fine-tuning at a time writes into a folder; the lock file dies with its process (taken over then).
    with joined(ranks, dev) as ranks, ItemLock(out / ".finetune.lock") as lock:
        check_precision(s.precision, dev)
        run_config = read_config(run_dir)
        if not (run_dir / "metrics.json").is_file():
            raise HistotransferError(f"{run_dir}: not a finished training run (no metrics.json); pass a `train` run.")
        enc = run_config.get("encoder") or {}
        if "encoder" not in enc or "truncate" not in enc:
            raise HistotransferError(
                f"{run_dir / 'config.json'}: the run's features do not record their encoder; "
                "only runs on features extracted by histotransfer can be fine-tuned."
            )
        n_stages = encoder_info(enc["encoder"])["n_stages"] - int(enc["truncate"])
        if s.freeze_stages > n_stages:
            raise HistotransferError(
                f"freeze_stages={s.freeze_stages}: the run's encoder ({enc['encoder']}, truncate "
                f"{enc['truncate']}) has {n_stages} stages after the stem; pass 0..{n_stages}."
            )
        lora = lora_of(s)
        if lora is not None:
            check_lora(enc["encoder"], int(enc["truncate"]), s.freeze_stages, lora)
        features_dir = Path(run_config["features_dir"])
        check_inputs(
            run_config,
            {
                sid: feature_fingerprint(features_dir / f"{sid}.h5")
                for sid in (run_config.get("inputs") or {}).get("features") or {}
            },
            features_dir,
        )
        splits = read_splits(run_dir)
        stain = recorded_normalizer(enc, run_dir / "config.json")
        request = {**s.result_settings(), "source": _source_fingerprint(run_dir)}
        config = {
            **run_config,
            "kind": "finetune",
            "seed": s.seed,
            "settings": s.record(),
            "finetune": request,
            "training": {
                "epochs": s.epochs,
                "lr": s.lr,
                "optimizer": "Adam",
                "weight_decay": 0.0,
                "loss": "cross_entropy",
                "batchnorm": "eval mode (running statistics fixed)",
                "steps": f"{s.batch_slides} slide(s) per step, top {s.top_k} patches each, shuffled",
                "selection": (
                    "best val AUC on top-k bags among the frozen start (epoch 0) and every epoch"
                    if s.frozen_candidate
                    else "best val AUC on top-k bags among the fine-tuned epochs"
                )
                + ", ties: lower val loss, then earlier epoch",
                "freeze_stages": s.freeze_stages,
                "stain_augment": augmentation_record(s),
                "stain_normalization": None if stain is None else stain.tag(),
            },
            "versions": {"histotransfer": __version__, "torch": torch.__version__},
        }
        if s.batch_slides % ranks.world:
            raise HistotransferError(
                f"--batch-slides {s.batch_slides} counts the slides of one step over all "
                f"{ranks.world} processes: pass a multiple of {ranks.world}."
            )
        if _guard(out, request):
            if ranks.rank == 0:
                tqdm.write(f"{out}: already fine-tuned with these settings; kept as it is")
            return out
        # Every slide is checked (its files and identity) before anything is written: a refused call leaves no
        # half-started fine-tuning behind.
        resumed = (out / "topk.csv").is_file()
        topk = read_csv(out / "topk.csv") if resumed else select_top_k(run_dir, s.top_k, save=False)
        labels = dict(zip(splits["slide_id"], splits["label"].astype(int)))
        trained_on = (run_config.get("inputs") or {}).get("features") or {}
        chosen, unreadable = topk_slides(topk, labels, features_dir, slides, trained_on)
        split_of = dict(zip(splits["slide_id"], splits["split"]))
        train = [t for t in chosen if split_of[t.job.slide_id] == "train"]
        val = [t for t in chosen if split_of[t.job.slide_id] == "val"]
        if not train:
            raise HistotransferError(f"{run_dir}: no readable training slide to fine-tune on; see the warnings.")
        if ranks.rank == 0:
            output_folder(out)
            if not lock.acquire():
                raise HistotransferError(
                    f"{out}: another fine-tuning is writing into this folder ({lock.owner}); "
                    "wait for it to finish, or choose another --out"
                )
            remove_stale_temps(out)
            write_config(config, out)
            write_csv(splits, out / "splits.csv")
            if not resumed:
                write_csv(topk, out / "topk.csv")
            if stain is not None:
                write_stain_target(stain, out / STAIN_FILE)
        ranks.barrier()
        input_size = _input_prep(run_config["encoder"])
        if not all((out / f).is_file() for f in (ENCODER_FILE, "model.pt", "history.csv")):
            _train_phase(run_dir, out, train, val, run_config, s, input_size, dev, ranks)
        stain_options = (
            {}
            if stain is None
            else {
                "stain_norm": stain.method,
                "stain_ref": str((out / STAIN_FILE).resolve()),
                "stain_scope": stain.scope,
            }
        )
        blocks = run_config["encoder"].get("blocks")  # sets the depth by itself: truncate 0 beside it
        folder = extract_features(
            _patches_dir(chosen),
            out,
            run_config["encoder"]["encoder"],
            str((out / ENCODER_FILE).resolve()),
            0 if blocks is not None else int(run_config["encoder"]["truncate"]),
            input_size=_extraction_size(run_config["encoder"], train[0]),
            batch_size=s.extract_batch_size,
            workers=s.workers,
            device=s.device,
            precision=s.precision,
            slides=slides,
            ranks=ranks,
            blocks=blocks,
            **stain_options,
        )
        if ranks.rank == 0:
            first = next(iter(feature_files(folder).values()))
            config = {
                **config,
                "features_dir": str(folder.resolve()),
                "encoder": encoder_attrs(read_feature_attrs(first)),
            }
            _evaluate_phase(run_dir, out, folder, splits, config, unreadable)
        ranks.barrier()
        return out
