"""Generate the small ONNX classifiers tests/test_onnx_import.py checks (random weights, no downloads).

    python tests/data/onnx/make_models.py      # needs torch; writes *.onnx beside this file

The .onnx files are committed, so CI needs no torch. Batch-norm statistics are randomized so that the
folded scale and shift are not the identity. Each network exercises a family of CNN building blocks:
residual adds, depthwise and grouped convolutions, concat branches, pooling with padding, the
Shape -> Gather -> Concat -> Reshape chain of x.view(x.size(0), -1).
"""
import os

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def bn(c):
    return nn.BatchNorm2d(c)


class ResNetTiny(nn.Module):
    """Two residual blocks (one with a strided 1x1 projection), global average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, padding=1, bias=False), bn(8))
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), bn(16), nn.ReLU(),
                                nn.Conv2d(16, 16, 3, padding=1, bias=False), bn(16))
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), bn(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.proj(x) + self.b2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MobileNetTiny(nn.Module):
    """Depthwise-separable blocks (depthwise 3x3 + pointwise 1x1, one with depth multiplier 2), an
    inverted residual, global average pool, softmax."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), bn(8), nn.ReLU())
        self.dw1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), bn(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 1, bias=False), bn(16), nn.ReLU())
        self.dw2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=16, bias=False), bn(32),
                                 nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False), bn(16))
        self.inv = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                                 nn.ReLU(), nn.Conv2d(32, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.dw2(self.dw1(self.stem(x)))
        x = x + self.inv(x)
        return torch.softmax(self.fc(x.mean((2, 3))), dim=1)


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.s = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.s(x))
        return torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)


class SqueezeNetTiny(nn.Module):
    """Fire modules (squeeze 1x1, expand 1x1 and 3x3 concatenated), max pool with ceil-free sizes,
    a 1x1 conv classifier and global average pool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.f1, self.f2 = Fire(16, 4, 8), Fire(16, 4, 8)
        self.f3 = Fire(16, 8, 16)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, stride=2)
        x = self.f2(self.f1(x))
        x = self.f3(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.head(x)), 1), 1)


class ResNeXtTiny(nn.Module):
    """Grouped 3x3 convolutions (groups=4) in a bottleneck with a residual, LeakyReLU, avg pool with
    count_include_pad, and a Flatten -> Linear head on a 4x4 feature map (the flatten of a channels-last
    tensor: the importer permutes the Linear's rows instead of transposing)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), bn(16), nn.LeakyReLU(0.1))
        self.block = nn.Sequential(nn.Conv2d(16, 16, 1), bn(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, groups=4), bn(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 1), bn(16))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True)
        self.pool2 = nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = nn.functional.leaky_relu(x + self.block(x), 0.1)
        x = self.pool2(self.pool(x))
        return self.fc(x.view(x.size(0), -1))


class LeNetDilated(nn.Module):
    """Dilated and asymmetric-stride convs, max pool with padding, tanh/sigmoid, two Linear layers
    after a Flatten, log-softmax."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, dilation=2, padding=2)
        self.c2 = nn.Conv2d(6, 12, (3, 5), stride=(1, 2), padding=(1, 2))
        self.fc1 = nn.Linear(12 * 8 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = nn.functional.max_pool2d(torch.sigmoid(self.c2(x)), 3, stride=2, padding=1)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return torch.log_softmax(self.fc2(x), dim=1)


MODELS = {"resnet_tiny": ResNetTiny, "mobilenet_tiny": MobileNetTiny, "squeezenet_tiny": SqueezeNetTiny,
          "resnext_tiny": ResNeXtTiny, "lenet_dilated": LeNetDilated}
INPUT_SHAPE = (3, 16, 16)
OPSETS = {"resnet_tiny": 17, "mobilenet_tiny": 13, "squeezenet_tiny": 11, "resnext_tiny": 17, "lenet_dilated": 9}


def main():
    torch.manual_seed(0)
    for name, cls in MODELS.items():
        m = cls().eval()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, *INPUT_SHAPE)
        path = os.path.join(HERE, f"{name}.onnx")
        torch.onnx.export(m, (x,), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSETS[name], dynamo=False, do_constant_folding=False)
        print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
