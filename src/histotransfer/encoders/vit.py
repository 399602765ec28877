"""Vision transformers: histopathology foundation models and ImageNet baselines, built with timm.

Each entry is timm's ``VisionTransformer`` built with the keyword arguments its authors publish (model card or
reference code, cited in ``reference``), so their checkpoints load strictly under timm's key names; Phikon-v2
is published as a transformers ``Dinov2Model``, whose keys :mod:`histotransfer.encoders.weights` renames.

Stages: ``stem`` = patch embedding, class and register tokens, position embedding (with timm's pos_drop,
patch_drop and norm_pre), then four stages of blocks, each a quarter of the depth (``blocks1-6`` ..
``blocks19-24`` for 24 blocks), so ``truncate=k`` keeps the first 4-k quarters. Stage outputs are token
tensors (B, N_tokens, C). Pooling (:class:`TokenPool`) applies the model's final norm and its own token
pooling to whatever stage is last kept: the class token, or for Virchow2 the class token concatenated with
the mean of the patch tokens (registers excluded). A truncated encoder therefore equals the full model's
intermediate block output passed through the final norm and the same pooling. ``blocks=n``
(:func:`keep_blocks`) keeps exactly the first n blocks, the last stage partial where n is not a multiple of a
quarter; :func:`block_by_block` makes every block a stage of its own (CKA per block).

Feature widths D (every truncation): uni 1024, uni2-h 1536, virchow2 2560, h-optimus-0 1536,
prov-gigapath 1536, phikon-v2 1024, vit_base_patch16_224 768, vit_large_patch16_224 1024. Depths: 24, 24, 32,
40, 40, 24, 12, 24 blocks. Prov-GigaPath's published configuration sets ``patch_size=16`` on timm's ViT-g/14
(so 196 patch tokens at 224 px), and is built as published.

Weights. The histopathology checkpoints are gated or licensed downloads that are never fetched here: each is
looked up in the weights folder under its own name (``<encoder>-<published file name>``, as several are
published as ``pytorch_model.bin``), or passed as a path. The ImageNet baselines' ``imagenet`` weights are
timm's files on the Hugging Face Hub, fetched on first use; timm's package does not list their ImageNet top-1,
so it is left unset.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer, global_pool_nlc
from torch import nn

from ..errors import HistotransferError
from . import cnn  # noqa: F401  (the CNNs are registered, and listed, first whichever is imported first)
from .build import Encoder, create_encoder
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BlockCuts,
    Checkpoint,
    HubFile,
    Preprocessing,
    Stage,
    WeightsOption,
    encoder_spec,
    meta_stages,
    register,
)

CLASS_TOKEN = "token"
CLASS_AND_MEAN = "token+avg"
N_STAGES = 4

# Bioptimus' normalisation for H-optimus-0 (its model card).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class ViTConfig:
    """A timm model name, the keyword arguments that make it the published network, and its token pooling."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: str = CLASS_TOKEN

    def build(self, **overrides: Any) -> VisionTransformer:
        """The untrained network; ``overrides`` replace published arguments (e.g. a smaller depth for tests)."""
        return cast(VisionTransformer, timm.create_model(self.arch, pretrained=False, **{**self.kwargs, **overrides}))


class TokenStem(nn.Module):
    """timm's VisionTransformer up to its first block: patch embedding, class/register tokens, positions.

    Holds the model's own modules and parameters; the tokens are assembled by timm's ``_pos_embed`` run on
    them, so that class, register and position handling (``no_embed_class``, ``dynamic_img_size``) stay timm's.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.dynamic_img_size = vit.dynamic_img_size
        self.no_embed_class = vit.no_embed_class
        self.num_prefix_tokens = vit.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N_tokens, C), prefix (class, register) tokens first."""
        x = VisionTransformer._pos_embed(self, self.patch_embed(x))  # type: ignore[arg-type]
        return self.norm_pre(self.patch_drop(x))


