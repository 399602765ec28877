"""Grad-CAM inside patches: a hand-computed case, full-backprop reference, planted signal, grid shapes."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from histotransfer.analysis.cam import grad_cam
from histotransfer.encoders import Encoder, Stage, create_encoder
from histotransfer.mil import AttentionMIL

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_encoder(stages: list[tuple[str, nn.Module, int]]) -> Encoder:
    return Encoder("hand", [Stage(*s) for s in stages], 0, "hand", None).eval()


class MeanLinearHead(nn.Module):
    """A head linear in the pooled features: logits = mean over patches @ V.T + b (what plain CAM assumes)."""

    n_classes = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], 2)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(bag.mean(0, keepdim=True)), torch.zeros(len(bag))


def test_grad_cam_of_a_linear_head_is_the_hand_computed_cam():
    conv_w = np.array([[1.0, -1.0, 0.5], [0.25, 2.0, -1.0]])
    conv_b = np.array([0.1, -0.2])
    head_w = np.array([[0.3, -0.7], [1.5, -2.0]])
    head_b = np.array([0.05, -0.4])
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(conv_w).view(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor(conv_b))
    encoder = hand_encoder([("stem", conv, 2)])
    head = MeanLinearHead(torch.tensor(head_w), torch.tensor(head_b))
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 3))
    stage = np.einsum("ck,bkyx->bcyx", conv_w, x) + conv_b[None, :, None, None]  # (B, C, h, w)
    fixed = np.random.default_rng(1).normal(size=(5, 2))

    # Alone, the bag is the 2 patches: dy/dA_c = V[1, c] / (N h w) at every cell, N = 2.
    got = grad_cam(encoder, head, torch.tensor(x, dtype=torch.float32))
    raw = np.einsum("c,bcyx->byx", head_w[1], stage) / (2 * 2 * 3)
    np.testing.assert_allclose(got.raw, raw, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.maps, np.maximum(raw, 0), rtol=0, atol=1e-6)
    assert got.grid == (2, 3) and got.stage == "stem" and got.feature_gap is None
    assert got.logit == pytest.approx(stage.mean(axis=(0, 2, 3)) @ head_w[1] + head_b[1], abs=1e-6)

    # In a slide of 5 rows, patches 0 and 1 replacing rows 3 and 0: N = 5, the other rows fixed.
    got = grad_cam(encoder, head, torch.tensor(x, dtype=torch.float32), slide_features=fixed, rows=[3, 0])
    np.testing.assert_allclose(got.raw, raw * 2 / 5, rtol=0, atol=1e-6)
    bag = fixed.copy()
    bag[[3, 0]] = stage.mean(axis=(2, 3))
    assert got.logit == pytest.approx(bag.mean(0) @ head_w[1] + head_b[1], abs=1e-6)
    assert got.feature_gap == pytest.approx(np.abs(stage.mean(axis=(2, 3)) - fixed[[3, 0]]).max(), abs=1e-6)


def reference_grad_cam(
    encoder: Encoder, head: AttentionMIL, patches: torch.Tensor, slide_features: torch.Tensor, rows: list[int]
) -> np.ndarray:
    """The textbook implementation: a hook keeps the last stage's output, backprop runs through everything."""
    kept = {}
    hook = encoder.body[-1].register_forward_hook(lambda m, i, o: kept.update(out=o))
    try:
        feats = encoder(patches)
        kept["out"].retain_grad()
        bag = slide_features.clone()
        bag[rows] = feats
        head(bag)[0][0, 1].backward()
    finally:
        hook.remove()
    out, grad = kept["out"].detach(), kept["out"].grad
    return (grad.mean(dim=(2, 3), keepdim=True) * out).sum(1).numpy()


def test_attention_mil_grad_cam_matches_full_backprop_and_leaves_no_trace():
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", weights="random", truncate=2)  # last kept stage: layer2, stride 8
    head = AttentionMIL(encoder.feature_dim, hidden=32)
    patches = torch.randn(7, 3, 64, 64)
    with torch.no_grad():
        slide_features = encoder(patches)
    head.set_standardization(slide_features.mean(0), slide_features.std(0))
    head.train()
    rows = [5, 2]

    got = grad_cam(encoder, head, patches[rows], slide_features=slide_features, rows=rows)
    assert head.training and not encoder.training
    assert all(p.grad is None for p in [*encoder.parameters(), *head.parameters()])
    assert got.grid == (8, 8) and got.maps.shape == (2, 8, 8) and got.stage == "layer2"
    assert got.feature_gap < 1e-5
    head.eval()
    expected = reference_grad_cam(encoder, head, patches[rows], slide_features, rows)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got.raw, expected, rtol=0, atol=1e-5 * scale)
    one_by_one = grad_cam(encoder, head, patches[rows], slide_features=slide_features, rows=rows, batch_size=1)
    # float32 convolutions sum in another order at another batch size (oneDNN picks its blocking by shape):
    # 3e-8 of 0.013 apart here, so batching is held to the float32 tolerance of the reference comparison.
    np.testing.assert_allclose(one_by_one.raw, got.raw, rtol=0, atol=1e-5 * scale)

    whole = grad_cam(encoder, head, patches, slide_features=slide_features, rows=list(range(7)))
    alone = grad_cam(encoder, head, patches)
    np.testing.assert_allclose(alone.raw, whole.raw, rtol=0, atol=1e-5 * scale)


