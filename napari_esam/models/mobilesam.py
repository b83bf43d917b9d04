"""MobileSAM (``vit_t``): TinyViT-5M image encoder + SAM prompt encoder and mask decoder.

The pipeline around the network is the one of the reference ``SamPredictor`` (see
``shared/conformance/README.md``): PIL bilinear resize of the longest side to 1024,
normalisation in the 0-255 scale, zero padding at the bottom/right, prompt coordinates
scaled in float64, masks upsampled to 1024, cropped and resized to the original size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from napari_esam.models.base import PromptableModel
from napari_esam.models.common import host_to_device
from napari_esam.models.sam_decoder import MaskDecoder, PromptEncoder, SamDecoding
from napari_esam.models.tiny_vit import TinyViT

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def preprocess_shape(h: int, w: int, long_side: int = 1024) -> tuple[int, int]:
    """(newh, neww) of an h x w image whose longest side is resized to ``long_side``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
    """(H, W, 3) uint8 -> uint8 resized with PIL bilinear so the longest side is ``long_side``."""
    h, w = image.shape[:2]
    newh, neww = preprocess_shape(h, w, long_side)
    if (newh, neww) == (h, w):
        return image
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.array(pil.resize((neww, newh), Image.BILINEAR))


class MobileSAM(SamDecoding, PromptableModel):
    """MobileSAM with SAM's prompt encoder and mask decoder (see :class:`PromptableModel`)."""

    name = "mobilesam"
    img_size = 1024
    mask_threshold_inclusive = False
    max_points = None
    has_negative_point_embedding = True

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = TinyViT(img_size=self.img_size)
        self.prompt_encoder = PromptEncoder(
            embed_dim=256,
            image_embedding_size=(self.img_size // 16, self.img_size // 16),
            input_image_size=(self.img_size, self.img_size),
        )
        self.mask_decoder = MaskDecoder(transformer_dim=256)
        self.register_buffer(
            "pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def resize(self, image: np.ndarray) -> np.ndarray:
        """The uint8 image resized so that its longest side is ``img_size`` (before padding)."""
        _check_image(image)
        return resize_longest_side(image, self.img_size)

    def preprocess(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> ((1, 3, 1024, 1024) float32 on the model's device, (h, w)).

        Normalisation is computed in float32 whatever the model's dtype.
        """
        resized = self.resize(image)
        newh, neww = resized.shape[:2]
        if not (resized.flags.writeable and resized.flags.c_contiguous):
            resized = np.array(resized)
        x = host_to_device(torch.from_numpy(resized), self.device)
        x = x.permute(2, 0, 1).float()
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        x = F.pad(x, (0, self.img_size - neww, 0, self.img_size - newh))
        return x[None], (newh, neww)

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, 1024, 1024) normalised input -> (B, 256, 64, 64) in the model's dtype."""
        return self.image_encoder(x.to(self.device, self.dtype))

    def transform_coords(self, coords: Tensor, original_size: tuple[int, int]) -> Tensor:
        """(..., 2) (x, y) original pixels -> float32 pixels of the resized image.

        Scaled in float64 then rounded to float32, like the reference ``apply_coords``.
        """
        h, w = int(original_size[0]), int(original_size[1])
        newh, neww = preprocess_shape(h, w, self.img_size)
        device = coords.device if coords.device.type != "mps" else torch.device("cpu")
        c = coords.to(device, torch.float64)
        scale = torch.tensor([neww / w, newh / h], dtype=torch.float64, device=device)
        return (c * scale).to(self.device, torch.float32)


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError("image must be an (H, W, 3) RGB array")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")


def build_mobilesam() -> MobileSAM:
    """A randomly initialised MobileSAM on the CPU (load weights with ``load_state_dict``)."""
    return MobileSAM()
