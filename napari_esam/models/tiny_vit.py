"""TinyViT-5M image encoder of MobileSAM (``vit_t``), with the SAM neck.

Module and parameter names follow the MobileSAM checkpoint format so that its state dict
(``image_encoder.*``) loads with ``strict=True``, including the unused classification head
(``norm_head``, ``head``). Behaviour follows ``shared/conformance/README.md``: eval-mode
BatchNorm after bias-free convolutions, exact GELU, zero-padded (unmasked) window attention
with a learned relative-position bias, a stride-1 last PatchMerging and the SAM neck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_esam.models.common import LayerNorm2d


def _gelu_(x: Tensor) -> Tensor:
    """Exact GELU, in place on the temporary ``x`` unless autograd needs its input."""
    if x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class Conv2d_BN(nn.Module):  # noqa: N801  (checkpoint naming: ``.c`` and ``.bn``)
    """Bias-free convolution followed by BatchNorm2d.

    In eval mode the BatchNorm is folded into the convolution on the fly (one pass over the
    activations instead of two; equal up to float rounding).
    """

    def __init__(
        self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(a, b, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(b)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.bn(self.c(x))
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale.reshape(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        c = self.c
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 Conv2d_BN with a GELU between them (1024 -> 256 resolution)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.seq[2](_gelu_(self.seq[0](x)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the sum."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2d_BN(dim, hidden, 1)
        self.conv2 = Conv2d_BN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2d_BN(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = _gelu_(self.conv1(x))
        y = _gelu_(self.conv2(y))
        return _gelu_(self.conv3(y).add_(x))


class PatchMerging(nn.Module):
    """1x1 conv, GELU, depthwise 3x3 (stride 2, or 1 for 320/448/576 channels), GELU, 1x1.

    Accepts (B, C, H, W) or tokens (B, H*W, C); returns tokens (B, H'*W', out_dim).
    """

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv1 = Conv2d_BN(dim, out_dim, 1)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = _gelu_(self.conv1(x))
        x = _gelu_(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """Stage of MBConv blocks followed by an optional PatchMerging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        expand_ratio: float,
        out_dim: int | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


def _relative_offset_index(window: int) -> Tensor:
    """(N, N) index of |dy| * window + |dx| for all pairs of the N = window**2 positions.

    This is the first-seen numbering of distinct offsets when positions are enumerated in
    row-major order, i.e. the column order of ``attention_biases``.
    """
    r = torch.arange(window)
    y = r.repeat_interleave(window)
    x = r.repeat(window)
    return (y[:, None] - y[None, :]).abs() * window + (x[:, None] - x[None, :]).abs()


def _refresh_after_load(module: WindowAttention, _incompatible_keys: object) -> None:
    module.refresh_bias()


class WindowAttention(nn.Module):
    """TinyViT attention on (windows, N, C): pre-LayerNorm, fused qkv, learned position bias.

    ``attention_biases`` (heads, window**2) is indexed by the relative offset; the gathered
    (heads, N, N) table is cached in the non-persistent buffer ``ab``, refreshed after
    ``load_state_dict`` and when switching to eval mode. In training mode the bias is gathered
    on the fly so that gradients reach ``attention_biases``.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * key_dim * num_heads)
        self.proj = nn.Linear(key_dim * num_heads, dim)
        n = window * window
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n))
        idxs = _relative_offset_index(window)
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)
        self.register_buffer("ab", torch.zeros(num_heads, n, n), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.refresh_bias()

    def refresh_bias(self) -> None:
        """Re-gather ``ab`` from ``attention_biases`` (same device and dtype)."""
        with torch.inference_mode(False), torch.no_grad():
            self.ab = self.attention_biases[:, self.attention_bias_idxs].clone()

    def train(self, mode: bool = True) -> WindowAttention:
        super().train(mode)
        if not mode:
            self.refresh_bias()
        return self

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.key_dim
        x = self.qkv(self.norm(x))
        # per head the fused projection holds [q | k | v], each of key_dim channels
        q, k, v = x.view(b, n, h, 3 * d).transpose(1, 2).split(d, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
        # a 4-D mask lets the fused CPU kernel run (a 3-D one falls back to the math path)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[None])
        return self.proj(x.transpose(1, 2).reshape(b, n, h * d))


class Mlp(nn.Module):
    """Pre-LayerNorm two-layer MLP with exact GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_gelu_(self.fc1(self.norm(x))))


def _dense_channels_last(x: Tensor) -> Tensor:
    """``x`` (B, C, H, W) with the dense NHWC strides oneDNN expects.

    A permuted HWC image (e.g. ``preprocess`` output) counts as channels-last for PyTorch
    even when its batch stride is not dense, and then makes every convolution of the
    encoder take a slower path (about 20 % on 2 CPU cores); one copy avoids it.
    """
    b, c, h, w = x.shape
    if x.stride() == (c * h * w, 1, w * c, c):
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return out.copy_(x)


class TinyViTBlock(nn.Module):
    """Window attention (zero-padded, unmasked windows), depthwise local conv, MLP."""

    def __init__(
        self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, dim // num_heads, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2d_BN(dim, dim, 3, 1, 1, groups=dim)

    def _window_attention(self, x: Tensor) -> Tensor:
        """(B, H*W, C) -> attention output (B, H, W, C), possibly a strided view."""
        h, w = self.resolution
        ws = self.window
        b, _, c = x.shape
        if h == ws and w == ws:
            return self.attn(x).view(b, h, w, c)
        x = x.reshape(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w]

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        x = (x.reshape(b, h, w, c) + self._window_attention(x)).reshape(b, n, c)
        # the (B, C, H, W) view of the tokens is channels-last
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.flatten(2).transpose(1, 2)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stage of TinyViT blocks followed by an optional PatchMerging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        out_dim: int | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio) for _ in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT image encoder with the SAM neck: (B, 3, 1024, 1024) -> (B, 256, 64, 64).

    Defaults are MobileSAM's TinyViT-5M (``vit_t``).
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        res = img_size // 4
        n = len(depths)
        self.layers = nn.ModuleList()
        for i in range(n):
            # each stage but the last halves the resolution, except the stride-1 merge into
            # the last stage (so the last two stages share a resolution)
            stage_res = res // 2 ** min(i, n - 2)
            out_dim = embed_dims[i + 1] if i < n - 1 else None
            if i == 0:
                layer: nn.Module = ConvLayer(
                    embed_dims[0], (stage_res, stage_res), depths[0], mbconv_expand_ratio, out_dim
                )
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    (stage_res, stage_res),
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    out_dim,
                )
            self.layers.append(layer)
        self.out_res = res // 2 ** (n - 2)
        # classification head of the original TinyViT: unused, present for a strict load
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        # channels-last throughout: faster convolutions, and (B, C, H, W) <-> (B, H*W, C)
        # token layouts become views
        x = self.patch_embed(_dense_channels_last(x))
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = self.neck[0](x.transpose(1, 2).reshape(b, c, self.out_res, self.out_res))
        x = self._norm2d(x, self.neck[1])
        return self._norm2d(self.neck[2](x), self.neck[3]).contiguous()

    @staticmethod
    def _norm2d(x: Tensor, norm: LayerNorm2d) -> Tensor:
        """LayerNorm2d over the channels of a (B, C, H, W) tensor, via its NHWC view."""
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], norm.weight, norm.bias, norm.eps)
        return y.permute(0, 3, 1, 2)
