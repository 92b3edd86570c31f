"""A small conv + BatchNorm CNN: the classic ``foldnorm`` target.

It covers the cases folding tools get wrong: a conv without bias, a depthwise conv, a
grouped conv, a BatchNorm1d after a linear, and frozen statistics far from (0, 1).
"""

from __future__ import annotations

import torch
from torch import nn

from models_zoo import register


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n) * 0.5)
        bn.running_var.copy_(torch.rand(n) * 2 + 0.25)
        bn.weight.copy_(torch.randn(n) * 0.5 + 1)
        bn.bias.copy_(torch.randn(n) * 0.2)


class BnCnn(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 32, 1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 64)
        self.bn3 = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _randomize_bn(m)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        x = x.mean(dim=(2, 3))
        x = torch.relu(self.bn3(self.fc(x)))
        return self.head(x)


@register("bn-cnn", "conv+BatchNorm CNN (plain, depthwise, grouped convs; BatchNorm1d after a linear)")
def bn_cnn():
    return BnCnn(), (torch.randn(2, 3, 16, 16),)
