"""Small CNNs for the embedded CPU datasets, where a whole LIS run takes minutes.

- ``digits_cnn``: scikit-learn's 8x8 handwritten digits (1x8x8), a 2-D
  conv-BN-ReLU CNN (32, 32, max-pool, 64, 64) that reaches >= 97% test accuracy.
- ``mnist1d_cnn``: MNIST-1D (Greydanus, "Scaling Down Deep Learning", 2020),
  40-sample 1-D signals (1x40), a 1-D conv-BN-ReLU CNN (32, 32, 64, 64) of about
  29 k parameters, in the spirit of that paper's CNN baseline (~98.5% test
  accuracy after 30 epochs of SGD).

Both end in global average pooling and a Linear classifier ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from lis.models import kaiming_init, register_model


def conv_bn_relu(dim: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
    return nn.Sequential(conv(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
                         bn(out_channels), nn.ReLU())


class SmallCNN(nn.Module):
    """``features`` (conv-BN-ReLU blocks), global average pooling, Linear ``fc``."""

    def __init__(self, features: nn.Sequential, width: int, num_classes: int):
        super().__init__()
        self.features = features
        self.fc = nn.Linear(width, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 2).mean(2))


@register_model(input_shape=(1, 8, 8))
def digits_cnn(num_classes: int) -> SmallCNN:
    features = nn.Sequential(conv_bn_relu(2, 1, 32, 3), conv_bn_relu(2, 32, 32, 3), nn.MaxPool2d(2),
                             conv_bn_relu(2, 32, 64, 3), conv_bn_relu(2, 64, 64, 3))
    return SmallCNN(features, 64, num_classes)


@register_model(input_shape=(1, 40))
def mnist1d_cnn(num_classes: int) -> SmallCNN:
    # The stride-2 conv halves the sequence (40 -> 20) halfway, where the width doubles.
    features = nn.Sequential(conv_bn_relu(1, 1, 32, 5), conv_bn_relu(1, 32, 32, 5),
                             conv_bn_relu(1, 32, 64, 5, stride=2), conv_bn_relu(1, 64, 64, 3))
    return SmallCNN(features, 64, num_classes)
