"""Grad-CAM (Selvaraju et al., 2017) inside the patches a MIL run attends to: where in a patch the slide's
positive-class logit comes from.

The function differentiated is the run's own: for a slide of N patches with feature rows F (N, D),

    y = head(F')[0, target_class],   F' = F with rows ``rows`` replaced by GAP(A_b) of the batch patches,

where A_b (C, h, w) is the output of the encoder's last kept stage for batch patch b, GAP its global average
(exactly ``Encoder.forward``), and ``head`` the AttentionMIL (its standardisation, embedding, attention softmax
over all N patches, pooling and classifier). The other N - B patches enter as their fixed, precomputed feature
rows. Without ``slide_features`` the batch itself is the bag (N = B), as in top-k fine-tuning. Grad-CAM of
patch b is then ReLU(sum_c alpha_bc A_bc) with alpha_bc the spatial mean of dy/dA_bc.

Because the last kept stage is followed only by the average pooling, dy/dA_b needs no backward pass through
the encoder: the stage is run without autograd and its output becomes the leaf that y is differentiated by,
so the maps of 64 patches of 512 px cost one forward pass and a backward pass through the small head.

Plain CAM (Zhou et al., 2016: the classifier's weights applied to the last feature maps) is exact only when
the logit is linear in each patch's pooled features. The AttentionMIL head is not: its ReLU MLP runs before
the pooling and the attention softmax weighs the patches by a tanh of their embeddings, so the classifier
weights alone do not say how a feature map moves the logit. Grad-CAM is the CAM of the head's first-order
expansion at the actual input (for a head linear in the pooled features it equals plain CAM divided by h * w),
so Grad-CAM is the map provided.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoders import Encoder
from ..mil import AttentionMIL
from ..runtime import precision_context

POSITIVE_CLASS = 1  # index of the positive class in a run's label mapping (the second class name)


@dataclass(frozen=True)
class CamResult:
    """Grad-CAM of a batch of B patches on the last kept stage's (h, w) output grid.

    ``maps`` (B, h, w) float32 is ReLU(``raw``), Grad-CAM as defined; ``raw`` keeps the sign (negative cells
    lower the logit). ``logit`` is the value of the differentiated logit, ``feature_gap`` the largest
    absolute difference between the batch's live features and the ``slide_features`` rows they replace (None
    without ``slide_features``): near zero when the rows and the patches match.
    """

    maps: np.ndarray
    raw: np.ndarray
    grid: tuple[int, int]
    stage: str
    target_class: int
    logit: float
    feature_gap: float | None


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode (BatchNorm statistics, no dropout) and restore each submodule's mode."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def last_stage_maps(encoder: Encoder, patches: Tensor, batch_size: int) -> Tensor:
    """(B, C, h, w) float32 output of the encoder's last kept stage, computed ``batch_size`` patches at a time."""
    with torch.no_grad():
        return torch.cat([encoder.body(chunk).float() for chunk in patches.split(batch_size)])


def _slide_bag(
    feats: Tensor, slide_features: Tensor | np.ndarray | None, rows: Sequence[int] | np.ndarray | None
) -> tuple[Tensor, float | None]:
    """The bag the head sees: the slide's feature rows with ``rows`` replaced by ``feats`` (or ``feats``)."""
    if slide_features is None:
        if rows is not None:
            raise ValueError("rows is given without slide_features")
        return feats, None
    fixed = torch.as_tensor(slide_features, device=feats.device).float()
    if rows is None:
        raise ValueError("slide_features needs rows: the row of each batch patch in the slide's features")
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=feats.device)
    if fixed.dim() != 2 or fixed.shape[1] != feats.shape[1]:
        raise ValueError(f"slide_features must be (N, {feats.shape[1]}), got {tuple(fixed.shape)}")
    if index.shape != (len(feats),) or len(torch.unique(index)) != len(index):
        raise ValueError(f"rows must hold {len(feats)} distinct indices, one per batch patch")
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(fixed)):
        raise ValueError(f"rows must index the {len(fixed)} rows of slide_features")
    gap = float((feats.detach() - fixed[index]).abs().max()) if len(index) else 0.0
    return fixed.index_copy(0, index, feats), gap


def grad_cam(
    encoder: Encoder,
    head: AttentionMIL,
    patches: Tensor,
    slide_features: Tensor | np.ndarray | None = None,
    rows: Sequence[int] | np.ndarray | None = None,
    target_class: int = POSITIVE_CLASS,
    batch_size: int = 16,
) -> CamResult:
    """Grad-CAM of the slide's ``target_class`` logit for each of a batch of patches.

    ``patches``: ImageNet-normalised float (B, 3, H, W) on the device of ``encoder`` and ``head``.
    ``slide_features`` (N, D): the slide's precomputed feature rows, ``rows`` (B,) the row of each batch patch
    in them; the logit is the head's over all N rows, the batch's rows computed live (module docstring).
    ``batch_size`` patches go through the encoder at a time (the maps do not depend on it). Both modules are
    used in eval mode and left in the mode they were in; no parameter gradient is written.
    """
    if patches.dim() != 4 or patches.shape[1] != 3:
        raise ValueError(f"patches must be (B, 3, H, W), got {tuple(patches.shape)}")
    if not 0 <= target_class < head.n_classes:
        raise ValueError(f"target_class {target_class} is not a class of a {head.n_classes}-class head")
    with _eval_mode(encoder, head), precision_context(patches.device, "fp32"):
        stage_out = last_stage_maps(encoder, patches, batch_size).requires_grad_(True)
        with torch.enable_grad():
            feats = torch.flatten(F.adaptive_avg_pool2d(stage_out, 1), 1)  # as Encoder.forward pools
            bag, gap = _slide_bag(feats, slide_features, rows)
            logit = head(bag)[0][0, target_class]
            (grad,) = torch.autograd.grad(logit, stage_out)
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    raw = (alpha * stage_out.detach()).sum(dim=1)
    return CamResult(
        maps=torch.relu(raw).cpu().numpy().astype(np.float32),
        raw=raw.cpu().numpy().astype(np.float32),
        grid=(int(raw.shape[1]), int(raw.shape[2])),
        stage=encoder.stage_names[-1],
        target_class=int(target_class),
        logit=float(logit.detach()),
        feature_gap=gap,
    )
