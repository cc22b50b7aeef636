"""PyTorch twins of examples/resnet8.py, resnet20.py and mobilenet_tiny.py, for the side-by-side speed
table (benchmarks/cnn_epochs.py). Same layers, widths, strides and TensorFlow "same" padding (the odd
extra pad at the bottom/right, which PyTorch's symmetric padding does not do), BatchNorm with Keras's
momentum 0.99 (PyTorch momentum 0.01) and epsilon 1e-3. Inputs are NCHW; outputs are logits (the softmax
is folded into CrossEntropyLoss, as graphcnn folds it into the loss). No augmentation: the benchmark
times the networks.

    from benchmarks.torch_nets import build
    net = build("resnet8", (32, 32, 3))
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.01     # Keras momentum 0.99: moving = 0.99 * moving + 0.01 * batch
BN_EPSILON = 1e-3


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME: output ceil(size / stride); the odd extra pad goes after (bottom/right)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow "same" padding for any input size and stride."""

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, bias=True):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x):
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[2], kh, sh)
        left, right = same_padding(x.shape[3], kw, sw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def bn(channels):
    return nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)


def conv_bn(cin, cout, kernel_size=3, stride=1, act=nn.ReLU):
    """conv (no bias) -> BN -> act (None: no activation)."""
    mods = [SameConv2d(cin, cout, kernel_size, stride, bias=False), bn(cout)]
    return nn.Sequential(*mods, act()) if act else nn.Sequential(*mods)


class Residual(nn.Module):
    """relu(shortcut(x) + body(x))."""

    def __init__(self, body, shortcut=None):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x):
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(s + self.body(x))


class Head(nn.Module):
    def __init__(self, channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def resnet8(input_shape, num_classes=10):
    """examples/resnet8.py: stem 16, stacks 16/32/64, 1x1 strided projection with bias and no BN."""
    c = input_shape[-1]
    layers = [conv_bn(c, 16)]
    cin = 16
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        body = nn.Sequential(conv_bn(cin, filters, stride=stride), conv_bn(filters, filters, act=None))
        short = SameConv2d(cin, filters, 1, stride) if stride != 1 else None
        layers.append(Residual(body, short))
        cin = filters
    return nn.Sequential(*layers, Head(64, num_classes))


def resnet20(input_shape, num_classes=10):
    """examples/resnet20.py: 3 stages x 3 basic blocks, 16/32/64, option-B projection (1x1 conv + BN)."""
    c = input_shape[-1]
    layers = [conv_bn(c, 16)]
    cin = 16
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            body = nn.Sequential(conv_bn(cin, filters, stride=stride), conv_bn(filters, filters, act=None))
            short = conv_bn(cin, filters, 1, stride, act=None) if stride != 1 else None
            layers.append(Residual(body, short))
            cin = filters
    return nn.Sequential(*layers, Head(64, num_classes))


def mobilenet_tiny(input_shape, num_classes=10):
    """examples/mobilenet_tiny.py: stem 16, five depthwise-separable blocks, ReLU6."""
    c = input_shape[-1]
    layers = [conv_bn(c, 16, act=nn.ReLU6)]
    cin = 16
    for filters, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
        layers += [nn.Sequential(SameConv2d(cin, cin, 3, stride, groups=cin, bias=False), bn(cin), nn.ReLU6()),
                   conv_bn(cin, filters, 1, act=nn.ReLU6)]
        cin = filters
    return nn.Sequential(*layers, Head(cin, num_classes))


NETS = {"resnet8": resnet8, "resnet20": resnet20, "mobilenet_tiny": mobilenet_tiny}


def build(name: str, input_shape, num_classes: int = 10) -> nn.Module:
    """The PyTorch twin of examples/<name>.py for NHWC `input_shape` (H, W, C); takes NCHW batches."""
    if name not in NETS:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(NETS)}")
    return NETS[name](tuple(input_shape), num_classes)
