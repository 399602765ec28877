"""The CNN encoders of the HistoTransfer study: nine ImageNet torchvision networks and three histopathology ones.

Stages (``truncate=k`` drops the last ``k`` of the four stages after the stem; D is the kept stage's width):

* ResNet: ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` .. ``layer4``.
* DenseNet: ``stem`` (conv0, norm0, relu0, pool0), ``denseblock1`` .. ``denseblock4``; stage i > 1 starts
  with ``transition{i-1}``, so a cut falls right after ``denseblock{4-k}``. The last stage ends with norm5 and
  ReLU, as in torchvision's forward.
* EfficientNet: grouped by output stride like ResNet's layers: ``stem`` = features[0] (stride 2),
  ``stage1`` = features[1:3] (stride 4), ``stage2`` = features[3] (stride 8), ``stage3`` = features[4:6]
  (stride 16), ``stage4`` = features[6:9] (stride 32, ending with the 1x1 head convolution).

Feature widths D for truncate 0/1/2/3: resnet18, resnet34 512/256/128/64; resnet50 2048/1024/512/256;
densenet121 1024/1024/512/256; densenet169 1664/1280/512/256; efficientnet_b0 and _b1 1280/112/40/24;
efficientnet_b2 1408/120/48/24; efficientnet_b3 1536/136/48/32.

Weights. ``imagenet`` is the pre-training the paper used: torchvision's original (V1) weights, whose ImageNet
top-1 equals the paper's Table I for the ResNets and DenseNets. The paper's EfficientNets are the original
TensorFlow weights (Table I: 76.3 / 78.8 / 79.8 / 81.1), which torchvision does not ship; ``imagenet`` for them is
torchvision's V1, the nearest, and the difference is listed (``paper_top1``). Newer torchvision weights are
``imagenet-v2``. The histopathology encoders' ``pretrained`` weights are their authors' published files.
"""

from __future__ import annotations

from collections import OrderedDict

import torchvision.models as tvm
from torch import nn

from .registry import Checkpoint, Stage, WeightsOption, register

# The HistoTransfer paper's Table I ImageNet top-1 of the EfficientNet weights it used (original TensorFlow).
PAPER_EFFICIENTNET_TOP1 = {
    "efficientnet_b0": 76.3,
    "efficientnet_b1": 78.8,
    "efficientnet_b2": 79.8,
    "efficientnet_b3": 81.1,
}


def _out_channels(module: nn.Module) -> int:
    """Output channels of a torchvision block (ResNet block, MBConv, Conv2dNormActivation, Sequential)."""
    out_channels = getattr(module, "out_channels", None)
    if out_channels is not None:
        return int(out_channels)
    if isinstance(module, tvm.resnet.Bottleneck):
        return module.bn3.num_features
    if isinstance(module, tvm.resnet.BasicBlock):
        return module.bn2.num_features
    if isinstance(module, nn.Sequential):
        return _out_channels(module[-1])
    raise TypeError(f"cannot tell the output channels of {type(module).__name__}")


def resnet_stages(m: tvm.ResNet) -> list[Stage]:
    """``stem``, ``layer1`` .. ``layer4`` of a torchvision ResNet."""
    stem = nn.Sequential(OrderedDict(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool))
    stages = [Stage("stem", stem, m.bn1.num_features)]
    for i in range(1, 5):
        layer = getattr(m, f"layer{i}")
        stages.append(Stage(f"layer{i}", layer, _out_channels(layer)))
    return stages


def densenet_stages(m: tvm.DenseNet) -> list[Stage]:
    """``stem``, ``denseblock1`` .. ``denseblock4`` of a torchvision DenseNet (transitions open stages 2-4)."""
    f = m.features
    stem = nn.Sequential(OrderedDict(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0))
    stages = [Stage("stem", stem, f.norm0.num_features)]
    channels = f.norm0.num_features
    for i in range(1, 5):
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if i > 1:
            transition = getattr(f, f"transition{i - 1}")
            parts[f"transition{i - 1}"] = transition
            channels = transition.conv.out_channels
        block = getattr(f, f"denseblock{i}")
        parts[f"denseblock{i}"] = block
        channels += sum(layer.conv2.out_channels for layer in block.values())
        if i == 4:
            parts["norm5"] = f.norm5
            parts["relu5"] = nn.ReLU(inplace=True)
            channels = f.norm5.num_features
        stages.append(Stage(f"denseblock{i}", nn.Sequential(parts), channels))
    return stages


