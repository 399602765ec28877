"""Stain normalisation against torchstain's NumPy backend, reference handling, and seeded HED jitter."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from histotransfer.colour import HED_FROM_RGB, RGB_FROM_HED, optical_density
from histotransfer.demo_slides import render_tissue
from histotransfer.errors import HistotransferError
from histotransfer.stain import HedJitter, StainNormalizer, density, load_reference, reinhard
from histotransfer.stain.macenko import macenko_fit

pytestmark = pytest.mark.usefixtures("one_thread")
PATCH = 128


def he_image(seed: int, size: int = 384, lesion: bool = True) -> np.ndarray:
    """Demo H&E texture covering the whole image, with a lesion in its lower half."""
    tissue = np.ones((size, size), bool)
    region = np.zeros_like(tissue)
    if lesion:
        region[size // 2 :, : size // 2] = True
    return render_tissue(tissue, region, np.random.default_rng(seed))


def crops(image: np.ndarray, size: int = PATCH) -> np.ndarray:
    h, w = image.shape[:2]
    return np.stack(
        [image[y : y + size, x : x + size] for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]
    )


def torchstain_reference(method: str, reference: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """torchstain's own NumPy-backend result, patch by patch."""
    normalizer = NumpyMacenkoNormalizer() if method == "macenko" else NumpyReinhardNormalizer()
    normalizer.fit(reference)
    if method == "macenko":
        return np.stack([normalizer.normalize(p, stains=False)[0] for p in patches])
    return np.stack([normalizer.normalize(p) for p in patches])


def stained_pixels(patches: np.ndarray) -> np.ndarray:
    """Per patch, the pixels with optical density >= 0.15 in all channels (Io 240), counted in float64."""
    return (-np.log((patches.astype(np.float64) + 1) / 240) >= 0.15).all(-1).sum((1, 2))


def assert_matches_torchstain(method: str, reference: np.ndarray, patches: np.ndarray) -> None:
    """Patches with at least 500 stained pixels equal torchstain's result to one grey level; the others (for
    which torchstain's Macenko fails or returns noise) come back unchanged."""
    ours = StainNormalizer.fit(method, reference)(torch.from_numpy(patches)).numpy()
    assert ours.shape == patches.shape and ours.dtype == np.uint8
    tissue = stained_pixels(patches) >= 500
    assert tissue.mean() >= 0.5  # the comparison below is not vacuous
    expected = torchstain_reference(method, reference, patches[tissue])
    assert np.abs(ours[tissue].astype(int) - expected.astype(int)).max() <= 1
    assert np.array_equal(ours[~tissue], patches[~tissue])
    assert (ours[tissue] != patches[tissue]).mean() > 0.5  # normalisation moved most values


def test_macenko_fit_equals_torchstains_on_a_reference_and_a_slide_sized_sample() -> None:
    """The Macenko fit (stain matrix, 99th-percentile concentrations) is torchstain's to float64 rounding, so the
    fitted targets and slide estimates, rounded to 6 decimals, are the numbers torchstain gives."""
    tinted = np.clip(he_image(seed=2).astype(int) + np.array([-25, 10, -5]), 0, 255).astype(np.uint8)
    sample = np.concatenate([crops(he_image(seed=s, size=512)) for s in range(3, 7)])  # 64 patches, 1M pixels
    for rgb in (he_image(seed=1), tinted, sample):
        theirs = NumpyMacenkoNormalizer()
        theirs.fit(rgb.reshape(-1, 1, 3), Io=240, alpha=1, beta=0.15)
        stains, max_c = macenko_fit(rgb, 240.0, 1.0, 0.15)
        np.testing.assert_allclose(stains, theirs.HERef, rtol=0, atol=1e-12)
        np.testing.assert_allclose(max_c, theirs.maxCRef, rtol=1e-12, atol=0)
    fitted = StainNormalizer.fit("macenko", tinted).target
    theirs = NumpyMacenkoNormalizer()
    theirs.fit(tinted, Io=240, alpha=1, beta=0.15)
    assert fitted == {
        "stain_matrix": np.round(theirs.HERef, 6).tolist(),
        "max_concentrations": np.round(theirs.maxCRef, 6).tolist(),
    }


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_batch_equals_torchstain_numpy_on_demo_patches(method: str) -> None:
    patches = crops(he_image(seed=1))
    reference = he_image(seed=2, size=256)
    # A differently tinted reference, so that normalisation moves pixels a lot.
    reference = np.clip(reference.astype(int) + np.array([-25, 10, -5]), 0, 255).astype(np.uint8)
    assert_matches_torchstain(method, reference, patches)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_batch_equals_torchstain_numpy_on_real_slide(method: str, cmu_svs: Path) -> None:
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(cmu_svs)) as slide:
        # Tissue, and a strip of glass on the left (x < 800) that must pass through unchanged.
        region = np.asarray(slide.read_region((600, 1900), 0, (6 * PATCH, 2 * PATCH)).convert("RGB"))
        reference = np.asarray(slide.read_region((1000, 1000), 0, (256, 256)).convert("RGB"))
    assert_matches_torchstain(method, reference, crops(region))


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_background_and_flat_patches_pass_through_unchanged(method: str) -> None:
    normalizer = StainNormalizer.fit(method, he_image(seed=3, size=256))
    white = np.full((PATCH, PATCH, 3), 243, np.uint8)
    white[::7, ::5] = 236  # slide-glass noise, still background
    flat = np.full((PATCH, PATCH, 3), (120, 60, 140), np.uint8)  # stained but one colour: no stain pair
    black = np.zeros((PATCH, PATCH, 3), np.uint8)
    tissue = crops(he_image(seed=4, size=PATCH), PATCH)[0]
    batch = torch.from_numpy(np.stack([white, flat, black, tissue]))
    out = normalizer(batch)
    assert torch.equal(out[:3], batch[:3])
    assert not torch.equal(out[3], batch[3])
    empty = torch.zeros(0, PATCH, PATCH, 3, dtype=torch.uint8)
    assert normalizer(empty).shape == empty.shape


