"""EfficientSAM prompt encoder, two-way transformer and mask decoder.

Parameter names follow the EfficientSAM checkpoints (``prompt_encoder.*``, ``mask_decoder.*``).
Differences from SAM's decoder: GELU in every MLP, the first layer's self-attention keeps its
residual, later layers add the prompt PE into the queries, GroupNorm in the upscaling, and
no dense (mask) prompt.

Efficiency (results equal the reference up to float rounding):

* The image embedding may be shared by all B prompts, shape (1, C, h, w), or given per prompt,
  (B, C, h, w). A shared embedding is never tiled: the image positional encoding and, for
  B > 1, the key/value projections of the first token-to-image attention are computed once,
  and the first image-to-token attention scores all prompts in one matrix product.
* Token-to-image attention (few queries, 4096 keys) never projects the image tokens: the
  queries are mapped back through the key projection and attend over the raw image tokens in
  one SDPA call (:func:`token_to_image_reassociated`).
* Image-to-token attention (4096 queries, 11 keys per head) folds the query, value and output
  projections into the prompt tokens, so it is two matrix products and a softmax over the
  tokens (:func:`image_to_token_residual`); SDPA is slow for 11 keys per head and could not
  fuse the projections.
* Only the output tokens that are used go through the final attention; only the selected
  hypernetworks run.
* The upscaling transposed convolutions (kernel 2, stride 2: per-pixel linear maps) run as
  matrix products on channel-last tokens, GELU in place.
* After the shared work the prompts run in chunks (``MaskDecoder.chunk_size``) that bound the
  memory; without autograd the image-sized intermediates live in :class:`Scratch` buffers
  reused from chunk to chunk (fresh large tensors cost page faults) and residual additions,
  biases and normalisations are done in place or folded into matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_esam.models.common import Attention
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
    split_heads,
    subpixel_to_image,
    token_to_image_shared,
)


class PromptEncoder(PromptEncoderBase):
    """Sparse (point / box-corner) prompt encoder of EfficientSAM.

    Labels: 1 foreground, 0 background (positional encoding only), 2 / 3 box top-left /
    bottom-right corner, -1 padding (encoding kept, plus ``invalid_points``).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
    ) -> None:
        super().__init__(embed_dim, image_embedding_size, input_image_size)
        self.invalid_points = nn.Embedding(1, embed_dim)
        self.point_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_top_left_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_bottom_right_embeddings = nn.Embedding(1, embed_dim)

    def forward(self, coords: Tensor, labels: Tensor) -> Tensor:
        """(B, N, 2) (x, y) in the model input frame and (B, N) labels -> (B, N, C)."""
        emb = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)
        labels = labels[..., None]
        for value, table in (
            (-1, self.invalid_points),
            (1, self.point_embeddings),
            (2, self.bbox_top_left_embeddings),
            (3, self.bbox_bottom_right_embeddings),
        ):
            emb = torch.where(labels == value, emb + table.weight, emb)
        return emb


