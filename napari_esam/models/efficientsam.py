"""EfficientSAM (ViT-Ti / ViT-S): image encoder, prompt encoder and mask decoder.

The pipeline around the networks is the official one: the image is stretched (bilinear, no
antialias, aspect ratio not kept) to 1024x1024 and normalised in the 0-1 scale; prompts are
rescaled to that frame and always padded / truncated to 6 points; logits go back to the
original size by bicubic interpolation straight from 256x256; masks are ``logits >= 0``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_esam.models.base import PromptableModel
from napari_esam.models.common import host_to_device
from napari_esam.models.efficientsam_decoder import MaskDecoder, PromptEncoder
from napari_esam.models.vit import ImageEncoderViT

#: (embed_dim, num_heads) of the ViT encoder per variant
VARIANTS: dict[str, tuple[int, int]] = {"ti": (192, 3), "s": (384, 6)}


class EfficientSAM(PromptableModel):
    """EfficientSAM with the :class:`PromptableModel` interface."""

    mask_threshold_inclusive = True
    max_points = 6
    has_negative_point_embedding = False

    def __init__(self, variant: str = "ti") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientSAM variant {variant!r}; choose 'ti' or 's'")
        embed_dim, num_heads = VARIANTS[variant]
        self.variant = variant
        self.name = f"efficientsam_{variant}"
        self.image_encoder = ImageEncoderViT(
            img_size=self.img_size, embed_dim=embed_dim, num_heads=num_heads
        )
        grid = self.img_size // self.image_encoder.patch_size
        self.prompt_encoder = PromptEncoder(256, (grid, grid), (self.img_size, self.img_size))
        self.mask_decoder = MaskDecoder(256)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def preprocess(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> ((1, 3, 1024, 1024) normalised input, (1024, 1024)).

        ``ToTensor`` (/255), bilinear stretch to 1024x1024 (no antialias), then
        ``(x - mean) / std``; computed in float32, returned in the model's dtype.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        x = host_to_device(torch.from_numpy(np.ascontiguousarray(image)), self.device)
        x = x.permute(2, 0, 1)[None].to(torch.float32).div(255)
        size = (self.img_size, self.img_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size, mode="bilinear", align_corners=False)
        x = (x - self.pixel_mean.float()) / self.pixel_std.float()
        return x.to(self.dtype), size

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, 1024, 1024) normalised input -> (B, 256, 64, 64) image embedding."""
        return self.image_encoder(x.to(device=self.device, dtype=self.dtype))

    def prepare_points(
        self, coords: Tensor, labels: Tensor, original_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Rescale (x, y) original pixels to the 1024 frame (negative -> -1) and pad/truncate
        to exactly ``max_points`` points (padding: coordinate -1, label -1)."""
        h, w = original_size
        coords = torch.as_tensor(coords, device=self.device).to(torch.float32)
        labels = torch.as_tensor(labels, device=self.device).to(torch.int64)
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise ValueError("coords must be (B, N, 2) and labels (B, N)")
        x, y = coords[..., 0], coords[..., 1]
        coords = torch.stack(
            [
                torch.where(x >= 0, x * self.img_size / w, -1.0),
                torch.where(y >= 0, y * self.img_size / h, -1.0),
            ],
            dim=-1,
        )
        n, m = coords.shape[1], self.max_points
        if n > m:
            coords, labels = coords[:, :m], labels[:, :m]
        elif n < m:
            coords = F.pad(coords, (0, 0, 0, m - n), value=-1.0)
            labels = F.pad(labels, (0, m - n), value=-1)
        return coords, labels

    def decode(
        self,
        embedding: Tensor,
        coords: Tensor,
        labels: Tensor,
        original_size: tuple[int, int],
        multimask_output: bool = True,
        iou_gate: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode B prompts; see :meth:`PromptableModel.decode`.

        ``embedding`` (1, 256, 64, 64) is shared by all rows without being copied.
        """
        coords, labels = self.prepare_points(coords, labels, original_size)
        sparse = self.prompt_encoder(coords, labels).to(self.dtype)
        image_pe = self.prompt_encoder.get_dense_pe().to(self.dtype)
        embedding = embedding.to(device=self.device, dtype=self.dtype)
        return self.mask_decoder(embedding, image_pe, sparse, multimask_output, iou_gate)

    def postprocess_masks(
        self, low_res_logits: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Bicubic (align_corners=False) from 256x256 directly to ``original_size``.

        ``input_size`` is unused: the input was stretched to the full 1024x1024 frame.
        """
        return F.interpolate(
            low_res_logits, tuple(original_size), mode="bicubic", align_corners=False
        )


def build_efficientsam(variant: str) -> EfficientSAM:
    """A randomly initialised EfficientSAM, ``variant`` ``"ti"`` or ``"s"`` (CPU)."""
    return EfficientSAM(variant)
