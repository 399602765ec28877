"""The patch encoder and the attention-MIL head as one network, trained end to end on top-k bags.

Training choices (as the paper's authors did): BatchNorm layers stay in eval mode (their running statistics
are not updated by the small, highly selected top-k batches; their affine weights are still trained), and
``freeze_stages=k`` keeps the stem and the first k stages fixed, so their outputs are unchanged by fine-tuning.
Frozen stages run without autograd.

Gradient checkpointing (``torch.utils.checkpoint``) recomputes activations in the backward pass instead of
keeping them: a CNN stage (B, C, H, W) is recomputed as a whole, which is what lets 64 patches of 512 px
through a DenseNet121 fit on one 24 GB GPU; a transformer stage (tokens, B, N, C) block by block, since a
quarter of a ViT-L (6 blocks) recomputed at once would hold six blocks' activations again.

Low-rank adaptation (:class:`Lora`, with peft) replaces training a transformer's weights by training rank-r
matrices beside its blocks' linear layers (W + alpha/r B A; B starts at zero, so training starts from the
encoder as it was); every encoder weight stays fixed, only those matrices and the MIL head learn.
:func:`merge_lora` folds them into the weights afterwards, giving back the network's own layers and key names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..encoders import Encoder, create_encoder
from ..errors import HistotransferError
from ..mil import AttentionMIL
from .settings import LORA_TARGETS, FinetuneSettings

# Module-name suffix, inside a timm transformer block, of each layer LoRA can target.
LORA_LAYERS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


@dataclass(frozen=True)
class Lora:
    """Low-rank adaptation of the ``targets`` layers (of :data:`LORA_LAYERS`) with matrices of ``rank``,
    scaled by ``alpha / rank`` (``alpha`` None: equal to the rank); ``seed`` draws the initial A matrices."""

    rank: int
    alpha: int | None = None
    targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise HistotransferError(
                f"lora rank {self.rank!r}: pass a positive integer (e.g. 8), or no rank for full fine-tuning."
            )
        if self.alpha is not None and (not isinstance(self.alpha, int) or self.alpha < 1):
            raise HistotransferError(f"lora alpha {self.alpha!r}: pass a positive integer (or none: the rank).")
        unknown = [t for t in self.targets if t not in LORA_LAYERS]
        if unknown or not self.targets:
            raise HistotransferError(f"lora targets {list(self.targets)!r}: choose among {', '.join(LORA_LAYERS)}.")

    @property
    def alpha_or_rank(self) -> int:
        """The alpha in effect: the one given, else the rank (a scale of 1)."""
        return self.rank if self.alpha is None else self.alpha


def lora_of(settings: FinetuneSettings) -> Lora | None:
    """The low-rank adaptation ``settings`` ask for (None: full fine-tuning)."""
    if settings.lora_rank is None:
        return None
    return Lora(settings.lora_rank, settings.lora_alpha, settings.lora_targets or LORA_TARGETS, settings.seed)


def lora_layer_names(encoder: Encoder, targets: Sequence[str], skip_stages: int = 0) -> list[str]:
    """Names (in ``encoder``) of the linear layers of ``targets`` in its stages after the first ``skip_stages``."""
    suffixes = tuple("." + LORA_LAYERS[t] for t in targets)
    stages = list(encoder.body.named_children())[skip_stages:]
    return [
        f"body.{stage_name}.{name}"
        for stage_name, stage in stages
        for name, m in stage.named_modules()
        if isinstance(m, nn.Linear) and ("." + name).endswith(suffixes)
    ]


def adapted_layers(encoder: Encoder, lora: Lora, skip_stages: int = 0) -> list[str]:
    """The layers ``lora`` adapts in ``encoder`` when its first ``skip_stages`` stages are frozen; an error
    naming the fix when there are none (a CNN, or every transformer stage frozen)."""
    names = lora_layer_names(encoder, lora.targets, skip_stages)
    if names:
        return names
    if lora_layer_names(encoder, lora.targets):
        raise HistotransferError(
            f"lora: every stage of {encoder.name} with {', '.join(lora.targets)} layers is "
            "frozen; freeze fewer stages (--freeze-stages)."
        )
    raise HistotransferError(
        f"lora: {encoder.name} has no transformer block layers "
        f"({', '.join(LORA_LAYERS[t] for t in lora.targets)}); low-rank adaptation applies "
        "to the transformer encoders: drop --lora-rank to fine-tune it fully."
    )


def check_lora(name: str, truncate: int, freeze_stages: int, lora: Lora) -> None:
    """Refuse, before any work, a ``lora`` that would adapt nothing in encoder ``name`` cut by ``truncate``
    (built on the meta device: no weights are read or allocated)."""
    with torch.device("meta"):
        encoder = create_encoder(name, "random", truncate)
    adapted_layers(encoder, lora, frozen_with_stem(freeze_stages))


def add_lora(encoder: Encoder, lora: Lora, skip_stages: int = 0) -> list[str]:
    """Put ``lora``'s matrices beside the targeted layers of ``encoder``'s stages after the first
    ``skip_stages`` (in place, with peft) and fix every encoder weight but theirs; returns the adapted layers."""
    names = adapted_layers(encoder, lora, skip_stages)
    from peft import LoraConfig, inject_adapter_in_model  # imports transformers: seconds, so only when used

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha_or_rank, target_modules=names, lora_dropout=0.0, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)  # the same initial matrices in every process (resume, DDP ranks)
        inject_adapter_in_model(config, encoder)
    return names


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA layer of ``module`` into the weight it adapts (W + alpha/r B A) and put the plain layer
    back in its place, so ``module`` has its network's own layers and key names again; returns how many.

    peft's ``merge_and_unload`` is a method of the tuner wrapper that ``inject_adapter_in_model`` does not
    keep, so this is its loop, over peft's own per-layer ``merge``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, layer.get_base_layer())
    module.__dict__.pop("peft_config", None)  # peft's record of the injected adapters, now gone
    return len(layers)


def frozen_with_stem(freeze_stages: int) -> int:
    """How many of the encoder's stages ``freeze_stages`` fixes: the stem goes with the first stage."""
    return freeze_stages + 1 if freeze_stages > 0 else 0


