"""Refine existing labels object by object (one 2-D plane; the rule: ``docs/rules/refine.md``).

Every object (label id) of a labels plane is decoded again from three prompts taken from its
own mask: its **box** (XYXY, inclusive max, as SAM's mask-to-box), an **interior point** (the
maximum of the distance transform inside the object, the first in raster order) and, for
models whose decoder takes one (``model.supports_mask_input``), the **mask itself as mask
input** (:func:`mask_input_logits`). Decoding is single-mask, batched.

The refined mask keeps the object's id. An object whose refined mask has an IoU below
``iou_threshold`` with its original mask is **kept as it was** and listed
(:attr:`RefineResult.kept`). Accepted objects are painted by :func:`paint_refined`.

:func:`refine_labels` refines a whole plane held in memory with a
:class:`~napari_esam.core.plane.predictor.Predictor`; the tiled version (planes larger than one
tile) is :func:`napari_esam.core.tiling.refine.refine_plane`, which decodes each object on a
tile window with :func:`decode_objects`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from napari_esam.core.plane.everything import Cancelled
from napari_esam.core.plane.labels import paint_order
from napari_esam.core.plane.mask_prompts import EPS, region_logits
from napari_esam.core.plane.predictor import Predictor
from napari_esam.models.base import PromptableModel

__all__ = [
    "DEFAULT_BATCH",
    "IOU_THRESHOLD",
    "LOGIT_EPS",
    "LabelObject",
    "ObjectSteps",
    "RefineResult",
    "RefinedMask",
    "check_iou_threshold",
    "check_labels",
    "decode_objects",
    "label_objects",
    "mask_input_logits",
    "mask_iou",
    "paint_refined",
    "refine_labels",
    "uses_mask_input",
]

#: default IoU (refined vs original mask) below which an object is kept as it was
IOU_THRESHOLD = 0.5
#: objects decoded per decoder call
DEFAULT_BATCH = 16
#: mask-input probabilities are clipped to [LOGIT_EPS, 1 - LOGIT_EPS] before the logit
LOGIT_EPS = EPS

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), end exclusive, plane pixels


@dataclass(frozen=True, eq=False)
class LabelObject:
    """One object of a labels plane: its id, bounding box, interior point and mask crop."""

    id: int
    #: (y0, x0, y1, x1) in plane pixels, end exclusive
    box: Box
    #: (x, y) plane pixels: the distance-transform maximum inside the object
    point: tuple[int, int]
    #: (y1 - y0, x1 - x0) bool, the object's pixels inside ``box``
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True, eq=False)
class RefinedMask:
    """A decoded mask cropped to its bounding box (``box`` ``None``: the mask is empty)."""

    box: Box | None
    mask: np.ndarray
    score: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class RefineResult:
    """The refined plane and what happened to every object.

    ``labels``: the new plane (same shape and dtype as the input). ``refined``: ids replaced
    by their refined mask. ``kept``: ``(id, iou)`` of objects kept as they were because the
    refined mask disagreed (IoU below the threshold), in id order. ``ious``: every object's
    IoU. ``mask_input``: whether the masks were given to the decoder as mask input (False
    for models without one, e.g. EfficientSAM, or when switched off).
    """

    labels: np.ndarray
    refined: list[int] = field(default_factory=list)
    kept: list[tuple[int, float]] = field(default_factory=list)
    ious: dict[int, float] = field(default_factory=dict)
    mask_input: bool = False

    @property
    def n_objects(self) -> int:
        return len(self.ious)


# ------------------------------------------------------------------------------ objects


def check_labels(labels: Any, shape: Sequence[int] | None = None) -> np.ndarray:
    """``labels`` as a 2-D integer NumPy array; ``ValueError`` for float, non-2-D labels or a
    ``shape`` mismatch (``shape``: the image plane's (H, W))."""
    if hasattr(labels, "compute") and not isinstance(labels, np.ndarray):
        labels = labels.compute()
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise ValueError(
            f"labels must be integers (one id per object, 0 = background), not {labels.dtype}"
        )
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D labels plane, got shape {labels.shape}")
    if shape is not None and tuple(labels.shape) != tuple(int(s) for s in shape[:2]):
        raise ValueError(
            f"the labels ({labels.shape[0]}x{labels.shape[1]}) and the image "
            f"({int(shape[0])}x{int(shape[1])}) differ in size"
        )
    return labels


def label_objects(labels: Any) -> list[LabelObject]:
    """Every object (nonzero id) of a 2-D labels plane, in id order.

    An id is one object even when its pixels are in several pieces. The interior point is
    the pixel farthest from the background (Euclidean distance transform, the image border
    counting as background), the first in raster order among equals.
    """
    labels = check_labels(labels)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    nz = labels != 0
    ids = np.unique(labels[nz])
    if ids.size == 0:
        return []
    compact = np.zeros(labels.shape, dtype=np.int32 if ids.size < 2**31 - 1 else np.int64)
    compact[nz] = np.searchsorted(ids, labels[nz]) + 1
    out = []
    for k, sl in enumerate(ndimage.find_objects(compact)):
        if sl is None:  # pragma: no cover - every compact id is present
            continue
        mask = compact[sl] == k + 1
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        y0, x0 = sl[0].start, sl[1].start
        out.append(LabelObject(int(ids[k]), (y0, x0, sl[0].stop, sl[1].stop),
                               (int(x0 + c), int(y0 + r)), mask))
    return out


# --------------------------------------------------------------------------- mask input


def mask_input_logits(
    obj: LabelObject,
    origin: tuple[int, int],
    size: tuple[int, int],
    input_size: tuple[int, int],
) -> np.ndarray:
    """The object's mask as SAM mask-input logits (256, 256) float32 for a decode window,
    by the one mask-prompt rule (:func:`~napari_esam.core.plane.mask_prompts.region_logits`).

    ``origin`` (y, x) and ``size`` (h, w): the window in plane pixels; ``input_size``: the
    (h, w) the window's content occupies in SAM's 1024 prompt frame (from the model's
    ``preprocess``); pixels outside the window count as background.
    """
    return region_logits(obj.mask, (obj.box[0], obj.box[1]), origin, size, input_size)


# ------------------------------------------------------------------------------ decoding


def _prompts(objs: Sequence[LabelObject], origin: tuple[int, int]) -> tuple[Any, Any]:
    """(B, 3, 2) window (x, y) of point, box top-left, box bottom-right; (B, 3) labels."""
    oy, ox = origin
    coords = np.array(
        [[o.point, (o.box[1], o.box[0]), (o.box[3] - 1, o.box[2] - 1)] for o in objs],
        dtype=np.float64,
    ) - np.array([ox, oy], dtype=np.float64)
    labels = np.tile(np.array([[1, 2, 3]], dtype=np.int64), (len(objs), 1))
    return torch.from_numpy(coords.astype(np.float32)), torch.from_numpy(labels)


def _cropped(mask: np.ndarray, origin: tuple[int, int], score: float) -> RefinedMask:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return RefinedMask(None, np.zeros((0, 0), bool), score)
    r0, r1 = int(np.argmax(rows)), len(rows) - int(np.argmax(rows[::-1]))
    c0, c1 = int(np.argmax(cols)), len(cols) - int(np.argmax(cols[::-1]))
    oy, ox = origin
    return RefinedMask((oy + r0, ox + c0, oy + r1, ox + c1), mask[r0:r1, c0:c1].copy(), score)


def uses_mask_input(model: PromptableModel, use_mask_input: bool = True) -> bool:
    """Whether refining with ``model`` passes the masks as mask input (only where the
    decoder takes one)."""
    return bool(use_mask_input and getattr(model, "supports_mask_input", False))


def decode_objects(
    predictor: Predictor,
    objects: Sequence[LabelObject],
    origin: tuple[int, int] = (0, 0),
    *,
    use_mask_input: bool = True,
    batch_size: int = DEFAULT_BATCH,
    step: Callable[[int], Any] | None = None,
) -> list[RefinedMask]:
    """Decode ``objects`` on the predictor's embedding of one window (``origin`` (y, x): its
    top-left in plane pixels; its size is ``predictor.original_size``), ``batch_size`` per
    decoder call. Returns one :class:`RefinedMask` per object, in plane pixels.
    ``step(n)`` is called after each batch with the number of objects it decoded (raise
    from it to stop)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    predictor._require_image()
    size = predictor.original_size
    with_mask = uses_mask_input(predictor.model, use_mask_input)
    out: list[RefinedMask] = []
    for start in range(0, len(objects), batch_size):
        batch = objects[start : start + batch_size]
        coords, labels = _prompts(batch, origin)
        mask_input = None
        if with_mask:
            mask_input = torch.from_numpy(np.stack([
                mask_input_logits(o, origin, size, predictor.input_size) for o in batch
            ])[:, None])
        low, iou = predictor.decode_torch(coords, labels, False, mask_input)
        with torch.inference_mode():
            masks = predictor.model.threshold(predictor.upsample(low))[:, 0].cpu().numpy()
        scores = iou[:, 0].cpu().numpy()
        out += [_cropped(m, origin, float(s)) for m, s in zip(masks, scores, strict=True)]
        if step is not None:
            step(len(batch))
    return out


# ------------------------------------------------------------------------------ painting


def mask_iou(obj: LabelObject, refined: RefinedMask) -> float:
    """IoU of an object's original mask and its refined mask (0 for an empty refined mask)."""
    if refined.box is None:
        return 0.0
    a, b = obj.box, refined.box
    y0, x0 = min(a[0], b[0]), min(a[1], b[1])
    y1, x1 = max(a[2], b[2]), max(a[3], b[3])
    frame = np.zeros((2, y1 - y0, x1 - x0), dtype=bool)
    frame[0, a[0] - y0 : a[2] - y0, a[1] - x0 : a[3] - x0] = obj.mask
    frame[1, b[0] - y0 : b[2] - y0, b[1] - x0 : b[3] - x0] = refined.mask
    inter = np.logical_and(frame[0], frame[1]).sum()
    union = np.logical_or(frame[0], frame[1]).sum()
    return float(inter / union) if union else 0.0


def paint_refined(
    labels: np.ndarray,
    objects: Sequence[LabelObject],
    refined: Sequence[RefinedMask],
    iou_threshold: float = IOU_THRESHOLD,
) -> RefineResult:
    """The refined plane (``docs/rules/refine.md#painting``).

    An object whose refined mask has ``IoU < iou_threshold`` with its original mask, or is
    empty, is kept as it was and listed. Every other object loses its original pixels and is
    painted with its refined mask, on pixels that were background (0) or its own in the
    input: a refined object never takes another object's input pixels. Refined masks are
    painted larger first, smaller on top (ties: higher predicted IoU on top, then the lower
    id).
    """
    check_iou_threshold(iou_threshold)
    labels = np.asarray(labels)
    out = labels.copy()
    result = RefineResult(out)
    accepted: list[tuple[LabelObject, RefinedMask]] = []
    for obj, ref in zip(objects, refined, strict=True):
        iou = mask_iou(obj, ref)
        result.ious[obj.id] = iou
        if iou < iou_threshold or ref.box is None:
            result.kept.append((obj.id, iou))
        else:
            accepted.append((obj, ref))
    for obj, _ in accepted:
        y0, x0, y1, x1 = obj.box
        out[y0:y1, x0:x1][obj.mask] = 0
    order = paint_order([r.area for _, r in accepted], [r.score for _, r in accepted])
    for i in order:
        obj, ref = accepted[int(i)]
        y0, x0, y1, x1 = ref.box
        before = labels[y0:y1, x0:x1]
        allowed = ref.mask & ((before == 0) | (before == obj.id))
        out[y0:y1, x0:x1][allowed] = obj.id
    result.refined = sorted(obj.id for obj, _ in accepted)
    return result


def check_iou_threshold(value: float) -> float:
    """``value`` as a float in [0, 1] (``ValueError`` otherwise)."""
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"the IoU threshold must be a number in [0, 1], got {value}")
    return value


