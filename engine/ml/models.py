"""Classifier architectures. Layer names follow the reference implementations so that their
state dicts import directly: ``resnet18`` and ``vgg11-bn`` follow kuangliu/pytorch-cifar (the
checkpoints the MESA paper started from), ``preact-resnet18`` follows BackdoorBench.

Every model takes any class count, 1 or 3 channels and 28 or 32 pixel images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError

# ---------------------------------------------------------------------------------------------
# ResNet-18, CIFAR variant (3x3 stem, no max-pool)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(out, 4) at 32 px
        return self.linear(out)


# ---------------------------------------------------------------------------------------------
# PreAct-ResNet-18 (BackdoorBench's default)


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


# ---------------------------------------------------------------------------------------------
# VGG-11 with batch norm


class VGG(nn.Module):
    CFG_11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in self.CFG_11:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [
                    nn.Conv2d(c, int(v), 3, padding=1),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(True),
                ]
                c = int(v)
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ---------------------------------------------------------------------------------------------
# A small fast network for CPU work (airbench-like: conv, pool, BN, activation). ReLU rather than
# airbench's GELU: a quarter faster per step on a CPU, where these element-wise passes dominate.


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling with stride 2, as ``F.max_pool2d(x, 2)``.

    Where no gradient will flow back (evaluation) on a CPU, the maximum of the four strided
    quarters: the same values, 3x faster on a channels_last bf16 batch, because max_pool2d also
    computes the argmax indices a backward pass would need. With autograd, max_pool2d itself, whose
    backward kernel beats any composite of strided views.
    """
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return F.max_pool2d(x, 2)
    h, w = x.shape[-2] - x.shape[-2] % 2, x.shape[-1] - x.shape[-1] % 2  # floor, as max_pool2d
    top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
    return torch.maximum(top, torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


torch.fx.wrap("max_pool2")  # one opaque node for torch.fx (fold_batchnorm traces these models)


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out, momentum=0.4)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, momentum=0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(max_pool2(self.conv1(x))), inplace=True)
        return F.relu(self.norm2(self.conv2(x)), inplace=True)


class SmallNet(nn.Module):
    """0.29 M parameters at the default widths; mid-80s on CIFAR-10 in minutes on a CPU."""

    def __init__(
        self, num_classes: int, in_channels: int, widths: tuple[int, int, int] = (32, 64, 128)
    ):
        super().__init__()
        stem = widths[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem, momentum=0.4),
            nn.ReLU(inplace=True),
        )
        self.layer1 = ConvGroup(stem, widths[0])
        self.layer2 = ConvGroup(widths[0], widths[1])
        self.layer3 = ConvGroup(widths[1], widths[2])
        self.linear = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = 1 / 9  # logit temperature as in airbench

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.linear(x) * self.scale


ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": lambda n, c: ResNet([2, 2, 2, 2], n, c),
    "preact-resnet18": PreActResNet18,
    "vgg11-bn": VGG,
    "small": lambda n, c: SmallNet(n, c, (32, 64, 128)),
    "small-wide": lambda n, c: SmallNet(n, c, (64, 128, 256)),
}


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise UserError(f"architecture '{arch}' is unknown; use one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise UserError(f"num_classes {num_classes} is too small; a classifier needs at least 2")
    if in_channels not in (1, 3):
        raise UserError(f"in_channels {in_channels} is unsupported; use 1 (grey) or 3 (RGB)")
    return ARCHITECTURES[arch](num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with each BatchNorm folded into the convolution before it.

    For a frozen model (a MESA search back-propagates only into the input): the same function up
    to float rounding, with one operation fewer per layer each way; about 15 % off a ResNet-18
    forward and input-gradient pass on a CPU. A model torch.fx cannot trace is returned as it is
    (in eval mode): slower, never different."""
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        return fuse(model)
    except Exception:  # tracing refused (data-dependent control flow): keep the model unfused
        return model


def stem_modules(model: nn.Module) -> list[nn.Module]:
    """The model's first convolution and, when the layer registered next beside it is a BatchNorm
    of its outputs (``small``, ``resnet18``, ``vgg11-bn``), that BatchNorm: the layers a fixed
    stem freezes, after which no gradient needs to reach the full-resolution input layers."""
    named = list(model.named_modules())
    for i, (name, module) in enumerate(named):
        if isinstance(module, nn.Conv2d):
            if i + 1 < len(named):
                after_name, after = named[i + 1]
                if (
                    isinstance(after, nn.BatchNorm2d)
                    and after.num_features == module.out_channels
                    and after_name.rpartition(".")[0] == name.rpartition(".")[0]
                ):
                    return [module, after]
            return [module]
    return []


def whiten_first_conv_(
    model: nn.Module, images: torch.Tensor, eps: float = 5e-4, chunk: int = 256
) -> nn.Conv2d:
    """Set the filters of ``model``'s first convolution to the PCA whitening of the patches it
    sees in ``images`` (normalised, N x C x H x W), as airbench's patch-whitening stem does.

    Filter pair ``i`` is the i-th principal component of the k x k patches divided by the square
    root of its variance (plus ``eps``), and its negative (a ReLU after the convolution keeps both
    signs). The top ``min(filters // 2, C * k * k)`` components are written; any filter beyond
    them keeps its initial value. Returns the convolution (the caller may freeze it)."""
    conv = (stem_modules(model) or [None])[0]
    if conv is None or conv.groups != 1:
        raise ValueError("whitening needs a model whose first layer is a dense convolution")
    filters, channels, kh, kw = conv.weight.shape
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f"images of shape {tuple(images.shape)} do not fit {channels} channels")
    dims = channels * kh * kw
    total = torch.zeros(dims, dtype=torch.float64)
    products = torch.zeros(dims, dims, dtype=torch.float64)
    count = 0
    for part in images.split(chunk):  # chunked: the patches of 5,000 images would be 1 GB
        patches = F.unfold(part.float().cpu(), (kh, kw), dilation=conv.dilation)
        patches = patches.transpose(1, 2).reshape(-1, dims).double()
        total += patches.sum(0)
        products += patches.T @ patches
        count += patches.shape[0]
    if count < 2:
        raise ValueError("whitening needs at least two patches")
    mean = total / count
    covariance = (products - count * torch.outer(mean, mean)) / (count - 1)
    variances, components = torch.linalg.eigh(covariance)  # ascending
    pairs = min(filters // 2, dims)
    top = components.flip(1)[:, :pairs] / torch.sqrt(variances.flip(0)[:pairs] + eps)
    weight = torch.cat([top.T, -top.T]).reshape(2 * pairs, channels, kh, kw)
    with torch.no_grad():
        conv.weight[: 2 * pairs].copy_(weight.to(conv.weight.dtype))
    return conv