def efficientnet_stages(m: tvm.EfficientNet) -> list[Stage]:
    """``stem``, ``stage1`` .. ``stage4`` of a torchvision EfficientNet, split at strides 4, 8, 16, 32."""
    f = m.features
    groups = {"stem": [0], "stage1": [1, 2], "stage2": [3], "stage3": [4, 5], "stage4": [6, 7, 8]}
    stages = []
    for name, idx in groups.items():
        module = nn.Sequential(OrderedDict((f"features{i}", f[i]) for i in idx))
        stages.append(Stage(name, module, _out_channels(f[idx[-1]])))
    return stages


def _top1(weights: tvm.WeightsEnum) -> float:
    return float(weights.meta["_metrics"]["ImageNet-1K"]["acc@1"])


def torchvision_weights(enum: type[tvm.WeightsEnum], paper_top1: float | None = None) -> list[WeightsOption]:
    """``imagenet`` (V1, the paper's) and, where torchvision has them, ``imagenet-v2`` weights of an enum."""
    options = [
        WeightsOption(
            "imagenet",
            f"torchvision {enum.IMAGENET1K_V1}",
            torchvision=enum.IMAGENET1K_V1,
            imagenet_top1=_top1(enum.IMAGENET1K_V1),
            paper_top1=paper_top1,
        )
    ]
    if hasattr(enum, "IMAGENET1K_V2"):
        options.append(
            WeightsOption(
                "imagenet-v2",
                f"torchvision {enum.IMAGENET1K_V2}",
                torchvision=enum.IMAGENET1K_V2,
                imagenet_top1=_top1(enum.IMAGENET1K_V2),
            )
        )
    return options


for _name, _builder, _stages, _enum in [
    ("resnet18", tvm.resnet18, resnet_stages, tvm.ResNet18_Weights),
    ("resnet34", tvm.resnet34, resnet_stages, tvm.ResNet34_Weights),
    ("resnet50", tvm.resnet50, resnet_stages, tvm.ResNet50_Weights),
    ("densenet121", tvm.densenet121, densenet_stages, tvm.DenseNet121_Weights),
    ("densenet169", tvm.densenet169, densenet_stages, tvm.DenseNet169_Weights),
    ("efficientnet_b0", tvm.efficientnet_b0, efficientnet_stages, tvm.EfficientNet_B0_Weights),
    ("efficientnet_b1", tvm.efficientnet_b1, efficientnet_stages, tvm.EfficientNet_B1_Weights),
    ("efficientnet_b2", tvm.efficientnet_b2, efficientnet_stages, tvm.EfficientNet_B2_Weights),
    ("efficientnet_b3", tvm.efficientnet_b3, efficientnet_stages, tvm.EfficientNet_B3_Weights),
]:
    register(
        _name,
        stages=_stages,
        architecture=_name,
        weights=torchvision_weights(_enum, PAPER_EFFICIENTNET_TOP1.get(_name)),
        reference="torchvision.models",
    )(_builder)

CIGA = Checkpoint(
    "tenpercent_resnet18.ckpt",
    "https://github.com/ozanciga/self-supervised-histopathology/releases/tag/tenpercent",
    "Ciga et al., Self supervised contrastive learning for digital histopathology, MLWA 2022",
)
MORMONT_RESNET50 = Checkpoint(
    "resnet50-mh-best-191205-141200.pth",
    "https://github.com/waliens/multitask-dipath (README, 'Raw model files': "
    "https://dox.uliege.be/index.php/s/kvABLtVuMxW8iJy/download)",
    "Mormont et al., Multi-task pre-training of deep neural networks for digital pathology, JBHI 2021",
)
MORMONT_DENSENET121 = Checkpoint(
    "densenet121-mh-best-191205-141200.pth",
    "https://github.com/waliens/multitask-dipath (README, 'Raw model files': "
    "https://dox.uliege.be/index.php/s/G72InP4xmJvOrVp/download)",
    "Mormont et al., Multi-task pre-training of deep neural networks for digital pathology, JBHI 2021",
)


def _published(checkpoint: Checkpoint) -> list[WeightsOption]:
    return [WeightsOption("pretrained", f"published checkpoint {checkpoint.filename}", checkpoint=checkpoint)]


for _name, _builder, _stages, _arch, _ckpt in [
    ("ciga-simclr-resnet18", tvm.resnet18, resnet_stages, "resnet18", CIGA),
    ("mormont-mtl-resnet50", tvm.resnet50, resnet_stages, "resnet50", MORMONT_RESNET50),
    ("mormont-mtl-densenet121", tvm.densenet121, densenet_stages, "densenet121", MORMONT_DENSENET121),
]:
    register(
        _name,
        stages=_stages,
        architecture=_arch,
        family="histopathology",
        weights=_published(_ckpt),
        reference=_ckpt.reference,
    )(_builder)
