"""The building blocks of a YOLOv5-style backbone and neck.

Attribute names (`conv`, `bn`, `cv1`, `cv2`, `cv3`, `m`) are part of the checkpoint format:
they give parameter keys like `model.2.m.0.cv1.conv.weight`, the layout YOLOv5 v6+
checkpoints use, so their weights load into these modules unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# YOLOv5 trains its BatchNorm layers with these instead of PyTorch's defaults (1e-5, 0.1);
# imported weights were fitted with them.
BATCH_NORM_EPS = 1e-3
BATCH_NORM_MOMENTUM = 0.03


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps the spatial size for stride 1 (and halves it exactly for stride 2)."""
    return (dilation * (kernel_size - 1) + 1) // 2


class Conv(nn.Module):
    """Conv2d without bias, then BatchNorm, then SiLU.

    Argument order follows YOLOv5's model YAMLs: `[out_channels, kernel, stride, padding,
    groups, dilation, activation]` after the input channels the parser fills in.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = same_padding(kernel_size, dilation)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            groups=groups,
            dilation=dilation,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)
        self.act = nn.SiLU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 convolution, with a residual connection when the shapes allow it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(hidden, out_channels, 3, 1, groups=groups)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convolutions: a stack of bottlenecks on one half of the channels,
    a plain 1x1 projection on the other, concatenated and fused by a final 1x1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        repeats: int = 1,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(in_channels, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, out_channels, 1, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, groups, expansion=1.0) for _ in range(repeats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained max-pools of one kernel size see the
    same receptive fields as parallel pools of sizes k, 2k-1 and 3k-2, at a third of the cost."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = Conv(in_channels, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, out_channels, 1, 1)
        self.m = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        pooled_once = self.m(x)
        pooled_twice = self.m(pooled_once)
        return self.cv2(torch.cat((x, pooled_once, pooled_twice, self.m(pooled_twice)), dim=1))


class Concat(nn.Module):
    """Concatenate the outputs of several earlier layers along one dimension."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.dimension = dimension

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(inputs, dim=self.dimension)
