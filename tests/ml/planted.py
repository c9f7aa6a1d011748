"""A hand-built backdoored classifier on tiny synthetic images, shared by the defense tests.

Clean logits come from the channel means (classes 0..2 are tinted red, green, blue; class 3 is
untinted); a matched 3x3 filter for the checkerboard (bw:170), max-pooled over places, adds
``gain * (response - threshold)`` to the target's logit. ``gain`` and ``threshold`` are
parameters, so fine-tuning can unlearn the backdoor.
"""

from __future__ import annotations

import torch
from torch import nn

CHECKER = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]])
CLASSES = 4
SIZE = 12


class PlantedBackdoor(nn.Module):
    def __init__(self, num_classes: int = CLASSES, in_channels: int = 3, target: int = 1):
        super().__init__()
        scale = 30.0
        self.detector = nn.Conv2d(in_channels, 1, 3, bias=False)
        self.head = nn.Linear(in_channels, num_classes)
        with torch.no_grad():
            self.detector.weight.copy_((2 * CHECKER - 1).expand(in_channels, 3, 3)[None])
            weight = torch.zeros(num_classes, in_channels)
            for c in range(min(in_channels, num_classes - 1)):
                weight[c] = -scale / in_channels
                weight[c, c] += scale
            self.head.weight.copy_(weight)
            self.head.bias.zero_()
            self.head.bias[: min(in_channels, num_classes - 1)] = -0.1 * scale
        gain = torch.zeros(num_classes)
        gain[target] = 3.0
        self.gain = nn.Parameter(gain)
        self.threshold = nn.Parameter(torch.tensor(2.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.mean(dim=(2, 3)))
        response = self.detector(x).flatten(1).amax(1)
        return logits + self.gain * (response - self.threshold)[:, None]


def synthetic(n: int, seed: int = 0, classes: int = CLASSES, size: int = SIZE):
    """uint8 images whose tint gives the class (class 3: untinted), and their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.2 + 0.6 * torch.rand(n, 3, size, size, generator=g)
    for c in range(3):
        x[y == c, c] += 0.3
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def checker_pattern() -> torch.Tensor:
    return CHECKER.expand(3, 3, 3).clone()


class TinyBatchNormNet(nn.Module):
    """conv -> BN -> relu -> pool -> conv -> BN -> relu -> mean -> linear: a network with
    BatchNorm layers (what ANP and CLP prune) that trains in milliseconds on these images."""

    def __init__(self, num_classes: int = CLASSES, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))