class MLPBlock(nn.Module):
    """``num_layers`` x (Linear + GELU) followed by a linear output layer ``fc``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden_dim), nn.GELU()) for d in dims
        )
        self.fc = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)


def token_to_image_reassociated(
    attn: Attention, queries: Tensor, keys_pe: Tensor, keys: Tensor
) -> Tensor:
    """``attn(queries, keys_pe, keys)`` for (B, T, C) queries and (B, S, C) image tokens.

    The S image tokens are not projected: per head ``q_h . (Wk_h x + bk_h)`` equals
    ``(Wk_h^T q_h) . x`` plus a constant that cancels in the softmax, and
    ``sum_s p_s (Wv_h y_s + bv_h) = Wv_h (sum_s p_s y_s) + bv_h``. So the T*H query vectors are
    mapped back to C dimensions and attend directly over ``keys_pe`` with values ``keys``, as
    one SDPA head with the per-head scale.
    """
    b, t, c = queries.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    q = split_heads(attn.q_proj(queries), h)  # (B, H, T, d)
    q = torch.matmul(q, attn.k_proj.weight.view(h, d, c))  # (B, H, T, C)
    out = F.scaled_dot_product_attention(
        q.reshape(b, 1, h * t, c), keys_pe[:, None], keys[:, None], scale=d**-0.5
    ).view(b, h, t, c)
    out = torch.matmul(out, attn.v_proj.weight.view(h, d, c).transpose(1, 2))  # (B, H, T, d)
    out = out + attn.v_proj.bias.view(h, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


def image_to_token_residual(
    attn: Attention,
    keys_pe: Tensor,
    keys: Tensor,
    tokens_pe: Tensor,
    tokens: Tensor,
    inplace: bool = False,
    scratch: Scratch | None = None,
) -> Tensor:
    """``keys + attn(keys_pe, tokens_pe, tokens)``: image tokens (1 or B, S, C) attend to the
    (B, T, C) prompt tokens; returns (B, S, C).

    With the projections folded into the tokens (:func:`image_to_token_factors`) this is a
    score product, a softmax over the T tokens per head and a value product that also adds
    the residual (into ``keys`` itself when ``inplace``). A shared image (batch 1) is scored
    against all prompts in one product.
    """
    b, t, c = tokens.shape
    h = attn.num_heads
    n = t * h
    k, bias, v = image_to_token_factors(attn, tokens_pe, tokens)
    s = keys.shape[1]
    scores = buffer(scratch, "scores", (s, b * n), keys)
    probs = buffer(scratch, "probs", (s, b, t, h), keys)
    if keys.shape[0] == 1:
        kmat = k.transpose(0, 1).reshape(c, b * n)
        scores = torch.addmm(bias.reshape(1, b * n), keys_pe[0], kmat, out=scores)  # (S, B*n)
        probs = softmax_into(scores.view(s, b, t, h), -2, probs).view(s, b, n).transpose(0, 1)
        keys = keys.expand(b, -1, -1)
    else:
        if scores is not None:
            scores = scores.view(b, s, n)
            probs = probs.view(b, s, t, h)
        scores = torch.baddbmm(bias, keys_pe, k, out=scores)  # (B, S, n)
        probs = softmax_into(scores.view(b, s, t, h), -2, probs).view(b, s, n)
        if inplace and not (keys.requires_grad and torch.is_grad_enabled()):
            return keys.baddbmm_(probs, v)
    return torch.baddbmm(keys, probs, v, out=buffer(scratch, "residual", (b, s, c), keys))


class TwoWayAttentionBlock(TwoWayAttentionBlockBase):
    """Self-attention of tokens, token-to-image and image-to-token cross attention, MLP."""

    @staticmethod
    def make_mlp(embedding_dim: int, mlp_dim: int) -> nn.Module:
        return MLPBlock(embedding_dim, mlp_dim, embedding_dim, 1)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        shared: tuple[Tensor, ...] | None = None,
        keys_owned: bool = False,
        scratch: Scratch | None = None,
    ) -> tuple[Tensor, Tensor]:
        """queries (B, T, C), keys (1 or B, S, C), query_pe (B, T, C), key_pe (1, S, C).

        ``shared``: :meth:`shared_image_projections` of ``keys`` when they are shared (batch 1)
        by B > 1 prompts. ``keys_owned``: ``keys`` is a temporary that may be overwritten.
        ``scratch``: reused buffers for the image-sized intermediates.
        Returns (queries (B, T, C), keys (B, S, C)).
        """
        if not self.skip_first_layer_pe:
            queries = queries + query_pe
        queries = self.norm1(queries + self.self_attn(queries, queries, queries))

        t2i = self.cross_attn_token_to_image
        if shared is not None:
            keys_pe, k, v = shared
            attn_out = token_to_image_shared(t2i, queries + query_pe, k, v)
        else:
            keys_pe = torch.add(
                keys, key_pe, out=buffer(scratch, "keys_pe", tuple(keys.shape), keys)
            )
            if keys.shape[0] != queries.shape[0]:
                attn_out = token_to_image_shared(
                    t2i, queries + query_pe, t2i.k_proj(keys_pe), t2i.v_proj(keys)
                )
            else:
                attn_out = token_to_image_reassociated(t2i, queries + query_pe, keys_pe, keys)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))

        keys = image_to_token_residual(
            self.cross_attn_image_to_token,
            keys_pe,
            keys,
            queries + query_pe,
            queries,
            inplace=keys_owned,
            scratch=scratch,
        )
        return queries, self.norm4(keys)


class TwoWayTransformer(TwoWayTransformerBase):
    """Stack of two-way attention blocks and a final token-to-image attention."""

    block = TwoWayAttentionBlock

    def prepare(self, image_embedding: Tensor, image_pe: Tensor, num_prompts: int) -> dict:
        """Prompt-independent context for :meth:`forward_prepared`.

        image_embedding (1 or B, C, h, w), image_pe (1, C, h, w); with a shared embedding and
        ``num_prompts`` > 1 the first layer's image projections are computed here, once.
        Without autograd the context holds a :class:`Scratch` for the chunks.
        """
        ctx: dict = {
            "embedding": image_embedding,
            "key_pe": image_pe.flatten(2).transpose(1, 2).contiguous(),
            "shared": None,
            "scratch": None if torch.is_grad_enabled() else Scratch(),
        }
        if image_embedding.shape[0] == 1:
            keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
            ctx["keys"] = keys
            if num_prompts > 1 and len(self.layers):
                ctx["shared"] = self.layers[0].shared_image_projections(keys, ctx["key_pe"])
        return ctx

    def forward_prepared(
        self,
        ctx: dict,
        point_embedding: Tensor,
        rows: slice | None = None,
        out_tokens: list[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the prompts ``point_embedding`` (b, T, C), rows ``rows`` of the batch.

        Returns (tokens (b, T', C), image tokens (b, S, C)); the tokens are those at the
        indices ``out_tokens`` (all when None): the final attention is row-wise, so only the
        needed query tokens are computed. The image tokens may live in the context's scratch
        buffers: use them before the next call.
        """
        b = point_embedding.shape[0]
        key_pe = ctx["key_pe"]
        scratch = ctx["scratch"]
        if "keys" in ctx:
            keys, shared, owned = ctx["keys"], ctx["shared"], False
        else:
            emb = ctx["embedding"] if rows is None else ctx["embedding"][rows]
            keys, shared = emb.flatten(2).transpose(1, 2), None
            if scratch is not None:
                keys = scratch("keys_in", tuple(keys.shape), keys).copy_(keys)
            else:
                keys = keys.contiguous()
            owned = keys.data_ptr() != emb.data_ptr()
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            queries, keys = layer(
                queries,
                keys,
                point_embedding,
                key_pe,
                shared if i == 0 else None,
                owned,
                scratch,
            )
            owned = True
        if keys.shape[0] != b:  # depth 0 with a shared image
            keys = keys.expand(b, -1, -1)
        if out_tokens is not None:
            queries, point_embedding = queries[:, out_tokens], point_embedding[:, out_tokens]
        keys_pe = torch.add(keys, key_pe, out=buffer(scratch, "keys_pe", tuple(keys.shape), keys))
        attn_out = token_to_image_reassociated(
            self.final_attn_token_to_image, queries + point_embedding, keys_pe, keys
        )
        return self.norm_final_attn(queries + attn_out), keys

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        point_embedding: Tensor,
        out_tokens: list[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """image_embedding (1 or B, C, h, w), image_pe (1, C, h, w), point_embedding (B, T, C)
        -> (tokens (B, T', C), image tokens (B, h*w, C)); see :meth:`forward_prepared`."""
        ctx = self.prepare(image_embedding, image_pe, point_embedding.shape[0])
        ctx["scratch"] = None  # the result must not live in scratch buffers
        return self.forward_prepared(ctx, point_embedding, out_tokens=out_tokens)


class MaskDecoder(nn.Module):
    """Predicts mask logits and IoU scores from image and prompt embeddings."""

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        upscaling_layer_dims: tuple[int, ...] = (64, 32),
        iou_head_depth: int = 2,
        iou_head_hidden_dim: int = 256,
        chunk_size: int = 16,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        #: prompts decoded together after the shared image work (bounds the memory of large
        #: batches; scratch buffers are reused from chunk to chunk)
        self.chunk_size = chunk_size
        self.transformer = TwoWayTransformer(embedding_dim=transformer_dim)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        layers = []
        in_dim = transformer_dim
        for i, dim in enumerate(upscaling_layer_dims):
            mods: list[nn.Module] = [nn.ConvTranspose2d(in_dim, dim, kernel_size=2, stride=2)]
            if i < len(upscaling_layer_dims) - 1:
                mods.append(nn.GroupNorm(1, dim))
            mods.append(nn.GELU())
            layers.append(nn.Sequential(*mods))
            in_dim = dim
        self.final_output_upscaling_layers = nn.ModuleList(layers)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLPBlock(transformer_dim, transformer_dim, in_dim, 2)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLPBlock(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        multimask_output: bool = True,
        iou_gate: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """image_embeddings (1 or B, C, h, w), image_pe (1, C, h, w), prompts (B, N, C).

        Returns (mask logits (B, K, 4h, 4w), iou predictions (B, K)); K = 3 with multimask
        output (mask tokens 1..3), else 1 (mask token 0). ``iou_gate``: see
        :func:`~napari_esam.models.decoder_ops.gate_rows`.
        """
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError("image_embeddings must have batch 1 or the number of prompts")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens[None].expand(b, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)
        sel = list(range(1, self.num_mask_tokens) if multimask_output else range(1))
        out_tokens = [0] + [1 + j for j in sel]  # the IoU token and the selected mask tokens
        h, w = image_embeddings.shape[-2:]
        ctx = self.transformer.prepare(image_embeddings, image_pe, b)
        scratch = ctx["scratch"]
        scale = 2 ** len(self.final_output_upscaling_layers)
        out = None
        if scratch is not None or iou_gate is not None:
            out = tokens.new_empty(b, len(sel), h * scale, w * scale)
        masks, ious = [], []
        for i in range(0, b, self.chunk_size):
            rows = slice(i, i + self.chunk_size)
            hs, src = self.transformer.forward_prepared(ctx, tokens[rows], rows, out_tokens)
            iou = self.iou_prediction_head(hs[:, 0])[:, sel]
            ious.append(iou)
            live = None if out is None else gate_rows(iou, iou_gate, out[rows])
            if live is not None:
                if not live.numel():
                    continue
                hs, src = hs[live], src[live]
            hyper_in = torch.stack(
                [self.output_hypernetworks_mlps[j](hs[:, 1 + n]) for n, j in enumerate(sel)],
                dim=1,
            )  # (b, K, c_last)
            if live is not None:
                out[i + live] = self._upscale_and_predict(src, hyper_in, h, w, scratch)
                continue
            chunk = self._upscale_and_predict(
                src, hyper_in, h, w, scratch, None if out is None else out[rows]
            )
            if out is None:
                masks.append(chunk)
        iou = ious[0] if len(ious) == 1 else torch.cat(ious)
        if out is not None:
            return out, iou
        return (masks[0] if len(masks) == 1 else torch.cat(masks)), iou

    def _upscale_and_predict(
        self,
        src: Tensor,
        hyper_in: Tensor,
        h: int,
        w: int,
        scratch: Scratch | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Image tokens (B, h*w, C) and hypernetwork outputs (B, K, c) -> (B, K, H, W) logits.

        Each ConvTranspose2d(kernel 2, stride 2) is a linear map of each pixel to a 2x2 block;
        the sub-pixel offsets stay in the token axis (channel-last, no pixel shuffle) until the
        final mask product, which is reordered once to image layout (into ``out`` if given).
        With ``scratch`` (no autograd) activations live in reused buffers, are normalised and
        activated in place and carry a column of ones so that the next convolution's bias is
        part of its matrix product.
        """
        b = src.shape[0]
        layers = self.final_output_upscaling_layers
        x = src
        for idx, layer in enumerate(layers):
            x = _conv_transpose_2x2(layer[0], x, scratch, f"up{idx}")
            mods = list(layer[1:])
            if scratch is not None and all(isinstance(m, (nn.GroupNorm, nn.GELU)) for m in mods):
                x = _norm_act_fast(x, mods, idx + 1 < len(layers), scratch, f"act{idx}")
            else:
                for mod in mods:
                    x = (
                        _group_norm_channel_last(x, mod)
                        if isinstance(mod, nn.GroupNorm)
                        else mod(x)
                    )
        k = hyper_in.shape[1]
        masks = torch.matmul(
            hyper_in, x.transpose(1, 2), out=buffer(scratch, "masks", (b, k, x.shape[1]), x)
        )  # (B, K, pixels)
        return subpixel_to_image(masks, h, w, len(layers), out)


def _conv_transpose_2x2(
    conv: nn.ConvTranspose2d, x: Tensor, scratch: Scratch | None = None, name: str = ""
) -> Tensor:
    """ConvTranspose2d(kernel 2, stride 2) of channel-last tokens (B, P, c_in) -> (B, 4P, c_out).

    Output token 4p + 2a + b is the sub-pixel (a, b) of input pixel p. An input with one extra
    channel holds ones (see :func:`_norm_act_fast`): the bias is then part of the product.
    """
    weight, bias = conv_transpose_2x2_linear(conv)
    c_out, c_in = weight.shape[0] // 4, weight.shape[1]
    b, p, c = x.shape
    out = buffer(scratch, name, (b * p, 4 * c_out), x)
    if c == c_in + 1:
        if bias is None:
            bias = weight.new_zeros(4 * c_out)
        y = torch.matmul(x.view(b * p, c), torch.cat([weight, bias[:, None]], 1).t(), out=out)
    elif bias is not None:
        y = torch.addmm(bias, x.reshape(b * p, c), weight.t(), out=out)
    else:
        y = torch.matmul(x.reshape(b * p, c), weight.t(), out=out)
    return y.view(b, 4 * p, c_out)


def _norm_act_fast(
    x: Tensor, mods: list[nn.Module], augment: bool, scratch: Scratch, name: str
) -> Tensor:
    """GroupNorm(1 group) / exact GELU of (B, P, C) without autograd, in place where possible.

    With ``augment`` the result is (B, P, C + 1), last channel all ones.
    """
    b, p, c = x.shape
    out = scratch(name, (b, p, c + 1), x) if augment else x
    if augment:
        out[..., c] = 1
    view = out[..., :c]
    in_view = not augment  # whether the current values live in ``view``
    for mod in mods:
        src = view if in_view else x
        if isinstance(mod, nn.GroupNorm) and mod.num_groups == 1 and src.is_contiguous():
            flat = src.view(b, p * c)
            y = _layer_norm_plain(flat, mod.eps, scratch(name + "_norm", (b, p * c), x))
            y = y.view(b, p, c)
            if mod.affine:
                torch.addcmul(mod.bias, y, mod.weight, out=view)
            else:
                view.copy_(y)
        elif isinstance(mod, nn.GELU) and mod.approximate == "none":
            if not in_view:
                view.copy_(src)
            torch.ops.aten.gelu_(view)
        else:
            view.copy_(
                _group_norm_channel_last(src, mod) if isinstance(mod, nn.GroupNorm) else mod(src)
            )
        in_view = True
    if not in_view:
        view.copy_(x)
    return out


def _layer_norm_plain(x: Tensor, eps: float, out: Tensor) -> Tensor:
    """Layer norm of (N, D) over D without affine, into ``out``."""
    stats = (x.shape[0], 1)
    torch.ops.aten.native_layer_norm.out(
        x, [x.shape[1]], None, None, eps, out0=out, out1=x.new_empty(stats), out2=x.new_empty(stats)
    )
    return out


def _group_norm_channel_last(x: Tensor, gn: nn.GroupNorm) -> Tensor:
    """GroupNorm of (B, pixels, C) channel-last activations."""
    b, p, c = x.shape
    if gn.num_groups != 1:
        return gn(x.transpose(1, 2)).transpose(1, 2)
    # one group: a layer norm over all values of each sample, then the per-channel affine
    y = F.layer_norm(x.reshape(b, p * c), (p * c,), eps=gn.eps).view(b, p, c)
    if not gn.affine:
        return y
    return torch.addcmul(gn.bias, y, gn.weight)
