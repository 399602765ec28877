"""CKA of a LayerScale ViT (the registry's UNI scaled down: depth 8, width 96; it is the initialisation that
matters): the baseline is a non-degenerate control, reported as mean ± sd over its draws, and CKA compares the
representation the classifier sees (final norm, class token)."""

from __future__ import annotations

import dataclasses
import json
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from histotransfer.analysis import compare_encoders, linear_cka
from histotransfer.analysis.cka_activations import sample_patches
from histotransfer.analysis.cka_encoders import baseline_encoder
from histotransfer.analysis.compare import cka_summary
from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import create_encoder, registry
from histotransfer.encoders.vit import VIT_ENCODERS
from histotransfer.features.loader import PatchBatches
from histotransfer.patches.tiling import tile_slides

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"depth": 8, "embed_dim": 96, "num_heads": 4}


@pytest.fixture
def small_uni(monkeypatch):
    spec = registry.encoder_spec("uni")
    monkeypatch.setitem(
        registry._REGISTRY,
        "uni",
        dataclasses.replace(
            spec, build=partial(VIT_ENCODERS["uni"].build, **SMALL), preprocessing=spec.preprocessing.at(64)
        ),
    )  # the card's bilinear resize, at a size that keeps the test fast


@pytest.fixture(scope="module")
def patches_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cka_ls")
    demo = make_demo_slides(root, n_slides=2, seed=2, size=1024, mpp=0.5)
    return tile_slides(demo.slides, root / "tiles", magnification=10, patch_size=64).patches


def _stem_vs_last(encoder, x: torch.Tensor) -> float:
    """CKA of the stem's tokens with the last stage's, each patch's tokens averaged."""
    with torch.no_grad():
        maps = encoder.forward_stages(x)
    return linear_cka(maps[0].mean(dim=1), maps[-1].mean(dim=1))


def test_random_layerscale_init_is_near_identity_and_the_control_is_not(small_uni):
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = create_encoder("uni", "random", random_seed=1)
    control, rescaled = baseline_encoder(plain, 1)
    assert rescaled
    assert _stem_vs_last(plain, x) > 0.9999  # a random LayerScale ViT passes its patch embedding through
    assert _stem_vs_last(control, x) < 0.995  # without LayerScale the blocks move the tokens (0.984 measured)
    _, rescaled = baseline_encoder(create_encoder("resnet18", "random", 2), 1)
    assert not rescaled  # other architectures are drawn as they are


def test_cka_of_a_layerscale_vit_reports_a_baseline_band_below_frozen_vs_frozen(small_uni, patches_dir, tmp_path):
    a = create_encoder("uni", "random")
    df = compare_encoders(a, a, patches_dir, tmp_path, n_patches=40, batch_size=20, device="cpu", estimator="debiased")
    assert list(df.columns) == ["stage", "cka", "baseline", "baseline_sd"]
    blocks = df.iloc[1:]  # the stem's class token is the same for every patch (a parameter): CKA 0 by definition
    assert df.loc[0, "cka"] == 0.0
    assert np.allclose(blocks["cka"], 1.0)
    assert (blocks["baseline"] + 2 * blocks["baseline_sd"] < blocks["cka"]).all()
    assert (blocks["baseline_sd"] > 0).all()
    record = json.loads((tmp_path / "cka.json").read_text())
    assert "3 draws (seeds 1-3)" in record["baseline"] and "LayerScale gains set to 1" in record["baseline"]
    assert record["settings"]["pooling"] == "classifier"
    assert record["preprocessing_a"]["interpolation"] == "bilinear"
    written = pd.read_csv(tmp_path / "cka.csv")
    assert list(written.columns) == list(df.columns)
    assert "±" in cka_summary(df)


def test_classifier_pooling_is_the_normed_class_token_and_mean_is_its_own_option(small_uni, patches_dir, tmp_path):
    """Against the encoder's own features: CKA of A cut after stage k with itself through compare_encoders'
    default equals CKA computed on A's pooled features (the class token after the final norm)."""
    a = create_encoder("uni", "random")
    b = create_encoder("uni", "random", random_seed=5)
    df = compare_encoders(
        a, b, patches_dir, tmp_path / "cls", n_patches=24, batch_size=24, device="cpu", baseline=False
    )
    mean = compare_encoders(
        a, b, patches_dir, tmp_path / "mean", n_patches=24, batch_size=24, device="cpu", baseline=False, pooling="mean"
    )
    used = pd.read_csv(tmp_path / "cls" / "patches.csv", dtype={"slide_id": str})
    assert len(used) == 24
    jobs = sample_patches(patches_dir, 24)
    pixels = torch.cat([b_.pixels for b_ in PatchBatches(jobs, 24, a.preprocessing)])
    x = a.preprocess(pixels, torch.device("cpu"))
    with torch.no_grad():
        last_a, last_b = a(x), b(x)
        tokens_a, tokens_b = a.forward_stages(x)[-1], b.forward_stages(x)[-1]
    assert df.iloc[-1]["cka"] == pytest.approx(linear_cka(last_a, last_b), abs=1e-6)
    assert mean.iloc[-1]["cka"] == pytest.approx(linear_cka(tokens_a.mean(dim=1), tokens_b.mean(dim=1)), abs=1e-6)
    assert df.iloc[-1]["cka"] != pytest.approx(mean.iloc[-1]["cka"], abs=1e-3)
