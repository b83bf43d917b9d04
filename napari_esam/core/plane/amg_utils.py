"""Building blocks of segment-everything (automatic mask generation), in pure torch/NumPy.

Semantics follow the reference ``SamAutomaticMaskGenerator`` (see the conformance README):

* point grids and crop boxes as SAM builds them;
* stability score = count(logit > t + offset) / count(logit > t - offset) (NaN on an empty
  union);
* XYXY boxes with *inclusive* max indices (empty mask -> 0, 0, 0, 0);
* non-maximum suppression with torchvision's CPU semantics, **including its tie order**:
  scores are ordered with torch's default (non-stable) descending CPU sort, IoU uses
  area = (x2 - x1) * (y2 - y1) in float32 and a box is suppressed when IoU > threshold;
  :func:`batched_nms` switches between the "coordinate offset" path and the per-category
  path at 1000 boxes exactly like torchvision on CPU, because the two order ties differently.
* small-region clean-up: holes then islands smaller than an area, 8-connectivity.

Everything that works on masks is batched (no Python loop over masks) except
:func:`remove_small_regions`, which is inherently per mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

#: torchvision's ``batched_nms`` uses the per-category path above this many box numbers on CPU
_VANILLA_NMS_NUMEL = 4000
#: block size of the exact blockwise greedy NMS (bounds the IoU matrix to block x block)
_NMS_BLOCK = 1024
_EIGHT = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) float64 grid of (x, y) in [0, 1]: cell centres, row-major (x varies fastest)."""
    if n_per_side < 1:
        raise ValueError("n_per_side must be >= 1")
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """One normalised grid per crop layer; layer i has ``int(n / scale**i)`` points per side."""
    return [
        build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)
    ]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """SAM's crop boxes (XYXY, exclusive max) and their layer indices.

    Layer 0 is the whole image; layer i (1..n_layers) tiles the image with 2**i crops per
    side overlapping by ``int(overlap_ratio * short_side * 2 / 2**i)`` pixels.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layers = [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_per_side))
        crop_w = crop_len(im_w, n_per_side, overlap)
        crop_h = crop_len(im_h, n_per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i_layer + 1)
    return boxes, layers


# --------------------------------------------------------------------------- mask statistics


def _row_counts(mask: Tensor) -> Tensor:
    """Per-row pixel counts of (..., H, W) bool masks (int16 when rows are short: 2-4x faster
    than one int64 reduction over H x W)."""
    return mask.sum(-1, dtype=torch.int16 if mask.shape[-1] < 2**15 else torch.int32)


def count_pixels(mask: Tensor) -> Tensor:
    """Number of True pixels of (..., H, W) bool masks, int64."""
    return _row_counts(mask).sum(-1, dtype=torch.int64)


def stability_score(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """Stability of (..., H, W) logits: IoU of the masks at ``threshold ± offset``.

    count(logit > threshold + offset) / count(logit > threshold - offset), float32;
    NaN when the second count is 0 (``NaN >= x`` is False, so such masks fail a filter).
    """
    inter = count_pixels(logits > (threshold + offset))
    union = count_pixels(logits > (threshold - offset))
    return inter.to(torch.float32) / union.to(torch.float32)


def _boxes_from_any(rows: Tensor, cols: Tensor) -> Tensor:
    """XYXY int64 boxes from (n, H) "row has a pixel" and (n, W) "column has a pixel"."""
    h, w = rows.shape[-1], cols.shape[-1]
    # argmax returns the first maximal index; flipping gives the last one
    y0 = rows.to(torch.uint8).argmax(-1)
    y1 = h - 1 - rows.flip(-1).to(torch.uint8).argmax(-1)
    x0 = cols.to(torch.uint8).argmax(-1)
    x1 = w - 1 - cols.flip(-1).to(torch.uint8).argmax(-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(torch.int64)
    return boxes * rows.any(-1, keepdim=True)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(..., H, W) bool masks -> (..., 4) int64 XYXY boxes with inclusive max indices.

    An empty mask gives (0, 0, 0, 0).
    """
    h, w = masks.shape[-2:]
    lead = masks.shape[:-2]
    if masks.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.int64, device=masks.device)
    masks = masks.reshape(-1, h, w)
    return _boxes_from_any(masks.any(-1), masks.any(-2)).reshape(*lead, 4)


