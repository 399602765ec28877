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
from .._io import remove_stale_temps, write_csv, write_json
from ..errors import HistotransferError
from ..features import create_encoder, extract_features, read_feature_attrs, read_feature_file
from ..runtime import Ranks, init_ranks
from ..features.extract import resolve_device
from ..features.encoders import AUTOCAST_DTYPES, PRECISIONS, encoder_info
from ..features.loader import PatchBatches, SlideJob
from ..mil import load_run_model
from ..mil.bags import encoder_attrs, load_bags
from ..mil.labels import feature_files
from ..mil.rundir import read_checkpoint, read_config, save_model
from ..mil.splits import SPLITS
from ..mil.train import write_run_outputs
from .data import SlidesArg, TopKSlide, normalise, slides_folder, topk_slides
from .encoder_io import ENCODER_FILE, encoder_from_attrs, save_encoder
from .model import EndToEndMIL
from .topk import read_splits, select_top_k
from .train import FitResult, LoopSettings, fit_end_to_end

CHECKPOINT_FILE = "checkpoint.pt"
# Largest relative difference tolerated between the run's stored features and the rebuilt encoder's output
# for the same pixels: float32 rounding across devices (TF32 convolutions on GPUs) stays far below it, while
# other weights, pixels or input sizes give differences of order 1.
REPRODUCE_TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 5e-2}


