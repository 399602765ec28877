"""The rearranged DenseNet used for extraction computes the torchvision forward pass, to float32 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from histotransfer.encoders import create_encoder
from histotransfer.features.densenet_inference import DenseNetInference, NormReLUConv, is_densenet_encoder
from histotransfer.features.extract import BatchEncoder, inference_model


def _randomise_batchnorms(model: nn.Module, seed: int) -> None:
    """Trained-looking BatchNorms, including the awkward cases: negative, zero and tiny scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.05)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                m.weight[:2] = 0.0
                m.weight[2] = 1e-9
                m.weight[3] = -1e-9


@pytest.mark.parametrize(
    "name,truncate",
    [("densenet121", 0), ("densenet121", 1), ("densenet121", 2), ("densenet121", 3), ("densenet169", 0)],
)
def test_equals_torchvision_forward(name, truncate, one_thread):
    encoder = create_encoder(name, weights="random", truncate=truncate).eval()
    _randomise_batchnorms(encoder, seed=truncate)
    assert is_densenet_encoder(encoder)
    fast = DenseNetInference(encoder).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))  # odd sizes: 3x2 at the end
    with torch.inference_mode():
        got = fast(x.contiguous(memory_format=torch.channels_last)).double()
        want = encoder.double()(x.double())
    assert got.shape == (2, encoder.feature_dim)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-6 * scale


def test_norm_relu_conv_is_exact_per_channel():
    """The clamp form of relu(a*x + b) for positive, negative, zero and tiny a, pooled and not."""
    bn = nn.BatchNorm2d(8).eval()
    conv = nn.Conv2d(8, 4, 1, bias=True)
    with torch.no_grad():  # the last three: kinks at -b/a of about 3e34, -1e34 and 0 with a tiny a
        bn.weight.copy_(torch.tensor([2.0, -3.0, 0.0, 1e-35, -0.5, 1.0, 1e-25, -1e-25]))
        bn.bias.copy_(torch.tensor([0.5, 0.2, 0.7, -0.3, -1.0, 0.0, -3e9, -1e9]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 1.0, -1.0, 0.0, 0.0]))
        bn.running_var.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0, 0.1, 3.0, 1.0, 1.0]))
    x = torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        for pool in (False, True):
            want = conv(F.relu(bn(x)))
            if pool:
                want = F.avg_pool2d(want, 2)
            got = NormReLUConv(bn, conv, pool=pool)(x)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_only_densenets_are_rearranged():
    dense = create_encoder("densenet121", weights="random", truncate=2)
    res = create_encoder("resnet18", weights="random", truncate=2)
    assert isinstance(inference_model(dense.eval()), DenseNetInference)
    assert not is_densenet_encoder(res)
    assert not isinstance(inference_model(res.eval()), DenseNetInference)
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    encode = BatchEncoder(res, torch.device("cpu"), "fp32")
    assert encode(pixels).shape == (2, res.feature_dim)


def test_leaves_the_encoder_untouched():
    encoder = create_encoder("densenet121", weights="random", truncate=2).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    fast = DenseNetInference(encoder).to(torch.float64, memory_format=torch.channels_last)
    assert all(p.dtype == torch.float64 for p in fast.parameters())
    after = encoder.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
