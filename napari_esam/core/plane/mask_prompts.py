"""Masks as SAM mask prompts: a binary mask of an image → low-res logits in SAM's frame.

SAM's prompt encoder takes a mask prompt as (1, 256, 256) logits covering its padded
1024 x 1024 input frame: the image resized so its longer side is 1024 px (top-left), zero
padding after. A previous prediction's low-res logits are already in that frame; a mask the
user drew (a lasso) or an existing label is brought into it by :func:`mask_to_logits`:

1. resize the (h, w) mask to the image's size in the 1024 frame (longest side 1024,
   ``round(h * 1024 / max(h, w))``), as the fraction of each output pixel covered (area),
2. pad with 0 to 1024 x 1024 and average 4 x 4 blocks → coverage ``p`` in [0, 1] at 256²,
3. logits ``log(p / (1 - p))`` with ``p`` clipped to ``[EPS, 1 - EPS]`` (±6.9 for
   ``EPS = 1e-3``): confident inside and outside, soft along the edge.

All models with a mask prompt (MobileSAM, EfficientViT-SAM) use this 1024 frame for prompts,
whatever their encoder's input size. Rule page: ``docs/interactive.md#mask-input``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EPS", "LOW_RES", "PROMPT_FRAME", "frame_size", "mask_to_logits"]

#: side of SAM's prompt frame (pixels)
PROMPT_FRAME = 1024
#: side of SAM's low-res mask logits
LOW_RES = 256
#: coverage clip before the logit (the logits' magnitude inside and outside)
EPS = 1e-3


def frame_size(h: int, w: int) -> tuple[int, int]:
    """(h, w) of an h x w image in SAM's 1024 frame (longer side 1024, rounded)."""
    s = PROMPT_FRAME / max(int(h), int(w))
    return int(h * s + 0.5), int(w * s + 0.5)


def mask_to_logits(mask: np.ndarray) -> np.ndarray:
    """A binary (h, w) mask of a whole image (or decode window) → (256, 256) float32 logits
    of SAM's mask prompt (module doc).

    Args:
        mask: (h, w) bool or 0/1 array covering the image the prompts refer to.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or min(m.shape) < 1:
        raise ValueError(f"a mask prompt is a 2-D (h, w) mask, got shape {m.shape}")
    nh, nw = frame_size(*m.shape)
    x = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    x = F.interpolate(x, (nh, nw), mode="area") if (nh, nw) != m.shape else x
    x = F.pad(x, (0, PROMPT_FRAME - nw, 0, PROMPT_FRAME - nh))
    p = F.avg_pool2d(x, PROMPT_FRAME // LOW_RES)[0, 0].clamp(EPS, 1 - EPS)
    return torch.log(p / (1 - p)).numpy().astype(np.float32)
