"""Vision-transformer encoders: published checkpoint layouts, model-card pooling, truncation, exact depth.

The reference networks here are written from the model cards (timm architecture and keyword arguments, or
transformers' Dinov2 module names for Phikon-v2), not from the registry: full size on the meta device for
key names and shapes, and scaled down (same arguments, depth 8, width 96) with random weights for numbers.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn

from histotransfer.encoders import create_encoder, encoder_id, encoder_info, registry
from histotransfer.encoders.vit import VIT_ENCODERS, vit_blocks_encoder
from histotransfer.encoders.weights import hub_path
from histotransfer.errors import HistotransferError

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# name: (timm architecture, model-card keyword arguments, pooling, published with timm's ImageNet head).
CARDS = {
    # MahmoodLab/UNI README, manual loading.
    "uni": (
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        "cls",
        False,
    ),
    # MahmoodLab/UNI2-h model card, timm_kwargs.
    "uni2-h": (
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        "cls",
        False,
    ),
    # paige-ai/Virchow2: config.json model_args plus the card's mlp_layer / act_layer.
    "virchow2": (
        "vit_huge_patch14_224",
        {
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
        },
        "cls+mean",
        False,
    ),
    # bioptimus/H-optimus-0: config.json architecture, card's create_model arguments.
    "h-optimus-0": (
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token", "dynamic_img_size": False},
        "cls",
        False,
    ),
    # prov-gigapath/prov-gigapath: config.json.
    "prov-gigapath": (
        "vit_giant_patch14_dinov2",
        {
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        "cls",
        False,
    ),
    # timm's own ImageNet checkpoints (with their 1000-class head).
    "vit_base_patch16_224": ("vit_base_patch16_224", {}, "cls", True),
    "vit_large_patch16_224": ("vit_large_patch16_224", {}, "cls", True),
}
# name: (feature dim, depth, prefix tokens, mean, std, interpolation) as the model cards state them.
FACTS = {
    "uni": (1024, 24, 1, *IMAGENET, "bilinear"),
    "uni2-h": (1536, 24, 9, *IMAGENET, "bilinear"),
    "virchow2": (2560, 32, 5, *IMAGENET, "bicubic"),
    "h-optimus-0": (1536, 40, 5, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "bicubic"),
    "prov-gigapath": (1536, 40, 1, *IMAGENET, "bicubic"),
    "phikon-v2": (1024, 24, 1, *IMAGENET, "bicubic"),
    "vit_base_patch16_224": (768, 12, 1, (0.5,) * 3, (0.5,) * 3, "bicubic"),
    "vit_large_patch16_224": (1024, 24, 1, (0.5,) * 3, (0.5,) * 3, "bicubic"),
}
SMALL = {"depth": 8, "embed_dim": 96, "num_heads": 4}
DINO_SMALL = {"hidden": 96, "layers": 8, "heads": 4}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith("head.")}


def _card_model(name: str, **overrides: object) -> nn.Module:
    arch, kwargs, _, _ = CARDS[name]
    return timm.create_model(arch, pretrained=False, **{**kwargs, **overrides})


def _ours_on_meta(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(registry.encoder_spec(name).build().state_dict())


def _randomised(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with every tensor moved by noise, so that LayerScale (1e-5 at init) does not hide
    the blocks; written back into ``model``."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return state


@pytest.fixture
def small(monkeypatch):
    """Registry entries rebuilt with the scaled-down arguments (everything else as registered)."""

    def shrink(name: str) -> None:
        spec = registry.encoder_spec(name)
        build = partial(VIT_ENCODERS[name].build, **SMALL)
        monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(spec, build=build))

    return shrink


def _card_pooling(name: str, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """The model card's embedding from final-norm tokens (B, N, C)."""
    if CARDS[name][2] == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1)  # Virchow2 card: output[:, 5:]
    return tokens[:, 0]


# --- full size, meta device: layout, dims, stages --------------------------------------------------------------


@pytest.mark.parametrize("name", list(CARDS))
def test_published_timm_layout_matches_full_size(name):
    """Every key and shape of the model-card network (ImageNet head aside) is what our build expects."""
    with torch.device("meta"):
        published = _shapes(_card_model(name).state_dict())
    assert _ours_on_meta(name) == published


