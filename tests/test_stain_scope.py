"""Per-slide stain normalisation: the slide's pooled source estimate against torchstain's formulas, what it
keeps of a slide's own colour differences, and what its settings record."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from histotransfer.analysis.settings import CkaSettings
from histotransfer.demo_slides import make_demo_slides, render_tissue
from histotransfer.errors import HistotransferError
from histotransfer.features import ExtractSettings, extract_features
from histotransfer.mil import evaluate_run, train_mil
from histotransfer.patches import PatchReader, read_patch_file, tile_slides
from histotransfer.slide import open_slide
from histotransfer.stain import SOURCE_PATCHES, SlideStain, StainNormalizer, source_sample

pytestmark = pytest.mark.usefixtures("one_thread")
PATCH = 128


def slide_image(seed: int, size: int = 512) -> np.ndarray:
    """Demo H&E texture covering the image, with a lesion (darker, denser nuclei) in its left half."""
    tissue = np.ones((size, size), bool)
    lesion = np.zeros_like(tissue)
    lesion[:, : size // 2] = True
    return render_tissue(tissue, lesion, np.random.default_rng(seed))


def tiles(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.stack([image[y : y + PATCH, x : x + PATCH] for y in range(0, h, PATCH) for x in range(0, w, PATCH)])


def mean_od(patches: np.ndarray) -> np.ndarray:
    """Mean optical density of each patch (all channels)."""
    return -np.log((patches.astype(np.float64) + 1) / 256).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def slide() -> dict[str, np.ndarray]:
    """The 16 patches of one slide (lesion in the left half), one lesion and one stroma patch of it, and a
    reference of another tint."""
    patches = tiles(slide_image(seed=21))
    tint = np.array([-25, 10, -5])
    reference = np.clip(slide_image(seed=22, size=256).astype(int) + tint, 0, 255).astype(np.uint8)
    return {"patches": patches, "lesion": patches[[4, 8]], "stroma": patches[[7, 11]], "reference": reference}


def test_slide_macenko_equals_torchstains_formulas_with_the_slides_pooled_estimate(slide) -> None:
    """Two patches of one slide, mapped with the slide's estimate, equal torchstain's Macenko arithmetic
    (its ``normalize``) with the source stain vectors and maximum concentrations replaced by torchstain's fit
    on the pooled pixels of the slide's patches."""
    normalizer = StainNormalizer.fit("macenko", slide["reference"], scope="slide")
    source = normalizer.fit_source(slide["patches"])
    pooled = NumpyMacenkoNormalizer()
    pooled.fit(slide["patches"].reshape(-1, 1, 3))
    np.testing.assert_allclose(source.estimate["stain_matrix"], pooled.HERef, atol=1e-6)
    np.testing.assert_allclose(source.estimate["max_concentrations"], pooled.maxCRef, atol=1e-6)
    assert (source.n_patches, source.n_pixels, source.reason) == (16, 16 * PATCH * PATCH, "")
    target = NumpyMacenkoNormalizer()
    target.fit(slide["reference"])
    two = np.concatenate([slide["lesion"][:1], slide["stroma"][:1]])
    ours = normalizer(torch.from_numpy(two), source).numpy()
    for patch, mine in zip(two, ours, strict=True):
        od = -np.log((patch.reshape(-1, 3).astype(np.float64) + 1) / 240)
        concentrations = np.linalg.lstsq(pooled.HERef, od.T, rcond=None)[0]
        scaled = concentrations / (pooled.maxCRef / target.maxCRef)[:, None]
        expected = np.minimum(240 * np.exp(-target.HERef @ scaled), 255).T.reshape(patch.shape).astype(np.uint8)
        assert np.abs(mine.astype(int) - expected.astype(int)).max() <= 1
        assert (mine != patch).mean() > 0.5  # the comparison is not vacuous


