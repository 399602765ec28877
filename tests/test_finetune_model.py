"""The end-to-end network: frozen stages, BatchNorm in eval mode, gradient checkpointing changes nothing and
recomputes a CNN stage as a whole."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import histotransfer.finetune.model as ft_model
from histotransfer.encoders import create_encoder
from histotransfer.errors import HistotransferError
from histotransfer.finetune.model import EndToEndMIL
from histotransfer.mil import AttentionMIL


@pytest.fixture
def parts():
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", "random", 2)  # stem, layer1, layer2: 128-d
    head = AttentionMIL(128)
    x = torch.randn(7, 3, 32, 32)
    return encoder, head, x


def step(model: EndToEndMIL, x: torch.Tensor, lr: float = 1e-2) -> torch.Tensor:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    logits, _scores = model(x, [4, 3])
    loss = F.cross_entropy(logits, torch.tensor([1, 0]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_forward_matches_encoder_and_head(parts):
    encoder, head, x = parts
    model = EndToEndMIL(encoder, head).eval()
    with torch.no_grad():
        logits, scores = model(x, [4, 3])
        feats = encoder(x)
        ref0, s0 = head(feats[:4])
        ref1, s1 = head(feats[4:])
    torch.testing.assert_close(logits, torch.cat([ref0, ref1]))
    torch.testing.assert_close(scores[0], s0)
    torch.testing.assert_close(scores[1], s1)


def test_frozen_stages_and_batchnorm_statistics_do_not_move(parts):
    encoder, head, x = parts
    before = copy.deepcopy(encoder.state_dict())
    model = EndToEndMIL(encoder, head, freeze_stages=1)
    step(model, x)
    assert all(m.training is False for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    after = encoder.state_dict()
    for key, value in before.items():
        if key.startswith(("body.stem", "body.layer1")) or "running_" in key or "num_batches" in key:
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["body.layer2.0.conv1.weight"], before["body.layer2.0.conv1.weight"])
    assert not torch.equal(after["body.layer2.0.bn1.weight"], before["body.layer2.0.bn1.weight"])  # affine trains


def test_gradient_checkpointing_gives_the_same_step(parts):
    encoder, head, x = parts
    plain = EndToEndMIL(copy.deepcopy(encoder), copy.deepcopy(head))
    ckpt = EndToEndMIL(copy.deepcopy(encoder), copy.deepcopy(head), checkpointing=True)
    loss_a, loss_b = step(plain, x), step(ckpt, x)
    torch.testing.assert_close(loss_a, loss_b)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_cnn_stages_are_recomputed_whole(parts, monkeypatch):
    """A CNN stage (a sequence of residual blocks on (B, C, H, W) maps) is one checkpointed unit, frozen
    stages none."""
    encoder, head, x = parts
    units = []

    def recording(fn, *args, **kwargs):
        units.append(fn)
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(ft_model, "checkpoint", recording)
    step(EndToEndMIL(encoder, head, freeze_stages=1, checkpointing=True), x)
    assert units == [encoder.body.layer2]


def test_freeze_stages_out_of_range(parts):
    encoder, head, _ = parts
    with pytest.raises(HistotransferError, match="has 2 stages after the stem"):
        EndToEndMIL(encoder, head, freeze_stages=3)
