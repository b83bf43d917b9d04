"""Plain ViT image encoder of EfficientSAM (ViT-Ti / ViT-S) with its convolutional neck.

Parameter names and shapes follow the EfficientSAM checkpoints (``image_encoder.*``):
``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``
and ``neck.{0,1,2,3}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_esam.models.common import LayerNorm2d


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) -> (B, C, H/p, W/p)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ViTAttention(nn.Module):
    """Global multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTMlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """ViT encoder: 1024x1024 image -> (B, neck_dim, 64, 64) embedding.

    The pretraining position embedding (class token + 14x14 grid) is bicubic-interpolated to
    the 64x64 patch grid; the result is cached until ``pos_embed`` changes (load, ``.to()``).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        neck_dim: int = 256,
        pretrain_grid: int = 14,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.pretrain_grid = pretrain_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain_grid * pretrain_grid + 1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(ViTBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(neck_dim),
            nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(neck_dim),
        )
        self._pos_cache: tuple[tuple, Tensor] | None = None

    def _interpolated_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embedding for an h x w patch grid, shape (1, h, w, C)."""
        p = self.pos_embed
        try:
            key = (h, w, p.data_ptr(), p._version, p.dtype, p.device)
        except RuntimeError:  # inference tensors have no version counter
            key = None
        cacheable = key is not None and not (torch.is_grad_enabled() and p.requires_grad)
        if cacheable and self._pos_cache is not None and self._pos_cache[0] == key:
            return self._pos_cache[1]
        g = self.pretrain_grid
        grid = p[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if (g, g) != (h, w):
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = grid.permute(0, 2, 3, 1)
        if cacheable:
            self._pos_cache = (key, pos)
        return pos

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected a {self.img_size}x{self.img_size} input, got {x.shape}")
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        b, h, w, c = x.shape
        x = (x + self._interpolated_pos_embed(h, w)).reshape(b, h * w, c)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.view(b, h, w, c).permute(0, 3, 1, 2))