def checkpoint_units(stage: nn.Module, x: Tensor) -> list[nn.Module]:
    """The parts of ``stage`` recomputed one at a time: each block of a transformer stage (a sequence of blocks
    taking tokens (B, N, C)), else the whole stage."""
    if x.dim() == 3 and isinstance(stage, nn.Sequential):
        return list(stage)
    return [stage]


class EndToEndMIL(nn.Module):
    """``encoder`` followed by the MIL ``head``: pixels of several slides in, one logit row per slide out.

    With ``lora``, the encoder's trainable stages get low-rank adaptation (:func:`add_lora`) and its own
    weights stay fixed; ``lora_layers`` names the adapted layers.
    """

    def __init__(
        self,
        encoder: Encoder,
        head: AttentionMIL,
        freeze_stages: int = 0,
        checkpointing: bool = False,
        lora: Lora | None = None,
    ):
        super().__init__()
        n_stages = len(encoder.stage_names) - 1
        if not 0 <= freeze_stages <= n_stages:
            raise HistotransferError(
                f"freeze_stages={freeze_stages}: {encoder.name} (truncate {encoder.truncate}) has {n_stages} "
                f"stages after the stem; pass 0..{n_stages}."
            )
        self.encoder, self.head = encoder, head
        self.n_frozen = frozen_with_stem(freeze_stages)
        self.checkpointing = checkpointing
        for stage in list(encoder.body)[: self.n_frozen]:
            stage.requires_grad_(False)
        self.lora_layers = add_lora(encoder, lora, self.n_frozen) if lora is not None else []

    def train(self, mode: bool = True) -> EndToEndMIL:
        super().train(mode)
        for m in self.encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """(B, D) pooled features of a normalised image batch: the encoder's ``forward``, stage by stage."""
        for i, stage in enumerate(self.encoder.body):
            if i < self.n_frozen:
                with torch.no_grad():
                    x = stage(x)
            elif self.checkpointing and self.training and torch.is_grad_enabled():
                for unit in checkpoint_units(stage, x):
                    x = checkpoint(unit, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.encoder.pool(x)

    def forward(self, x: Tensor, sizes: list[int]) -> tuple[Tensor, list[Tensor]]:
        """Logits (S, n_classes) of S slides whose patches are the consecutive ``sizes`` rows of ``x``, and
        each slide's raw attention scores."""
        feats = self.features(x).float()
        logits, scores = [], []
        for bag in torch.split(feats, sizes):
            lg, sc = self.head(bag)
            logits.append(lg)
            scores.append(sc)
        return torch.cat(logits), scores
