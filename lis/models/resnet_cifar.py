"""CIFAR ResNets: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2.

A 3x3 stem with 16 channels, then three stages of n = (depth - 2) / 6 BasicBlocks
with 16, 32 and 64 channels (the second and third start with stride 2), global
average pooling and a Linear classifier: ResNet-56 has 0.85 M parameters and
125 M multiply-accumulates on 3x32x32.

Downsampling shortcuts are 1x1 conv + BatchNorm (the paper's option B), as the
pruning literature uses them, so Torch-Pruning's ``DependencyGraph`` can trace
the channel groups that the residual adds tie together; the paper's option A
(zero-padded identity) is not traceable.
"""

from __future__ import annotations

import torch
from torch import nn

from lis.models import kaiming_init, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; the first conv carries the stride."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        assert (depth - 2) % 6 == 0, f"CIFAR ResNet depth must be 6n + 2, got {depth}"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, channels, stride)]
        blocks += [BasicBlock(channels, channels, 1) for _ in range(n - 1)]
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
