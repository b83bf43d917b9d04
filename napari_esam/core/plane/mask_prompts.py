"""Masks as SAM mask prompts: a binary mask of an image → low-res logits in SAM's frame.

SAM's prompt encoder takes a mask prompt as (1, 256, 256) logits covering its padded
1024 x 1024 input frame: the image resized so its longer side is 1024 px (top-left), zero
padding after. A previous prediction's low-res logits are already in that frame; a mask the
user drew (a lasso) or an existing label is brought into it by :func:`mask_to_logits`:

1. map the image's pixels into the 1024 frame by the resize (longest side 1024,
   ``round(h * 1024 / max(h, w))``; each pixel a rectangle of that scale), the rest is padding,
2. each of the 256 x 256 low-res cells (4 x 4 in the frame) gets the fraction ``p`` of its
   area the mask covers (an exact box filter; padding counts as background),
3. logits ``log(p / (1 - p))`` with ``p`` clipped to ``[EPS, 1 - EPS]`` (±6.9 for
   ``EPS = 1e-3``): confident inside and outside, soft along the edge.

All models with a mask prompt (MobileSAM, EfficientViT-SAM) use this 1024 frame for prompts,
whatever their encoder's input size. Rule page: ``docs/interactive.md#mask-input``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EPS", "LOW_RES", "PROMPT_FRAME", "frame_size", "mask_to_logits", "region_logits"]

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
    return region_logits(m, (0, 0), (0, 0), m.shape)


def region_logits(
    mask: np.ndarray,
    mask_origin: tuple[int, int],
    window_origin: tuple[int, int],
    window_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The mask prompt (256, 256) of a mask covering part of a decode window (module doc).

    Args:
        mask: (h, w) bool mask whose top-left pixel is ``mask_origin`` (y, x), in the same
            pixel frame as the window (e.g. plane pixels); its part outside the window is
            ignored.
        window_origin, window_size: the decode window's top-left (y, x) and (h, w).
        input_size: the window's (h, w) in SAM's 1024 frame (default :func:`frame_size`).
    """
    (my, mx), (oy, ox), (h, w) = mask_origin, window_origin, window_size
    nh, nw = frame_size(h, w) if input_size is None else input_size
    m = np.asarray(mask)
    ya, xa = max(my, oy), max(mx, ox)
    yb, xb = min(my + m.shape[0], oy + h), min(mx + m.shape[1], ox + w)
    p = np.zeros((LOW_RES, LOW_RES))
    if ya < yb and xa < xb:
        crop = m[ya - my : yb - my, xa - mx : xb - mx].astype(np.float64)
        ay = _cell_overlap(ya - oy, yb - oy, nh / h)
        ax = _cell_overlap(xa - ox, xb - ox, nw / w)
        p = ay @ crop @ ax.T / (_CELL * _CELL)
    p = np.clip(p, EPS, 1.0 - EPS)
    return np.log(p / (1.0 - p)).astype(np.float32)


#: side of a low-res cell in the 1024 frame
_CELL = PROMPT_FRAME // LOW_RES


def _cell_overlap(start: int, stop: int, scale: float) -> np.ndarray:
    """(256, stop - start) lengths of overlap between pixels ``start..stop`` (each ``scale``
    long in the 1024 frame) and the 256 low-res cells (each 4 long)."""
    lo = np.arange(start, stop, dtype=np.float64)[None] * scale
    hi = lo + scale
    c_lo = np.arange(LOW_RES, dtype=np.float64)[:, None] * _CELL
    return np.clip(np.minimum(hi, c_lo + _CELL) - np.maximum(lo, c_lo), 0.0, None)
