"""Architectures the channel-group and pruning tests run on: (model name, per-sample input shape).

torchvision models at 64x64 to stay fast on a CPU."""

ARCHS = [
    ("resnet20", (3, 32, 32)),
    ("resnet56", (3, 32, 32)),
    ("vgg16", (3, 32, 32)),
    ("mnist1d_cnn", (1, 40)),
    ("resnet20_1d", (1, 40)),
    ("resnet56_1d", (1, 40)),
    ("torchvision:resnet18", (3, 64, 64)),
    ("torchvision:resnet50", (3, 64, 64)),
    ("torchvision:mobilenet_v2", (3, 64, 64)),
]
