"""SAM prompt encoder, two-way transformer and mask decoder (as used by MobileSAM).

Parameter names follow the SAM / MobileSAM checkpoint format (``prompt_encoder.*``,
``mask_decoder.*``). Behaviour follows ``shared/conformance/README.md``: ReLU MLPs, the first
transformer layer's self-attention without PE and without residual, token-to-image and
image-to-token attentions at half width, ConvTranspose upscaling with LayerNorm2d and GELU.

Efficiency (results equal to the straightforward computation up to float rounding):

* Many prompts on one image embedding share the prompt-independent work of the first layer
  (key/value projections of the image for token-to-image attention, the query projection of
  image + PE for image-to-token attention); the image is never repeated per prompt there.
* Once the image tokens depend on the prompt, attention is computed without projecting the
  4096 image tokens: the few token-side vectors are mapped back through the projection
  weights instead (``q . (W_k x + b_k) = (W_k^T q) . x + const``; the value and output
  projections are applied after the weighted sum over image tokens).
* The two stride-2 transposed convolutions of the upscaling are per-position linear maps
  evaluated channels-last, followed directly by the hypernetwork product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_esam.models.common import Attention, LayerNorm2d
from napari_esam.models.decoder_ops import (
    PromptEncoderBase,
    Scratch,
    TwoWayAttentionBlockBase,
    TwoWayTransformerBase,
    buffer,
    conv_transpose_2x2_linear,
    gate_rows,
    image_to_token_factors,
    softmax_into,
    subpixel_to_image,
    token_to_image_shared,
    values_through_output,
)


class MLPBlock(nn.Module):
    """Transformer feed-forward block: Linear, ReLU, Linear."""

    def __init__(self, embedding_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (hypernetworks, IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class PromptEncoder(PromptEncoderBase):
    """Sparse (points, box corners) and dense (mask / no-mask) prompt embeddings of SAM."""

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__(embed_dim, image_embedding_size, input_image_size)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """(B, N, 2) pixel (x, y) in the model input frame, (B, N) labels -> (B, N, C).

        Labels: 1 foreground, 0 background, 2/3 box top-left/bottom-right corner,
        -1 padding (encoding zeroed, ``not_a_point_embed`` added).
        """
        pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)
        table = torch.cat(
            [self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings]
        )
        labels = labels.long()
        return pe.masked_fill((labels == -1)[..., None], 0.0) + table[labels + 1]

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(B, 1, 4h, 4w) mask logits -> (B, C, h, w) dense embedding."""
        return self.mask_downscaling(masks)

    def no_mask_dense(self) -> Tensor:
        """Dense embedding without a mask prompt, (1, C, 1, 1) (broadcasts over the grid)."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1)


def _gelu_(x: Tensor) -> Tensor:
    """Exact GELU, in place on the temporary ``x`` unless autograd needs its input."""
    if x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class SharedImage(NamedTuple):
    """Prompt-independent tensors of the first transformer layer for one image embedding."""

    keys: Tensor  # (1, L, C) image tokens (embedding + dense prompt)
    keys_pe: Tensor  # (1, L, C) image tokens + positional encoding
    t2i_k: Tensor  # (1, L, heads * d) token-to-image key projection of keys_pe
    t2i_v: Tensor  # (1, L, heads * d) token-to-image value projection of keys
    i2t_q: Tensor  # (L, heads * d) image-to-token query projection of keys_pe


def token_to_image_rows(
    attn: Attention, q_in: Tensor, keys: Tensor, keys_pe: Tensor, scratch: Scratch | None = None
) -> Tensor:
    """``attn(q=q_in, k=keys_pe, v=keys)``; q_in (B, T, C), keys/keys_pe (B or 1, L, C).

    The L image tokens are never projected: ``q . (W_k x + b_k) = (W_k^T q) . x + const``
    (the constant drops out of the softmax over x) and the value projection commutes with
    the attention-weighted sum over x.
    """
    b, t, c = q_in.shape
    h = attn.num_heads
    q = attn.q_proj(q_in).unflatten(-1, (h, -1))
    d = q.shape[-1]
    wk = attn.k_proj.weight.view(h, d, c) * d**-0.5
    qt = torch.einsum("bthd,hdc->bhtc", q, wk).reshape(b, h * t, c)
    kt = keys_pe.expand(b, -1, -1).transpose(1, 2)
    n = keys.shape[1]
    scores = torch.bmm(qt, kt, out=buffer(scratch, "t2i_scores", (b, h * t, n), qt))
    p = softmax_into(scores, -1, buffer(scratch, "t2i_probs", (b, h * t, n), qt))  # (B, h*T, L)
    z = (p @ keys).view(b, h, t, c)
    wv = attn.v_proj.weight.view(h, d, c)
    out = torch.einsum("bhtc,hdc->bthd", z, wv) + attn.v_proj.bias.view(h, d)
    return attn.out_proj(out.flatten(2))


def _attend_image_to_token(
    keys: Tensor, scores: Tensor, u: Tensor, t: int, scratch: Scratch | None = None
) -> Tensor:
    """``keys + softmax_t(scores)^T @ u``; scores (B, T*heads, L), u (B, T*heads, C)."""
    b, n, length = scores.shape
    probs = buffer(scratch, "i2t_probs", (b, t, n // t * length), scores)
    p = softmax_into(scores.view(b, t, -1), 1, probs).view(scores.shape)
    out = buffer(scratch, "i2t_out", (b, length, keys.shape[-1]), scores)
    return torch.baddbmm(keys, p.transpose(1, 2), u, out=out)


def image_to_token_shared(
    attn: Attention,
    keys: Tensor,
    q: Tensor,
    k_in: Tensor,
    v_in: Tensor,
    scratch: Scratch | None = None,
) -> Tensor:
    """``keys + attn(q=., k=k_in, v=v_in)`` with one image's query projection q (L, h*d).

    Scores of every row come from one product with a block-diagonal (per head) key matrix.
    keys (1, L, C); k_in, v_in (B, T, C). Returns (B, L, C).
    """
    b, t, _ = k_in.shape
    h = attn.num_heads
    k = attn.k_proj(k_in).unflatten(-1, (h, -1))
    eye = torch.eye(h, device=k.device, dtype=k.dtype)
    kbd = torch.einsum("bthd,gh->btghd", k * k.shape[-1] ** -0.5, eye)
    kbd = kbd.reshape(b * t * h, -1)
    scores = torch.mm(kbd, q.T, out=buffer(scratch, "i2t_scores", (b * t * h, q.shape[0]), kbd))
    u = values_through_output(attn, v_in)
    return _attend_image_to_token(keys, scores.view(b, t * h, -1), u, t, scratch)


def image_to_token_rows(
    attn: Attention,
    keys: Tensor,
    keys_pe: Tensor,
    k_in: Tensor,
    v_in: Tensor,
    scratch: Scratch | None = None,
) -> Tensor:
    """``keys + attn(q=keys_pe, k=k_in, v=v_in)``; keys/keys_pe (B or 1, L, C).

    The image tokens are not projected (:func:`image_to_token_factors`). Returns (B, L, C).
    """
    b, t, _ = k_in.shape
    kt, kb, u = image_to_token_factors(attn, k_in, v_in)
    keys_pe = keys_pe.expand(b, -1, -1).transpose(1, 2)
    out = buffer(scratch, "i2t_scores", (b, kt.shape[2], keys_pe.shape[2]), kt)
    scores = torch.baddbmm(kb.transpose(1, 2), kt.transpose(1, 2), keys_pe, out=out)
    return _attend_image_to_token(keys, scores, u, t, scratch)


class TwoWayAttentionBlock(TwoWayAttentionBlockBase):
    """Self-attention of tokens, token-to-image, MLP, image-to-token (post-norm)."""

    @staticmethod
    def make_mlp(embedding_dim: int, mlp_dim: int) -> nn.Module:
        return MLPBlock(embedding_dim, mlp_dim)

    def share(self, keys: Tensor, key_pe: Tensor) -> SharedImage:
        """Prompt-independent projections of one image's tokens keys (1, L, C)."""
        keys_pe, k, v = self.shared_image_projections(keys, key_pe)
        q = self.cross_attn_image_to_token.q_proj(keys_pe[0])
        return SharedImage(keys, keys_pe, k, v, q)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        shared: SharedImage | None = None,
        scratch: Scratch | None = None,
    ) -> tuple[Tensor, Tensor]:
        """queries, query_pe (B, T, C); keys (1 or B, L, C); key_pe (1, L, C).

        With ``shared`` (from :meth:`share`), ``keys`` is ignored and its tensors are used.
        ``scratch``: reused buffers for the image-sized intermediates.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if shared is not None:
            attn = token_to_image_shared(t2i, queries + query_pe, shared.t2i_k, shared.t2i_v)
        else:
            keys_pe = torch.add(keys, key_pe, out=buffer(scratch, "keys_pe", keys.shape, keys))
            attn = token_to_image_rows(t2i, queries + query_pe, keys, keys_pe, scratch)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))
        if shared is not None:
            k_in = queries + query_pe
            keys = image_to_token_shared(
                i2t, shared.keys, shared.i2t_q, k_in, queries, scratch
            )
        else:
            keys = image_to_token_rows(i2t, keys, keys_pe, queries + query_pe, queries, scratch)
        return queries, self.norm4(keys)


class TwoWayTransformer(TwoWayTransformerBase):
    """SAM's two-way transformer: tokens and image tokens attend to each other."""

    block = TwoWayAttentionBlock

    @staticmethod
    def _tokens(x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, h*w, C)."""
        return x.flatten(2).transpose(1, 2)

    def share(self, image_embedding: Tensor, image_pe: Tensor) -> SharedImage:
        """Prompt-independent first-layer tensors for image_embedding (1, C, h, w)."""
        return self.layers[0].share(self._tokens(image_embedding), self._tokens(image_pe))

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        point_embedding: Tensor,
        shared: SharedImage | None = None,
        scratch: Scratch | None = None,
    ) -> tuple[Tensor, Tensor]:
        """image_embedding (1 or B, C, h, w), image_pe (1, C, h, w), tokens (B, T, C).

        ``shared`` (from :meth:`share` on the same image) replaces the first layer's
        prompt-independent work. ``scratch``: buffers reused across calls for the image-sized
        intermediates. Returns (tokens (B, T, C), image tokens (B, h*w, C)).
        """
        keys = self._tokens(image_embedding)
        key_pe = self._tokens(image_pe)
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            layer_shared = shared if i == 0 else None
            queries, keys = layer(
                queries, keys, point_embedding, key_pe, layer_shared, scratch
            )
        keys_pe = torch.add(keys, key_pe, out=buffer(scratch, "keys_pe", keys.shape, keys))
        attn = token_to_image_rows(
            self.final_attn_token_to_image, queries + point_embedding, keys, keys_pe, scratch
        )
        return self.norm_final_attn(queries + attn), keys


class MaskOutput(NamedTuple):
    masks: Tensor
    iou_predictions: Tensor


class MaskDecoder(nn.Module):
    """SAM mask decoder: IoU and mask tokens through the transformer, hypernetwork masks.

    ``transformer_norm_eps`` is the eps of the transformer's 9 LayerNorms: torch's default
    1e-5 for SAM / MobileSAM, 1e-6 for EfficientViT-SAM (the upscaling's LayerNorm2d is
    1e-6 in both).
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        transformer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer(
            embedding_dim=transformer_dim, norm_eps=transformer_norm_eps
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        #: prompt rows decoded together (peak memory grows with it; speed barely does)
        self.rows_per_chunk = 4

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool = True,
        iou_gate: float | None = None,
    ) -> MaskOutput:
        """Masks (B, K, 4h, 4w) and IoU predictions (B, K) for B prompt rows.

        ``image_embeddings`` (1 or B, C, h, w) is shared by all rows when its batch is 1;
        ``dense_prompt_embeddings`` broadcasts against it. K = 3 (mask tokens 1..3) with
        ``multimask_output`` else 1 (mask token 0). Rows are decoded in chunks of
        ``rows_per_chunk`` (bounded memory, cache-friendly). ``iou_gate``: see
        :func:`gate_rows`.
        """
        b = sparse_prompt_embeddings.shape[0]
        src = image_embeddings + dense_prompt_embeddings
        h, w = src.shape[-2:]
        one_image = src.shape[0] == 1
        shared = self.transformer.share(src, image_pe) if one_image and b > 1 else None
        selected = range(1, self.num_mask_tokens) if multimask_output else range(1)
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        masks = src.new_empty(b, len(selected), 4 * h, 4 * w)
        scratch = None if torch.is_grad_enabled() else Scratch()
        ious = []
        for i in range(0, b, self.rows_per_chunk):
            sparse = sparse_prompt_embeddings[i : i + self.rows_per_chunk]
            n = sparse.shape[0]
            tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse], dim=1)
            image = src if one_image else src[i : i + n]
            hs, keys = self.transformer(image, image_pe, tokens, shared, scratch)
            iou = self.iou_prediction_head(hs[:, 0])[:, selected.start : selected.stop]
            ious.append(iou)
            live = gate_rows(iou, iou_gate, masks[i : i + n])
            if live is not None:
                if not live.numel():
                    continue
                hs, keys = hs[live], keys[live]
            hyper_in = torch.stack(
                [self.output_hypernetworks_mlps[j](hs[:, 1 + j]) for j in selected], dim=1
            )
            if live is None:
                self._upscale_and_project(keys, hyper_in, masks[i : i + n], scratch)
            else:
                part = masks.new_empty(live.numel(), *masks.shape[1:])
                self._upscale_and_project(keys, hyper_in, part, scratch)
                masks[i + live] = part
        iou = torch.cat(ious) if ious else src.new_empty(0, len(selected))
        return MaskOutput(masks, iou)

    def _upscale_and_project(
        self, keys: Tensor, hyper_in: Tensor, out: Tensor, scratch: Scratch | None = None
    ) -> None:
        """``out[:] = hyper_in @ output_upscaling(image tokens)``, out (B, K, 4h, 4w).

        A kernel-2 stride-2 ConvTranspose2d writes each input position to its own 2x2 output
        block, so it is a per-position Linear (channels-last, sub-pixel order (di, dj, c)).
        ``scratch``: reused buffers for the intermediates.
        """
        up1, norm, _, up2, _ = self.output_upscaling
        b, k = hyper_in.shape[:2]
        h, w = out.shape[-2] // 4, out.shape[-1] // 4
        c1, c2 = up1.out_channels, up2.out_channels
        x = keys.reshape(-1, keys.shape[-1])
        wt, bias = conv_transpose_2x2_linear(up1)
        y = torch.addmm(bias, x, wt.T, out=buffer(scratch, "up1", (x.shape[0], wt.shape[0]), x))
        y = y.view(b, -1, c1)
        y = _gelu_(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
        wt, bias = conv_transpose_2x2_linear(up2)
        y = y.view(-1, c1)
        y = torch.addmm(bias, y, wt.T, out=buffer(scratch, "up2", (y.shape[0], wt.shape[0]), y))
        y = _gelu_(y).view(b, -1, c2)
        m = torch.matmul(
            hyper_in, y.transpose(1, 2), out=buffer(scratch, "m", (b, k, y.shape[1]), y)
        )  # (B, K, h*w*16) ordered (i, j, di, dj, ei, ej)
        subpixel_to_image(m, h, w, 2, out)


#: SAM's prompt frame: prompts and mask crops live in a 1024-px frame whatever the encoder input
PROMPT_SIZE = 1024
#: most (mask, 1024 x 1024) intermediates upsampled at once in ``postprocess_masks``
_UPSAMPLE_CHUNK = 16


class SamDecoding:
    """``decode`` and ``postprocess_masks`` of the models with SAM's prompt encoder and mask
    decoder (MobileSAM, EfficientViT-SAM): point/box prompts, an optional mask input, and
    the upsampling through SAM's 1024-px frame. The model provides ``prompt_encoder``,
    ``mask_decoder``, ``transform_coords``, ``device`` and ``dtype``."""

    #: SAM's prompt encoder takes a previous low-res mask as a prompt
    supports_mask_input = True

    def decode(
        self,
        embedding: Tensor,
        coords: Tensor,
        labels: Tensor,
        original_size: tuple[int, int],
        multimask_output: bool = True,
        mask_input: Tensor | None = None,
        iou_gate: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`PromptableModel.decode`; outputs are in the model's dtype.

        Without a box corner (label 2/3) in any row, one padding point is appended to every
        row, as SAM does for point-only prompts. ``mask_input``: optional (B or 1, 1, 256, 256)
        mask logits from a previous prediction (SAM's mask prompt).
        """
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise ValueError("coords must be (B, N, 2) and labels (B, N)")
        b = coords.shape[0]
        if embedding.shape[0] not in (1, b):
            raise ValueError(f"embedding batch {embedding.shape[0]} is neither 1 nor {b}")
        device, dtype = self.device, self.dtype
        labels = labels.to(device, torch.long)
        if labels.numel() and bool(((labels < -1) | (labels > 3)).any()):
            raise ValueError("labels must be -1 (padding), 0, 1 (points) or 2, 3 (box corners)")
        pts = self.transform_coords(coords, original_size)
        if not bool(((labels == 2) | (labels == 3)).any()):
            pts = torch.cat([pts, pts.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        sparse = self.prompt_encoder.embed_points(pts, labels).to(dtype)
        if mask_input is None:
            dense = self.prompt_encoder.no_mask_dense()
        else:
            if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, 256, 256):
                raise ValueError(
                    f"mask_input must be (B, 1, 256, 256) logits, got {tuple(mask_input.shape)}"
                )
            if mask_input.shape[0] not in (1, b):
                raise ValueError(f"mask_input batch {mask_input.shape[0]} is neither 1 nor {b}")
            dense = self.prompt_encoder.embed_masks(mask_input.to(device, dtype))
        masks, iou = self.mask_decoder(
            embedding.to(device, dtype),
            self.prompt_encoder.get_dense_pe().to(dtype),
            sparse,
            dense,
            multimask_output,
            iou_gate,
        )
        return masks, iou

    def postprocess_masks(
        self, low_res_logits: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """(B, K, 256, 256) -> (B, K, H, W): bilinear to 1024, crop ``input_size`` (the
        1024-frame size from :meth:`preprocess`), bilinear to the original size."""
        b, k = low_res_logits.shape[:2]
        flat = low_res_logits.reshape(b * k, 1, *low_res_logits.shape[-2:])
        newh, neww = int(input_size[0]), int(input_size[1])
        original_size = (int(original_size[0]), int(original_size[1]))
        out = flat.new_empty(b * k, 1, *original_size)
        for i in range(0, b * k, _UPSAMPLE_CHUNK):
            x = F.interpolate(
                flat[i : i + _UPSAMPLE_CHUNK],
                (PROMPT_SIZE, PROMPT_SIZE),
                mode="bilinear",
                align_corners=False,
            )
            x = x[..., :newh, :neww]
            out[i : i + _UPSAMPLE_CHUNK] = F.interpolate(
                x, original_size, mode="bilinear", align_corners=False
            )
        return out.view(b, k, *original_size)
