"""ResNet-18, CIFAR variant (the lab's model).

3x3 stem with stride 1 and no max-pool (32x32 inputs are already small), four stages of two
BasicBlocks at 64/128/256/512 channels, 1x1-conv+BN shortcuts where the shape changes, global
average pool, Linear(512, 10). All convolutions have bias=False because a norm layer follows.
Parameter names follow the widely used reference code (conv1, bn1, layer1..4, shortcut, linear) so
its checkpoints load. `norm="none"` (lab C7) replaces every BatchNorm, shortcut ones included, with
Identity; the convolutions keep bias=False so the parameter count drops by exactly the BN affine
parameters (11,173,962 -> 11,164,362).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                _norm(norm, planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int = 10, norm: str = "batch") -> None:
        super().__init__()
        self.norm = norm
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        widths_strides = ((64, 1), (128, 2), (256, 2), (512, 2))
        stages = [self._stage(w, n, s, norm) for (w, s), n in zip(widths_strides, blocks_per_stage)]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, norm))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # At 32x32 input the last stage is 4x4, so this equals the reference avg_pool2d(out, 4).
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, norm: str = "batch") -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, norm=norm)