class TokenPool(nn.Module):
    """(B, N_tokens, C) -> (B, D): the model's final norm, then its token pooling (timm's ``global_pool_nlc``).

    ``token``: the class token (D = C); ``token+avg``: the class token concatenated with the mean of the
    patch tokens, prefix tokens excluded (D = 2C).
    """

    def __init__(self, norm: nn.Module, num_prefix_tokens: int, pooling: str, channels: int):
        super().__init__()
        if pooling not in (CLASS_TOKEN, CLASS_AND_MEAN):
            raise ValueError(f"unknown token pooling '{pooling}'")
        self.norm = norm
        self.num_prefix_tokens = num_prefix_tokens
        self.pooling = pooling
        self.out_features = channels * (2 if pooling == CLASS_AND_MEAN else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        cls = global_pool_nlc(x, CLASS_TOKEN)
        if self.pooling == CLASS_TOKEN:
            return cls
        return torch.cat([cls, global_pool_nlc(x, "avg", self.num_prefix_tokens)], dim=1)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}, num_prefix_tokens={self.num_prefix_tokens}"


def token_pool(pooling: str) -> Callable[[nn.Module, list[Stage]], nn.Module]:
    """The registry's ``pool`` factory for a ViT with this token pooling."""

    def make(model: nn.Module, kept: list[Stage]) -> nn.Module:
        vit = cast(VisionTransformer, model)  # what ViTConfig.build makes
        if not isinstance(vit.fc_norm, nn.Identity):
            raise TypeError("token pooling expects the final norm before pooling (timm's fc_norm unused)")
        return TokenPool(vit.norm, vit.num_prefix_tokens, pooling, kept[-1].channels)

    return make


def quarter_bounds(depth: int, blocks: int | None = None) -> list[tuple[int, int]]:
    """Block index ranges [start, end) of the four stages of a ``depth``-block ViT, cut after ``blocks``."""
    if depth % N_STAGES:
        raise ValueError(f"a depth of {depth} blocks does not split into {N_STAGES} equal stages")
    quarter = depth // N_STAGES
    n = depth if blocks is None else blocks
    return [(start, min(start + quarter, n)) for start in range(0, n, quarter)]


def block_stages(
    blocks: Sequence[nn.Module], width: int, keep: int | None = None, depth: int | None = None
) -> list[Stage]:
    """The quarter-depth stages of ``blocks`` (all of them, or the first ``keep``), named by block range;
    ``depth`` is the network's whole depth when ``blocks`` are only its first ones."""
    stages = []
    for start, end in quarter_bounds(len(blocks) if depth is None else depth, keep):
        module = nn.Sequential(OrderedDict((str(i), blocks[i]) for i in range(start, end)))
        stages.append(Stage(f"blocks{start + 1}-{end}", module, width))
    return stages


def vit_stages(model: nn.Module) -> list[Stage]:
    """``stem`` and the four quarter-depth stages of a timm VisionTransformer."""
    vit = cast(VisionTransformer, model)  # what ViTConfig.build makes
    return [Stage("stem", TokenStem(vit), vit.embed_dim), *block_stages(list(vit.blocks), vit.embed_dim)]


def _layout(name: str) -> tuple[int, int] | None:
    """(depth in blocks, token width) of transformer encoder ``name``, None for a CNN; read on the meta device."""
    if name not in VIT_ENCODERS:
        return None
    stages = meta_stages(encoder_spec(name))
    return sum(len(cast(nn.Sequential, s.module)) for s in stages[1:]), stages[0].channels


def transformer_depth(name: str) -> int | None:
    """The number of transformer blocks of encoder ``name`` (None for a CNN)."""
    layout = _layout(name)
    return None if layout is None else layout[0]


def _checked_layout(name: str, blocks: int) -> tuple[int, int]:
    """:func:`_layout` of ``name``, after checking that it is a transformer of at least ``blocks`` blocks."""
    layout = _layout(name)
    if layout is None:
        raise HistotransferError(
            f"blocks={blocks!r} applies to transformer encoders ({', '.join(VIT_ENCODERS)}), not {name}; "
            "use truncate for it."
        )
    if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= layout[0]:
        raise HistotransferError(f"blocks={blocks!r} is out of range for {name}: pass 1..{layout[0]}.")
    return layout


