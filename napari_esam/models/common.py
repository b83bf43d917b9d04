"""Building blocks shared by the EfficientSAM and MobileSAM decoders and necks.

Parameter names follow the official checkpoints (``q_proj``/``k_proj``/``v_proj``/``out_proj``,
``positional_encoding_gaussian_matrix``) so that state dicts load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def host_to_device(x: Tensor, device: torch.device) -> Tensor:
    """Move a CPU tensor to ``device``; to CUDA through pinned memory, asynchronously (the
    copy overlaps host work until the next synchronising use). CPU: returned as is."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Attention(nn.Module):
    """Multi-head attention with optional down-projection of the embedding (SAM decoders).

    Uses :func:`torch.nn.functional.scaled_dot_product_attention`.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention over already projected q, k, v of shape (B, N, internal_dim)."""
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of normalised (x, y) coordinates."""

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        """coords in [0, 1], shape (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, h: int, w: int) -> Tensor:
        """Encoding of every cell centre of an h x w grid, shape (C, h, w)."""
        m = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
        x = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Encode pixel coordinates (x, y) in a frame of ``image_size`` = (h, w)."""
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._pe_encoding(coords.to(self.positional_encoding_gaussian_matrix.dtype))
