"""A faster inference form of a DenseNet encoder: the same function, rearranged for the CPU.

torchvision's DenseNet feeds every dense layer ``conv1(relu(norm1(cat(previous features))))``. On a CPU a
third of the time goes to that concatenation and the BatchNorm and ReLU passes over ever wider inputs, not to
the convolutions (``benchmarks/bench_extract.py``). Three exact rewrites remove most of it:

1. **No concatenation.** A dense block writes its input and each layer's new channels into one preallocated
   buffer; a layer reads the first ``C_in`` channels of it.
2. **BatchNorm + ReLU in one pass, folded into the next convolution.** With a per-channel scale ``a`` and
   shift ``b``, ``relu(a*x + b) = a*(clamp(x, lo, hi) + b/a)`` (``lo = -b/a, hi = inf`` where ``a > 0``;
   ``lo = -inf, hi = -b/a`` where ``a < 0``), so the 1x1 convolution after it takes the scale ``a`` into its
   weights and the shift into its bias, and the pass over the input is a single ``clamp``. A channel with
   ``a == 0`` is the constant ``relu(b)``, which goes into the bias. The BatchNorm after ``conv1`` folds into
   it as usual.
3. **Transitions pool first.** ``avgpool(conv1x1(z)) == conv1x1(avgpool(z))`` (both are linear and the
   convolution acts on each pixel alone), so the transition's convolution runs at a quarter of the pixels.

The result equals the torchvision forward pass to float32 rounding (tested against it, with random and with
real ImageNet weights). ``forward`` gives the pooled features; ``stages`` are the encoder's stages in this form,
one module each, so that one pass can pool several stages' outputs (every truncation of the network at once).
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torchvision.models.densenet import _DenseBlock, _DenseLayer, _Transition

from ..encoders import Encoder

# A channel whose kink -b/a lies beyond this is constant: relu(a*x + b) == relu(b) for every |x| below it
# (activations are many orders smaller), and -b/a itself could overflow float32.
_FAR_KINK = 1e20


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``a * x + b`` per channel, in float64."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("only a BatchNorm with running statistics can be folded")
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - a * mean


class NormReLUConv(nn.Module):
    """``conv(relu(bn(x)))`` for a 1x1 ``conv``, as ``conv'(clamp(x, lo, hi))``; optionally average-pooled
    2x2 before the convolution (a transition) and followed by a folded BatchNorm ``after``."""

    lo: Tensor  # buffers, registered in __init__
    hi: Tensor

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d, pool: bool = False, after: nn.BatchNorm2d | None = None):
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError("only a plain 1x1 convolution can take a BatchNorm + ReLU in front of it")
        a, b = _bn_scale_shift(bn)
        zero = b.abs() >= a.abs() * _FAR_KINK  # includes a == 0
        a = torch.where(zero, torch.zeros_like(a), a)
        safe_a = torch.where(zero, torch.ones_like(a), a)
        t = -b / safe_a
        inf = torch.full_like(t, float("inf"))
        lo = torch.where(zero, torch.zeros_like(t), torch.where(a > 0, t, -inf))
        hi = torch.where(zero, torch.zeros_like(t), torch.where(a > 0, inf, t))
        const = torch.where(zero, b.clamp_min(0), b)  # relu(a*x + b) == a * clamp(x) + const
        w = conv.weight.double()[:, :, 0, 0]
        bias = w @ const + (conv.bias.double() if conv.bias is not None else 0.0)
        w = w * a
        if after is not None:
            a2, b2 = _bn_scale_shift(after)
            w, bias = w * a2[:, None], bias * a2 + b2
        self.register_buffer("lo", lo.float().view(1, -1, 1, 1))
        self.register_buffer("hi", hi.float().view(1, -1, 1, 1))
        self.conv = nn.Conv2d(w.shape[1], w.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(w[:, :, None, None])
            cast(Tensor, self.conv.bias).copy_(bias)  # a Conv2d made with its bias
        self.pool = pool

    def forward(self, x: Tensor, scratch: Tensor | None = None) -> Tensor:
        """``scratch``: storage for the clamped input (dense channels_last), reused by the caller."""
        if scratch is None:
            z = torch.clamp(x, self.lo, self.hi)
        else:
            n, c, h, w = x.shape
            z = scratch[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)
            torch.clamp(x, self.lo, self.hi, out=z)
        if self.pool:
            z = F.avg_pool2d(z, 2)
        return self.conv(z)


class DenseLayer(nn.Module):
    """One dense layer reading the first ``in_channels`` of the block buffer: the 32 (growth) new channels."""

    def __init__(self, layer: _DenseLayer):
        super().__init__()
        self.bottleneck = NormReLUConv(layer.norm1, layer.conv1, after=layer.norm2)
        self.conv2 = copy.deepcopy(layer.conv2)
        self.in_channels: int = layer.norm1.num_features

    def forward(self, buffer: Tensor, scratch: Tensor) -> Tensor:
        return self.conv2(torch.relu_(self.bottleneck(buffer[:, : self.in_channels], scratch)))


class DenseBlock(nn.Module):
    """A dense block writing into one preallocated channels_last buffer instead of concatenating; the last
    block of a whole network also applies its final BatchNorm and ReLU (``norm``), as torchvision does."""

    def __init__(self, block: _DenseBlock, transition: _Transition | None, norm: nn.Module | None = None):
        super().__init__()
        self.transition = NormReLUConv(transition.norm, transition.conv, pool=True) if transition is not None else None
        self.layers = nn.ModuleList(DenseLayer(layer) for layer in block.values())
        self.norm = copy.deepcopy(norm)
        last = cast(DenseLayer, self.layers[-1])
        self.out_channels: int = last.in_channels + last.conv2.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.transition is not None:
            x = self.transition(x)
        n, c, h, w = x.shape
        buffer = torch.empty(
            (n, self.out_channels, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )
        buffer[:, :c].copy_(x)
        # One scratch for every layer's clamped input: fresh large tensors cost page faults, which on a
        # small CPU machine take as long as the clamp itself.
        scratch = torch.empty(buffer.numel(), dtype=x.dtype, device=x.device)
        for layer in self.layers:
            new = layer(buffer, scratch)
            buffer[:, layer.in_channels : layer.in_channels + new.shape[1]].copy_(new)
        return buffer if self.norm is None else torch.relu_(self.norm(buffer))


class DenseNetInference(nn.Module):
    """``Encoder.forward`` of a DenseNet encoder (any truncation), rearranged as described above. Shares no
    parameters with ``encoder``, which stays as it was."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        stages = list(encoder.body.children())
        blocks: list[nn.Module] = [fx_fuse(stages[0])]  # the stem: conv0 + norm0 folded, relu0, pool0
        for i, stage in enumerate(stages[1:], start=1):
            parts = dict(stage.named_children())
            blocks.append(DenseBlock(parts[f"denseblock{i}"], parts.get(f"transition{i - 1}"), parts.get("norm5")))
        self.stages = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(x), 1), 1)


def is_densenet_encoder(encoder: nn.Module) -> bool:
    """True for an ``Encoder`` whose stages after the stem are torchvision dense blocks."""
    body = getattr(encoder, "body", None)
    if body is None or len(body) < 2:
        return False
    return all(any(isinstance(m, _DenseBlock) for m in stage.children()) for stage in list(body)[1:])
