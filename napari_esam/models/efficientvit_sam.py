"""EfficientViT-SAM (L0, L1, L2, XL0, XL1): EfficientViT image encoder + SAM prompt encoder
and mask decoder.

The pipeline is the reference ``EfficientViTSamPredictor`` (``shared/conformance/README.md``,
section 6.3). There are two frames:

* the *encoder frame* of side S (512 for L0/L1/L2, 1024 for XL0/XL1): the image is resized
  with PIL bilinear so that its longest side is S, normalised in the 0-1 scale and padded with
  zeros at the bottom/right to S x S;
* the *prompt/mask frame* of side 1024: prompt coordinates, the prompt encoder's
  normalisation and the mask crop use the 1024-frame size computed from the original size
  (not twice the 512-frame size: they can differ by one pixel).

``preprocess`` therefore returns the 1024-frame ``input_size``, which is what
``postprocess_masks`` needs. Every norm of the model uses eps 1e-6, the decoder's
transformer LayerNorms included.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_esam.models.base import PromptableModel
from napari_esam.models.common import host_to_device
from napari_esam.models.efficientvit import ENCODERS, NORM_EPS, EfficientViTSamImageEncoder
from napari_esam.models.mobilesam import (
    _UPSAMPLE_CHUNK,
    _check_image,
    preprocess_shape,
    resize_longest_side,
)
from napari_esam.models.sam_decoder import MaskDecoder, PromptEncoder

#: side of the prompt / mask frame for every variant
PROMPT_SIZE = 1024
#: normalisation in the 0-1 scale: the 0-255 constants divided by 255 in Python doubles
PIXEL_MEAN = tuple(v / 255 for v in (123.675, 116.28, 103.53))
PIXEL_STD = tuple(v / 255 for v in (58.395, 57.12, 57.375))

VARIANTS = tuple(ENCODERS)


class EfficientViTSAM(PromptableModel):
    """EfficientViT-SAM with SAM's prompt encoder and mask decoder (see :class:`PromptableModel`).

    ``img_size`` is the encoder frame S; ``encode`` takes (B, 3, S, S).
    """

    mask_threshold_inclusive = False
    max_points = None
    has_negative_point_embedding = True
    supports_mask_input = True

    def __init__(self, variant: str) -> None:
        super().__init__()
        if variant not in ENCODERS:
            raise ValueError(f"unknown EfficientViT-SAM variant {variant!r}; use one of {VARIANTS}")
        cfg = ENCODERS[variant]
        self.variant = variant
        self.name = f"efficientvit_sam_{variant}"
        self.img_size = cfg.input_size
        self.image_encoder = EfficientViTSamImageEncoder(cfg)
        self.prompt_encoder = PromptEncoder(
            embed_dim=256,
            image_embedding_size=(64, 64),
            input_image_size=(PROMPT_SIZE, PROMPT_SIZE),
        )
        self.mask_decoder = MaskDecoder(transformer_dim=256, transformer_norm_eps=NORM_EPS)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ image
    def resize(self, image: np.ndarray) -> np.ndarray:
        """The uint8 image resized so that its longest side is S (before padding)."""
        _check_image(image)
        return resize_longest_side(image, self.img_size)

    def preprocess(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> ((1, 3, S, S) float32 on the model's device, input_size).

        ``input_size`` is the (h, w) of the image in the **1024** prompt/mask frame.
        """
        resized = self.resize(image)
        newh, neww = resized.shape[:2]
        if not (resized.flags.writeable and resized.flags.c_contiguous):
            resized = np.array(resized)
        x = host_to_device(torch.from_numpy(resized), self.device)
        x = x.permute(2, 0, 1).float().div(255)
        mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.tensor(PIXEL_STD, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        x = (x - mean) / std
        x = F.pad(x, (0, self.img_size - neww, 0, self.img_size - newh))
        h, w = image.shape[:2]
        return x[None], preprocess_shape(h, w, PROMPT_SIZE)

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) normalised input -> (B, 256, 64, 64) in the model's dtype."""
        return self.image_encoder(x.to(self.device, self.dtype))

    # ---------------------------------------------------------------- prompts
    def transform_coords(self, coords: Tensor, original_size: tuple[int, int]) -> Tensor:
        """(..., 2) (x, y) original pixels -> pixels of the 1024 frame.

        Scaled in float64. float64 input stays float64 (the reference automatic mask
        generator casts to float32 only inside the positional encoding); other input is
        rounded to float32 after scaling, as the reference ``predict``.
        """
        h, w = int(original_size[0]), int(original_size[1])
        newh, neww = preprocess_shape(h, w, PROMPT_SIZE)
        device = coords.device if coords.device.type != "mps" else torch.device("cpu")
        out_dtype = torch.float64 if coords.dtype == torch.float64 else torch.float32
        c = coords.to(device, torch.float64)
        scale = torch.tensor([neww / w, newh / h], dtype=torch.float64, device=device)
        out = c * scale
        if out_dtype == torch.float64 and self.device.type == "mps":
            out_dtype = torch.float32  # MPS has no float64
        return out.to(self.device, out_dtype)

    def decode(
        self,
        embedding: Tensor,
        coords: Tensor,
        labels: Tensor,
        original_size: tuple[int, int],
        multimask_output: bool = True,
        mask_input: Tensor | None = None,
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


def build_efficientvit_sam(variant: str) -> EfficientViTSAM:
    """A randomly initialised EfficientViT-SAM (``"l0"`` ... ``"xl1"``) on the CPU."""
    return EfficientViTSAM(variant)
