"""The interface every promptable model of this package implements.

The predictor, segment-everything and tiling code only talk to this interface, so
EfficientSAM and MobileSAM are interchangeable above the ``models`` layer.

Prompt convention for :meth:`PromptableModel.decode` (one row per object):

* ``coords``: (B, N, 2) float32, (x, y) in *original image pixels*.
* ``labels``: (B, N) int64 with 1 = foreground point, 0 = background point,
  2 = box top-left corner, 3 = box bottom-right corner, -1 = padding (ignored point).
  A box is given as its two corners (labels 2 and 3) after the points of its row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class PromptableModel(nn.Module):
    """Image encoder + prompt encoder + mask decoder with the official pipeline around them."""

    #: registry name, e.g. ``"mobilesam"``
    name: str = ""
    #: side of the square encoder input (512 for EfficientViT-SAM L0/L1/L2, else 1024)
    img_size: int = 1024
    #: True when the official pipeline thresholds masks with ``logits >= 0`` (EfficientSAM),
    #: False for ``logits > 0`` (MobileSAM / SAM)
    mask_threshold_inclusive: bool = False
    #: most prompt points per object the model can take (``None`` = unlimited);
    #: EfficientSAM takes 6, a box counting as two points
    max_points: int | None = None
    #: whether background (label 0) points have a learned embedding
    has_negative_point_embedding: bool = True
    #: whether :meth:`decode` accepts ``mask_input=`` (SAM's mask prompt: (B or 1, 1, 256, 256)
    #: low-res logits of a previous prediction)
    supports_mask_input: bool = False
    #: autocast dtype used by the predictor on CUDA (``None`` = plain float32)
    compute_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> ((1, 3, S, S) float32 on the model's device, input_size).

        S = :attr:`img_size`. ``input_size`` = (h, w) of the image content inside the frame
        that :meth:`postprocess_masks` crops, 1024x1024 for every model (for EfficientViT-SAM
        L models this can differ by a pixel from twice the 512-frame size).
        """
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) normalised input (S = :attr:`img_size`) -> (B, 256, 64, 64) embedding."""
        raise NotImplementedError

    def decode(
        self,
        embedding: Tensor,
        coords: Tensor,
        labels: Tensor,
        original_size: tuple[int, int],
        multimask_output: bool = True,
        iou_gate: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode B prompts on one image embedding.

        ``embedding`` is (1, 256, 64, 64) (shared by all rows) or (B, 256, 64, 64).
        Returns (low_res_logits (B, K, 256, 256), iou_predictions (B, K)), K = 3 with
        multimask output (mask tokens 1..3, model order) else 1 (mask token 0).
        ``iou_gate``: when given, the logits of rows none of whose K IoU predictions exceeds
        it may be left uncomputed (NaN): segment-everything's filter drops them anyway, so
        callers must not read them; the IoU predictions are always complete.
        """
        raise NotImplementedError

    def postprocess_masks(
        self, low_res_logits: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """(B, K, 256, 256) low-res logits -> (B, K, H, W) logits at the original size."""
        raise NotImplementedError

    def threshold(self, logits: Tensor) -> Tensor:
        """Binary masks from logits with the official pipeline's comparison."""
        return logits >= 0 if self.mask_threshold_inclusive else logits > 0
