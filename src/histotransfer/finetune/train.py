"""The end-to-end training loop on top-k bags: Adam, one or more slides per step, selection on val AUC among
the frozen start (epoch 0) and every epoch, so fine-tuning never hands back a model worse on validation than
the one it started from.

Each epoch's slide order is drawn from ``(seed, epoch)``, and the state after every epoch (model, optimizer,
best model so far, history) is saved to a checkpoint, so a killed run resumes at the next epoch.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel: ``batch_slides`` counts the
slides of one optimizer step over all ranks (each rank takes ``batch_slides / world`` of them, so the run equals one
process taking ``batch_slides`` per step), every rank takes its share of the epoch's slides (the order padded by
repetition to a multiple of the world size, so every rank does the same number of steps), gradients are averaged
across ranks, and validation slides are split across ranks and their predictions gathered, so every rank makes the
same selection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .._io import write_torch
from ..encoders import Preprocessing
from ..errors import HistotransferError, one_line
from ..features import PatchBatch, normalise_pixels, read_feature_attrs
from ..mil import FitResult, validation_scores
from ..runtime import Ranks, precision_context
from ..stain import HedJitter, SlideStain, StainNormalizer, recorded_source
from .data import TopKSlide, bag_loader
from .model import EndToEndMIL
from .settings import FinetuneSettings


def _batches(loader: Any, slides: list[TopKSlide], per_step: int) -> Iterator[tuple[list[PatchBatch], list[int]]]:
    """Group the loader's one-slide items into steps of ``per_step`` slides (with their labels)."""
    items: list[PatchBatch] = []
    for item in loader:
        if item.error:
            raise HistotransferError(f"reading top-k patches failed: {item.error}")
        items.append(item)
        if len(items) == per_step:
            yield items, [slides[i.job].label for i in items]
            items = []
    if items:
        yield items, [slides[i.job].label for i in items]


# Jitters one slide's pixels (on the device) given its index in the slide list.
Augment = Callable[[int, torch.Tensor], torch.Tensor]


def hed_seed(seed: int, epoch: int, slide: int) -> int:
    """The HED jitter seed of one slide's bag in one epoch: the same in any process, rank or slide order."""
    return int(np.random.SeedSequence([seed, epoch, slide]).generate_state(1)[0])


def hed_augment(cfg: FinetuneSettings, epoch: int, device: torch.device) -> Augment | None:
    """The training batches' stain augmentation of ``epoch`` (None without ``stain_augment``)."""
    if cfg.stain_augment != "hed":
        return None
    sigma, bias = cfg.hed_strength

    def augment(slide: int, pixels: torch.Tensor) -> torch.Tensor:
        with precision_context(device, "fp32"):
            return HedJitter(sigma, bias, hed_seed(cfg.seed, epoch, slide))(pixels)

    return augment


def augmentation_record(cfg: FinetuneSettings) -> dict[str, Any] | None:
    """How the training patches are augmented, for the run's config (None: not at all)."""
    if cfg.stain_augment != "hed":
        return None
    record = HedJitter(*cfg.hed_strength).describe()
    record["seed"] = (
        f"per slide and epoch: numpy SeedSequence([{cfg.seed}, epoch, slide index in the sorted "
        "training slides]); training batches only"
    )
    return record


def slide_sources(slides: list[TopKSlide], stain: StainNormalizer | None) -> list[SlideStain | None]:
    """Each slide's source stain estimate as its feature file records it, under a per-slide normalisation (so
    the top-k patches get the pixels extraction gave them); None for each slide otherwise."""
    if stain is None or not stain.per_slide:
        return [None] * len(slides)
    return [recorded_source(read_feature_attrs(s.feature_file), s.feature_file) for s in slides]


