"""Rebuild the encoder a run was trained on, and save a fine-tuned encoder as a weights file.

A run records how its features were made (``config.json`` -> ``encoder``: name, truncate, weights, sha256,
input size). :func:`encoder_from_attrs` rebuilds exactly that encoder and checks the weights file's sha256.
A fine-tuned encoder is saved as ``encoder.pt``: a flat torchvision-style state dict of the *full* network
(stages beyond the truncation keep the weights it started from, since fine-tuning never ran them), which
:func:`histotransfer.features.create_encoder` and ``histotransfer extract --weights`` accept as a local file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._io import write_torch
from ..encoders import Encoder, create_encoder, encoder_spec, is_file_label
from ..errors import HistotransferError

ENCODER_FILE = "encoder.pt"


def weights_argument(attrs: dict[str, Any], source: str | Path) -> str:
    """The ``weights`` argument of create_encoder that reproduces the recorded weights: a named option
    (``weights_label``, e.g. imagenet) or the recorded file."""
    weights = str(attrs.get("weights", ""))
    label = str(attrs.get("weights_label", ""))
    if label and not is_file_label(label):
        return label
    if not weights:
        raise HistotransferError(
            f"{source}: does not record which encoder weights made the features, so the encoder cannot be "
            "rebuilt; re-extract the features with histotransfer extract."
        )
    return weights  # "random" rebuilds exactly: create_encoder draws it from a fixed seed


def encoder_from_attrs(attrs: dict[str, Any], source: str | Path, local_dir: Path | None = None) -> Encoder:
    """Build the encoder described by feature attrs (``encoder``, ``truncate``, ``weights``, ``weights_sha256``).

    A weights file that is gone but has a copy named ``encoder.pt`` in ``local_dir`` (a fine-tuned run
    folder that was moved) is taken from there. The file's sha256 must match the recorded one.
    """
    if "encoder" not in attrs or "truncate" not in attrs:
        raise HistotransferError(
            f"{source}: does not record which encoder made the features (encoder, truncate); only features "
            "extracted by histotransfer can be fine-tuned or compared."
        )
    weights = weights_argument(attrs, source)
    if (
        weights != attrs.get("weights_label")
        and not Path(weights).is_file()
        and local_dir is not None
        and (local_dir / ENCODER_FILE).is_file()
    ):
        weights = str(local_dir / ENCODER_FILE)
    encoder = create_encoder(str(attrs["encoder"]), weights, int(attrs["truncate"]))
    expected = attrs.get("weights_sha256") or ""
    if expected and encoder.weights_sha256 and expected != encoder.weights_sha256:
        raise HistotransferError(
            f"{source}: the weights file {weights} has sha256 {encoder.weights_sha256[:12]}..., but the features "
            f"were made with {expected[:12]}...; restore the original weights file."
        )
    return encoder


def run_encoder_attrs(run_dir: str | Path) -> dict[str, Any]:
    """The ``encoder`` block of a run folder's ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise HistotransferError(f"{run_dir}: no config.json; pass a run folder written by train or finetune.")
    attrs = json.loads(path.read_text()).get("encoder") or {}
    return attrs


def run_encoder(run_dir: str | Path) -> Encoder:
    """The encoder of a run folder: the frozen one of a ``train`` run, the fine-tuned one of a ``finetune`` run."""
    run_dir = Path(run_dir)
    return encoder_from_attrs(run_encoder_attrs(run_dir), run_dir / "config.json", local_dir=run_dir)


def torchvision_state_dict(encoder: Encoder, base: Encoder | None = None) -> dict[str, torch.Tensor]:
    """``encoder``'s weights under the torchvision key names of its full network.

    ``base`` is the same network untruncated: it supplies the stages a truncated ``encoder`` dropped (not
    needed when ``encoder`` is untruncated). Keys are matched through the registry's own stage split (the same
    module objects appear in the network and its stages), so the mapping holds for every registered
    architecture.
    """
    if base is None:
        base = encoder
    if base.name != encoder.name or base.truncate != 0:
        raise HistotransferError(
            f"saving {encoder.name} truncated by {encoder.truncate}: pass the untruncated "
            f"{encoder.name} it was cut from as base, to supply the dropped stages."
        )
    spec = encoder_spec(encoder.name)
    with torch.device("meta"):
        network = spec.build()
        stages = spec.stages(network)
        pool = spec.pool(network, stages) if spec.pool is not None else None
        reference = Encoder(encoder.name, stages, 0, "", None, spec.preprocessing, pool)
    tv_names = {id(t): k for k, t in network.state_dict(keep_vars=True).items()}
    to_tv = {k: tv_names[id(t)] for k, t in reference.state_dict(keep_vars=True).items()}
    state = base.state_dict()
    state.update(encoder.state_dict())
    foreign = [k for k in state if k not in to_tv]
    if foreign:
        raise HistotransferError(
            f"saving {encoder.name}: {len(foreign)} tensor(s) are not its network's (e.g. "
            f"{foreign[0]}); merge low-rank adaptation layers into the weights first "
            "(histotransfer.finetune.model.merge_lora)."
        )
    return {to_tv[k]: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def save_encoder(encoder: Encoder, path: str | Path, base: Encoder | None = None) -> Path:
    """Write ``encoder`` as a torchvision-style state dict file that create_encoder and ``extract --weights``
    accept (see :func:`torchvision_state_dict` for ``base``)."""
    path = Path(path)
    write_torch(torchvision_state_dict(encoder, base), path)
    return path
