"""Encoder registry: names, stage splits, feature widths, exact equality with torchvision's pooled features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from histotransfer.encoders import build as enc_module
from histotransfer.encoders import create_encoder, encoder_id, encoder_info, list_encoders, register, registry
from histotransfer.encoders.cnn import resnet_stages
from histotransfer.errors import HistotransferError
from histotransfer.runtime import precision_context

# Feature widths for truncate = 0, 1, 2, 3 (resnet18 and densenet121 as the study states them; the others
# follow from torchvision's architectures and the stage split documented in histotransfer.encoders.build).
EXPECTED_DIMS = {
    "resnet18": [512, 256, 128, 64],
    "resnet34": [512, 256, 128, 64],
    "resnet50": [2048, 1024, 512, 256],
    "densenet121": [1024, 1024, 512, 256],
    "densenet169": [1664, 1280, 512, 256],
    "efficientnet_b0": [1280, 112, 40, 24],
    "efficientnet_b1": [1280, 112, 40, 24],
    "efficientnet_b2": [1408, 120, 48, 24],
    "efficientnet_b3": [1536, 136, 48, 32],
    "ciga-simclr-resnet18": [512, 256, 128, 64],
    "mormont-mtl-resnet50": [2048, 1024, 512, 256],
    "mormont-mtl-densenet121": [1024, 1024, 512, 256],
}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_the_study_encoders_first():
    assert list_encoders()[: len(EXPECTED_DIMS)] == list(EXPECTED_DIMS)


@pytest.mark.parametrize("name", list(EXPECTED_DIMS))
def test_feature_dims_of_every_truncation(name):
    """create_encoder's feature_dim, the registry's dims and the actual output width all agree."""
    info = encoder_info(name)
    assert info["feature_dims"] == EXPECTED_DIMS[name]
    assert info["n_stages"] == 4
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for k, dim in enumerate(EXPECTED_DIMS[name]):
        enc = create_encoder(name, weights="random", truncate=k)
        assert enc.feature_dim == dim
        assert len(enc.stage_names) == 5 - k
        with torch.inference_mode():
            y = enc(x)
            stages = enc.forward_stages(x)
        assert y.shape == (2, dim)
        assert [s.shape[1] for s in stages][-1] == dim
        torch.testing.assert_close(torch.flatten(F.adaptive_avg_pool2d(stages[-1], 1), 1), y, rtol=0, atol=0)


# The HistoTransfer paper's Table I "ImageNet top-1" column.
PAPER_TOP1 = {
    "resnet18": 69.76,
    "resnet34": 73.31,
    "resnet50": 76.13,
    "densenet121": 74.43,
    "densenet169": 75.6,
    "efficientnet_b0": 76.3,
    "efficientnet_b1": 78.8,
    "efficientnet_b2": 79.8,
    "efficientnet_b3": 81.1,
}


@pytest.mark.parametrize("name", sorted(PAPER_TOP1))
def test_default_imagenet_weights_are_the_papers_or_the_nearest_with_the_difference_stated(name):
    info = encoder_info(name)
    assert info["default_weights"] == "imagenet"
    weights = info["weights"]["imagenet"]
    if name.startswith("efficientnet"):  # the paper's original TensorFlow weights are not in torchvision
        assert weights["paper_top1"] == PAPER_TOP1[name]
        assert abs(weights["imagenet_top1"] - PAPER_TOP1[name]) < 1.5
    else:
        assert weights["paper_top1"] is None
        assert round(weights["imagenet_top1"], 2) == PAPER_TOP1[name]
    assert info["imagenet_top1"] == weights["imagenet_top1"]


def test_newer_weights_have_their_own_name_and_top1():
    r50 = encoder_info("resnet50")["weights"]
    assert r50["imagenet"]["source"] == "ResNet50_Weights.IMAGENET1K_V1"
    assert r50["imagenet-v2"]["source"] == "ResNet50_Weights.IMAGENET1K_V2"
    assert r50["imagenet-v2"]["imagenet_top1"] == pytest.approx(80.858)
    assert encoder_id("resnet50", "imagenet-v2", 0, None, "fp32") == "resnet50-imagenet-v2-t0-native-fp32"
    assert encoder_id("resnet50", None, 0, None, "fp32") == "resnet50-imagenet-t0-native-fp32"


def test_encoder_info_for_table():
    r18 = encoder_info("resnet18")
    assert r18["family"] == "imagenet" and r18["architecture"] == "resnet18"
    assert r18["imagenet_top1"] == tvm.ResNet18_Weights.IMAGENET1K_V1.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert r18["imagenet_top1"] == pytest.approx(69.758)
    assert r18["stage_names"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert r18["n_params"] == sum(p.numel() for n, p in tvm.resnet18().named_parameters() if not n.startswith("fc."))
    ciga = encoder_info("ciga-simclr-resnet18")
    assert ciga["family"] == "histopathology" and ciga["architecture"] == "resnet18"
    assert ciga["imagenet_top1"] is None and ciga["default_weights"] == "pretrained"
    assert ciga["weights"]["pretrained"]["checkpoint"] == "tenpercent_resnet18.ckpt"
    assert encoder_info("densenet121")["stage_names"][1:] == [f"denseblock{i}" for i in range(1, 5)]
    assert encoder_info("efficientnet_b0")["stage_names"] == ["stem", "stage1", "stage2", "stage3", "stage4"]


def _same_random_model(builder):
    torch.manual_seed(enc_module.RANDOM_INIT_SEED)
    return builder().eval()


def test_full_encoders_equal_torchvision_pooled_features():
    """truncate=0 is exactly torchvision's features before the classifier (same weights, same ops)."""
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        r = _same_random_model(tvm.resnet18)
        r.fc = nn.Identity()
        assert torch.equal(create_encoder("resnet18", "random")(x), r(x))

        d = _same_random_model(tvm.densenet121)
        ref = torch.flatten(F.adaptive_avg_pool2d(F.relu(d.features(x)), 1), 1)
        assert torch.equal(create_encoder("densenet121", "random")(x), ref)

        e = _same_random_model(tvm.efficientnet_b0)
        ref = torch.flatten(e.avgpool(e.features(x)), 1)
        assert torch.equal(create_encoder("efficientnet_b0", "random")(x), ref)


