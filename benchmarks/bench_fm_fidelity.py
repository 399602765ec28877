"""Our foundation-model features against their authors' own loading path, on the demo's patches.

For each foundation model whose checkpoint is in ``--weights-dir`` (under the name ``histotransfer encoders``
prints, e.g. ``uni-pytorch_model.bin``), the features histotransfer extracts (registry network, our loading of
the file, ``prepare_patch`` + ``Encoder.preprocess``, the registry's pooling) are compared with the model card's
path: ``timm.create_model`` with the card's keyword arguments, the file loaded with ``load_state_dict`` as the
card does, the card's torchvision / timm transform on PIL images, and the card's own embedding (the pooled
output; Virchow2: class token ++ mean patch token after the 4 registers). Prints, per model, the largest absolute
difference of the features and of the input tensors, relative to the features' largest magnitude.

Phikon-v2 is published as a transformers ``Dinov2Model``: its card path needs ``transformers`` and the card's
folder ``<weights-dir>/phikon-v2/`` (its ``config.json`` and ``model.safetensors``) for ``AutoModel.from_pretrained``
(the row says why it is skipped otherwise).

Without any checkpoint in the folder (or with ``--random``) every model runs on random weights: the card's timm
network is drawn, saved to a temporary file and loaded by both paths (a check of the architecture, loading and
pixels, not of the published weights), scaled down (depth 4, width 96) unless ``--full-size``; it says so.

Run: ``.venv/bin/python benchmarks/bench_fm_fidelity.py --weights-dir ~/weights [--device cuda] [--n-patches 16]``
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder, encoder_spec, load_state_dict_file, registry
from histotransfer.encoders.vit import VIT_ENCODERS
from histotransfer.features import prepare_patch
from histotransfer.slide import open_slide

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HOPTIMUS = {"mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517)}
BICUBIC = T.InterpolationMode.BICUBIC
SMALL = {"depth": 4, "embed_dim": 96, "num_heads": 4}


def _timm_cfg(interpolation: str, norm: dict[str, Any]) -> T.Compose:
    cfg = {"input_size": (3, 224, 224), "interpolation": interpolation, "crop_pct": 1.0, "crop_mode": "center", **norm}
    return create_transform(**resolve_data_config(cfg))


# name -> (the card's transform, the card's embedding of the model's output)
CARDS = {
    "uni": (lambda: T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(**IMAGENET)]), None),
    "uni2-h": (lambda: T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(**IMAGENET)]), None),
    "virchow2": (
        lambda: _timm_cfg("bicubic", IMAGENET),
        lambda out: torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1),
    ),
    "h-optimus-0": (lambda: _timm_cfg("bicubic", HOPTIMUS), None),
    "prov-gigapath": (
        lambda: T.Compose(
            [T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(), T.Normalize(**IMAGENET)]
        ),
        None,
    ),
    "phikon-v2": (
        lambda: T.Compose([T.Resize(224, interpolation=BICUBIC), T.ToTensor(), T.Normalize(**IMAGENET)]),
        None,
    ),
}


def demo_patches(n: int) -> list[np.ndarray]:
    """``n`` 256 px RGB patches of the demo's slides."""
    root = Path(tempfile.mkdtemp(prefix="fm-fidelity-"))
    demo = make_demo_slides(root, n_slides=2, seed=0, size=2048)
    patches = []
    rng = np.random.default_rng(0)
    for path in demo.slides:
        with open_slide(path) as slide:
            for x, y in rng.integers(256, 1536, size=(n // 2 + n % 2, 2)):
                patches.append(slide.read_region((int(x), int(y)), 0, (256, 256)))
    return patches[:n]


def card_model(name: str, small: bool) -> torch.nn.Module:
    config = VIT_ENCODERS[name]
    return timm.create_model(config.arch, pretrained=False, **{**config.kwargs, **(SMALL if small else {})}).eval()


def checkpoint(name: str, folder: Path | None) -> Path | None:
    option = encoder_spec(name).weights["pretrained"]
    assert option.checkpoint is not None
    path = None if folder is None else folder / option.checkpoint.filename
    return path if path is not None and path.is_file() else None


def compare(
    name: str, file: Path | None, patches: list[np.ndarray], device: torch.device, small: bool, tmp: Path
) -> str:
    transform, embed = CARDS[name]
    if file is None:  # random weights: the card's network, saved and loaded by both paths
        reference = card_model(name, small)
        file = tmp / f"{name}.pt"
        torch.save(reference.state_dict(), file)
    elif name == "phikon-v2":
        try:
            from transformers import AutoModel
        except ImportError:
            return "skipped: its card path is transformers' Dinov2Model (pip install transformers)"
        if not (file.parent / "phikon-v2" / "config.json").is_file():
            return f"skipped: put the card's folder (config.json, model.safetensors) in {file.parent / 'phikon-v2'}"
        reference = AutoModel.from_pretrained(file.parent / "phikon-v2").eval()
        embed = lambda out: out.last_hidden_state[:, 0]  # noqa: E731
    else:
        reference = card_model(name, small)
        reference.load_state_dict(load_state_dict_file(file), strict=True)
    ours = create_encoder(name, str(file)).to(device).eval()
    reference = reference.to(device)
    prep = ours.preprocessing
    mine_x = prep.normalise(torch.from_numpy(np.stack([prepare_patch(p, prep) for p in patches])), device)
    card_x = torch.stack([transform()(Image.fromarray(p)) for p in patches]).to(device)
    with torch.inference_mode():
        mine = ours(mine_x).float()
        card_input = {"pixel_values": card_x} if not isinstance(reference, timm.models.VisionTransformer) else {}
        out = reference(**card_input) if card_input else reference(card_x)
        theirs = (embed(out) if embed is not None else out).float()
    scale = float(theirs.abs().max())
    return (
        f"input max |diff| {float((mine_x - card_x).abs().max()):.2e}; features max |diff| "
        f"{float((mine - theirs).abs().max()):.3e} ({float((mine - theirs).abs().max()) / scale:.2e} of the "
        f"largest feature), {tuple(mine.shape)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, default=None, help="folder of downloaded checkpoints")
    parser.add_argument("--random", action="store_true", help="random weights even where checkpoints exist")
    parser.add_argument("--full-size", action="store_true", help="random weights at the published sizes")
    parser.add_argument("--n-patches", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    folder = None if args.random else args.weights_dir
    files = {name: checkpoint(name, folder) for name in CARDS}
    if not any(files.values()):
        small = not args.full_size
        print(
            f"No checkpoint found{'' if args.weights_dir is None else ' in ' + str(args.weights_dir)}: running "
            "on RANDOM weights"
            + (" (scaled down: depth 4, width 96)" if small else "")
            + "; this checks architecture, loading and "
            "pixels, not the published weights."
        )
        for name in CARDS:
            if small:
                spec = registry.encoder_spec(name)
                registry._REGISTRY[name] = dataclasses.replace(spec, build=partial(VIT_ENCODERS[name].build, **SMALL))
    else:
        small = False
    patches = demo_patches(args.n_patches)
    with tempfile.TemporaryDirectory() as tmp:
        for name, file in files.items():
            if any(files.values()) and file is None:
                print(f"{name:14} no checkpoint in {args.weights_dir}")
                continue
            torch.manual_seed(0)
            print(
                f"{name:14} {'checkpoint ' + file.name if file else 'random weights'}: "
                f"{compare(name, file, patches, device, small, Path(tmp))}",
                flush=True,
            )


if __name__ == "__main__":
    main()