def test_a_few_stained_pixels_are_not_enough() -> None:
    normalizer = StainNormalizer.fit("macenko", he_image(seed=3, size=256), min_pixels=500)
    sparse = np.full((PATCH, PATCH, 3), 243, np.uint8)
    sparse[:20, :20] = he_image(seed=5, size=PATCH)[:20, :20]  # at most 400 stained pixels
    batch = torch.from_numpy(sparse[None])
    assert torch.equal(normalizer(batch), batch)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_dict_round_trip_through_json_gives_identical_outputs(method: str) -> None:
    normalizer = StainNormalizer.fit(method, he_image(seed=6, size=256))
    again = StainNormalizer.from_dict(json.loads(json.dumps(normalizer.to_dict())))
    patches = torch.from_numpy(crops(he_image(seed=7, size=192)))
    assert torch.equal(normalizer(patches), again(patches))
    assert again.tag() == normalizer.tag() and again.tag().startswith(f"{method}-")


def test_tag_changes_with_reference_method_and_settings() -> None:
    a, b = he_image(seed=8, size=256), he_image(seed=9, size=256)
    tags = {
        StainNormalizer.fit("macenko", a).tag(),
        StainNormalizer.fit("macenko", b).tag(),
        StainNormalizer.fit("reinhard", a).tag(),
        StainNormalizer.fit("macenko", a, alpha=2).tag(),
    }
    assert len(tags) == 4
    assert StainNormalizer.fit("macenko", a.copy()).tag() == StainNormalizer.fit("macenko", a).tag()


def test_reference_file_array_and_patch_list_agree(tmp_path: Path) -> None:
    image = he_image(seed=10, size=256)
    cv2.imwrite(str(tmp_path / "ref.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    from_file = StainNormalizer.fit("macenko", tmp_path / "ref.png")
    from_array = StainNormalizer.fit("macenko", image)
    assert from_file.to_dict() == from_array.to_dict()
    # A list of patches is fitted on the concatenation of their pixels: same as one image holding them all.
    halves = [image[:128], np.dstack([image[128:], np.full((128, 256, 1), 255, np.uint8)])]  # RGB and RGBA
    assert np.array_equal(load_reference(halves), load_reference(image))
    assert StainNormalizer.fit("reinhard", halves).to_dict() == StainNormalizer.fit("reinhard", image).to_dict()


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (np.full((64, 64, 3), 245, np.uint8), "only 0 stained pixels"),
        (np.zeros((64, 64), np.uint8), r"uint8 RGB\(A\) array"),
        ([], "list of reference patches is empty"),
        ("missing.png", "missing.png: not a readable image"),
    ],
)
def test_bad_references_are_refused(reference: object, message: str) -> None:
    with pytest.raises(HistotransferError, match=message):
        StainNormalizer.fit("macenko", reference)  # type: ignore[arg-type]


def test_unknown_method_and_incomplete_dict_are_refused() -> None:
    with pytest.raises(HistotransferError, match="'vahadane' is unknown"):
        StainNormalizer.fit("vahadane", he_image(seed=0, size=128))
    with pytest.raises(HistotransferError, match="lacks settings"):
        StainNormalizer.from_dict({"method": "macenko", "target": {}})


