"""Segment everything: prompt a grid of points and keep the good, distinct masks.

Two procedures, both usable with every model (each binarises with its model's own rule,
``> 0`` for MobileSAM, ``>= 0`` for EfficientSAM):

* ``method="sam"`` reproduces the reference ``SamAutomaticMaskGenerator`` (records, order and
  values), crops included;
* ``method="efficientsam"`` reproduces the EfficientSAM "segment everything" notebook.

Both return SAM-style records (see :func:`segment_everything`). The work is organised for
speed and bounded memory without changing any result: the image embedding is
shared by every batch of points; candidates are filtered by predicted IoU *before* their
logits are upsampled (the IoU does not depend on upsampling, and upsampling is per mask);
stability, binarisation, boxes and areas are computed batched on the model's device; only
the 256x256 logits of the candidates are kept, and full-resolution masks are rebuilt for the
survivors of NMS only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from napari_esam.core.plane import amg_utils as U
from napari_esam.core.plane.params import check_everything_args, check_point_grids
from napari_esam.core.plane.predictor import Predictor
from napari_esam.models.base import PromptableModel

__all__ = ["Cancelled", "segment_everything", "auto_points_per_batch", "efficientsam_grid"]

#: bytes of full-resolution float32 logits processed at once (upsampling chunks)
_CHUNK_BYTES = 256 * 2**20


class Cancelled(Exception):
    """Raised by :func:`segment_everything` when its ``cancel`` callback returns True."""


# ---------------------------------------------------------------------------- helpers


def _as_predictor(obj: Predictor | PromptableModel) -> Predictor:
    if isinstance(obj, Predictor):
        return obj
    if isinstance(obj, PromptableModel):
        return Predictor(obj)
    raise TypeError(f"expected a Predictor or a PromptableModel, got {type(obj).__name__}")


def auto_points_per_batch(device: torch.device | str, image_hw: tuple[int, int]) -> int:
    """A points-per-batch that fits in free memory.

    Budget: a quarter of the free memory (CUDA: ``torch.cuda.mem_get_info``; CPU: ``psutil``
    available memory) divided by ~64 MiB per point (decoder activations, 3 candidates of
    256x256 logits) plus 12 bytes per image pixel (3 candidates' full-size float32 logits).
    Clamped to 8..256 on CUDA and 8..64 on the CPU (larger CPU batches are not faster);
    64 when the free memory cannot be read.
    """
    device = torch.device(device)
    free: int | None = None
    try:
        if device.type == "cuda":
            free = int(torch.cuda.mem_get_info(device)[0])
        else:
            import psutil

            free = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - any failure: fall back to the default
        free = None
    if free is None:
        return 64
    per_point = 64 * 2**20 + 12 * int(image_hw[0]) * int(image_hw[1])
    hi = 256 if device.type == "cuda" else 64
    n = free // 4 // per_point
    return int(max(8, min(hi, n // 8 * 8 if n >= 8 else 8)))


def efficientsam_grid(grid_size: int, image_hw: tuple[int, int]) -> np.ndarray:
    """The EfficientSAM notebook's (G², 2) float64 (x, y) grid in pixels.

    ``x_i = 0.5 + i / G * W`` (outer loop over i) and ``y_j = 0.5 + j / G * H`` (inner loop).
    """
    h, w = image_hw
    steps = np.arange(grid_size, dtype=np.float64) / grid_size
    xs = 0.5 + steps * w
    ys = 0.5 + steps * h
    return np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)


class _Steps:
    """Progress reporting and cancellation."""

    def __init__(
        self,
        total: int,
        progress: Callable[[int, int], Any] | None,
        cancel: Callable[[], bool] | None,
    ) -> None:
        self.total, self.done = total, 0
        self.progress, self.cancel = progress, cancel

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("segment everything was cancelled")

    def step(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


@dataclass
class _Crop:
    """One crop's frame and the sizes needed to upsample its low-res logits again."""

    box: list[int]  # XYXY in the image frame
    input_size: tuple[int, int]
    size: tuple[int, int]  # (h, w) of the crop


@dataclass
class _Candidates:
    """Masks that passed the per-batch filters (concatenated in reference order)."""

    low_res: list[Tensor] = field(default_factory=list)  # (n, 256, 256) float32, CPU
    iou: list[Tensor] = field(default_factory=list)
    stability: list[Tensor] = field(default_factory=list)
    boxes: list[Tensor] = field(default_factory=list)  # XYXY int64, crop frame
    area: list[Tensor] = field(default_factory=list)
    points: list[Tensor] = field(default_factory=list)  # (n, 2) float64, crop frame
    query: list[Tensor] = field(default_factory=list)  # index of the grid point

    def cat(self) -> dict[str, Tensor]:
        def c(xs: list[Tensor], empty: Tensor) -> Tensor:
            return torch.cat(xs) if xs else empty

        return {
            "low_res": c(self.low_res, torch.empty(0, 256, 256)),
            "iou": c(self.iou, torch.empty(0)),
            "stability": c(self.stability, torch.empty(0)),
            "boxes": c(self.boxes, torch.empty(0, 4, dtype=torch.int64)),
            "area": c(self.area, torch.empty(0, dtype=torch.int64)),
            "points": c(self.points, torch.empty(0, 2, dtype=torch.float64)),
            "query": c(self.query, torch.empty(0, dtype=torch.int64)),
        }


def _chunk(hw: tuple[int, int]) -> int:
    """Masks of size ``hw`` whose float32 logits fit in the chunk budget."""
    return max(1, _CHUNK_BYTES // (4 * int(hw[0]) * int(hw[1])))


def _iter_full_masks(
    low_res: Tensor,
    crop_ids: Sequence[int],
    crops: list[_Crop],
    model: PromptableModel,
    image_hw: tuple[int, int],
):
    """Yield the (H, W) bool CPU masks of candidates, in order, rebuilt from low-res logits."""
    n = len(crop_ids)
    step = _chunk(image_hw)
    for start in range(0, n, step):
        ids = list(crop_ids[start : start + step])
        chunk = low_res[start : start + step]
        out: list[Tensor | None] = [None] * len(ids)
        for cid in sorted(set(ids)):
            rows = [i for i, c in enumerate(ids) if c == cid]
            crop = crops[cid]
            logits = model.postprocess_masks(
                chunk[rows].to(model.device)[:, None], crop.input_size, crop.size
            )[:, 0]
            masks = U.uncrop_masks(model.threshold(logits), crop.box, *image_hw).cpu()
            for r, m in zip(rows, masks, strict=True):
                out[r] = m
        yield from out


def _record(
    mask: np.ndarray,
    box: Sequence[int],
    area: int,
    iou: float,
    stability: float,
    point: Sequence[float],
    crop_box: Sequence[int],
) -> dict[str, Any]:
    x0, y0, x1, y1 = (int(v) for v in box)
    cx0, cy0, cx1, cy1 = (int(v) for v in crop_box)
    return {
        "segmentation": mask,
        "area": int(area),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "predicted_iou": float(iou),
        "point_coords": [[float(point[0]), float(point[1])]],
        "stability_score": float(stability),
        "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
    }


# ---------------------------------------------------------------------------- the API


def segment_everything(
    image: Any,
    predictor_or_model: Predictor | PromptableModel,
    *,
    points_per_side: int | None = 32,
    points_per_batch: int | None = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    crop_n_layers: int = 0,
    crop_nms_thresh: float = 0.7,
    crop_overlap_ratio: float = 512 / 1500,
    crop_n_points_downscale_factor: int = 1,
    min_mask_region_area: int = 0,
    point_grids: np.ndarray | Sequence[np.ndarray] | None = None,
    prompt_boxes: np.ndarray | None = None,
    method: str = "sam",
    progress: Callable[[int, int], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    contrast_limits: tuple[float, float] | None = None,
    details: dict | None = None,
) -> list[dict[str, Any]]:
    """Masks of everything in ``image``, as SAM-style records, best first.

    ``image``: (H, W) or (H, W, 3) of any dtype (converted by the predictor, with
    ``contrast_limits`` if given); ``None`` uses the image already set on the predictor
    (not with crops). ``predictor_or_model``: a :class:`Predictor` (its image embedding is
    reused when the same image is set again) or a bare model.

    Each record: ``segmentation`` (H, W) bool, ``bbox`` XYWH ints with w = x2 - x1 of the
    inclusive box, ``area`` (pixels), ``predicted_iou``, ``stability_score``,
    ``point_coords`` ([[x, y]] prompt in image pixels) and ``crop_box`` (XYWH).

    ``method="sam"`` (``SamAutomaticMaskGenerator``): grid of ``points_per_side``² cell
    centres per crop (or ``point_grids``: normalised (N, 2) (x, y) in [0, 1], one array or
    one per crop layer); keep candidates with predicted IoU > ``pred_iou_thresh`` and
    stability (logit thresholds ±``stability_score_offset``) >= ``stability_score_thresh``
    (0 disables a filter); NMS per crop at ``box_nms_thresh`` by predicted IoU; with
    ``crop_n_layers`` > 0 NMS across crops at ``crop_nms_thresh`` preferring smaller crops;
    with ``min_mask_region_area`` > 0 remove holes then islands smaller than it and re-run NMS
    with score 1 for unchanged and 0 for changed masks.

    ``method="efficientsam"`` (EfficientSAM notebook), keyword mapping:
    ``points_per_side`` -> grid size G (points ``x_i = 0.5 + i/G*W``, ``y_j = 0.5 + j/G*H``,
    i outer; or ``point_grids[0]`` normalised, scaled by (W, H)), ``pred_iou_thresh`` ->
    iou_thresh (best candidate's IoU, strict >), ``stability_score_thresh`` (best
    candidate's stability, strict >), ``stability_score_offset``, ``min_mask_region_area``
    -> min_area (always applied: holes then islands; score 1 unchanged / 0 changed),
    ``box_nms_thresh`` -> nms_thresh. Crops are not part of this procedure
    (``crop_n_layers`` must be 0).

    ``prompt_boxes`` (``method="sam"``, no crops; MobileSAMv2's decoding): (N, 4) XYXY boxes
    in image pixels, one per point of ``point_grids``; each point is decoded as its box
    (single-mask output) instead of as a positive point, and stays the record's
    ``point_coords``. The filters and NMS apply as given (thresholds <= 0 disable them).

    ``points_per_batch``: points decoded per model call (results do not depend on it, up
    to the decoder's last-bit float rounding, which BLAS may vary with the batch size);
    ``None`` picks it from free memory (:func:`auto_points_per_batch`).
    ``progress(done, total)`` is called after each batch and at the end; ``cancel()`` is
    polled between batches and masks, and :class:`Cancelled` is raised when it returns True.
    ``details``: optional dict filled with intermediates (for tests and debugging).

    Arguments are checked first (:func:`~napari_esam.core.plane.params.check_everything_args`:
    whole numbers, thresholds in [0, 1], at most 1024 points per side and 4 crop layers,
    grids in [0, 1], ``contrast_limits`` finite with low < high); a bad one raises
    ``ValueError``.

    Tie order in NMS reproduces the reference on the CPU (see :mod:`amg_utils`).
    """
    check_everything_args(
        points_per_side=points_per_side, points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
        crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
        crop_overlap_ratio=crop_overlap_ratio,
        crop_n_points_downscale_factor=crop_n_points_downscale_factor,
        min_mask_region_area=min_mask_region_area, point_grids=point_grids, method=method,
        contrast_limits=contrast_limits,
    )
    predictor = _as_predictor(predictor_or_model)
    if image is not None:
        predictor.set_image(image, contrast_limits)
    elif not predictor.is_image_set:
        raise ValueError("no image: pass one, or set it on the predictor first")
    grids = None if point_grids is None else check_point_grids(point_grids)
    if grids is None:
        points_per_side = int(points_per_side)
    crop_n_layers = int(crop_n_layers)
    crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
    boxes = None
    if prompt_boxes is not None:
        boxes = np.asarray(prompt_boxes, dtype=np.float64)
        if method != "sam" or crop_n_layers:
            raise ValueError("prompt_boxes need method='sam' and no crops (crop_n_layers=0)")
        if grids is None or len(grids) != 1 or boxes.shape != (len(grids[0]), 4):
            raise ValueError("prompt_boxes must be (N, 4) XYXY, one per point of point_grids")
        if not np.isfinite(boxes).all():
            raise ValueError("prompt_boxes contain NaN or infinite values")
    with torch.inference_mode():
        if method == "efficientsam":
            return _everything_efficientsam(
                predictor,
                grid_size=points_per_side,
                grid=grids[0] if grids else None,
                points_per_batch=points_per_batch,
                iou_thresh=pred_iou_thresh,
                stability_thresh=stability_score_thresh,
                stability_offset=stability_score_offset,
                min_area=min_mask_region_area,
                nms_thresh=box_nms_thresh,
                progress=progress,
                cancel=cancel,
                details=details,
            )
        return _everything_sam(
            image,
            predictor,
            contrast_limits=contrast_limits,
            points_per_side=points_per_side,
            grids=grids,
            boxes=boxes,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            min_mask_region_area=min_mask_region_area,
            progress=progress,
            cancel=cancel,
            details=details,
        )


# ---------------------------------------------------------------------------- SAM procedure


def _gate(iou_thresh: float) -> float | None:
    """The decoder's IoU gate for a predicted-IoU filter (None when the filter is off)."""
    return float(iou_thresh) if iou_thresh > 0.0 else None


def _decode_points(
    predictor: Predictor, points: np.ndarray, iou_thresh: float = 0.0
) -> tuple[Tensor, Tensor]:
    """One positive point per row -> (low-res (B, 3, 256, 256), iou (B, 3)) on the device.

    Rows whose three IoU predictions are all <= ``iou_thresh`` (> 0) have undefined logits:
    the decoder skips their masks, which the predicted-IoU filter drops.
    """
    coords = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64))[:, None, :]
    labels = torch.ones(coords.shape[0], 1, dtype=torch.int64)
    return predictor.decode_torch(
        coords, labels, multimask_output=True, iou_gate=_gate(iou_thresh)
    )


def _decode_boxes(
    predictor: Predictor, boxes: np.ndarray, iou_thresh: float = 0.0
) -> tuple[Tensor, Tensor]:
    """One XYXY box per row -> (low-res (B, 1, 256, 256), iou (B, 1)): single-mask output,
    the corners labelled 2 and 3 (SAM's box prompt); ``iou_thresh`` as for points."""
    h, w = predictor.original_size
    b = np.ascontiguousarray(boxes, dtype=np.float64)
    b = np.clip(b, 0, [w, h, w, h])
    coords = torch.from_numpy(b.reshape(-1, 2, 2))
    labels = torch.tensor([[2, 3]], dtype=torch.int64).expand(coords.shape[0], 2)
    return predictor.decode_torch(
        coords, labels.contiguous(), multimask_output=False, iou_gate=_gate(iou_thresh)
    )


def _sam_batch(
    predictor: Predictor,
    points: np.ndarray,
    query_offset: int,
    crop_box: list[int],
    image_hw: tuple[int, int],
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    out: _Candidates,
    boxes: np.ndarray | None = None,
) -> None:
    model = predictor.model
    if boxes is None:
        low_res, iou = _decode_points(predictor, points, pred_iou_thresh)
    else:
        low_res, iou = _decode_boxes(predictor, boxes, pred_iou_thresh)
    k = low_res.shape[1]
    low_res = low_res.flatten(0, 1)
    iou = iou.flatten(0, 1)
    query = torch.arange(points.shape[0], device=iou.device).repeat_interleave(k)
    idx = torch.arange(iou.shape[0], device=iou.device)
    if pred_iou_thresh > 0.0:
        idx = idx[iou > pred_iou_thresh]
    orig_box = [0, 0, image_hw[1], image_hw[0]]
    size = predictor.original_size
    step = _chunk(size)
    for start in range(0, idx.shape[0], step):
        sel = idx[start : start + step]
        logits = predictor.upsample(low_res[sel][:, None])[:, 0]
        stab = U.stability_score(logits, 0.0, stability_score_offset)
        if stability_score_thresh > 0.0:
            ok = stab >= stability_score_thresh
            sel, stab, logits = sel[ok], stab[ok], logits[ok]
        masks = model.threshold(logits)
        del logits
        boxes, area = U.mask_boxes_and_areas(masks)
        del masks
        near = U.is_box_near_crop_edge(boxes, crop_box, orig_box)
        if near.any():
            ok = ~near
            sel, stab, boxes, area = sel[ok], stab[ok], boxes[ok], area[ok]
        q = query[sel].cpu()
        out.low_res.append(low_res[sel].cpu())
        out.iou.append(iou[sel].cpu())
        out.stability.append(stab.cpu())
        out.boxes.append(boxes.cpu())
        out.area.append(area.cpu())
        out.points.append(torch.from_numpy(points)[q])
        out.query.append(q + query_offset)


def _everything_sam(
    image: Any,
    predictor: Predictor,
    *,
    contrast_limits: tuple[float, float] | None,
    points_per_side: int | None,
    grids: list[np.ndarray] | None,
    boxes: np.ndarray | None,
    points_per_batch: int | None,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    box_nms_thresh: float,
    crop_n_layers: int,
    crop_nms_thresh: float,
    crop_overlap_ratio: float,
    crop_n_points_downscale_factor: int,
    min_mask_region_area: int,
    progress: Callable[[int, int], Any] | None,
    cancel: Callable[[], bool] | None,
    details: dict | None,
) -> list[dict[str, Any]]:
    model = predictor.model
    image_hw = predictor.original_size
    if grids is None:
        grids = U.build_all_layer_point_grids(
            points_per_side, crop_n_layers, crop_n_points_downscale_factor
        )
    if len(grids) != crop_n_layers + 1:
        raise ValueError(
            f"point_grids has {len(grids)} grids but crop_n_layers={crop_n_layers} needs "
            f"{crop_n_layers + 1}"
        )
    crop_boxes, layers = U.generate_crop_boxes(image_hw, crop_n_layers, crop_overlap_ratio)
    ppb = points_per_batch or auto_points_per_batch(model.device, image_hw)
    n_batches = sum(math.ceil(len(grids[layer]) / ppb) for layer in layers)
    steps = _Steps(n_batches + 1, progress, cancel)
    rgb = None
    if len(crop_boxes) > 1:
        if image is None:
            raise ValueError("crops need the image: pass it to segment_everything")
        from napari_esam.core.plane.image import to_model_rgb

        rgb = to_model_rgb(image, contrast_limits)

    crops: list[_Crop] = []
    per_crop: list[dict[str, Tensor]] = []
    for crop_box, layer in zip(crop_boxes, layers, strict=True):
        x0, y0, x1, y1 = crop_box
        if layer == 0:
            pred = predictor
        else:  # a private predictor: the caller's keeps the whole image's embedding
            steps.check()
            pred = Predictor(model)
            pred.set_image(rgb[y0:y1, x0:x1])
        h, w = pred.original_size
        points = grids[layer] * np.array([[w, h]], dtype=np.float64)
        cand = _Candidates()
        for start in range(0, len(points), ppb):
            steps.check()
            _sam_batch(
                pred,
                points[start : start + ppb],
                start,
                crop_box,
                image_hw,
                pred_iou_thresh,
                stability_score_thresh,
                stability_score_offset,
                cand,
                None if boxes is None else boxes[start : start + ppb],
            )
            steps.step()
        data = cand.cat()
        keep = U.batched_nms(
            data["boxes"].float(),
            data["iou"],
            torch.zeros(len(data["boxes"]), dtype=torch.int64),
            box_nms_thresh,
        )
        data = {k: v[keep] for k, v in data.items()}
        data["boxes"] = U.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = U.uncrop_points(data["points"], crop_box)
        data["crop_id"] = torch.full((len(keep),), len(crops), dtype=torch.int64)
        crops.append(_Crop(list(crop_box), pred.input_size, (h, w)))
        per_crop.append(data)

    data = {k: torch.cat([d[k] for d in per_crop]) for k in per_crop[0]}
    if len(crop_boxes) > 1:
        cb = torch.tensor([crops[i].box for i in data["crop_id"].tolist()], dtype=torch.int64)
        cb = cb.reshape(-1, 4)
        scores = 1 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
        keep = U.batched_nms(
            data["boxes"].float(), scores, torch.zeros(len(cb), dtype=torch.int64), crop_nms_thresh
        )
        data = {k: v[keep] for k, v in data.items()}

    crop_ids = data["crop_id"].tolist()
    masks: list[np.ndarray] = []
    if min_mask_region_area > 0 and len(crop_ids):
        packed, unchanged, boxes, areas = [], [], [], []
        full = _iter_full_masks(data["low_res"], crop_ids, crops, model, image_hw)
        for i, m in enumerate(full):
            steps.check()
            mask, same = U.clean_mask(m.numpy(), min_mask_region_area)
            if same:  # same mask: same box and area
                boxes.append(data["boxes"][i])
                areas.append(int(data["area"][i]))
            else:
                boxes.append(U.masks_to_boxes(torch.from_numpy(mask)))
                areas.append(int(mask.sum()))
            unchanged.append(float(same))
            packed.append(np.packbits(mask))
        boxes_t = torch.stack(boxes)
        scores = torch.as_tensor(unchanged)
        keep = U.batched_nms(
            boxes_t.float(),
            scores,
            torch.zeros(len(boxes_t), dtype=torch.int64),
            max(box_nms_thresh, crop_nms_thresh),
        )
        changed = scores == 0.0
        data["boxes"] = torch.where(changed[:, None], boxes_t, data["boxes"])
        data["area"] = torch.tensor(areas, dtype=torch.int64)
        data = {k: v[keep] for k, v in data.items()}
        n_px = image_hw[0] * image_hw[1]
        masks = [
            np.unpackbits(packed[i], count=n_px).view(bool).reshape(image_hw)
            for i in keep.tolist()
        ]
        if details is not None:
            details["cleanup_unchanged"] = scores.numpy()
            details["cleanup_keep"] = keep.numpy()
    else:
        masks = [
            m.numpy() for m in _iter_full_masks(data["low_res"], crop_ids, crops, model, image_hw)
        ]
    steps.step()
    if details is not None:
        details["query_index"] = data["query"].numpy()
    return [
        _record(
            masks[i],
            data["boxes"][i].tolist(),
            int(data["area"][i]),
            float(data["iou"][i]),
            float(data["stability"][i]),
            data["points"][i].tolist(),
            crops[crop_ids[i]].box,
        )
        for i in range(len(masks))
    ]


# ---------------------------------------------------------------------- EfficientSAM procedure


def _everything_efficientsam(
    predictor: Predictor,
    *,
    grid_size: int | None,
    grid: np.ndarray | None,
    points_per_batch: int | None,
    iou_thresh: float,
    stability_thresh: float,
    stability_offset: float,
    min_area: float,
    nms_thresh: float,
    progress: Callable[[int, int], Any] | None,
    cancel: Callable[[], bool] | None,
    details: dict | None,
) -> list[dict[str, Any]]:
    model = predictor.model
    image_hw = predictor.original_size
    h, w = image_hw
    if grid is None:
        points = efficientsam_grid(grid_size, image_hw)
    else:
        points = grid * np.array([[w, h]], dtype=np.float64)
    ppb = points_per_batch or auto_points_per_batch(model.device, image_hw)
    steps = _Steps(math.ceil(len(points) / ppb) + 1, progress, cancel)
    n_px = h * w

    best_iou_all: list[Tensor] = []
    query, best_iou, stability, unchanged, boxes, areas = [], [], [], [], [], []
    packed: list[np.ndarray] = []
    for start in range(0, len(points), ppb):
        steps.check()
        low_res, iou = _decode_points(predictor, points[start : start + ppb], iou_thresh)
        order = torch.argsort(iou, dim=-1, descending=True)
        best = order[:, 0]
        b_iou = iou.gather(1, best[:, None])[:, 0]
        best_iou_all.append(b_iou.cpu())
        idx = torch.nonzero(b_iou > iou_thresh).flatten()
        step = _chunk(image_hw)
        for c0 in range(0, idx.shape[0], step):
            sel = idx[c0 : c0 + step]
            logits = predictor.upsample(low_res[sel, best[sel]][:, None])[:, 0]
            stab = U.stability_score(logits, 0.0, stability_offset)
            ok = stab > stability_thresh
            sel, stab = sel[ok], stab[ok]
            masks_t = model.threshold(logits[ok])
            del logits
            bx, ar = U.mask_boxes_and_areas(masks_t)
            masks = masks_t.cpu().numpy()
            del masks_t
            for j in range(len(sel)):
                steps.check()
                mask, same = U.clean_mask(masks[j], min_area)
                if same:
                    boxes.append(bx[j].cpu())
                    areas.append(int(ar[j]))
                else:
                    boxes.append(U.masks_to_boxes(torch.from_numpy(mask)))
                    areas.append(int(mask.sum()))
                unchanged.append(float(same))
                packed.append(np.packbits(mask))
            query.append(sel.cpu() + start)
            best_iou.append(b_iou[sel].cpu())
            stability.append(stab.cpu())
        steps.step()

    n = len(packed)
    query_t = torch.cat(query) if query else torch.empty(0, dtype=torch.int64)
    iou_t = torch.cat(best_iou) if best_iou else torch.empty(0)
    stab_t = torch.cat(stability) if stability else torch.empty(0)
    scores = torch.as_tensor(unchanged, dtype=torch.float32)
    boxes_t = torch.stack(boxes) if boxes else torch.empty(0, 4, dtype=torch.int64)
    keep = U.batched_nms(boxes_t.float(), scores, torch.zeros(n, dtype=torch.int64), nms_thresh)
    steps.step()
    if details is not None:
        details.update(
            grid_points=points,
            best_iou_all=torch.cat(best_iou_all).numpy() if best_iou_all else np.empty(0),
            candidate_query_index=query_t.numpy(),
            candidate_best_iou=iou_t.numpy(),
            candidate_stability=stab_t.numpy(),
            candidate_unchanged=scores.numpy(),
            nms_keep=keep.numpy(),
        )
    crop_box = [0, 0, w, h]
    return [
        _record(
            np.unpackbits(packed[i], count=n_px).view(bool).reshape(image_hw),
            boxes_t[i].tolist(),
            areas[i],
            float(iou_t[i]),
            float(stab_t[i]),
            points[int(query_t[i])].tolist(),
            crop_box,
        )
        for i in keep.tolist()
    ]