def test_slide_reinhard_maps_every_patch_by_the_slides_lab_statistics(slide) -> None:
    normalizer = StainNormalizer.fit("reinhard", slide["reference"], scope="slide")
    source = normalizer.fit_source(slide["patches"])
    pooled = NumpyReinhardNormalizer()
    pooled.fit(slide["patches"].reshape(-1, 1, 3))
    # torchstain's statistics are float32 numbers (a unit in the last place is 4e-6 at 32): equal to that.
    np.testing.assert_allclose(source.estimate["lab_means"], pooled.target_means, atol=1e-5)
    np.testing.assert_allclose(source.estimate["lab_stds"], pooled.target_stds, atol=1e-5)
    # torchstain's Reinhard of a whole image uses that image's statistics: the 16 patches as one image, mapped
    # by torchstain, give each patch what the per-slide normaliser gives it.
    target = NumpyReinhardNormalizer()
    target.fit(slide["reference"])
    whole = target.normalize(slide["patches"].reshape(-1, PATCH, 3)).reshape(slide["patches"].shape)
    ours = normalizer(torch.from_numpy(slide["patches"]), source).numpy()
    assert np.abs(ours.astype(int) - whole.astype(int)).max() <= 1


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_slide_scope_keeps_the_slides_colour_differences_patch_scope_evens_them_out(slide, method: str) -> None:
    """Lesion patches are darker than stroma patches of the same slide. Mapped with the slide's one estimate
    every lesion patch stays darker than every stroma patch, by much of the gap; normalised each on its own,
    a good part of the gap closes (Reinhard, which matches each patch's mean, closes nearly all of it)."""
    per_slide = StainNormalizer.fit(method, slide["reference"], scope="slide")
    per_patch = per_slide.with_scope("patch")
    source = per_slide.fit_source(slide["patches"])
    batch = torch.from_numpy(np.concatenate([slide["lesion"], slide["stroma"]]))

    def gap(pixels: np.ndarray) -> float:
        od = mean_od(pixels)
        return float(od[:2].mean() - od[2:].mean())

    raw, kept, evened = gap(batch.numpy()), gap(per_slide(batch, source).numpy()), gap(per_patch(batch).numpy())
    assert raw > 0.15
    assert kept > 0.5 * raw and evened < 0.7 * kept
    lesion, stroma = mean_od(per_slide(batch, source).numpy()).reshape(2, 2)
    assert lesion.min() > stroma.max()  # every lesion patch stays darker than every stroma patch


def test_a_slide_with_too_few_stained_pixels_is_left_unchanged_and_says_why(slide) -> None:
    normalizer = StainNormalizer.fit("macenko", slide["reference"], scope="slide")
    pale = np.full((3, PATCH, PATCH, 3), 243, np.uint8)
    pale[0, :10, :10] = slide["lesion"][0, :10, :10]
    source = normalizer.fit_source(pale)
    assert source.estimate is None and "stained pixels in the 3 patch(es) sampled (need 500)" in source.reason
    flat = np.full((2, PATCH, PATCH, 3), (120, 60, 140), np.uint8)
    assert "less than 1 degree apart" in normalizer.fit_source(flat).reason
    batch = torch.from_numpy(slide["lesion"])
    assert torch.equal(normalizer(batch, source), batch)
    assert SlideStain.from_dict(json.loads(json.dumps(source.to_dict()))) == source
    with pytest.raises(ValueError, match="per-slide normaliser takes the slide's source estimate"):
        normalizer(batch)
    with pytest.raises(ValueError, match="per-slide normaliser takes the slide's source estimate"):
        normalizer.with_scope("patch")(batch, source)


def test_the_source_sample_spreads_over_the_slide() -> None:
    coords = np.arange(500)[:, None] * [1, 2]
    sample = source_sample(coords)
    assert len(sample) == SOURCE_PATCHES and sample[0].tolist() == [0, 0] and sample[-1].tolist() == [499, 998]
    assert np.all(np.diff(sample[:, 0]) >= 7)  # about 500 / 63 rows apart
    assert np.array_equal(source_sample(coords[:10]), coords[:10])


def test_a_large_sample_is_thinned_by_a_pixel_stride(slide) -> None:
    normalizer = StainNormalizer.fit("reinhard", slide["reference"], scope="slide")
    big = np.concatenate([slide["patches"]] * 5)  # 80 patches of 128 px: 1.3 M pixels, stride 2
    source = normalizer.fit_source(big)
    assert source.n_pixels == 80 * 64 * 64
    pooled = NumpyReinhardNormalizer()
    pooled.fit(np.ascontiguousarray(big[:, ::2, ::2]).reshape(-1, 1, 3))
    np.testing.assert_allclose(source.estimate["lab_means"], pooled.target_means, atol=1e-5)  # float32, as above


