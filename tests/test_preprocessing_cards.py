"""Each encoder's input tensor against its model card's own transform, on real H&E pixels.

Our path: ``prepare_patch`` (the record's resize method and crop, PIL's resize as torchvision's and timm's
transforms do on PIL images) then ``Preprocessing.normalise``. The card's path: the torchvision / timm transform
its authors publish, run on the PIL image of the same patch. Tolerance: 1e-6 on the normalised tensor (both are
float32 (x / 255 - mean) / std of the same uint8 pixels; measured: 0.0 for every encoder).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from histotransfer.demo_slides import make_demo_slides
from histotransfer.encoders import encoder_spec, list_encoders
from histotransfer.encoders.vit import VIT_ENCODERS
from histotransfer.features import prepare_patch
from histotransfer.features.extract import settings_fingerprint
from histotransfer.features.loader import resize_patch
from histotransfer.features.settings import EncoderChoice, ExtractSettings
from histotransfer.slide import open_slide

TOLERANCE = 1e-6
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
BICUBIC = T.InterpolationMode.BICUBIC


def _card_cfg(interpolation: str, **norm: tuple[float, ...]) -> dict:
    """A Hugging Face Hub config.json's ``pretrained_cfg`` as the timm-hub cards publish it."""
    return {
        "input_size": (3, 224, 224),
        "interpolation": interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
        **(norm or IMAGENET),
    }


def _timm_card(cfg: dict) -> T.Compose:
    """The cards' ``create_transform(**resolve_data_config(model.pretrained_cfg, model=model))``."""
    return create_transform(**resolve_data_config(cfg))


def _imagenet_vit(name: str) -> T.Compose:
    tag = encoder_spec(name).weights["imagenet"].description.split()[-1]
    return create_transform(**resolve_data_config(timm.models.get_pretrained_cfg(tag).to_dict()))


# The authors' published transforms (model cards and reference code cited in each entry's ``reference``).
CARDS = {
    # UNI, UNI2-h: uni/get_encoder get_eval_transforms: Resize(224) (torchvision's default bilinear).
    "uni": lambda: T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(**IMAGENET)]),
    "uni2-h": lambda: T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(**IMAGENET)]),
    # Virchow2: timm transform of the hub pretrained_cfg (bicubic, crop_pct 1.0).
    "virchow2": lambda: _timm_card(_card_cfg("bicubic")),
    # H-optimus-0: timm transform of the hub pretrained_cfg, Bioptimus' mean and std.
    "h-optimus-0": lambda: _timm_card(
        _card_cfg("bicubic", mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
    ),
    # Prov-GigaPath README: Resize(256, bicubic), CenterCrop(224).
    "prov-gigapath": lambda: T.Compose(
        [T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(), T.Normalize(**IMAGENET)]
    ),
    # Phikon-v2: its image processor's bicubic resize to 224 with ImageNet statistics.
    "phikon-v2": lambda: T.Compose([T.Resize(224, interpolation=BICUBIC), T.ToTensor(), T.Normalize(**IMAGENET)]),
    "vit_base_patch16_224": lambda: _imagenet_vit("vit_base_patch16_224"),
    "vit_large_patch16_224": lambda: _imagenet_vit("vit_large_patch16_224"),
}


@pytest.fixture(scope="module")
def he_patches(tmp_path_factory) -> list[np.ndarray]:
    """Real H&E-like pixels: 256 px and 512 px regions of a demo slide, uint8 RGB."""
    demo = make_demo_slides(tmp_path_factory.mktemp("cards"), n_slides=1, seed=3, size=1024, mpp=0.5)
    with open_slide(demo.slides[0]) as slide:
        return [slide.read_region((300, 200), 0, (256, 256)), slide.read_region((100, 400), 0, (512, 512))]


def ours(patch: np.ndarray, name: str, size: int | None = None) -> torch.Tensor:
    prep = encoder_spec(name).preprocessing
    prep = prep if size is None else prep.at(size)
    return prep.normalise(torch.from_numpy(prepare_patch(patch, prep))[None], torch.device("cpu"))[0]


def test_every_transformer_has_a_card_transform():
    assert set(CARDS) == set(VIT_ENCODERS)


@pytest.mark.parametrize("name", list(CARDS))
def test_input_tensor_is_the_cards(name, he_patches):
    card = CARDS[name]()
    for patch in he_patches:
        expected = card(Image.fromarray(patch))
        mine = ours(patch, name)
        assert mine.shape == expected.shape == (3, 224, 224)
        assert float((mine - expected).abs().max()) <= TOLERANCE


def test_real_slide_pixels_match_the_cards(cmu_svs):
    with open_slide(cmu_svs) as slide:
        patch = slide.read_region((1000, 1000), 0, (256, 256))
    for name, card in CARDS.items():
        assert float((ours(patch, name) - card()(Image.fromarray(patch))).abs().max()) <= TOLERANCE, name


def test_gigapath_sees_the_cards_field_of_view(he_patches):
    """Resize(256) then CenterCrop(224): the network sees the central 7/8 of the patch, not the whole of it."""
    patch = he_patches[0].copy()
    patch[:16], patch[-16:], patch[:, :16], patch[:, -16:] = 255, 255, 255, 255  # a frame outside the crop
    x = prepare_patch(patch, encoder_spec("prov-gigapath").preprocessing)
    assert x.shape == (224, 224, 3)
    np.testing.assert_array_equal(x, patch[16:240, 16:240])  # 256 px: the resize keeps it, the crop cuts it
    assert not (x == 255).all(axis=-1).any()
    # At twice the size the same field of view: Resize(512) then CenterCrop(448).
    prep = encoder_spec("prov-gigapath").preprocessing.at(448)
    assert (prep.resize_size, prep.input_size) == (512, 448)


def test_cnns_keep_the_tiled_size_and_area_resize(he_patches):
    """The CNN records: no resize at the tiled size; OpenCV area averaging at a given input size."""
    for name in ["resnet18", "densenet121", "efficientnet_b0", "ciga-simclr-resnet18"]:
        prep = encoder_spec(name).preprocessing
        assert prep.input_size is None and prep.interpolation == "area"
        np.testing.assert_array_equal(prepare_patch(he_patches[1], prep), he_patches[1])
        np.testing.assert_array_equal(prepare_patch(he_patches[1], prep.at(224)), resize_patch(he_patches[1], 224))
    assert {encoder_spec(n).preprocessing.interpolation for n in list_encoders() if n not in VIT_ENCODERS} == {"area"}


def test_the_record_is_in_the_extraction_fingerprint():
    """Features made with the old (area) resize of a transformer are not reused; the CNNs' stay valid."""
    s = ExtractSettings()
    described = {"weights_label": "random", "weights_sha256": ""}
    vit, cnn = EncoderChoice.build(encoder="uni", weights="random"), EncoderChoice.build(encoder="resnet18")
    uni = encoder_spec("uni").preprocessing
    old_way = uni.__class__(input_size=224)
    assert settings_fingerprint(vit, s, 224, described, None, uni) != settings_fingerprint(
        vit, s, 224, described, None, old_way
    )
    assert settings_fingerprint(vit, s, 224, described, None, uni) != settings_fingerprint(
        vit, s, 224, described, None, encoder_spec("prov-gigapath").preprocessing
    )
    resnet = encoder_spec("resnet18").preprocessing.at(224)
    assert settings_fingerprint(cnn, s, 224, described, None, resnet) == settings_fingerprint(
        cnn, s, 224, described, None
    )
