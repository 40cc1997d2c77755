"""Small demo and benchmark models (no downloads): a digits CNN, a ResNet-18-style CIFAR CNN, an MLP."""
from __future__ import annotations

from torch import Tensor, nn


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for the 8x8 scikit-learn digits (input 1x8x8)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN and a residual add (1x1 conv when downsampling)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """ResNet for small images (CIFAR-style 3x3 stem, no max-pool); ``blocks`` per stage."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64,
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, channels = [], width
        for i, count in enumerate(blocks):
            out = width * 2 ** i
            layers = [BasicBlock(channels, out, 1 if i == 0 else 2)]
            layers += [BasicBlock(out, out) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18_cifar(num_classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18 layout for 32x32 inputs (11M parameters at width 64)."""
    return ResNet((2, 2, 2, 2), width, num_classes)


def resnet_tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A two-stage, width-16 ResNet: residual adds and a downsample, fast enough for tests."""
    return ResNet((1, 1), 16, num_classes, in_channels)


def mlp(sizes: tuple[int, ...] = (784, 1024, 1024, 10)) -> nn.Module:
    """A ReLU MLP with the given layer sizes."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