def blocks_truncation(name: str, blocks: int) -> int:
    """The quarter stages that keeping the first ``blocks`` blocks of ``name`` leaves out entirely (what the
    encoder records as ``truncate``), after checking that ``name`` is a transformer of at least that depth."""
    depth, _ = _checked_layout(name, blocks)
    return N_STAGES - len(quarter_bounds(depth, blocks))


def _held_blocks(encoder: Encoder) -> list[nn.Module]:
    """The transformer blocks an encoder holds, in order."""
    return [block for stage in list(encoder.body)[1:] for block in cast(nn.Sequential, stage)]


def keep_blocks(encoder: Encoder, blocks: int) -> Encoder:
    """``encoder`` (a transformer holding at least ``blocks`` blocks) cut after exactly its first ``blocks``
    blocks, sharing its modules, weights and pooling (the final norm and the model's token pooling).

    Stages are the network's quarter-depth stages cut after ``blocks`` (the last one partial where ``blocks`` is
    not a multiple of a quarter; its name, e.g. ``blocks7-10``, gives the depth); ``truncate`` is the number of
    quarters left out entirely, so ``blocks`` = 3/4, 1/2, 1/4 of the depth equals ``truncate`` = 1, 2, 3.
    """
    depth, width = _checked_layout(encoder.name, blocks)
    held = _held_blocks(encoder)
    if blocks > len(held):
        raise HistotransferError(
            f"blocks={blocks}: this {encoder.name} encoder holds only its first {len(held)} "
            f"blocks; build it with create_encoder({encoder.name!r}, weights, blocks={blocks})."
        )
    stages = [Stage("stem", encoder.body[0], width), *block_stages(held, width, blocks, depth)]
    return Encoder(
        encoder.name,
        stages,
        N_STAGES - (len(stages) - 1),
        encoder.weights_source,
        encoder.weights_sha256,
        encoder.preprocessing,
        encoder.pool,
        encoder.weights_label,
        blocks,
    ).eval()


def block_by_block(encoder: Encoder) -> Encoder:
    """``encoder`` with each of its transformer blocks a stage of its own (``block1``, ``block2``, ...), sharing
    its modules: the same features, and :meth:`Encoder.forward_stages` gives every block's output (CKA per
    block)."""
    layout = _layout(encoder.name)
    if layout is None:
        raise HistotransferError(
            f"comparing block by block applies to transformer encoders "
            f"({', '.join(VIT_ENCODERS)}), not {encoder.name}; drop per_block to compare "
            "its stages."
        )
    width = layout[1]
    stages = [
        Stage("stem", encoder.body[0], width),
        *(
            Stage(f"block{i + 1}", nn.Sequential(OrderedDict([(str(i), block)])), width)
            for i, block in enumerate(_held_blocks(encoder))
        ),
    ]
    return Encoder(
        encoder.name,
        stages,
        encoder.truncate,
        encoder.weights_source,
        encoder.weights_sha256,
        encoder.preprocessing,
        encoder.pool,
        encoder.weights_label,
        encoder.blocks,
    ).eval()


VIT_CUTS = BlockCuts(blocks_truncation, keep_blocks, block_by_block)


def vit_blocks_encoder(name: str, weights: str | None, blocks: int) -> Encoder:
    """ViT ``name`` with ``weights`` keeping exactly its first ``blocks`` transformer blocks, then the final norm
    and the model's pooling: ``create_encoder(name, weights, blocks=blocks)`` (see :func:`keep_blocks`)."""
    return create_encoder(name, weights, blocks=blocks)


def _gated(repo: str, licence: str) -> str:
    return (
        f"gated on Hugging Face: log in and accept the access conditions of {repo} ({licence} licence) "
        "before downloading; histotransfer never fetches it"
    )


