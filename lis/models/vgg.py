"""VGG-16 for CIFAR: Simonyan and Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015, with BatchNorm after every conv.

The CIFAR variant of the pruning literature (e.g. Li et al., "Pruning Filters
for Efficient ConvNets", ICLR 2017): the 13 conv layers of configuration D,
five 2x2 max-pools that take 32x32 down to 1x1, and a single Linear(512,
num_classes) instead of the three ImageNet FC layers: 14.7 M parameters and
313 M multiply-accumulates on 3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from lis.models import kaiming_init, register_model

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg: tuple, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model(input_shape=(3, 32, 32))
def vgg16(num_classes: int) -> VGG:
    return VGG(VGG16_CFG, num_classes)