def mask_boxes_and_areas(masks: Tensor) -> tuple[Tensor, Tensor]:
    """(n, H, W) bool masks -> (XYXY inclusive int64 boxes (n, 4), pixel counts (n,)).

    One pass for the row counts (giving both the area and the rows' occupancy) and one for
    the columns' occupancy.
    """
    if masks.shape[0] == 0:
        z = torch.zeros(0, dtype=torch.int64, device=masks.device)
        return z.reshape(0, 4), z
    rows = _row_counts(masks)
    return _boxes_from_any(rows > 0, masks.any(-2)), rows.sum(-1, dtype=torch.int64)


def is_box_near_crop_edge(
    boxes: Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> Tensor:
    """(n,) bool: a box (crop frame, XYXY) lies within ``atol`` of an edge of the crop that is
    not also an edge of the original image (``orig_box``)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    b = uncrop_boxes_xyxy(boxes, crop_box).to(torch.float32)
    near_crop = torch.isclose(b, crop[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig[None, :], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """XYXY -> XYWH with w = x2 - x1, h = y2 - y1 (SAM's record convention)."""
    out = boxes.clone()
    out[..., 2] = boxes[..., 2] - boxes[..., 0]
    out[..., 3] = boxes[..., 3] - boxes[..., 1]
    return out


# --------------------------------------------------------------------------- uncropping


def uncrop_boxes_xyxy(boxes: Tensor, crop_box: Sequence[int]) -> Tensor:
    """Boxes from the crop frame to the image frame."""
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    offset = torch.tensor([x0, y0, x0, y0], device=boxes.device, dtype=boxes.dtype)
    return boxes + offset


def uncrop_points(points: Tensor, crop_box: Sequence[int]) -> Tensor:
    """(n, 2) (x, y) points from the crop frame to the image frame."""
    offset = torch.tensor(
        [int(crop_box[0]), int(crop_box[1])], device=points.device, dtype=points.dtype
    )
    return points + offset


def uncrop_masks(masks: Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> Tensor:
    """(..., h, w) masks of a crop -> (..., orig_h, orig_w), zero outside the crop."""
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad = (x0, orig_w - x1, y0, orig_h - y1)
    return torch.nn.functional.pad(masks, pad, value=0)


# --------------------------------------------------------------------------- NMS


def box_iou_pairs(a: Tensor, b: Tensor) -> Tensor:
    """(n, m) float32 IoU of XYXY boxes with area = (x2 - x1) * (y2 - y1) (torchvision's).

    0 / 0 (two zero-area boxes) gives NaN, which never exceeds a threshold.
    """
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0]))
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1]))
    inter = w.clamp_min(0) * h.clamp_min(0)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _greedy_block(suppress: Tensor, alive: Tensor) -> Tensor:
    """Exact greedy NMS inside one block of score-ordered boxes.

    ``suppress[i, j]`` (i < j only) says box i would suppress box j; ``alive`` marks the boxes
    not already suppressed by kept boxes of earlier blocks. Box j is kept iff it is alive and
    no kept i < j suppresses it. That recursion has a unique solution, reached by iterating
    the vectorised update until it stops changing (after at most the length of the longest
    suppression chain).
    """
    keep = alive.clone()
    while True:
        hit = (suppress & keep[:, None]).any(0)
        new = alive & ~hit
        if torch.equal(new, keep):
            return keep
        keep = new


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS with torchvision's CPU semantics -> int64 indices of kept boxes, score order.

    Scores are ordered with torch's default (non-stable) descending sort on CPU, which is what
    torchvision does, so tied scores come out in the same order as the reference. Runs on CPU
    in blocks of score-ordered boxes, so memory is O(block x (kept + block)).
    """
    boxes = boxes.detach().to("cpu", torch.float32)
    scores = scores.detach().to("cpu")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(scores, dim=0, descending=True)[1]
    sboxes = boxes[order]
    thr = float(iou_threshold)
    kept_boxes = sboxes[:0]
    kept_pos: list[Tensor] = []
    for start in range(0, n, _NMS_BLOCK):
        blk = sboxes[start : start + _NMS_BLOCK]
        m = blk.shape[0]
        if kept_boxes.shape[0]:
            alive = ~(box_iou_pairs(kept_boxes, blk) > thr).any(0)
        else:
            alive = torch.ones(m, dtype=torch.bool)
        suppress = (box_iou_pairs(blk, blk) > thr).triu_(diagonal=1)
        keep = _greedy_block(suppress, alive)
        pos = torch.nonzero(keep).flatten()
        kept_pos.append(pos + start)
        kept_boxes = torch.cat([kept_boxes, blk[pos]])
    return order[torch.cat(kept_pos)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS separately per category ``idxs``, as ``torchvision.ops.batched_nms`` on CPU.

    Up to 1000 boxes: one :func:`nms` on boxes shifted per category (coordinate offset trick);
    above: :func:`nms` per category, then the kept indices (ascending) ordered by a
    non-stable descending sort of their scores. Both paths keep the same boxes; they differ
    only in the order of tied scores, reproduced here.
    """
    boxes = boxes.detach().to("cpu", torch.float32)
    scores = scores.detach().to("cpu")
    idxs = idxs.detach().to("cpu")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    if boxes.numel() > _VANILLA_NMS_NUMEL:
        keep_mask = torch.zeros(scores.shape[0], dtype=torch.bool)
        for cat in torch.unique(idxs):
            cur = torch.where(idxs == cat)[0]
            keep_mask[cur[nms(boxes[cur], scores[cur], iou_threshold)]] = True
        keep = torch.where(keep_mask)[0]
        return keep[torch.sort(scores[keep], descending=True)[1]]
    max_coord = boxes.max()
    offsets = idxs.to(boxes) * (max_coord + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


# --------------------------------------------------------------------------- clean-up


def _first_block_order(labels: np.ndarray, n: int, offset: tuple[int, int]) -> np.ndarray:
    """Rank key per component (1..n): position of its first 2x2 block in block raster order.

    OpenCV's default 8-connectivity labelling numbers components in that order; it only
    matters to break ties when choosing the largest island. ``offset`` = (row, col) of
    ``labels[0, 0]`` in the image (blocks are aligned to the image).
    """
    h, w = labels.shape
    yy, xx = np.indices((h, w))
    key = ((yy + offset[0]) // 2) * (2**31) + (xx + offset[1]) // 2
    return np.asarray(ndimage.minimum(key, labels, np.arange(1, n + 1)), dtype=np.int64)


def _islands(mask: np.ndarray, area_thresh: float) -> tuple[np.ndarray, bool]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return mask, False
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = mask[y0:y1, x0:x1]  # every island lies inside the bounding box
    labels, n = ndimage.label(sub, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if small.all():  # keep the largest island (OpenCV's first on ties)
        largest = np.flatnonzero(sizes == sizes.max())
        if largest.size > 1:
            rank = _first_block_order(labels, n, (int(y0), int(x0)))[largest]
            largest = largest[np.argsort(rank, kind="stable")]
        lut = np.zeros(n + 1, dtype=bool)
        lut[largest[0] + 1] = True
    else:
        lut = np.concatenate([[False], ~small])
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = lut[labels]
    return out, True


def _holes(mask: np.ndarray, area_thresh: float) -> tuple[np.ndarray, bool]:
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size:
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        inner = y0 > 0 and x0 > 0 and y1 < h and x1 < w
        if inner and h * w - (y1 - y0) * (x1 - x0) >= area_thresh:
            # The background outside the bounding box is one connected region of at least
            # area_thresh pixels, so its component is never small; every other background
            # component lies inside the box. Label the box grown by a 1-px background ring,
            # whose component stands for the outside.
            y0, x0, y1, x1 = y0 - 1, x0 - 1, y1 + 1, x1 + 1
            labels, n = ndimage.label(~mask[y0:y1, x0:x1], structure=_EIGHT)
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            small = sizes < area_thresh
            small[labels[0, 0] - 1] = False
            if not small.any():
                return mask, False
            out = mask.copy()
            out[y0:y1, x0:x1] |= np.concatenate([[False], small])[labels]
            return out, True
    labels, n = ndimage.label(~mask, structure=_EIGHT)
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    return mask | np.concatenate([[False], small])[labels], True


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Remove small holes (``mode="holes"``) or islands (``"islands"``) of a 2-D bool mask.

    Connected components use 8-connectivity; a region is small when its pixel count is
    < ``area_thresh``. Holes are the components of the complement (including ones touching
    the border) and are filled. Islands are removed, except that when every island is small
    the largest one is kept (ties: the one OpenCV would number first). Returns (new mask,
    changed); the input is returned unchanged (same object) when nothing is small. Only the
    mask's bounding box is labelled when that gives the same result.
    """
    if mode not in ("holes", "islands"):
        raise ValueError("mode must be 'holes' or 'islands'")
    mask = np.asarray(mask, dtype=bool)
    if area_thresh <= 1:  # every region has >= 1 pixel: nothing can be small
        return mask, False
    return _holes(mask, area_thresh) if mode == "holes" else _islands(mask, area_thresh)


def clean_mask(mask: np.ndarray, min_area: float) -> tuple[np.ndarray, bool]:
    """Holes then islands smaller than ``min_area``; returns (mask, unchanged)."""
    mask, changed_h = remove_small_regions(mask, min_area, "holes")
    mask, changed_i = remove_small_regions(mask, min_area, "islands")
    return mask, not (changed_h or changed_i)