def planted_patches(rng: np.random.Generator) -> torch.Tensor:
    """Four noise patches with a red, green-less 8 x 8 block in quadrant q of patch q, and two plain ones."""
    x = rng.normal(0.0, 0.2, (6, 3, 32, 32)).astype(np.float32)
    for q, (qy, qx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        y0, x0 = 16 * qy + 4, 16 * qx + 4
        x[q, 0, y0 : y0 + 8, x0 : x0 + 8] += 2.0
        x[q, 1, y0 : y0 + 8, x0 : x0 + 8] -= 2.0
    return torch.from_numpy(x)


def signal_model() -> tuple[Encoder, AttentionMIL]:
    """Channel 0 detects red minus green, channel 1 is a constant; the head attends to and rewards channel 0
    and counts channel 1 against the positive class."""
    conv = nn.Conv2d(3, 2, 1)
    head = AttentionMIL(2, hidden=4)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :2, 0, 0] = torch.tensor([1.0, -1.0])
        conv.bias.copy_(torch.tensor([0.0, 0.5]))
        for p in head.parameters():
            p.zero_()
        head.fc1.weight[0, 0] = head.fc1.weight[1, 1] = 1.0
        head.fc2.weight[0, 0] = head.fc2.weight[1, 1] = 1.0
        head.attention_v.weight[0, 0] = head.attention_w.weight[0, 0] = 1.0
        head.classifier.weight[1, 0], head.classifier.weight[1, 1] = 1.0, -0.5
    stem = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU()))
    return hand_encoder([("stem", stem, 2), ("pool", nn.AvgPool2d(4), 2)]), head.eval()


def test_planted_signal_puts_the_cam_maximum_in_its_quadrant():
    encoder, head = signal_model()
    patches = planted_patches(np.random.default_rng(0))
    got = grad_cam(encoder, head, patches)
    assert got.grid == (8, 8)
    for q, (qy, qx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        y, x = np.unravel_index(np.argmax(got.maps[q]), got.grid)
        assert (y // 4, x // 4) == (qy, qx)
        quadrant = got.maps[q, 4 * qy : 4 * qy + 4, 4 * qx : 4 * qx + 4]
        assert quadrant.sum() > 0.9 * got.maps[q].sum()
        assert got.raw[q].min() < 0  # the constant channel counts against the class where there is no signal

    with torch.no_grad():
        slide_features = encoder(patches)
    in_slide = grad_cam(encoder, head, patches[[1, 3]], slide_features=slide_features, rows=[1, 3])
    np.testing.assert_allclose(in_slide.raw, got.raw[[1, 3]], rtol=0, atol=1e-6)


def test_grid_is_the_last_stage_output_of_resnet18_at_512_px():
    encoder = create_encoder("resnet18", weights="random")
    head = AttentionMIL(encoder.feature_dim)
    got = grad_cam(encoder, head, torch.randn(1, 3, 512, 512))
    assert got.grid == (16, 16) and got.maps.shape == got.raw.shape == (1, 16, 16)
    assert got.stage == "layer4" and got.maps.dtype == got.raw.dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_maps_equal_cpu_maps():
    encoder, head = signal_model()
    patches = planted_patches(np.random.default_rng(0))
    cpu = grad_cam(encoder, head, patches)
    cuda = grad_cam(encoder.cuda(), head.cuda(), patches.cuda())
    np.testing.assert_allclose(cuda.raw, cpu.raw, rtol=0, atol=1e-5 * np.abs(cpu.raw).max())


def test_bad_arguments_are_rejected():
    encoder, head = signal_model()
    patches = planted_patches(np.random.default_rng(0))[:2]
    with pytest.raises(ValueError, match="rows"):
        grad_cam(encoder, head, patches, rows=[0, 1])
    with pytest.raises(ValueError, match="rows"):
        grad_cam(encoder, head, patches, slide_features=np.zeros((4, 2)), rows=[1, 1])
    with pytest.raises(ValueError, match="slide_features"):
        grad_cam(encoder, head, patches, slide_features=np.zeros((4, 3)), rows=[0, 1])
    with pytest.raises(ValueError, match="target_class"):
        grad_cam(encoder, head, patches, target_class=2)