def _published(encoder: str, repo: str, filename: str, reference: str, access: str = "") -> WeightsOption:
    """The ``pretrained`` option of a checkpoint published on the Hugging Face Hub as ``repo``/``filename``,
    looked up in the weights folder as ``<encoder>-<filename>``."""
    local = f"{encoder}-{filename}"
    checkpoint = Checkpoint(
        local, f"https://huggingface.co/{repo} (file {filename}; save it as {local})", reference, access
    )
    return WeightsOption("pretrained", f"published checkpoint {repo}/{filename}", checkpoint=checkpoint)


def _timm_imagenet(tag: str, top1: float) -> tuple[WeightsOption, Preprocessing]:
    """timm's ImageNet weights ``tag`` (their model.safetensors on the Hugging Face Hub), their ImageNet top-1
    ``top1``, and the preprocessing of timm's pretrained config for them (timm's eval transform: resize to
    floor(input / crop_pct), then the centre crop)."""
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm has no Hugging Face Hub weights tagged {tag}")
    option = WeightsOption(
        "imagenet", f"timm {tag}", hub=HubFile(cfg.hf_hub_id, "model.safetensors"), imagenet_top1=top1
    )
    rgb = tuple[float, float, float]
    size = cfg.input_size[-1]
    resize = math.floor(size / cfg.crop_pct) if cfg.crop_pct is not None and cfg.crop_pct < 1 else None
    return option, Preprocessing(cast(rgb, tuple(cfg.mean)), cast(rgb, tuple(cfg.std)), size, cfg.interpolation, resize)


VIT_ENCODERS: dict[str, ViTConfig] = {}


def _register(
    name: str,
    config: ViTConfig,
    *,
    weights: WeightsOption,
    architecture: str,
    family: str,
    preprocessing: Preprocessing,
    reference: str,
) -> None:
    VIT_ENCODERS[name] = config
    register(
        name,
        stages=vit_stages,
        weights=[weights],
        architecture=architecture,
        family=family,
        preprocessing=preprocessing,
        pool=token_pool(config.pooling),
        reference=reference,
        cuts=VIT_CUTS,
    )(config.build)


def _at_224(
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    resize: int | None = None,
) -> Preprocessing:
    """The card's transform: PIL resize with ``interpolation`` to 224 px, or to ``resize`` then a centre crop."""
    return Preprocessing(mean, std, 224, interpolation, resize)


UNI_REF = (
    "Chen et al., Towards a general-purpose foundation model for computational pathology, Nat Med 2024; "
    "configuration: huggingface.co/MahmoodLab/UNI model card and github.com/mahmoodlab/UNI "
    "uni/get_encoder/get_encoder.py"
)
_register(
    "uni",
    ViTConfig(
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
    ),
    weights=_published(
        "uni", "MahmoodLab/UNI", "pytorch_model.bin", UNI_REF, _gated("MahmoodLab/UNI", "CC-BY-NC-ND-4.0")
    ),
    architecture="ViT-L/16",
    family="histopathology",
    preprocessing=_at_224(interpolation="bilinear"),
    reference=UNI_REF,
)

UNI2_REF = (
    "MahmoodLab UNI2-h; configuration: huggingface.co/MahmoodLab/UNI2-h model card (timm_kwargs) and "
    "github.com/mahmoodlab/UNI uni/get_encoder/get_encoder.py"
)
_register(
    "uni2-h",
    ViTConfig(
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
    ),
    weights=_published(
        "uni2-h", "MahmoodLab/UNI2-h", "pytorch_model.bin", UNI2_REF, _gated("MahmoodLab/UNI2-h", "CC-BY-NC-ND-4.0")
    ),
    architecture="ViT-H/14, 8 registers, SwiGLU",
    family="histopathology",
    preprocessing=_at_224(interpolation="bilinear"),
    reference=UNI2_REF,
)

