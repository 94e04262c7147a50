"""Pre-activation ResNets (the ResIST model family), as plain nn.Modules.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016: BN -> ReLU -> conv
inside each block, identity shortcut added after the last conv. Pre-activation keeps the input
distribution of a block stable when blocks before it are dropped, which is what ResIST relies on.
Nothing here knows about ResIST: resist_mpi.blocks finds and switches the blocks; resist_mpi.strategies.store stores them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    """Basic pre-activation block: two 3x3 convs."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        """The residual branch after the block's first BN-ReLU."""
        return self.conv2(F.relu(self.bn2(self.conv1(out))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        return shortcut + self.residual(out)


class PreActBottleneck(PreActBlock):
    """Bottleneck pre-activation block: 1x1 -> 3x3 -> 1x1 convs, 4x expansion."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        nn.Module.__init__(self)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def residual(self, out: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return self.conv3(F.relu(self.bn3(out)))


def _shortcut(in_planes: int, out_planes: int, stride: int):
    if stride == 1 and in_planes == out_planes:
        return None  # identity
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False))


class PreActResNet(nn.Module):
    """A pre-activation ResNet: stem, stages of blocks, BN-ReLU, global average pooling, linear head.

    Args:
        block: PreActBlock or PreActBottleneck.
        num_blocks: blocks per stage, e.g. [3, 4, 23, 3] for ResNet-101 (basic, CIFAR-style).
        num_classes: outputs of the linear head.
        width: channels of stage 1 (64 in the paper; stages double it).
        stem: "cifar" (3x3 conv, for 32x32 inputs) or "imagenet" (7x7/2 conv + 3x3/2 max-pool).
    """

    def __init__(self, block, num_blocks: Sequence[int], num_classes: int = 10, width: int = 64,
                 stem: str = "cifar"):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', not {stem!r}")
        self.arch = dict(block=block.__name__, num_blocks=list(num_blocks), num_classes=num_classes,
                         width=width, stem=stem)
        if stem == "cifar":
            self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.in_planes = width
        self.stages = nn.ModuleList(
            self._make_stage(block, width * 2 ** i, n, 1 if i == 0 else 2) for i, n in enumerate(num_blocks))
        final = self.in_planes
        self.bn = nn.BatchNorm2d(final)
        self.linear = nn.Linear(final, num_classes)
        del self.in_planes

    def _make_stage(self, block, planes: int, n: int, stride: int) -> nn.ModuleList:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            for blk in stage:
                x = blk(x)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)