# ------------------------------------------------------------------------------ one plane


def refine_labels(
    image: Any,
    labels: Any,
    model: PromptableModel | Predictor,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    use_mask_input: bool = True,
    batch_size: int = DEFAULT_BATCH,
    contrast_limits: tuple[float, float] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RefineResult:
    """Refine every object of a 2-D labels plane on its image, the plane as one model input.

    Args:
        image: (H, W) or (H, W, 3) image (any numeric dtype; ``to_model_rgb``'s rule).
        labels: (H, W) integer labels (0 = background); not modified.
        model: a promptable model, or a :class:`Predictor` (its embedding is reused when the
            same image is set again).
        iou_threshold: objects whose refined mask has a lower IoU with the original are kept
            as they were and listed in :attr:`RefineResult.kept`.
        use_mask_input: pass each mask as mask input where the model takes one.
        batch_size: objects per decoder call.
        contrast_limits: intensity range mapped to 0..255 (default: the image's percentiles).
        progress: ``progress(done, total)`` objects, after each batch.
        cancel: polled between batches; :class:`~napari_esam.core.plane.everything.Cancelled`
            is raised when it returns True.

    Returns:
        A :class:`RefineResult` (the ids are kept).
    """
    check_iou_threshold(iou_threshold)
    predictor = model if isinstance(model, Predictor) else Predictor(model)
    image = np.asarray(image)
    labels = check_labels(labels, image.shape[:2])
    objects = label_objects(labels)
    with_mask = uses_mask_input(predictor.model, use_mask_input)
    if not objects:
        return RefineResult(labels.copy(), mask_input=with_mask)
    counter = ObjectSteps(len(objects), progress, cancel)
    counter.check()
    predictor.set_image(image, contrast_limits)
    refined = decode_objects(predictor, objects, use_mask_input=use_mask_input,
                             batch_size=batch_size, step=counter.step)
    result = paint_refined(labels, objects, refined, iou_threshold)
    result.mask_input = with_mask
    return result


class ObjectSteps:
    """Progress (objects done of ``total``) and cancellation between decoder batches."""

    def __init__(self, total: int, progress: Callable[[int, int], Any] | None,
                 cancel: Callable[[], bool] | None) -> None:
        self.total, self.done = int(total), 0
        self.progress, self.cancel = progress, cancel

    def check(self) -> None:
        """Raise :class:`Cancelled` when ``cancel()`` says so."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("refine was cancelled")

    def step(self, n: int) -> None:
        """``n`` more objects decoded: report, then check for a cancel."""
        self.done += int(n)
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()