VIRCHOW2_REF = (
    "Zimmermann et al., Virchow2: scaling self-supervised mixed magnification models in pathology, "
    "arXiv:2408.00738; configuration: huggingface.co/paige-ai/Virchow2 model card and config.json "
    "(class token ++ mean of patch tokens after the 4 registers)"
)
_register(
    "virchow2",
    ViTConfig(
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
        CLASS_AND_MEAN,
    ),
    weights=_published(
        "virchow2",
        "paige-ai/Virchow2",
        "pytorch_model.bin",
        VIRCHOW2_REF,
        _gated("paige-ai/Virchow2", "CC-BY-NC-ND-4.0"),
    ),
    architecture="ViT-H/14, 4 registers, SwiGLU",
    family="histopathology",
    preprocessing=_at_224(),
    reference=VIRCHOW2_REF,
)

HOPTIMUS_REF = (
    "Saillard et al., H-optimus-0, Bioptimus 2024; configuration: huggingface.co/bioptimus/"
    "H-optimus-0 model card and config.json (timm vit_giant_patch14_reg4_dinov2)"
)
_register(
    "h-optimus-0",
    ViTConfig(
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token", "dynamic_img_size": False},
    ),
    weights=_published(
        "h-optimus-0",
        "bioptimus/H-optimus-0",
        "pytorch_model.bin",
        HOPTIMUS_REF,
        _gated("bioptimus/H-optimus-0", "Apache-2.0"),
    ),
    architecture="ViT-g/14, 4 registers, SwiGLU",
    family="histopathology",
    preprocessing=_at_224(HOPTIMUS_MEAN, HOPTIMUS_STD),
    reference=HOPTIMUS_REF,
)

GIGAPATH_REF = (
    "Xu et al., A whole-slide foundation model for digital pathology from real-world data, Nature 2024; "
    "configuration: huggingface.co/prov-gigapath/prov-gigapath config.json (timm "
    "vit_giant_patch14_dinov2 with patch_size 16) and github.com/prov-gigapath/prov-gigapath README "
    "(tile encoder transform)"
)
_register(
    "prov-gigapath",
    ViTConfig(
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
    ),
    weights=_published(
        "prov-gigapath",
        "prov-gigapath/prov-gigapath",
        "pytorch_model.bin",
        GIGAPATH_REF,
        _gated("prov-gigapath/prov-gigapath", "Apache-2.0"),
    ),
    architecture="ViT-g/16, SwiGLU",
    family="histopathology",
    preprocessing=_at_224(resize=256),
    reference=GIGAPATH_REF,
)

PHIKON2_REF = (
    "Filiot et al., Phikon-v2, a large and public feature extractor for biomarker prediction, "
    "arXiv:2409.09173; configuration: huggingface.co/owkin/phikon-v2 (transformers Dinov2Model "
    "ViT-L/16, output last_hidden_state[:, 0])"
)
_register(
    "phikon-v2",
    ViTConfig(
        "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}
    ),
    weights=_published("phikon-v2", "owkin/phikon-v2", "model.safetensors", PHIKON2_REF),
    architecture="ViT-L/16 (DINOv2)",
    family="histopathology",
    preprocessing=_at_224(),
    reference=PHIKON2_REF,
)

# ImageNet top-1 of exactly these weights: timm's evaluation of them (results/results-imagenet.csv).
for _name, _arch, _tag, _top1 in [
    ("vit_base_patch16_224", "ViT-B/16", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 85.096),
    ("vit_large_patch16_224", "ViT-L/16", "vit_large_patch16_224.augreg_in21k_ft_in1k", 85.834),
]:
    _option, _preprocessing = _timm_imagenet(_tag, _top1)
    _register(
        _name,
        ViTConfig(_name, {"num_classes": 0}),
        weights=_option,
        architecture=_arch,
        family="imagenet",
        preprocessing=_preprocessing,
        reference=f"Dosovitskiy et al., ICLR 2021; Steiner et al., TMLR 2022; timm {_tag} (pretrained_cfg)",
    )
