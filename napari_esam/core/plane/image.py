"""Turning microscopy images into the 8-bit RGB the models expect.

Rule (documented in ``docs/api.md#images``):

* ``uint8`` values pass unchanged (grayscale is repeated to 3 channels).
* ``bool`` becomes 0 / 255.
* Any other integer or float image is contrast-scaled to 0..255: ``lo, hi`` are the
  0.5th and 99.5th percentiles of all finite pixel values (robust to hot pixels and a few
  dead ones; computed on a regular subsample of at most ~4 M values for large images), or
  the given ``contrast_limits`` (e.g. a napari layer's); then
  ``round(clip((x - lo) / (hi - lo), 0, 1) * 255)``. If ``hi <= lo`` the min and max are used
  instead, and a constant image becomes all zeros.
* NaN/inf, empty, 1-pixel-wide, 4-D and wrong-channel images raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PERCENTILES = (0.5, 99.5)
_MAX_SAMPLE = 4_000_000


def check_image_shape(shape: Sequence[int]) -> None:
    """Raise a ``ValueError`` unless ``shape`` is (H, W), (H, W, 1) or (H, W, 3) with H, W >= 2."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(
            f"expected a 2-D image (H, W) or an RGB image (H, W, 3), got shape {shape}; "
            "for a stack, pass one slice at a time (or use the batch functions)"
        )
    if len(shape) == 3 and shape[2] not in (1, 3):
        raise ValueError(
            f"expected 1 or 3 channels in the last axis, got shape {shape}; pick one channel "
            "(e.g. image[..., c]) or drop the alpha channel of an RGBA image"
        )
    if 0 in shape[:2]:
        raise ValueError(f"the image is empty (shape {shape})")
    if min(shape[:2]) < 2:
        raise ValueError(
            f"the image is too small to segment (shape {shape}); it needs at least 2x2 pixels"
        )


def check_contrast_limits(contrast_limits: Any) -> tuple[float, float] | None:
    """Given contrast limits as ``(lo, hi)`` floats (``None`` stays ``None``); ``ValueError``
    unless they are two finite numbers with ``lo < hi`` (equal or inverted limits would map
    every pixel to one grey value)."""
    if contrast_limits is None:
        return None
    try:
        lo, hi = (float(v) for v in contrast_limits)
    except (TypeError, ValueError):
        raise ValueError(
            f"contrast_limits must be two numbers (low, high), got {contrast_limits!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"contrast_limits must be finite, got {contrast_limits}")
    if not lo < hi:
        raise ValueError(
            f"contrast_limits must be (low, high) with low < high, got "
            f"{tuple(contrast_limits)}: every pixel would map to one grey value"
        )
    return lo, hi


def contrast_limits_of(image: np.ndarray, percentiles: tuple[float, float] = PERCENTILES):
    """Robust (lo, hi) display range of ``image`` from percentiles of its finite values."""
    flat = np.asarray(image).reshape(-1)
    if flat.size > _MAX_SAMPLE:
        flat = flat[:: int(np.ceil(flat.size / _MAX_SAMPLE))]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(flat.astype(np.float64), percentiles)
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    return float(lo), float(hi)


def as_checked_image(image: Any) -> np.ndarray:
    """The image as a NumPy array (dask computed); ``ValueError`` unless its shape is
    supported, its dtype numeric and its values finite."""
    if hasattr(image, "compute") and not isinstance(image, np.ndarray):  # dask
        image = image.compute()
    image = np.asarray(image)
    check_image_shape(image.shape)
    if image.dtype.kind not in "biuf":
        raise ValueError(f"unsupported image dtype {image.dtype}; use an integer or float image")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(
            "the image contains NaN or infinite values; replace them (e.g. np.nan_to_num) first"
        )
    return image


def to_model_rgb(
    image: np.ndarray,
    contrast_limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """(H, W) or (H, W, 1|3) image of any numeric dtype → (H, W, 3) uint8 RGB (module doc)."""
    image = as_checked_image(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype == np.uint8 and contrast_limits is None:
        out = image
    elif image.dtype == bool:
        out = image.astype(np.uint8) * 255
    else:
        lo, hi = contrast_limits if contrast_limits is not None else contrast_limits_of(image)
        lo, hi = float(lo), float(hi)
        if hi <= lo:
            out = np.zeros(image.shape, dtype=np.uint8)
        else:
            scaled = (image.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
            out = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)