def _inputs(
    model: EndToEndMIL,
    items: list[PatchBatch],
    device: torch.device,
    stain: StainNormalizer | None = None,
    sources: list[SlideStain | None] | None = None,
    augment: Augment | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The preprocessed batch of some slides' top-k pixels: stain-normalised (the run's normalisation, with
    each slide's ``sources`` estimate when per slide), then jittered for training."""
    parts = []
    for item in items:
        pixels = normalise_pixels(item.pixels, stain, device, None if sources is None else sources[item.job])
        parts.append(pixels if augment is None else augment(item.job, pixels))
    x = model.encoder.preprocess(torch.cat(parts), device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, [len(i.pixels) for i in items]


def rank_share(order: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This rank's part of an epoch's slide order, padded by repetition so every rank gets as many slides."""
    if not ranks.distributed:
        return order
    total = math.ceil(len(order) / ranks.world) * ranks.world
    padded = np.resize(order, total)
    return padded[ranks.rank :: ranks.world]


@torch.no_grad()
def predict_topk(
    model: EndToEndMIL,
    slides: list[TopKSlide],
    cfg: FinetuneSettings,
    input_size: Preprocessing,
    device: torch.device,
    ranks: Ranks,
    stain: StainNormalizer | None = None,
) -> np.ndarray:
    """Class probabilities (n, n_classes) of each slide's top-k bag, in eval mode (split across ranks)."""
    model.eval()
    mine = list(range(len(slides)))[ranks.rank :: ranks.world]
    out: dict[int, np.ndarray] = {}
    if mine:
        sources = slide_sources(slides, stain)
        loader = bag_loader(slides, mine, input_size, cfg.workers, device.type == "cuda")
        for items, _ in _batches(loader, slides, 1):
            x, sizes = _inputs(model, items, device, stain, sources)
            with precision_context(device, cfg.precision):
                logits, _ = model(x, sizes)
            out[items[0].job] = torch.softmax(logits[0].double(), 0).cpu().numpy()
    if ranks.distributed:
        parts: list[Any] = [None] * ranks.world
        dist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    return np.stack([out[i] for i in range(len(slides))])


def _loss_auc(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float | None]:
    scores = validation_scores(probs, labels)
    return float(scores["loss"]), scores["auc"]


def _mean_across_ranks(total: float, count: int, ranks: Ranks, device: torch.device) -> float:
    if ranks.distributed:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scaler", "best_state", "best_key", "best_epoch", "history")


def _resume(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> dict[str, Any]:
    """Load ``checkpoint.pt`` into the model, optimizer and scaler; a file that is cut short, corrupt, holds
    pickled objects or another model's state is one line saying to remove it (training then restarts)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        int(ckpt["epoch"])
    except Exception as exc:  # torch reports a damaged archive as any of several error types
        raise HistotransferError(
            f"{path}: not a readable checkpoint of this fine-tuning ({one_line(exc)[:200]}); "
            "delete it, or move it aside, and re-run the same command to restart training."
        ) from exc
    return ckpt


def _selection_key(val_auc: float | None, val_loss: float) -> tuple[float, float]:
    """What selection maximises: val AUC (a single-class val set counts as -1), then lower val loss."""
    return (-1.0 if val_auc is None else val_auc), -val_loss


def _value(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def selection_record(history: pd.DataFrame) -> dict[str, Any]:
    """What selection kept, from a run's history (``history.csv``): ``kept`` (``"frozen"`` when no epoch beat
    the frozen start on validation, else ``"finetuned"``), ``selected_epoch``, ``frozen_val_auc`` /
    ``frozen_val_loss`` (epoch 0; None without validation slides, when there is no epoch 0 row) and
    ``best_finetuned_epoch``, ``best_finetuned_val_auc`` / ``best_finetuned_val_loss`` (the best epoch >= 1 by
    the same rule; the last one without validation slides)."""
    selected = int(history.loc[history["selected"].astype(bool), "epoch"].iloc[0])
    start = history[history["epoch"] == 0]
    tuned = list(history[history["epoch"] > 0].itertuples())
    if len(start):
        best = max(tuned, key=lambda r: (_selection_key(_value(r.val_auc), r.val_loss), -r.epoch))
    else:
        best = tuned[-1]
    return {
        "kept": "frozen" if selected == 0 else "finetuned",
        "selected_epoch": selected,
        "frozen_val_auc": _value(start["val_auc"].iloc[0]) if len(start) else None,
        "frozen_val_loss": _value(start["val_loss"].iloc[0]) if len(start) else None,
        "best_finetuned_epoch": int(best.epoch),
        "best_finetuned_val_auc": _value(best.val_auc),
        "best_finetuned_val_loss": _value(best.val_loss),
    }


def describe_selection(record: dict[str, Any]) -> str:
    """One line on what selection kept (:func:`selection_record`)."""
    if record["frozen_val_loss"] is None:
        return f"kept epoch {record['selected_epoch']} (no validation slides: the last epoch)"

    def auc(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    scores = (
        f"val AUC on top-k bags: frozen start {auc(record['frozen_val_auc'])}, best fine-tuned epoch "
        f"{record['best_finetuned_epoch']} {auc(record['best_finetuned_val_auc'])}"
    )
    if record["kept"] == "frozen":
        return (
            f"fine-tuning did not beat the frozen start ({scores}): the frozen encoder and head are kept; "
            "try a lower --lr, more --top-k or more epochs"
        )
    return f"kept fine-tuned epoch {record['selected_epoch']} ({scores})"


def fit_end_to_end(
    model: EndToEndMIL,
    train: list[TopKSlide],
    val: list[TopKSlide],
    cfg: FinetuneSettings,
    input_size: Preprocessing,
    device: torch.device,
    ranks: Ranks,
    checkpoint_path: Path,
    stain: StainNormalizer | None = None,
) -> FitResult:
    """Train ``model`` (already on ``device``) and return the epoch with the best val AUC on top-k bags
    (ties: lower val loss, then the earlier epoch; without validation slides, the last epoch). Epoch 0 is the
    model before fine-tuning, evaluated the same way and a candidate like every epoch: when no epoch beats it,
    the frozen start is returned (``selected_epoch`` 0). Every batch is normalised with ``stain`` (the
    run's stain normalisation; per slide, with the slide's recorded source estimate); training batches are then
    jittered as ``cfg.stain_augment`` says."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    net: torch.nn.Module = model
    if ranks.distributed:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    val_labels = np.array([s.label for s in val], dtype=int)
    train_sources = slide_sources(train, stain)
    rows: list[dict[str, Any]] = []
    best_key: tuple | None = None
    best_state, best_epoch, start = None, 0, 1

    if checkpoint_path.is_file():
        ckpt = _resume(checkpoint_path, model, optimizer, scaler)
        rows, best_state, best_epoch = ckpt["history"], ckpt["best_state"], ckpt["best_epoch"]
        best_key = tuple(ckpt["best_key"]) if ckpt["best_key"] is not None else None
        start = ckpt["epoch"] + 1
        if ranks.rank == 0:
            tqdm.write(f"{checkpoint_path}: resuming after epoch {ckpt['epoch']}")
    elif len(val):
        val_loss, val_auc = _loss_auc(predict_topk(model, val, cfg, input_size, device, ranks, stain), val_labels)
        rows.append(
            {
                "epoch": 0,
                "train_loss": math.nan,
                "val_loss": val_loss,
                "val_auc": math.nan if val_auc is None else val_auc,
                "seconds": 0.0,
            }
        )
        if cfg.frozen_candidate:
            best_key, best_state = _selection_key(val_auc, val_loss), _cpu_state(model)

    bar = tqdm(
        range(start, cfg.epochs + 1), desc="fine-tuning", unit="epoch", dynamic_ncols=True, disable=ranks.rank != 0
    )
    for epoch in bar:
        t0 = time.perf_counter()
        order = rank_share(np.random.default_rng([cfg.seed, epoch]).permutation(len(train)), ranks)
        loader = bag_loader(train, order, input_size, cfg.workers, device.type == "cuda")
        model.train()
        total, count = 0.0, 0
        per_rank = max(1, cfg.batch_slides // ranks.world)  # batch_slides counts the slides of all ranks
        steps = tqdm(
            total=math.ceil(len(order) / per_rank),
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=ranks.rank != 0,
        )
        augment = hed_augment(cfg, epoch, device)
        with torch.random.fork_rng(devices=[]), steps:
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            for items, labels in _batches(loader, train, per_rank):
                x, sizes = _inputs(model, items, device, stain, train_sources, augment)
                target = torch.tensor(labels, device=device)
                with precision_context(device, cfg.precision):
                    logits, _ = net(x, sizes)
                loss = F.cross_entropy(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += loss.item() * len(labels)
                count += len(labels)
                steps.update(1)
                steps.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        train_loss = _mean_across_ranks(total, count, ranks, device)
        val_loss, val_auc = math.nan, None
        if len(val):
            val_loss, val_auc = _loss_auc(predict_topk(model, val, cfg, input_size, device, ranks, stain), val_labels)
        key = _selection_key(val_auc, val_loss) if len(val) else (epoch,)
        if best_key is None or key > best_key:
            best_key, best_epoch, best_state = key, epoch, _cpu_state(model)
        rows.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_auc": math.nan if val_auc is None else val_auc,
                "seconds": time.perf_counter() - t0,
            }
        )
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auc="-" if val_auc is None else f"{val_auc:.3f}")
        if ranks.rank == 0:
            write_torch(
                {
                    "epoch": epoch,
                    "model": _cpu_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best_state": best_state,
                    "best_key": list(best_key),
                    "best_epoch": best_epoch,
                    "history": rows,
                },
                checkpoint_path,
            )
        ranks.barrier()
    history = pd.DataFrame(rows)
    history["selected"] = history["epoch"] == best_epoch
    assert best_state is not None
    return FitResult(best_state, history, best_epoch)