def test_hed_matrices_are_inverse_and_optical_density_of_white_is_zero() -> None:
    np.testing.assert_allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3), atol=1e-12)
    assert optical_density(np.array([255], np.uint8))[0] == 0
    np.testing.assert_allclose(optical_density(np.array([63], np.uint8)), [np.log(4)], rtol=1e-6)


def test_hed_jitter_with_zero_strength_is_the_identity() -> None:
    batch = torch.from_numpy(np.stack([he_image(seed=11, size=64), np.zeros((64, 64, 3), np.uint8)]))
    assert torch.equal(HedJitter(sigma=0, bias=0, seed=3)(batch), batch)


def test_hed_jitter_is_seeded_and_varies_per_patch() -> None:
    patch = he_image(seed=12, size=64)
    batch = torch.from_numpy(np.stack([patch, patch]))
    first, second = HedJitter(0.1, 0.1, seed=5), HedJitter(0.1, 0.1, seed=5)
    a1, a2 = first(batch), first(batch)
    assert torch.equal(a1, second(batch)) and torch.equal(a2, second(batch))  # same seed, same sequence
    assert not torch.equal(a1, a2)  # successive batches get new draws
    assert not torch.equal(a1[0], a1[1])  # each patch its own draw
    assert not torch.equal(HedJitter(0.1, 0.1, seed=6)(batch), a1)
    assert HedJitter(0.1, 0.2, seed=5).describe() == {
        "name": "hed_jitter",
        "sigma": 0.1,
        "bias": 0.2,
        "seed": 5,
        "units": "natural-log optical density",
        "stain_vectors": "Ruifrok-Johnston H, E, DAB",
    }


def test_hed_jitter_scales_haematoxylin_as_drawn() -> None:
    """An independent float64 NumPy computation of the same draws gives the same pixels (to rounding)."""
    patch = he_image(seed=13, size=32)
    jitter = HedJitter(0.3, 0.2, seed=7)
    out = jitter(torch.from_numpy(patch[None]))[0].numpy()
    draws = torch.Generator().manual_seed(7)
    scale = 1 + (torch.rand(1, 3, generator=draws) * 2 - 1).numpy()[0] * 0.3
    shift = (torch.rand(1, 3, generator=draws) * 2 - 1).numpy()[0] * 0.2
    hed = -np.log((patch.astype(np.float64) + 1) / 256) @ HED_FROM_RGB * scale + shift
    expected = np.clip(np.round(256 * np.exp(-hed @ RGB_FROM_HED) - 1), 0, 255)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_bad_batches_and_strengths_are_refused() -> None:
    normalizer = StainNormalizer.fit("reinhard", he_image(seed=0, size=128))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) uint8"):
        normalizer(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) uint8"):
        HedJitter()(torch.zeros(2, 8, 8, 3))
    with pytest.raises(HistotransferError, match="must be >= 0"):
        HedJitter(sigma=-0.1)


def test_reinhard_cpu_and_device_arithmetic_agree() -> None:
    """The CPU's OpenCV/NumPy conversions and the torch ones used on other devices give the same f (to float32
    rounding) and the same pixels back, near black, near white and beyond the gamut included."""
    levels = np.arange(256, dtype=np.uint8)
    every = np.stack(np.meshgrid(levels[::5], levels[::3], levels[::7], indexing="ij"), -1).reshape(1, -1, 3)
    pixels = torch.from_numpy(np.concatenate([every, he_image(seed=14, size=64).reshape(1, -1, 3)], 1))
    f_cpu, f_torch = reinhard.lab_f_numpy(pixels), reinhard.lab_f_torch(pixels)
    torch.testing.assert_close(f_cpu, f_torch, rtol=1e-6, atol=1e-6)
    moved = f_torch * 1.2 - 0.1  # out of gamut both ways
    back_cpu, back_torch = reinhard.rgb_of_f_numpy(moved), reinhard.rgb_of_f_torch(moved)
    assert (back_cpu.int() - back_torch.int()).abs().max() <= 1
    assert (back_cpu != back_torch).float().mean() < 1e-3
    lost = pixels.int() - reinhard.rgb_of_f_numpy(f_cpu).int()  # the round trip, truncated as torchstain's
    assert lost.min() >= 0 and lost.max() <= 1


def test_stained_pixels_by_grey_level_equal_the_per_pixel_formula() -> None:
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 5000, 3), dtype=np.uint8))
    for io, beta in [(240.0, 0.15), (255.0, 0.5), (240.0, 9.0)]:
        expected = (-torch.log((pixels.float() + 1.0) / io) >= beta).all(-1)
        assert torch.equal(density.stained_pixels(pixels, io, beta), expected)
        per_pixel = (-np.log((pixels.numpy().astype(np.float64) + 1) / io) >= beta).all(-1).sum()
        assert density.stained_count(pixels.numpy(), io, beta) == per_pixel
