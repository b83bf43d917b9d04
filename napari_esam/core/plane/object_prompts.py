"""Object-aware prompts: one prompt per candidate object instead of a dense grid.

The idea of MobileSAMv2 (prompt the decoder where objects are, not everywhere), with a
detector that needs no weights. :func:`detect_object_prompts` finds blob-like objects
(nuclei, cells, vesicles) of a given size range with a multi-scale Laplacian of Gaussian
(LoG); :func:`segment_everything_objects` runs segment-everything with those points as the
prompt set. On microscopy images this decodes several times fewer prompts than a 32x32 grid
and also reaches small objects that fall between grid points.

The detector, step by step (all on a float32 copy; cost is a few Gaussian filters):

1. **Contrast normalisation** with the rule of :mod:`napari_esam.core.plane.image`: RGB is
   averaged to grey, then ``clip((x - lo) / (hi - lo), 0, 1)`` with ``lo, hi`` the 0.5th and
   99.5th percentiles (or ``contrast_limits``). ``polarity="dark"`` uses ``1 - x`` (dark
   objects on a bright background, e.g. bright-field).
2. **Scales**: ``sigma = d / (2 sqrt 2)`` for diameters ``d`` from ``min_diameter`` to
   ``max_diameter``, geometrically spaced by a factor of at most 1.5 (a disc of diameter
   ``d`` gives its strongest LoG response at that sigma).
3. **Per scale**: the scale-normalised response ``R = -sigma^2 LoG_sigma * x``; scales with
   ``sigma >= 4`` are computed on the image block-averaged by ``f = floor(sigma / 4)``
   (same response, ``f^2`` times cheaper). Outside the image counts as the background next
   to the border (the image is padded with the minimum of a strip two largest diameters
   wide along each border row/column), so objects cut by the border are found *inside*
   their visible part, and an uneven background does not make a step at the border.
   Candidates are the local maxima of ``R`` above ``threshold`` at least one blob radius
   ``sigma sqrt 2`` apart. A uniform disc of contrast ``c`` (fraction of the normalised
   range) gives ``R = 2/e c ~ 0.74 c`` at its own scale, so the default ``threshold=0.05``
   keeps objects brighter than their surroundings by about 7 % of the display range.
4. **Merging across scales**: candidates of all scales are taken strongest first; each
   accepted one removes the weaker candidates within its blob radius (the same object
   seen at another scale, or the rim maxima a small scale finds inside a large object).
   Candidates are kept per scale (no maximum over scales is required) so that a dim object
   next to a bright one, whose response keeps growing with scale because the larger
   kernels reach the bright neighbour, is still found.

Prompts are (x, y) in pixels, SAM's convention: pixel (row r, column c) spans
``[c, c + 1) x [r, r + 1)`` and its centre is ``(c + 0.5, r + 0.5)``.

Two ways to decode the detected objects (``decoding``):

* ``"point"``: one positive point per object, three candidate masks each, SAM's filters
  (predicted IoU, stability) and NMS, exactly as for a grid;
* ``"box"`` (MobileSAMv2's decoding): each object is prompted by the box
  ``centre +- BOX_SCALE x radius`` (``radius``: the detector's blob radius, half the
  diameter of its scale), with single-mask output; every mask is kept (no predicted-IoU or
  stability filter), NMS still removes duplicates. Fastest: one mask per object.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_esam.core.plane.image import as_checked_image, contrast_limits_of

__all__ = [
    "BOX_SCALE",
    "DECODINGS",
    "POLARITIES",
    "detect_object_prompts",
    "max_object_prompts",
    "normalised_grey",
    "object_boxes",
    "object_scales",
    "segment_detected_objects",
    "segment_everything_objects",
]

#: largest ratio between consecutive detection scales
SCALE_STEP = 1.5
#: the detector's object polarities and the decoding modes (module doc)
POLARITIES = ("bright", "dark")
DECODINGS = ("point", "box")
#: box decoding: the half-side of an object's box in blob radii (a blob's scale is within
#: a factor ~1.2 of its size, and nuclei are elongated: 1.5 keeps the object in its box)
BOX_SCALE = 1.5


def object_scales(min_diameter: float, max_diameter: float) -> np.ndarray:
    """The LoG sigmas for diameters ``min_diameter..max_diameter`` (ratio <= 1.5 apart)."""
    if max_diameter <= min_diameter:
        return np.array([min_diameter / (2 * math.sqrt(2))])
    n = max(2, math.ceil(math.log(max_diameter / min_diameter) / math.log(SCALE_STEP)) + 1)
    return np.geomspace(min_diameter, max_diameter, n) / (2 * math.sqrt(2))


def _check_args(
    min_diameter: float,
    max_diameter: float,
    threshold: float,
    max_prompts: int | None,
    polarity: str,
) -> None:
    for name, v in (("min_diameter", min_diameter), ("max_diameter", max_diameter)):
        if not (isinstance(v, (int, float, np.number)) and math.isfinite(v) and v >= 2):
            raise ValueError(f"{name} must be a finite number of pixels >= 2, got {v!r}")
    if max_diameter < min_diameter:
        raise ValueError(
            f"max_diameter ({max_diameter}) must be >= min_diameter ({min_diameter})"
        )
    if not (isinstance(threshold, (int, float, np.number)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 (e.g. 0.05), got {threshold}")
    if max_prompts is not None and (isinstance(max_prompts, bool) or int(max_prompts) < 1
                                    or int(max_prompts) != max_prompts):
        raise ValueError(f"max_prompts must be a positive integer or None, got {max_prompts!r}")
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be 'bright' or 'dark', not {polarity!r}")


def normalised_grey(
    image: Any,
    contrast_limits: tuple[float, float] | None = None,
    polarity: str = "bright",
) -> np.ndarray:
    """(H, W) float32 in [0, 1]: grey, contrast-normalised, objects bright (module doc, 1)."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be 'bright' or 'dark', not {polarity!r}")
    image = as_checked_image(image)
    grey = image.astype(np.float32)
    if grey.ndim == 3:
        grey = grey.mean(axis=2, dtype=np.float32) if grey.shape[2] == 3 else grey[..., 0]
    lo, hi = contrast_limits if contrast_limits is not None else contrast_limits_of(grey)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"contrast_limits must be finite, got {contrast_limits}")
    if hi <= lo:
        return np.zeros(grey.shape, np.float32)
    x = np.clip((grey - np.float32(lo)) * np.float32(1.0 / (hi - lo)), 0.0, 1.0)
    return 1.0 - x if polarity == "dark" else x


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    """``x`` averaged over f x f blocks (edge pixels repeated to a multiple of ``f``)."""
    if f == 1:
        return x
    h, w = x.shape
    ph, pw = -h % f, -w % f
    if ph or pw:
        x = np.pad(x, ((0, ph), (0, pw)), mode="edge")
    return x.reshape(x.shape[0] // f, f, x.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)


def _candidates(
    x: np.ndarray, sigmas: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-scale LoG maxima -> (points (N, 2) (x, y), blob radii (N,), responses (N,))."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    h, w = x.shape
    strip = 2 * float(sigmas[-1]) * math.sqrt(2) * 2  # two largest diameters
    pts, rad, resp = [], [], []
    for sigma in sigmas:
        f = max(1, int(sigma // 4))
        small = _block_mean(x, f)
        s = float(sigma) / f
        pad = int(math.ceil(4 * s)) + 1
        # outside = the background next to the border: the minimum of a strip along it
        stat = min(max(2, int(round(strip / f))), min(small.shape))
        padded = np.pad(small, pad, mode="minimum", stat_length=stat)
        r = -(s * s) * ndi.gaussian_laplace(padded, s, mode="nearest")[pad:-pad, pad:-pad]
        radius = float(sigma) * math.sqrt(2)
        peaks = peak_local_max(
            r,
            min_distance=max(1, int(round(radius / f))),
            threshold_abs=threshold,
            exclude_border=False,
        )
        if not len(peaks):
            continue
        xy = (peaks[:, ::-1].astype(np.float64) + 0.5) * f
        xy[:, 0] = np.minimum(xy[:, 0], w - 0.5)
        xy[:, 1] = np.minimum(xy[:, 1], h - 0.5)
        pts.append(xy)
        rad.append(np.full(len(peaks), radius))
        resp.append(r[peaks[:, 0], peaks[:, 1]].astype(np.float64))
    if not pts:
        return np.empty((0, 2)), np.empty(0), np.empty(0)
    return np.concatenate(pts), np.concatenate(rad), np.concatenate(resp)


def _merge(pts: np.ndarray, rad: np.ndarray, resp: np.ndarray) -> np.ndarray:
    """Indices kept by greedy suppression, strongest first (ties: the larger blob first).

    Two blobs are the same object when either one's centre lies inside the other's radius
    (distance < the larger radius), so a strong small-scale peak inside a large nucleus also
    suppresses the large-scale blob of that nucleus and vice versa.
    """
    from scipy.spatial import cKDTree

    order = np.lexsort((-rad, -resp))
    tree = cKDTree(pts)
    rmax = float(rad.max())
    removed = np.zeros(len(pts), bool)
    keep = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        near = np.asarray(tree.query_ball_point(pts[i], max(rad[i], rmax)), dtype=np.int64)
        if len(near):
            d = np.hypot(*(pts[near] - pts[i]).T)
            removed[near[d < np.maximum(rad[near], rad[i])]] = True
    return np.asarray(keep, dtype=np.int64)


def detect_object_prompts(
    image: Any,
    *,
    min_diameter: float = 8.0,
    max_diameter: float = 40.0,
    threshold: float = 0.05,
    polarity: str = "bright",
    max_prompts: int | None = None,
    contrast_limits: tuple[float, float] | None = None,
    return_details: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
    """Prompt points at candidate objects of ``image`` (multi-scale LoG, module doc).

    ``image``: (H, W) or (H, W, 1|3), any integer/float dtype. ``min_diameter`` /
    ``max_diameter``: the object size range in pixels (>= 2). ``threshold``: the least
    scale-normalised LoG response (> 0; 0.74 x contrast for a disc of the right size).
    ``polarity``: ``"bright"`` objects on a dark background (fluorescence) or ``"dark"``.
    ``max_prompts``: keep at most this many, strongest first. ``contrast_limits``: as for
    :func:`~napari_esam.core.plane.image.to_model_rgb`.

    Returns (N, 2) float64 (x, y) pixel coordinates, strongest first; with
    ``return_details`` also ``{"radius": (N,), "response": (N,)}`` (blob radius in pixels
    and LoG response of each point). Raises ``ValueError`` for bad images or arguments.
    """
    _check_args(min_diameter, max_diameter, threshold, max_prompts, polarity)
    x = normalised_grey(image, contrast_limits, polarity)
    pts, rad, resp = _candidates(x, object_scales(min_diameter, max_diameter), threshold)
    keep = _merge(pts, rad, resp) if len(pts) else np.empty(0, np.int64)
    if max_prompts is not None:
        keep = keep[: int(max_prompts)]
    points = np.ascontiguousarray(pts[keep], dtype=np.float64).reshape(-1, 2)
    if return_details:
        return points, {"radius": rad[keep], "response": resp[keep]}
    return points


def max_object_prompts(shape: tuple[int, int], min_diameter: float) -> int:
    """The most prompts :func:`detect_object_prompts` can give on an image of ``shape``.

    Accepted blobs lie at least their radius (>= ``min_diameter / 2``) apart (step 4 of the
    module doc), so discs of radius ``min_diameter / 4`` around them are disjoint and lie in
    the image grown by that radius: their number is at most that area over one disc's.
    """
    r = float(min_diameter) / 2
    h, w = (int(v) for v in shape[:2])
    return max(1, int((h + r) * (w + r) / (math.pi * r * r / 4)))


def object_boxes(
    points: np.ndarray, radii: np.ndarray, shape: tuple[int, int], scale: float = BOX_SCALE
) -> np.ndarray:
    """(N, 4) float64 XYXY boxes ``point +- scale x radius`` clipped to an image of ``shape``
    ((H, W, ...)); the box prompts of ``decoding="box"``."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    half = float(scale) * np.asarray(radii, dtype=np.float64).reshape(-1, 1)
    if half.shape[0] != pts.shape[0]:
        raise ValueError(f"{pts.shape[0]} points but {half.shape[0]} radii")
    h, w = (int(v) for v in shape[:2])
    boxes = np.concatenate([pts - half, pts + half], axis=1)
    return np.clip(boxes, 0, [w, h, w, h])


def segment_detected_objects(
    image: Any,
    predictor_or_model: Any,
    points: np.ndarray,
    radii: np.ndarray | None = None,
    *,
    decoding: str = "point",
    box_scale: float = BOX_SCALE,
    **everything_kwargs: Any,
) -> list[dict[str, Any]]:
    """Segment the objects at ``points`` ((N, 2) (x, y) pixels, e.g. detected) with
    :func:`~napari_esam.core.plane.everything.segment_everything`.

    ``image``: as for ``segment_everything`` (``None``: the image already set on the
    predictor, whose size gives the frame). ``decoding``: ``"point"`` (the points are the
    prompt grid: three candidates each, the filters and NMS as given) or ``"box"`` (each
    point's box ``point +- box_scale x radius``, ``radii`` (N,) required, single-mask
    output; ``pred_iou_thresh``, ``stability_score_thresh`` and ``method`` do not apply:
    every mask is kept, then NMS). Other keywords go to ``segment_everything`` (no
    ``points_per_side``, ``point_grids`` or crops). No points give ``[]`` without running
    the model.
    """
    from napari_esam.core.plane.everything import _as_predictor, segment_everything

    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be 'point' or 'box', not {decoding!r}")
    for key in ("points_per_side", "point_grids", "prompt_boxes"):
        if key in everything_kwargs:
            raise ValueError(f"{key} cannot be combined with object prompts")
    if everything_kwargs.get("crop_n_layers", 0):
        raise ValueError("object prompts do not support crops (crop_n_layers must be 0)")
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not len(points):
        return []
    predictor = _as_predictor(predictor_or_model)
    if image is not None:
        predictor.set_image(image, everything_kwargs.get("contrast_limits"))
        image = None  # set: segment_everything reuses it
    elif not predictor.is_image_set:
        raise ValueError("no image: pass one, or set it on the predictor first")
    h, w = predictor.original_size
    grid = points / np.array([[w, h]], dtype=np.float64)
    if decoding == "box":
        if radii is None:
            raise ValueError("box decoding needs the objects' radii")
        everything_kwargs.update(method="sam", pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 prompt_boxes=object_boxes(points, radii, (h, w), box_scale))
    return segment_everything(image, predictor, points_per_side=None, point_grids=grid,
                              **everything_kwargs)


def segment_everything_objects(
    image: Any,
    predictor_or_model: Any,
    *,
    min_diameter: float = 8.0,
    max_diameter: float = 40.0,
    threshold: float = 0.05,
    polarity: str = "bright",
    max_prompts: int | None = None,
    decoding: str = "point",
    contrast_limits: tuple[float, float] | None = None,
    details: dict | None = None,
    **everything_kwargs: Any,
) -> list[dict[str, Any]]:
    """Segment everything with one prompt per detected object.

    Detector keywords as in :func:`detect_object_prompts`; ``decoding``: ``"point"`` (one
    positive point per object, SAM's filters as for a grid) or ``"box"`` (MobileSAMv2: the
    object's box, single-mask output, no IoU/stability filters; module doc). The other
    keywords go to :func:`~napari_esam.core.plane.everything.segment_everything`
    (``method``, thresholds, ``points_per_batch``, ``progress``, ``cancel``...), which gets
    the points as its ``point_grids`` (normalised by the image width and height). Records
    are SAM-style and their ``point_coords`` are the detected points. No crops
    (``crop_n_layers`` must be 0) and no ``points_per_side``/``point_grids``. An image
    without candidates gives ``[]`` without running the model. ``details`` also receives
    ``"object_prompts"`` (N, 2) and ``"object_radii"`` (N,).
    """
    for key in ("points_per_side", "point_grids", "prompt_boxes"):
        if key in everything_kwargs:
            raise ValueError(f"{key} cannot be combined with object prompts")
    if everything_kwargs.get("crop_n_layers", 0):
        raise ValueError("object prompts do not support crops (crop_n_layers must be 0)")
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be 'point' or 'box', not {decoding!r}")
    if image is None:
        raise ValueError("object prompts need the image pixels: pass the image")
    points, found = detect_object_prompts(
        image,
        min_diameter=min_diameter,
        max_diameter=max_diameter,
        threshold=threshold,
        polarity=polarity,
        max_prompts=max_prompts,
        contrast_limits=contrast_limits,
        return_details=True,
    )
    if details is not None:
        details["object_prompts"] = points
        details["object_radii"] = found["radius"]
    return segment_detected_objects(
        image, predictor_or_model, points, found["radius"], decoding=decoding,
        contrast_limits=contrast_limits, details=details, **everything_kwargs,
    )
