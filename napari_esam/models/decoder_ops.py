"""Pieces shared by the EfficientSAM and SAM (MobileSAM) prompt encoders and mask decoders.

The module skeletons keep the checkpoint parameter names and their creation order; the
functions evaluate attention and the upscaling without projecting the image tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from napari_esam.models.common import Attention, PositionEmbeddingRandom


class PromptEncoderBase(nn.Module):
    """Frame sizes and the random-Fourier positional encoding of a SAM-style prompt encoder."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image embedding grid, shape (1, C, h, w)."""
        return self.pe_layer.dense(*self.image_embedding_size)[None]


class TwoWayAttentionBlockBase(nn.Module):
    """Layers of a two-way attention block; subclasses give the MLP (:meth:`make_mlp`)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.mlp = self.make_mlp(embedding_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.norm4 = nn.LayerNorm(embedding_dim, eps=norm_eps)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    @staticmethod
    def make_mlp(embedding_dim: int, mlp_dim: int) -> nn.Module:
        """The feed-forward block of the tokens."""
        raise NotImplementedError

    def shared_image_projections(self, keys: Tensor, key_pe: Tensor) -> tuple[Tensor, ...]:
        """Prompt-independent work on image tokens (1, S, C) shared by many prompts:
        (keys + key_pe, token-to-image keys, token-to-image values)."""
        keys_pe = keys + key_pe
        t2i = self.cross_attn_token_to_image
        return keys_pe, t2i.k_proj(keys_pe), t2i.v_proj(keys)


class TwoWayTransformerBase(nn.Module):
    """Layers of a two-way transformer: ``depth`` blocks of type :attr:`block` and a final
    token-to-image attention. ``norm_eps``: eps of all its LayerNorms (torch's default 1e-5;
    EfficientViT-SAM uses 1e-6)."""

    block: type[TwoWayAttentionBlockBase] = TwoWayAttentionBlockBase

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            self.block(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim, eps=norm_eps)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d) view."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def token_to_image_shared(attn: Attention, queries: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Token-to-image attention of (B, T, C) query inputs on projected keys/values (1, S, D).

    The B prompts share the image, so they are folded into one query sequence (attention
    rows are independent): no per-prompt copy of the image keys/values.
    """
    b, t, _ = queries.shape
    q = attn.q_proj(queries).reshape(1, b * t, -1)
    return attn.attend(q, k, v).view(b, t, -1)


def values_through_output(attn: Attention, tokens: Tensor) -> Tensor:
    """(B, T, C) -> (B, T*H, C): ``Wo_h v_th + bo / H`` per (token, head), token-major.

    Each head's attention weights sum to one, so ``sum_(t,h) p_th u_th`` is the output
    projection of the attention output, bias included.
    """
    b, t, c = tokens.shape
    h = attn.num_heads
    v = split_heads(attn.v_proj(tokens), h)  # (B, H, T, d)
    w_out = attn.out_proj.weight.view(c, h, -1).permute(1, 2, 0)  # (H, d, C)
    values = torch.matmul(v, w_out) + attn.out_proj.bias / h  # (B, H, T, C)
    return values.transpose(1, 2).reshape(b, t * h, c)


def image_to_token_factors(
    attn: Attention, tokens_pe: Tensor, tokens: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Fold an image-to-token attention's projections into the (B, T, C) prompt tokens.

    For image token x, head h and token t the score is
    ``(Wq_h x + bq_h) . k_ht * s = x . (s Wq_h^T k_ht) + s bq_h . k_ht``; the values are
    :func:`values_through_output`. Returns key matrix (B, C, T*H), score bias (B, 1, T*H) and
    value matrix (B, T*H, C) with the (t, h) pairs in token-major order.
    """
    b, t, c = tokens.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    scale = d**-0.5
    k = split_heads(attn.k_proj(tokens_pe), h)  # (B, H, T, d)
    keys = torch.matmul(k, attn.q_proj.weight.view(h, d, c)) * scale  # (B, H, T, C)
    bias = (k * attn.q_proj.bias.view(h, 1, d)).sum(-1) * scale  # (B, H, T)
    keys = keys.transpose(1, 2).reshape(b, t * h, c).transpose(1, 2)
    bias = bias.transpose(1, 2).reshape(b, 1, t * h)
    return keys, bias, values_through_output(attn, tokens)


def conv_transpose_2x2_linear(conv: nn.ConvTranspose2d) -> tuple[Tensor, Tensor | None]:
    """A ConvTranspose2d(kernel 2, stride 2) as a per-pixel linear map.

    Returns weight (4 * c_out, c_in) and bias (4 * c_out,) or None; output row
    ``(2a + b) * c_out + o`` is channel o of sub-pixel (a, b).
    """
    c_in, c_out, kh, kw = conv.weight.shape
    if (kh, kw) != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0):
        raise ValueError("only kernel 2, stride 2, no padding transposed convolutions")
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)
    return weight, (conv.bias.repeat(4) if conv.bias is not None else None)


def subpixel_to_image(
    masks: Tensor, h: int, w: int, n_up: int, out: Tensor | None = None
) -> Tensor:
    """(B, K, pixels) in sub-pixel token order -> (B, K, h * 2**n_up, w * 2**n_up).

    Token index (i, j, a1, b1, a2, b2, ...) goes to row (i, a1, a2, ...), column
    (j, b1, b2, ...); written into ``out`` when given.
    """
    b, k = masks.shape[:2]
    sub = [2, 2] * n_up
    masks = masks.view(b, k, h, w, *sub)
    masks = masks.permute(0, 1, 2, *range(4, 4 + 2 * n_up, 2), 3, *range(5, 5 + 2 * n_up, 2))
    if out is None:
        return masks.reshape(b, k, h * 2**n_up, w * 2**n_up)
    out.view(b, k, h, *sub[:n_up], w, *sub[:n_up]).copy_(masks)
    return out


def gate_rows(iou: Tensor, iou_gate: float | None, masks: Tensor) -> Tensor | None:
    """Rows of a decoder chunk whose masks are worth computing (segment-everything's skip).

    ``iou`` (B, K) are the chunk's IoU predictions, ``masks`` (B, K, H, W) its output. With
    ``iou_gate`` None every row is computed (returns None). Otherwise a row none of whose K
    predictions exceeds ``iou_gate`` cannot give a mask that passes a predicted-IoU filter
    at that threshold, so its masks are filled with NaN and not computed; returns the
    indices (1-D int64) of the other rows.
    """
    if iou_gate is None:
        return None
    dead = ~(iou.float() > iou_gate).any(dim=1)
    if bool(dead.any()):
        masks[dead] = float("nan")
    return torch.nonzero(~dead).flatten()


class Scratch:
    """Named scratch tensors reused by the prompt chunks of one decoder call (no autograd).

    A fresh large tensor is page-faulted in by the OS on first touch, which costs about as
    much as the memory-bound steps themselves; reusing buffers across chunks avoids that.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous tensor of ``shape`` (dtype and device of ``like``), contents undefined."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = like.new_empty(numel)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def buffer(
    scratch: Scratch | None, name: str, shape: tuple[int, ...], like: Tensor
) -> Tensor | None:
    """``scratch(name, shape, like)``, or None without scratch (the op then allocates)."""
    return None if scratch is None else scratch(name, shape, like)


def softmax_into(x: Tensor, dim: int, out: Tensor | None) -> Tensor:
    """``x.softmax(dim)``, written into ``out`` when given."""
    if out is None:
        return x.softmax(dim)
    return torch.ops.aten._softmax.out(x, dim, False, out=out)