def _dinov2_state(
    hidden: int, layers: int, patch: int = 16, grid: int = 14, device: str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model state dict (modeling_dinov2.py names; GELU MLP of 4x width)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int, scale: float = 0.1, base: float = 0.0) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return base + scale * torch.randn(shape, generator=g)

    c = hidden
    sd = {
        "embeddings.cls_token": t(1, 1, c),
        "embeddings.mask_token": t(1, c),
        "embeddings.position_embeddings": t(1, grid * grid + 1, c),
        "embeddings.patch_embeddings.projection.weight": t(c, 3, patch, patch, scale=0.02),
        "embeddings.patch_embeddings.projection.bias": t(c),
        "layernorm.weight": t(c, base=1.0),
        "layernorm.bias": t(c),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd |= {f"{p}attention.attention.{n}.weight": t(c, c), f"{p}attention.attention.{n}.bias": t(c)}
        sd |= {
            f"{p}attention.output.dense.weight": t(c, c),
            f"{p}attention.output.dense.bias": t(c),
            f"{p}norm1.weight": t(c, base=1.0),
            f"{p}norm1.bias": t(c),
            f"{p}norm2.weight": t(c, base=1.0),
            f"{p}norm2.bias": t(c),
            f"{p}layer_scale1.lambda1": t(c, scale=0.5),
            f"{p}layer_scale2.lambda1": t(c, scale=0.5),
            f"{p}mlp.fc1.weight": t(4 * c, c),
            f"{p}mlp.fc1.bias": t(4 * c),
            f"{p}mlp.fc2.weight": t(c, 4 * c),
            f"{p}mlp.fc2.bias": t(c),
        }
    return sd


def test_phikon_v2_published_dinov2_layout_matches_full_size():
    """Phikon-v2's transformers layout (ViT-L/16: 1024 wide, 24 layers, 14x14 + 1 positions) converts to
    exactly our network's keys and shapes."""
    from histotransfer.encoders.weights import dinov2_to_timm

    published = dinov2_to_timm(_dinov2_state(1024, 24, device="meta"))
    assert _shapes(published) == _ours_on_meta("phikon-v2")


@pytest.mark.parametrize("name", list(FACTS))
def test_registry_dims_stages_and_preprocessing(name):
    dim, depth, _, mean, std, interpolation = FACTS[name]
    info = encoder_info(name)
    quarter = depth // 4
    assert info["feature_dims"] == [dim] * 4
    assert info["stage_names"] == ["stem"] + [f"blocks{a + 1}-{a + quarter}" for a in range(0, depth, quarter)]
    pre = registry.encoder_spec(name).preprocessing
    assert (pre.input_size, pre.interpolation) == (224, interpolation)
    assert pre.mean == pytest.approx(mean) and pre.std == pytest.approx(std)
    assert info["reference"]


# --- scaled down, real numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CARDS))
def test_published_checkpoint_loads_strictly_and_pools_as_the_card(name, small, tmp_path):
    """A random checkpoint of the card's network (scaled down) loads through create_encoder; every truncation
    equals timm's intermediate block output after the final norm and the card's pooling."""
    small(name)
    ref = _card_model(name, **SMALL).eval()
    state = _randomised(ref, seed=1)
    assert any(k.startswith("head.") for k in state) == CARDS[name][3]
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)

    prefix = FACTS[name][2]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        final = _card_pooling(name, ref.forward_features(x), prefix)
        if CARDS[name][2] == "cls":
            assert torch.allclose(final, ref.forward_head(ref.forward_features(x), pre_logits=True))
        for truncate in range(4):
            enc = create_encoder(name, weights=str(path), truncate=truncate)
            out = enc(x)
            assert out.shape == (2, enc.feature_dim)
            assert enc.feature_dim == 96 * (2 if CARDS[name][2] == "cls+mean" else 1)
            last = SMALL["depth"] * (4 - truncate) // 4 - 1
            ((patches, prefix_tokens),) = ref.forward_intermediates(
                x, indices=[last], norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
            )
            assert prefix_tokens.shape[1] == prefix
            expected = _card_pooling(name, torch.cat([prefix_tokens, patches], dim=1), prefix)
            assert torch.allclose(out, expected, atol=1e-5), (truncate, (out - expected).abs().max())
            if truncate == 0:
                assert torch.allclose(out, final, atol=1e-5)
                n_tokens = prefix + (224 // ref.patch_embed.patch_size[0]) ** 2
                assert [t.shape for t in enc.forward_stages(x)] == [(2, n_tokens, 96)] * 5


def _dinov2_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """transformers' Dinov2Model forward written out with torch functions: the hidden state after each layer."""
    c = sd["layernorm.weight"].numel()
    patches = (
        F.conv2d(
            x,
            sd["embeddings.patch_embeddings.projection.weight"],
            sd["embeddings.patch_embeddings.projection.bias"],
            stride=16,
        )
        .flatten(2)
        .transpose(1, 2)
    )
    h = torch.cat([sd["embeddings.cls_token"].expand(x.shape[0], -1, -1), patches], 1)
    h = h + sd["embeddings.position_embeddings"]
    b, n, _ = h.shape
    outs = []
    for i in range(sum(k.endswith("norm1.weight") for k in sd)):
        p = f"encoder.layer.{i}."

        def lin(y: torch.Tensor, name: str) -> torch.Tensor:
            return F.linear(y, sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"])  # noqa: B023

        y = F.layer_norm(h, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = (
            lin(y, f"attention.attention.{m}").view(b, n, heads, c // heads).transpose(1, 2)
            for m in ("query", "key", "value")
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1) @ v
        h = h + lin(attn.transpose(1, 2).reshape(b, n, c), "attention.output.dense") * sd[p + "layer_scale1.lambda1"]
        y = F.layer_norm(h, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = h + lin(F.gelu(lin(y, "mlp.fc1")), "mlp.fc2") * sd[p + "layer_scale2.lambda1"]
        outs.append(h)
    return outs


def test_phikon_v2_dinov2_checkpoint_equals_the_transformers_forward(small, tmp_path):
    """Phikon-v2's published layout (scaled down) loads strictly, and each truncation's output is the
    Dinov2 hidden state of that layer after the final layernorm, class token (last_hidden_state[:, 0])."""
    small("phikon-v2")
    sd = _dinov2_state(DINO_SMALL["hidden"], DINO_SMALL["layers"], seed=3)
    path = tmp_path / "model.safetensors"
    save_file(sd, path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = _dinov2_forward(sd, x, DINO_SMALL["heads"])
        for truncate in range(4):
            out = create_encoder("phikon-v2", weights=str(path), truncate=truncate)(x)
            h = hidden[DINO_SMALL["layers"] * (4 - truncate) // 4 - 1]
            expected = F.layer_norm(h, (96,), sd["layernorm.weight"], sd["layernorm.bias"], eps=1e-6)[:, 0]
            assert torch.allclose(out, expected, atol=1e-5), (truncate, (out - expected).abs().max())


def test_dinov2_checkpoint_missing_a_projection_is_refused(small, tmp_path):
    small("phikon-v2")
    sd = _dinov2_state(DINO_SMALL["hidden"], DINO_SMALL["layers"])
    del sd["encoder.layer.3.attention.attention.value.weight"]
    path = tmp_path / "model.safetensors"
    save_file(sd, path)
    with pytest.raises(
        HistotransferError,
        match=r"does not fit a timm ViT-L/16 \(DINOv2\): 1 missing key\(s\): "
        r"blocks\.3\.attn\.qkv\.weight\. Pass weights",
    ):
        create_encoder("phikon-v2", weights=str(path))


def test_wrong_architecture_is_refused(small, tmp_path):
    """A UNI checkpoint (no registers) given to UNI2-h fails the strict load, naming timm and the keys."""
    small("uni2-h")
    path = tmp_path / "uni.bin"
    torch.save(_card_model("uni", **SMALL).state_dict(), path)
    with pytest.raises(HistotransferError, match=r"does not fit a timm ViT-H/14, 8 registers, SwiGLU: .*reg_token"):
        create_encoder("uni2-h", weights=str(path))


# --- exact depth -----------------------------------------------------------------------------------------------


def test_blocks_encoder_keeps_exact_depth(small, tmp_path):
    small("uni")
    ref = _card_model("uni", **SMALL).eval()
    path = tmp_path / "uni.bin"
    torch.save(_randomised(ref, seed=5), path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        six = vit_blocks_encoder("uni", str(path), 6)
        quarter_cut = create_encoder("uni", weights=str(path), truncate=1)
        assert six.stage_names == quarter_cut.stage_names == ["stem", "blocks1-2", "blocks3-4", "blocks5-6"]
        assert six.truncate == 1
        assert torch.equal(six(x), quarter_cut(x))
        five = vit_blocks_encoder("uni", str(path), 5)
        assert five.stage_names == ["stem", "blocks1-2", "blocks3-4", "blocks5-5"] and five.truncate == 1
        ((_, prefix),) = ref.forward_intermediates(
            x, indices=[4], norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        assert torch.allclose(five(x), prefix[:, 0], atol=1e-5)
        assert five.weights_sha256 == quarter_cut.weights_sha256


@pytest.mark.parametrize(
    "name, blocks, message",
    [
        ("resnet18", 2, "applies to transformer encoders"),
        ("uni", 0, r"out of range for uni: pass 1\.\.24"),
        ("uni", 25, r"out of range for uni: pass 1\.\.24"),
        ("uni", True, "out of range"),
    ],
)
def test_blocks_encoder_refuses_bad_requests(name, blocks, message):
    with pytest.raises(HistotransferError, match=message):
        vit_blocks_encoder(name, "random", blocks)


# --- weights resolution ----------------------------------------------------------------------------------------


def test_gated_checkpoint_is_never_fetched(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", pytest.fail)
    with pytest.raises(
        HistotransferError,
        match=r"'uni-pytorch_model\.bin'.*MahmoodLab/UNI \(file pytorch_model"
        r"\.bin; save it as uni-pytorch_model\.bin\) gated on Hugging Face",
    ):
        create_encoder("uni")


def test_published_checkpoint_found_by_its_name(monkeypatch, small, tmp_path):
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path))
    small("virchow2")
    state = _card_model("virchow2", **SMALL).state_dict()
    torch.save(state, tmp_path / "virchow2-pytorch_model.bin")
    enc = create_encoder("virchow2")
    assert enc.weights_source == str(tmp_path / "virchow2-pytorch_model.bin")
    assert enc.weights_label.startswith("w") and len(enc.weights_label) == 13


def test_imagenet_baseline_is_fetched_once_into_the_weights_folder(monkeypatch, small, tmp_path):
    """The hub file goes to <weights>/<repo>/model.safetensors through huggingface_hub, once; its timm ImageNet
    head is dropped; encoder ids name it 'imagenet'."""
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path))
    small("vit_base_patch16_224")
    state = _randomised(_card_model("vit_base_patch16_224", **SMALL), seed=7)
    calls = []

    def download(repo_id: str, filename: str, *, local_dir: Path) -> str:
        calls.append((repo_id, filename))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        save_file(state, Path(local_dir) / filename)
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for _ in range(2):
        enc = create_encoder("vit_base_patch16_224", weights="imagenet")
    repo = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert calls == [(repo, "model.safetensors")]
    option = registry.encoder_spec("vit_base_patch16_224").weights["imagenet"]
    assert hub_path(option) == tmp_path / repo / "model.safetensors"
    assert enc.weights_label == "imagenet"
    assert torch.equal(enc.body.stem.pos_embed, state["pos_embed"])
    assert encoder_id("vit_base_patch16_224", "imagenet", 0, 224, "fp32").split("-")[1] == "imagenet"


def test_imagenet_baseline_offline_error(monkeypatch, small, tmp_path):
    monkeypatch.setenv("HISTOTRANSFER_WEIGHTS", str(tmp_path))
    small("vit_large_patch16_224")

    def offline(*args: object, **kwargs: object) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    target = tmp_path / "timm/vit_large_patch16_224.augreg_in21k_ft_in1k/model.safetensors"
    with pytest.raises(HistotransferError, match=f"no connection.*copy it to {target}"):
        create_encoder("vit_large_patch16_224", weights="imagenet")


def test_only_imagenet_weights_carry_an_imagenet_top1():
    """timm's evaluation of exactly the weights the ImageNet ViTs load; histopathology encoders have none."""
    assert registry.weights_top1("vit_base_patch16_224", "imagenet") == 85.096
    assert registry.weights_top1("vit_large_patch16_224", "imagenet") == 85.834
    assert registry.weights_top1("vit_base_patch16_224", "random") is None
    assert registry.weights_top1("uni", "pretrained") is None
