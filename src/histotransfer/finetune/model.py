"""The patch encoder and the attention-MIL head as one network, trained end to end on top-k bags.

Training choices (as the paper's authors did): BatchNorm layers stay in eval mode (their running statistics
are not updated by the small, highly selected top-k batches; their affine weights are still trained), and
``freeze_stages=k`` keeps the stem and the first k stages fixed, so their outputs are unchanged by fine-tuning.
Frozen stages run without autograd; with ``checkpointing`` each trainable stage is recomputed during the
backward pass (``torch.utils.checkpoint``) instead of keeping its activations, which is what lets 64 patches
of 512 px through a DenseNet121 fit on one 24 GB GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import HistotransferError
from ..features import Encoder
from ..mil import AttentionMIL


class EndToEndMIL(nn.Module):
    """``encoder`` followed by the MIL ``head``: pixels of several slides in, one logit row per slide out."""

    def __init__(self, encoder: Encoder, head: AttentionMIL, freeze_stages: int = 0, checkpointing: bool = False):
        super().__init__()
        n_stages = len(encoder.stage_names) - 1
        if not 0 <= freeze_stages <= n_stages:
            raise HistotransferError(
                f"freeze_stages={freeze_stages}: {encoder.name} (truncate {encoder.truncate}) has {n_stages} "
                f"stages after the stem; pass 0..{n_stages}."
            )
        self.encoder, self.head = encoder, head
        self.n_frozen = freeze_stages + 1 if freeze_stages > 0 else 0  # the stem goes with the first stage
        self.checkpointing = checkpointing
        for stage in list(encoder.body)[: self.n_frozen]:
            stage.requires_grad_(False)

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
                x = checkpoint(stage, x, use_reentrant=False)
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