def _check_args(top_k: int, lr: float, epochs: int, batch_slides: int, precision: str, workers: int,
                device: torch.device) -> None:
    if top_k < 1 or epochs < 1 or batch_slides < 1 or workers < 0 or not lr > 0:
        raise HistotransferError("finetune: --top-k, --epochs and --batch-slides must be >= 1, --lr > 0 and "
                                 "--workers >= 0.")
    if precision not in PRECISIONS:
        raise HistotransferError(f"precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
    if precision in AUTOCAST_DTYPES and device.type != "cuda":
        raise HistotransferError(f"precision {precision} runs on a CUDA GPU only; use --precision fp32 on CPU.")


def _guard(out: Path, settings: dict[str, Any]) -> bool:
    """True when ``out`` holds this finished fine-tuning; error when it holds other settings."""
    path = out / "config.json"
    if not path.is_file():
        return False
    old = json.loads(path.read_text()).get("finetune")
    if old != settings:
        diff = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
        raise HistotransferError(f"{out}: holds a fine-tuning run with other settings (differs in: "
                                 f"{', '.join(diff) or 'everything'}); choose another --out or delete it.")
    return (out / "comparison.json").is_file()


def _input_size(attrs: dict[str, Any], slide: TopKSlide) -> int | None:
    """The input size the run's features used, None when it is the tiled patch size (no resizing)."""
    size = attrs.get("input_size")
    return None if size is None or int(size) == slide.job.spec.patch_size else int(size)


@torch.no_grad()
def check_reproduces(model: EndToEndMIL, slide: TopKSlide, input_size: int | None, precision: str,
                     device: torch.device) -> float:
    """Relative max difference between the run's stored features of a few of ``slide``'s patches and the
    rebuilt encoder's; raises when it is beyond float rounding (other weights, slides or input size)."""
    bag = read_feature_file(slide.feature_file)
    rows = {(int(x), int(y)): i for i, (x, y) in enumerate(bag.coords)}
    coords = slide.job.coords[:4]
    stored = bag.features[[rows[(int(x), int(y))] for x, y in coords]]
    job = SlideJob(slide.job.slide_id, slide.job.slide_path, slide.job.patch_file, coords, slide.job.spec)
    item = PatchBatches([job], len(coords), input_size)[0]
    if item.error:
        raise HistotransferError(item.error)
    model.eval()
    mine = model.features(normalise(item.pixels, device)).float().cpu().numpy()
    err = float(np.abs(mine - stored).max() / max(float(np.abs(stored).max()), 1e-6))
    tol = REPRODUCE_TOLERANCE.get(str(bag.attrs.get("precision", "fp32")), 5e-2)
    if bag.attrs.get("dtype") == "float16" or bag.features.dtype == np.float16:
        tol = max(tol, 5e-2)
    if err > tol:
        raise HistotransferError(
            f"{slide.feature_file}: the rebuilt encoder does not reproduce the run's features for the same "
            f"patches (relative difference {err:.3g}); the slides (--slides), the weights file or the patch files "
            "differ from those the run was made with."
        )
    return err


def _train_phase(run_dir: Path, out: Path, train: list[TopKSlide], val: list[TopKSlide], run_config: dict,
                 cfg: LoopSettings, freeze_stages: int, grad_checkpointing: bool, device: torch.device,
                 ranks: Ranks) -> None:
    """Train and write ``encoder.pt``, ``model.pt`` and ``history.csv`` (the last marks the phase done)."""
    source = run_dir / "config.json"
    encoder = encoder_from_attrs(run_config["encoder"], source)
    head = load_run_model(run_dir)
    model = EndToEndMIL(encoder, head, freeze_stages, grad_checkpointing).to(device)
    check_reproduces(model, train[0], cfg.input_size, cfg.precision, device)
    result: FitResult = fit_end_to_end(model, train, val, cfg, device, ranks, out / CHECKPOINT_FILE)
    model.load_state_dict(result.state)
    if ranks.rank == 0:
        model.cpu()
        base = encoder_from_attrs({**run_config["encoder"], "truncate": 0}, source)
        save_encoder(encoder, out / ENCODER_FILE, base)
        reloaded = create_encoder(encoder.name, str(out / ENCODER_FILE), encoder.truncate).state_dict()
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
        raise HistotransferError(f"the run's patch files lie in several folders ({', '.join(map(str, folders))}); "
                                 "re-extraction needs them in one patch folder.")
    return folders.pop()


def _evaluate_phase(run_dir: Path, out: Path, features_dir: Path, splits: pd.DataFrame, config: dict,
                    unreadable: dict[str, str]) -> dict[str, Any]:
    """Predict every slide of the split from its re-extracted features; write the run files."""
    head = load_run_model(out)
    files = feature_files(features_dir)
    missing = {s: f"{features_dir / (s + '.h5')}: not extracted" for s in splits["slide_id"] if s not in files}
    bags, broken = load_bags({s: files[s] for s in splits["slide_id"] if s in files}, expect_dim=head.in_dim)
    unreadable = {**unreadable, **missing, **broken}
    kept = splits[splits["slide_id"].isin(bags.slide_ids)]
    selected = int(read_checkpoint(out)["selected_epoch"])
    write_json({**config, "unreadable_slides": unreadable}, out / "config.json")
    metrics = write_run_outputs(out, head, bags, kept, config["seed"],
                                f"fine-tuned {config['encoder'].get('encoder', '')} + attention MIL, epoch {selected}")
    frozen = json.loads((run_dir / "metrics.json").read_text())
    comparison = {
        "frozen_run": str(run_dir.resolve()), "finetuned_run": str(out.resolve()), "selected_epoch": selected,
        "splits": {name: {"frozen_auc": frozen.get(name, {}).get("auc"), "finetuned_auc": metrics[name]["auc"],
                          "frozen": frozen.get(name), "finetuned": metrics[name]} for name in SPLITS},
    }
    write_json(comparison, out / "comparison.json")
    return comparison


def finetune(
    run_dir: str | Path,
    out_dir: str | Path,
    slides: SlidesArg = None,
    top_k: int = 64,
    lr: float = 1e-5,
    epochs: int = 20,
    batch_slides: int = 1,
    grad_checkpointing: bool = False,
    precision: str = "fp32",
    device: str = "auto",
    seed: int = 0,
    workers: int = 0,
    freeze_stages: int = 0,
    extract_batch_size: int = 64,
) -> Path:
    """Fine-tune the encoder of MIL run ``run_dir`` end to end on its top-k patches; write ``out_dir``.

    ``slides`` (a folder or a list of files) says where the slide files are when they moved since tiling.
    Adam with ``lr``, ``batch_slides`` slides per step, BatchNorm in eval mode, ``freeze_stages`` leading
    stages (with the stem) kept fixed, ``grad_checkpointing`` per stage, ``precision`` bf16/fp16 autocast on
    GPU. Selection on the validation AUC of top-k bags. Then every slide is re-extracted with the fine-tuned
    encoder and evaluated at slide level. Under ``torchrun`` training runs data-parallel (DDP) and
    re-extraction is sharded. Re-running resumes (training by epoch, extraction by slide). Returns ``out_dir``.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    dev = resolve_device(device)
    _check_args(top_k, lr, epochs, batch_slides, precision, workers, dev)
    run_config = read_config(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise HistotransferError(f"{run_dir}: not a finished training run (no metrics.json); pass a `train` run.")
    enc = run_config.get("encoder") or {}
    if "encoder" not in enc or "truncate" not in enc:
        raise HistotransferError(f"{run_dir / 'config.json'}: the run's features do not record their encoder; "
                                 "only runs on features extracted by histotransfer can be fine-tuned.")
    n_stages = encoder_info(enc["encoder"])["n_stages"] - int(enc["truncate"])
    if not 0 <= freeze_stages <= n_stages:
        raise HistotransferError(f"freeze_stages={freeze_stages}: the run's encoder ({enc['encoder']}, truncate "
                                 f"{enc['truncate']}) has {n_stages} stages after the stem; pass 0..{n_stages}.")
    settings = {"source_run": str(run_dir.resolve()), "top_k": top_k, "lr": lr, "epochs": epochs,
                "batch_slides": batch_slides, "grad_checkpointing": grad_checkpointing, "precision": precision,
                "seed": seed, "freeze_stages": freeze_stages}
    splits = read_splits(run_dir)
    ranks = init_ranks(dev)
    try:
        if _guard(out, settings):
            if ranks.rank == 0:
                tqdm.write(f"{out}: already fine-tuned with these settings; kept as it is")
            return out
        config = {**run_config, "seed": seed, "finetune": settings,
                  "training": {"epochs": epochs, "lr": lr, "optimizer": "Adam", "weight_decay": 0.0,
                               "loss": "cross_entropy", "batchnorm": "eval mode (running statistics fixed)",
                               "steps": f"{batch_slides} slide(s) per step, top {top_k} patches each, shuffled",
                               "selection": "best val AUC on top-k bags, ties: lower val loss",
                               "freeze_stages": freeze_stages, "world_size": ranks.world},
                  "versions": {"histotransfer": __version__, "torch": torch.__version__}}
        if ranks.rank == 0:
            remove_stale_temps(out)
            write_json(config, out / "config.json")
            write_csv(splits, out / "splits.csv")
            select_top_k(run_dir, top_k, out_path=out / "topk.csv")
        ranks.barrier()
        topk = pd.read_csv(out / "topk.csv", dtype={"slide_id": str})
        labels = dict(zip(splits["slide_id"], splits["label"].astype(int)))
        features_dir = Path(run_config["features_dir"])
        chosen, unreadable = topk_slides(topk, labels, features_dir, slides)
        split_of = dict(zip(splits["slide_id"], splits["split"]))
        train = [s for s in chosen if split_of[s.job.slide_id] == "train"]
        val = [s for s in chosen if split_of[s.job.slide_id] == "val"]
        if not train:
            raise HistotransferError(f"{run_dir}: no readable training slide to fine-tune on; see the warnings.")
        cfg = LoopSettings(epochs, lr, batch_slides, precision, seed, workers,
                           _input_size(run_config["encoder"], train[0]))
        if not all((out / f).is_file() for f in (ENCODER_FILE, "model.pt", "history.csv")):
            _train_phase(run_dir, out, train, val, run_config, cfg, freeze_stages, grad_checkpointing, dev, ranks)
        folder = extract_features(_patches_dir(chosen), out, run_config["encoder"]["encoder"],
                                  str((out / ENCODER_FILE).resolve()), int(run_config["encoder"]["truncate"]),
                                  cfg.input_size, extract_batch_size, workers, device, precision,
                                  slides_dir=slides_folder(slides))
        if ranks.rank == 0:
            first = next(iter(feature_files(folder).values()))
            config = {**config, "features_dir": str(folder.resolve()),
                      "encoder": encoder_attrs(read_feature_attrs(first))}
            _evaluate_phase(run_dir, out, folder, splits, config, unreadable)
        ranks.barrier()
        return out
    finally:
        ranks.close()

