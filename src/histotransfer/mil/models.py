"""Attention-based multiple-instance learning (Ilse et al., 2018) over the patch features of a slide.

Two variants:

* ``histotransfer`` - as the HistoTransfer authors built it: D -> hidden (256) -> 64 with ReLU, attention
  64 -> 32 -> 1 with tanh, softmax over the patches, attention-weighted mean, linear classifier.
* ``gated`` - Ilse's gated attention: D -> hidden (256) with ReLU, attention tanh(V h) * sigmoid(U h) -> 1
  (V, U: hidden -> 128), softmax, weighted mean, linear classifier.

The feature standardisation (z-score with a floor on the std) lives inside the module as buffers, so a
saved model carries it and a CNN placed in front of it (end-to-end fine-tuning) feeds raw features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .settings import DEFAULT_HIDDEN, STD_FLOOR_FRACTION

VARIANTS = ("histotransfer", "gated")
GATED_ATTENTION_DIM = 128


class AttentionMIL(nn.Module):
    """Attention-MIL slide classifier.

    ``forward(bag)`` takes one slide's features, a float32 tensor of shape (N, D), and returns
    ``(logits, scores)``: ``logits`` of shape (1, n_classes) (ready for ``F.cross_entropy`` with a (1,)
    target) and ``scores`` of shape (N,), the raw pre-softmax attention score of each patch (the softmax of
    ``scores`` over the patches gives the pooling weights; top-k patch selection ranks by ``scores``).
    """

    feature_mean: Tensor  # buffers, registered in __init__
    feature_std: Tensor

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        variant: str = "histotransfer",
        hidden: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MIL model {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.in_dim, self.n_classes, self.variant = int(in_dim), int(n_classes), variant
        self.hidden, self.dropout = int(hidden or DEFAULT_HIDDEN), float(dropout)
        self.register_buffer("feature_mean", torch.zeros(self.in_dim))
        self.register_buffer("feature_std", torch.ones(self.in_dim))
        self.fc1 = nn.Linear(self.in_dim, self.hidden)
        if variant == "histotransfer":
            self.fc2 = nn.Linear(self.hidden, 64)
            width, attention_dim = 64, 32
        else:
            width, attention_dim = self.hidden, GATED_ATTENTION_DIM
            self.attention_u = nn.Linear(width, attention_dim)
        self.attention_v = nn.Linear(width, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(width, self.n_classes)

    @property
    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the module before loading its state dict."""
        return {
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            "variant": self.variant,
            "hidden": self.hidden,
            "dropout": self.dropout,
        }

    @torch.no_grad()
    def set_standardization(
        self, mean: Tensor | np.ndarray, std: Tensor | np.ndarray, floor: float | None = None
    ) -> float:
        """Store the per-dimension mean and std (clamped below at ``floor``; default: ``STD_FLOOR_FRACTION``
        of the median positive std) applied to every bag. Returns the floor used."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        if floor is None:
            positive = std[std > 0]
            floor = float(STD_FLOOR_FRACTION * positive.quantile(0.5)) if len(positive) else 1.0
        floor = max(float(floor), 1e-12)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(floor))
        return floor

    def _dropout(self, h: Tensor) -> Tensor:
        return F.dropout(h, self.dropout, self.training) if self.dropout > 0 else h

    def embed(self, bag: Tensor) -> Tensor:
        """Patch embeddings (N, width) fed to the attention and the pooling."""
        # Standardisation is folded into the first layer: W((x - m) / s) + b == (W / s) x + (b - (W / s) m).
        # This computes the same function (and gradients) without an (N, D) temporary per step.
        weight = self.fc1.weight / self.feature_std
        bias = torch.addmv(self.fc1.bias, weight, self.feature_mean, alpha=-1)
        h = self._dropout(torch.relu_(torch.addmm(bias, bag, weight.t())))
        if self.variant == "histotransfer":
            h = self._dropout(torch.relu_(self.fc2(h)))
        return h

    def attention(self, h: Tensor) -> Tensor:
        """Raw attention score (N,) of each patch embedding."""
        a = torch.tanh(self.attention_v(h))
        if self.variant == "gated":
            a = a * torch.sigmoid(self.attention_u(h))
        return self.attention_w(a).squeeze(1)

    def forward(self, bag: Tensor) -> tuple[Tensor, Tensor]:
        if bag.dim() != 2 or bag.shape[1] != self.in_dim:
            raise ValueError(f"expected a bag of shape (N, {self.in_dim}), got {tuple(bag.shape)}")
        h = self.embed(bag)
        scores = self.attention(h)
        pooled = torch.softmax(scores, 0).unsqueeze(0) @ h
        return self.classifier(pooled), scores


def build_model(config: dict) -> AttentionMIL:
    """An untrained AttentionMIL from its ``config``."""
    return AttentionMIL(**config)


@torch.inference_mode()
def predict_bag(model: AttentionMIL, bag: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (n_classes,) and raw attention scores (N,) of one bag, in eval mode."""
    model.eval()
    logits, scores = model(torch.as_tensor(bag, dtype=torch.float32))
    return torch.softmax(logits[0], 0).numpy(), scores.numpy()


@torch.inference_mode()
def predict(model: AttentionMIL, bags: list[Tensor]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, n_classes) and raw attention scores of each bag, in eval mode."""
    model.eval()
    probs, scores = [], []
    for bag in bags:
        logits, s = model(bag)
        probs.append(torch.softmax(logits[0].double(), 0).numpy())
        scores.append(s.numpy())
    return np.stack(probs) if probs else np.zeros((0, model.n_classes)), scores


def attention_scores(model: AttentionMIL, bag: Tensor | np.ndarray) -> np.ndarray:
    """Raw (pre-softmax) attention score of each patch of ``bag`` (N, D), as float32 (N,)."""
    return predict_bag(model, bag)[1]
