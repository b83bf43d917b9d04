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
    _check_image,
    preprocess_shape,
    resize_longest_side,
)
from napari_esam.models.sam_decoder import PROMPT_SIZE, MaskDecoder, PromptEncoder, SamDecoding

#: side of the prompt / mask frame for every variant
#: normalisation in the 0-1 scale: the 0-255 constants divided by 255 in Python doubles
PIXEL_MEAN = tuple(v / 255 for v in (123.675, 116.28, 103.53))
PIXEL_STD = tuple(v / 255 for v in (58.395, 57.12, 57.375))

VARIANTS = tuple(ENCODERS)


class EfficientViTSAM(SamDecoding, PromptableModel):
    """EfficientViT-SAM with SAM's prompt encoder and mask decoder (see :class:`PromptableModel`).

    ``img_size`` is the encoder frame S; ``encode`` takes (B, 3, S, S).
    """

    mask_threshold_inclusive = False
    max_points = None
    has_negative_point_embedding = True

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


def build_efficientvit_sam(variant: str) -> EfficientViTSAM:
    """A randomly initialised EfficientViT-SAM (``"l0"`` ... ``"xl1"``) on the CPU."""
    return EfficientViTSAM(variant)