def _pooled(x):
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def test_truncated_encoders_cut_where_documented():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        r = _same_random_model(tvm.resnet50)
        h = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        h = r.layer2(r.layer1(h))
        assert torch.equal(create_encoder("resnet50", "random", truncate=2)(x), _pooled(h))

        d = _same_random_model(tvm.densenet121)
        f = d.features
        h = f.denseblock1(f.pool0(f.relu0(f.norm0(f.conv0(x)))))
        assert torch.equal(create_encoder("densenet121", "random", truncate=3)(x), _pooled(h))
        h = f.denseblock3(f.transition2(f.denseblock2(f.transition1(h))))
        assert torch.equal(create_encoder("densenet121", "random", truncate=1)(x), _pooled(h))

        e = _same_random_model(tvm.efficientnet_b0)
        h = e.features[:6](x)
        out = create_encoder("efficientnet_b0", "random", truncate=1)
        assert torch.equal(out(x), _pooled(h))
        assert out.forward_stages(x)[2].shape[-1] == 64 // 8  # stage2 ends at stride 8


def test_random_weights_are_reproducible():
    a = create_encoder("resnet18", "random").state_dict()
    torch.manual_seed(123)  # the caller's RNG state does not matter, and is left as it was
    state = torch.get_rng_state()
    b = create_encoder("resnet18", "random").state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_attributes():
    enc = create_encoder("resnet18", "random", truncate=1)
    assert (enc.name, enc.truncate, enc.weights_source, enc.weights_sha256) == ("resnet18", 1, "random", None)
    assert enc.stage_names == ["stem", "layer1", "layer2", "layer3"]
    assert not enc.training


def test_bad_names_and_truncations():
    with pytest.raises(HistotransferError, match=r"unknown encoder 'resnet19'.*resnet18"):
        create_encoder("resnet19", "random")
    with pytest.raises(HistotransferError, match=r"truncate must be 0\.\.3"):
        create_encoder("resnet18", "random", truncate=4)
    with pytest.raises(HistotransferError, match=r"truncate must be 0\.\.3"):
        encoder_id("resnet18", "random", -1, None, "fp32")
    with pytest.raises(
        HistotransferError, match="'imagenet21k' for resnet18: expected one of imagenet, random or a path"
    ):
        create_encoder("resnet18", "imagenet21k")


def test_encoder_id_separates_every_setting(tmp_path):
    base = dict(name="resnet18", weights="random", truncate=0, input_size=224, precision="fp32")
    variants = [
        base,
        {**base, "truncate": 1},
        {**base, "input_size": None},
        {**base, "input_size": 256},
        {**base, "precision": "bf16"},
        {**base, "name": "resnet34"},
        {**base, "weights": "imagenet"},
    ]
    ids = [encoder_id(**v) for v in variants] + [encoder_id(**base, dtype="float16")]
    assert len(set(ids)) == len(ids)
    assert encoder_id(**base) == "resnet18-random-t0-s224-fp32"

    f1 = tmp_path / "a.pth"
    torch.save(tvm.resnet18().state_dict(), f1)
    id1 = encoder_id(**{**base, "weights": str(f1)})
    renamed = tmp_path / "b.pth"
    f1.rename(renamed)
    assert encoder_id(**{**base, "weights": str(renamed)}) == id1  # named by content, not file name
    torch.save(tvm.resnet18().state_dict(), renamed)  # other weights, same name
    assert encoder_id(**{**base, "weights": str(renamed)}) != id1


def test_register_adds_an_encoder():
    @register("tiny-resnet-test", stages=resnet_stages, architecture="resnet18", weights=[])
    def tiny() -> nn.Module:
        return tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1])

    try:
        assert "tiny-resnet-test" in list_encoders()
        enc = create_encoder("tiny-resnet-test", "random", truncate=2)
        assert enc.feature_dim == 128
        assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 128)
        with pytest.raises(ValueError, match="already registered"):
            register("tiny-resnet-test", stages=resnet_stages, weights=[])(tiny)
    finally:
        registry._REGISTRY.pop("tiny-resnet-test")


def test_fp32_on_cuda_turns_tf32_off_and_restores_it():
    """fp32 on a GPU means IEEE float32 (TF32 convolutions would move features by ~1e-3); the flags are put
    back afterwards, also after an error. The flags exist without a GPU, so this runs everywhere."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with precision_context(torch.device("cuda"), "fp32"):
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(RuntimeError), precision_context(torch.device("cuda"), "fp32"):
        raise RuntimeError("boom")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with precision_context(torch.device("cpu"), "fp32"):
        assert (conv.fp32_precision, matmul.fp32_precision) == before