def test_the_scope_is_recorded_only_where_it_changes_the_result(slide) -> None:
    """Raw settings and per-patch normalisation keep the settings, target record and tag of before the scope
    existed; per-slide normalisation (the default) gets its own."""
    for cls in (ExtractSettings, CkaSettings):
        assert cls.build().stain_scope == "slide"
        assert cls.build(stain_scope="patch").result_settings() == cls.build().result_settings()
        options = {"stain_norm": "macenko", "stain_ref": "r.png"}
        assert "stain_scope" not in cls.build(**options, stain_scope="patch").result_settings()
        assert cls.build(**options).result_settings()["stain_scope"] == "slide"
    per_patch = StainNormalizer.fit("macenko", slide["reference"])
    before = {"method": "macenko", "target": per_patch.target, "settings": per_patch.settings}
    text = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert per_patch.to_dict() == before
    assert per_patch.tag() == f"macenko-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    per_slide = per_patch.with_scope("slide")
    assert per_slide.to_dict() == {**before, "scope": "slide"} and per_slide.tag() != per_patch.tag()
    assert StainNormalizer.from_dict(per_slide.to_dict()) == per_slide
    assert StainNormalizer.from_dict(before) == per_patch
    with pytest.raises(HistotransferError, match="stain scope 'tile' is unknown"):
        per_patch.with_scope("tile")
    with pytest.raises(HistotransferError, match="'tile' is not one of slide, patch"):
        ExtractSettings.build(stain_scope="tile")


def _cohort(root, seed: int, prevalence_shift: float, prefix: str) -> tuple:
    """12 demo slides of two centres (haematoxylin and eosin shifted by 0.3 either way), ids prefixed, tiled;
    the patch folder and labels with the centre."""
    demo = make_demo_slides(
        root / "demo", n_slides=12, seed=seed, size=1024, centres=2, stain_shift=0.3, prevalence_shift=prevalence_shift
    )
    (root / "slides").mkdir(parents=True)
    slides = []
    for path in demo.slides:
        slides.append(root / "slides" / f"{prefix}{path.name}")
        slides[-1].symlink_to(path)
    patches = tile_slides(
        slides, root / "tiles", magnification=40, patch_size=128, min_region_um2=2000.0, workers=1
    ).patches
    labels = pd.read_csv(demo.labels_csv).merge(pd.read_csv(demo.centres_csv)[["slide_id", "centre"]])
    labels[["slide_id", "patient_id"]] = prefix + labels[["slide_id", "patient_id"]]
    labels.to_csv(root / "labels.csv", index=False)
    return patches, root / "labels.csv"


def _fullest_patches(patches, out):
    """The stain reference: each slide's patch most covered by tissue, fitted as one set."""
    out.mkdir()
    for path in sorted(patches.glob("*.h5")):
        patch_set = read_patch_file(path)
        x, y = patch_set.coords[int(np.argmax(patch_set.tissue_fraction))]
        with open_slide(patch_set.spec.slide_path) as slide, PatchReader(slide, patch_set.spec) as reader:
            cv2.imwrite(str(out / f"{path.stem}.png"), cv2.cvtColor(reader.read(int(x), int(y)), cv2.COLOR_RGB2BGR))
    return out


def test_per_slide_normalisation_removes_a_centre_shortcut_that_raw_features_keep(tmp_path) -> None:
    """Training slides whose centre gives the label away (every positive at the first centre), evaluated on
    slides of the same two centres with both classes at each; lesions darker than stroma, centres differing in
    stain. A model on raw features reads some of the centre's colour: on two of the three seeds its evaluation
    AUC falls well below 1 (its within-centre AUC stays 1). On per-slide Macenko features the centre's colour is
    gone and the lesions' stays: every seed ranks the evaluation slides perfectly. (Per-patch Macenko, which
    evens out the lesions' colour too, scored 0.83, 0.53 and 0.58 here.)"""
    common = {"input_size": 64, "device": "cpu", "workers": 0, "batch_size": 64}
    auc: dict[str, list[float]] = {"raw": [], "slide": []}
    for seed in (0, 1, 2):
        root = tmp_path / f"seed{seed}"
        train_patches, train_labels = _cohort(root / "train", seed, 1.0, "train_")
        test_patches, test_labels = _cohort(root / "test", seed + 1000, 0.0, "test_")
        reference = str(_fullest_patches(train_patches, root / "reference"))
        for name, stain in (("raw", {}), ("slide", {"stain_norm": "macenko", "stain_ref": reference})):
            train = extract_features(train_patches, root / "train", "resnet18", "random", 2, **common, **stain)
            test = extract_features(test_patches, root / "test", "resnet18", "random", 2, **common, **stain)
            run = train_mil(train, train_labels, root / f"run-{name}", epochs=10, seed=seed, protocol="split")
            auc[name].append(evaluate_run(run, test, test_labels, root / f"eval-{name}")["metrics"]["auc"])
    assert auc["slide"] == [1.0, 1.0, 1.0]
    assert np.mean(auc["slide"]) >= np.mean(auc["raw"]) + 0.08, auc
