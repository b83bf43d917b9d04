"""``Compose``, ``ToTensor`` and ``Normalize``: what ``EfficientViTSam.__init__`` builds."""

from __future__ import annotations

import numpy as np
import torch


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    """(H, W, C) uint8 array -> (C, H, W) float32 in 0..1."""

    def __call__(self, x) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float().div(255)


class Normalize:
    """``(x - mean) / std`` per channel, float32."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
