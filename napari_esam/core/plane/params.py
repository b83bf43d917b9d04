"""Checks of the segment-everything arguments, shared by the core function and the run
settings (one rule, one message each; no torch here).

Limits: ``points_per_side`` is an integer in 1..:data:`MAX_POINTS_PER_SIDE` (more points than
the model input has pixels add nothing; a million per side would need terabytes), and
``crop_n_layers`` an integer in 0..:data:`MAX_CROP_LAYERS` (layer k has 4^k crops).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = [
    "MAX_CROP_LAYERS",
    "MAX_POINTS_PER_SIDE",
    "check_everything_args",
    "check_integer",
    "check_point_grids",
]

#: most grid points per side (the models' input is 1024 px)
MAX_POINTS_PER_SIDE = 1024
#: most crop layers (layer k has 4^k crops: 4 layers = 340 crops)
MAX_CROP_LAYERS = 4
#: the thresholds that are fractions in [0, 1]
FRACTIONS = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh")


def check_integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int; ``ValueError`` unless it is a whole number (in ``lo..hi`` when
    given)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, numbers.Real) and math.isfinite(value):
        ok = float(value).is_integer()
    if not ok:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_fraction(name: str, value: Any) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_point_grids(point_grids: Any) -> list[np.ndarray]:
    """``point_grids`` (one (N, 2) array, or one per crop layer) as a list of float64 arrays
    of normalised (x, y) in [0, 1]; ``ValueError`` for anything else."""
    try:  # one grid (N, 2), or several stacked (L, N, 2)
        arr = np.asarray(point_grids, dtype=np.float64)
    except (TypeError, ValueError):  # a ragged list: one grid per crop layer
        arr = None
    if arr is not None and arr.ndim == 2:
        grids = [arr]
    elif arr is not None and arr.ndim != 3:
        raise ValueError(f"point_grids must be (N, 2) arrays of normalised (x, y), got shape "
                         f"{arr.shape}")
    else:
        grids = list(arr) if arr is not None else list(point_grids)
    out = []
    for g in grids:
        g = np.asarray(g, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
            raise ValueError(
                f"point_grids must be (N, 2) arrays of normalised (x, y) with N >= 1, got shape "
                f"{g.shape}")
        if not np.isfinite(g).all() or g.min() < 0 or g.max() > 1:
            raise ValueError("point_grids must hold normalised (x, y) in [0, 1] (fractions of "
                             "the width and height), with no NaN")
        out.append(g)
    if not out:
        raise ValueError("point_grids is empty: give at least one (N, 2) grid")
    return out


def check_everything_args(
    *,
    points_per_side: Any = 32,
    points_per_batch: Any = 64,
    pred_iou_thresh: Any = 0.88,
    stability_score_thresh: Any = 0.95,
    stability_score_offset: Any = 1.0,
    box_nms_thresh: Any = 0.7,
    crop_n_layers: Any = 0,
    crop_nms_thresh: Any = 0.7,
    crop_overlap_ratio: Any = 512 / 1500,
    crop_n_points_downscale_factor: Any = 1,
    min_mask_region_area: Any = 0,
    point_grids: Any = None,
    method: str = "sam",
    contrast_limits: Any = None,
) -> None:
    """Raise a ``ValueError`` naming the first argument of
    :func:`~napari_esam.core.plane.everything.segment_everything` that is out of range
    (module doc for the limits)."""
    from napari_esam.core.plane.image import check_contrast_limits

    if method not in ("sam", "efficientsam"):
        raise ValueError(f"method must be 'sam' or 'efficientsam', not {method!r}")
    if point_grids is None:
        if points_per_side is None:
            raise ValueError("give points_per_side >= 1 or point_grids")
        check_integer("points_per_side", points_per_side, 1, MAX_POINTS_PER_SIDE)
    else:
        check_point_grids(point_grids)
    if points_per_batch is not None:
        check_integer("points_per_batch", points_per_batch, 1)
    for name, value in (("pred_iou_thresh", pred_iou_thresh),
                        ("stability_score_thresh", stability_score_thresh),
                        ("box_nms_thresh", box_nms_thresh), ("crop_nms_thresh", crop_nms_thresh)):
        _check_fraction(name, value)
    if not (isinstance(stability_score_offset, numbers.Real)
            and math.isfinite(stability_score_offset) and stability_score_offset >= 0):
        raise ValueError(f"stability_score_offset must be >= 0, got {stability_score_offset!r}")
    layers = check_integer("crop_n_layers", crop_n_layers, 0, MAX_CROP_LAYERS)
    if layers and method != "sam":
        raise ValueError("crops (crop_n_layers > 0) are only supported with method 'sam'")
    if not (isinstance(crop_overlap_ratio, numbers.Real) and math.isfinite(crop_overlap_ratio)
            and 0.0 <= crop_overlap_ratio < 1.0):
        raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio!r}")
    check_integer("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
    if not (isinstance(min_mask_region_area, numbers.Real)
            and math.isfinite(min_mask_region_area) and min_mask_region_area >= 0):
        raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area!r}")
    check_contrast_limits(contrast_limits)
