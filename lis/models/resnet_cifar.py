"""CIFAR ResNets: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2.

A 3x3 stem with 16 channels, then three stages of n = (depth - 2) / 6 BasicBlocks
with 16, 32 and 64 channels (the second and third start with stride 2), global
average pooling and a Linear classifier: ResNet-56 has 0.85 M parameters and
125 M multiply-accumulates on 3x32x32.

Downsampling shortcuts are 1x1 conv + BatchNorm (the paper's option B), as the
pruning literature uses them, so Torch-Pruning's ``DependencyGraph`` can trace
the channel groups that the residual adds tie together; the paper's option A
(zero-padded identity) is not traceable.

``resnet20_1d|32_1d|56_1d`` are the same networks in one dimension (Conv1d,
kernel 3, BatchNorm1d) for 1-D signals such as MNIST-1D (1x40): the embedded
analogue of ResNet-56 on CIFAR-10, with the same depth and channel groups.
"""

from __future__ import annotations

import torch
from torch import nn

from lis.models import kaiming_init, register_model


def _layers(dim: int) -> tuple[type, type]:
    """The conv and BatchNorm classes of a ``dim``-dimensional (1 or 2) network."""
    return (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)


class BasicBlock(nn.Module):
    """Two conv-BN layers (kernel 3x3, or 3 with ``dim=1``) and a residual add; the first conv carries the stride."""

    def __init__(self, in_channels: int, channels: int, stride: int, dim: int = 2):
        super().__init__()
        conv, bn = _layers(dim)
        self.conv1 = conv(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = bn(channels)
        self.conv2 = conv(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = bn(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(conv(in_channels, channels, 1, stride, bias=False), bn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + identity)


class ResNet(nn.Module):
    """``dim=2``: on ``in_channels`` x H x W images; ``dim=1``: on ``in_channels`` x L signals."""

    def __init__(self, depth: int, num_classes: int, dim: int = 2, in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, f"CIFAR ResNet depth must be 6n + 2, got {depth}"
        n = (depth - 2) // 6
        conv, bn = _layers(dim)
        self.conv1 = conv(in_channels, 16, 3, 1, padding=1, bias=False)
        self.bn1 = bn(16)
        self.layer1 = self._stage(16, 16, n, 1, dim)
        self.layer2 = self._stage(16, 32, n, 2, dim)
        self.layer3 = self._stage(32, 64, n, 2, dim)
        self.pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, n: int, stride: int, dim: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, channels, stride, dim)]
        blocks += [BasicBlock(channels, channels, 1, dim) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(input_shape=(3, 32, 32))
def resnet20(num_classes: int) -> ResNet:
    return ResNet(20, num_classes)


@register_model(input_shape=(3, 32, 32))
def resnet32(num_classes: int) -> ResNet:
    return ResNet(32, num_classes)


@register_model(input_shape=(3, 32, 32))
def resnet56(num_classes: int) -> ResNet:
    return ResNet(56, num_classes)


@register_model(input_shape=(3, 32, 32))
def resnet110(num_classes: int) -> ResNet:
    return ResNet(110, num_classes)


@register_model(input_shape=(1, 40))
def resnet20_1d(num_classes: int) -> ResNet:
    return ResNet(20, num_classes, dim=1, in_channels=1)


@register_model(input_shape=(1, 40))
def resnet32_1d(num_classes: int) -> ResNet:
    return ResNet(32, num_classes, dim=1, in_channels=1)


@register_model(input_shape=(1, 40))
def resnet56_1d(num_classes: int) -> ResNet:
    return ResNet(56, num_classes, dim=1, in_channels=1)
