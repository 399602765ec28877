"""Extraction on a real Aperio slide with real ImageNet DenseNet121 weights, against torchvision directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from safetensors.torch import load_file

from histotransfer.features import extract_features, read_feature_file
from histotransfer.patches import PatchSpec, write_patch_file

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SLIDE = SHARED / "data" / "CMU-1-Small-Region.svs"
WEIGHTS = SHARED / "weights" / "densenet121_imagenet_from_keras.safetensors"
PATCH = 128

pytestmark = [
    pytest.mark.skipif(
        not (SLIDE.exists() and WEIGHTS.exists()), reason=f"real slide or weights not present under {SHARED}"
    ),
    pytest.mark.usefixtures("one_thread"),
]


def openslide_pixels(coords: np.ndarray) -> np.ndarray:
    """Patch pixels read with OpenSlide itself (RGBA -> RGB; the region is opaque)."""
    import openslide

    with openslide.OpenSlide(str(SLIDE)) as slide:
        return np.stack(
            [np.asarray(slide.read_region((int(x), int(y)), 0, (PATCH, PATCH)).convert("RGB")) for x, y in coords]
        )


def torchvision_features(pixels: np.ndarray) -> dict[int, np.ndarray]:
    """Pooled DenseNet121 features for truncate 0..3, computed with torchvision's module directly."""
    model = tvm.densenet121()
    missing, unexpected = model.load_state_dict(load_file(WEIGHTS), strict=False)
    assert not unexpected and set(missing) == {"classifier.weight", "classifier.bias"}
    model.eval()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    out = {}
    with torch.inference_mode():
        h = x
        for name, module in model.features.named_children():
            h = module(h)
            if name.startswith("denseblock") and name != "denseblock4":
                out[4 - int(name[-1])] = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1).numpy()
        out[0] = torch.flatten(F.adaptive_avg_pool2d(F.relu(h), 1), 1).numpy()
    return out


def test_real_slide_real_weights_equal_torchvision(tmp_path):
    coords = np.array([[x, y] for x in (300, 900, 1500) for y in (600, 1800)], dtype=np.int64)
    spec = PatchSpec(
        patch_size=PATCH,
        patch_size_level0=PATCH,
        patch_level=0,
        downsample=1.0,
        target_magnification=20.0,
        mpp=0.499,
        min_tissue=0.5,
        stride=PATCH,
        slide_path=str(SLIDE),
    )
    patches = tmp_path / "patches"
    write_patch_file(patches / "CMU-1-Small-Region.h5", coords, np.ones(len(coords), np.float32), spec)
    reference = torchvision_features(openslide_pixels(coords))
    assert [reference[k].shape[1] for k in range(4)] == [1024, 1024, 512, 256]
    for k in range(4):
        folder = extract_features(
            patches, tmp_path, "densenet121", weights=str(WEIGHTS), truncate=k, batch_size=4, workers=0
        )
        bag = read_feature_file(folder / "CMU-1-Small-Region.h5")
        np.testing.assert_array_equal(bag.coords, coords)
        assert bag.attrs["weights_sha256"] == "ca75f26225affa081e005d8100cebdce175fb4cb12d37c0104b91ee64f29b622"
        # Same pixels, same weights; only the convolution algorithms (channels_last) differ: float32 rounding.
        np.testing.assert_allclose(bag.features, reference[k], rtol=1e-5, atol=1e-5 * np.abs(reference[k]).max())
