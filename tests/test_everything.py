"""segment_everything on a fast fake model: equality with straightforward transcriptions of
both reference procedures (all logits upsampled, no batching tricks), crops, batching,
progress/cancel and input handling. Conformance with the real models is in
``test_everything_conformance.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_esam.core.plane import amg_utils as U
from napari_esam.core.plane.everything import (
    Cancelled,
    auto_points_per_batch,
    efficientsam_grid,
    segment_everything,
)
from napari_esam.core.plane.predictor import Predictor

from .fakes import RADIUS, SCALES, SCORES, FakeModel


class VariedFake(FakeModel):
    """FakeModel's disks around one positive point per row (vectorised), with a predicted IoU
    that varies with the point."""

    def decode(self, embedding, coords, labels, original_size, multimask_output=True):
        assert coords.shape[1] == 1 and bool((labels == 1).all()) and multimask_output
        h, w = original_size
        s = 1024 / max(h, w) / 4  # original px -> 256 frame
        c = coords.float()[:, 0] * s
        grid = torch.arange(256, dtype=torch.float32) + 0.5
        d = torch.sqrt(
            (grid[None, None, :] - c[:, 0, None, None]) ** 2
            + (grid[None, :, None] - c[:, 1, None, None]) ** 2
        )
        low = torch.stack([(RADIUS * s * k - d).clamp(-10, 10) for k in SCALES], 1)
        wiggle = 0.08 * torch.cos(0.37 * coords[:, 0, 0] + 0.11 * coords[:, 0, 1]).float()
        iou = torch.tensor(SCORES) + wiggle[:, None] * torch.tensor([1.0, -1.0, 0.5])
        return low, iou


class InclusiveFake(VariedFake):
    mask_threshold_inclusive = True


def _image(h: int = 80, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


KW = dict(
    points_per_side=6,
    pred_iou_thresh=0.6,
    stability_score_thresh=0.9,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
)


# ------------------------------------------------------------------ straightforward references


def naive_sam(
    image,
    model,
    *,
    points_per_side,
    points_per_batch=64,
    pred_iou_thresh=0.88,
    stability_score_thresh=0.95,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
    crop_n_layers=0,
    crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500,
    crop_n_points_downscale_factor=1,
    min_mask_region_area=0,
    predictor=None,
):
    """SamAutomaticMaskGenerator step by step: every candidate upsampled, then filtered.

    ``predictor`` (optional) is used for the whole-image crop (its embedding is reused)."""
    h_img, w_img = image.shape[:2]
    crop_boxes, layers = U.generate_crop_boxes((h_img, w_img), crop_n_layers, crop_overlap_ratio)
    grids = U.build_all_layer_point_grids(
        points_per_side, crop_n_layers, crop_n_points_downscale_factor
    )
    everything = []
    for cb, layer in zip(crop_boxes, layers, strict=True):
        x0, y0, x1, y1 = cb
        p = predictor if predictor is not None and layer == 0 else Predictor(model)
        p.set_image(image[y0:y1, x0:x1])
        h, w = p.original_size
        pts = grids[layer] * np.array([[w, h]])
        rows = []
        for s in range(0, len(pts), points_per_batch):
            b = pts[s : s + points_per_batch]
            low, iou = p.decode_torch(
                torch.from_numpy(b)[:, None], torch.ones(len(b), 1, dtype=torch.int64)
            )
            logits = p.upsample(low).flatten(0, 1)
            iou = iou.flatten()
            bp = np.repeat(b, low.shape[1], axis=0)
            for i in range(len(iou)):
                if pred_iou_thresh > 0 and not iou[i] > pred_iou_thresh:
                    continue
                st = U.stability_score(logits[i], 0.0, stability_score_offset)
                if stability_score_thresh > 0 and not st >= stability_score_thresh:
                    continue
                m = model.threshold(logits[i])
                box = U.masks_to_boxes(m)
                if U.is_box_near_crop_edge(box[None], cb, [0, 0, w_img, h_img])[0]:
                    continue
                rows.append(
                    dict(
                        mask=U.uncrop_masks(m, cb, h_img, w_img).numpy(),
                        cbox=box,
                        box=U.uncrop_boxes_xyxy(box, cb),
                        iou=float(iou[i]),
                        st=float(st),
                        pt=(bp[i] + [x0, y0]).tolist(),
                        crop=cb,
                    )
                )
        if rows:
            keep = U.batched_nms(
                torch.stack([r["cbox"] for r in rows]).float(),
                torch.tensor([r["iou"] for r in rows]),
                torch.zeros(len(rows)),
                box_nms_thresh,
            )
            everything += [rows[i] for i in keep.tolist()]
    if len(crop_boxes) > 1 and everything:
        cbs = torch.tensor([r["crop"] for r in everything])
        keep = U.batched_nms(
            torch.stack([r["box"] for r in everything]).float(),
            1 / ((cbs[:, 2] - cbs[:, 0]) * (cbs[:, 3] - cbs[:, 1])),
            torch.zeros(len(everything)),
            crop_nms_thresh,
        )
        everything = [everything[i] for i in keep.tolist()]
    if min_mask_region_area > 0 and everything:
        scores = []
        for r in everything:
            r["mask"], same = U.clean_mask(r["mask"], min_mask_region_area)
            scores.append(float(same))
        keep = U.batched_nms(
            U.masks_to_boxes(torch.from_numpy(np.stack([r["mask"] for r in everything]))).float(),
            torch.tensor(scores),
            torch.zeros(len(everything)),
            max(box_nms_thresh, crop_nms_thresh),
        )
        everything = [everything[i] for i in keep.tolist()]
    out = []
    for r in everything:
        bx = U.masks_to_boxes(torch.from_numpy(r["mask"])).tolist()
        c = r["crop"]
        out.append(
            dict(
                segmentation=r["mask"],
                area=int(r["mask"].sum()),
                bbox=[bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]],
                predicted_iou=r["iou"],
                point_coords=[r["pt"]],
                stability_score=r["st"],
                crop_box=[c[0], c[1], c[2] - c[0], c[3] - c[1]],
            )
        )
    return out


def naive_efficientsam(
    image,
    model,
    grid_size,
    iou_thresh,
    stability_thresh,
    offset,
    min_area,
    nms_thresh,
    predictor=None,
):
    """The notebook procedure: all queries in one call, all candidates upsampled."""
    p = predictor if predictor is not None else Predictor(model)
    p.set_image(image)
    h, w = p.original_size
    xy = [
        [0.5 + i / grid_size * w, 0.5 + j / grid_size * h]
        for i in range(grid_size)
        for j in range(grid_size)
    ]
    pts = torch.tensor(xy, dtype=torch.float64)
    low, iou = p.decode_torch(pts[:, None], torch.ones(len(xy), 1, dtype=torch.int64))
    logits = p.upsample(low)
    order = torch.argsort(iou, dim=-1, descending=True)
    iou = torch.take_along_dim(iou, order, dim=1)
    logits = torch.take_along_dim(logits, order[..., None, None], dim=1)
    keep = iou[:, 0] > iou_thresh
    q = torch.nonzero(keep).flatten()
    st = U.stability_score(logits[keep], 0.0, offset)[:, 0]
    ok = st > stability_thresh
    q, st = q[ok], st[ok]
    masks = model.threshold(logits[keep][ok][:, 0]).numpy()
    cleaned, scores = [], []
    for m in masks:
        m2, same = U.clean_mask(m, min_area)
        cleaned.append(m2)
        scores.append(float(same))
    if not cleaned:
        return []
    boxes = U.masks_to_boxes(torch.from_numpy(np.stack(cleaned)))
    keep = U.batched_nms(boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), nms_thresh)
    return [
        dict(
            segmentation=cleaned[i],
            query=int(q[i]),
            predicted_iou=float(iou[q[i], 0]),
            stability_score=float(st[i]),
        )
        for i in keep.tolist()
    ]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert set(rb) <= set(ra)
        for k, v in rb.items():
            if k == "segmentation":
                np.testing.assert_array_equal(ra[k], v)
            else:
                assert ra[k] == v, k


# ------------------------------------------------------------------ tests


def test_records_structure():
    img = _image()
    recs = segment_everything(img, Predictor(VariedFake()), **KW)
    assert len(recs) > 3
    grid = U.build_point_grid(6) * [96, 80]
    for r in recs:
        seg = r["segmentation"]
        assert seg.dtype == bool and seg.shape == (80, 96)
        assert r["area"] == int(seg.sum()) and isinstance(r["area"], int)
        ys, xs = np.nonzero(seg)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert all(isinstance(v, int) for v in r["bbox"] + r["crop_box"])
        assert r["crop_box"] == [0, 0, 96, 80]
        assert r["predicted_iou"] > 0.6 and r["stability_score"] >= 0.9
        assert any(np.allclose(r["point_coords"][0], g) for g in grid)
        x, y = r["point_coords"][0]
        assert seg[int(y), int(x)]  # the disk contains its prompt
    ious = [r["predicted_iou"] for r in recs]
    assert ious == sorted(ious, reverse=True)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"box_nms_thresh": 1.0, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
        {"min_mask_region_area": 400, "box_nms_thresh": 0.95},
        {"crop_n_layers": 1, "crop_n_points_downscale_factor": 2, "crop_nms_thresh": 0.6},
    ],
)
def test_sam_matches_naive_reference(extra):
    img = _image()
    kw = {**KW, **extra}
    model = VariedFake()
    ours = segment_everything(img, model, points_per_batch=16, **kw)
    ref = naive_sam(img, model, points_per_batch=16, **kw)
    assert len(ours) > 0
    assert_same_records(ours, ref)
    if extra.get("crop_n_layers"):
        crops = {tuple(r["crop_box"]) for r in ours}
        assert len(crops) > 1
        for r in ours:  # masks lie inside their crop
            x, y, w, h = r["crop_box"]
            outside = r["segmentation"].copy()
            outside[y : y + h, x : x + w] = False
            assert not outside.any()


def test_points_per_batch_does_not_change_results():
    img = _image()
    model = VariedFake()
    ref = segment_everything(img, model, points_per_batch=64, **KW)
    for ppb in (1, 7, None):
        assert_same_records(segment_everything(img, model, points_per_batch=ppb, **KW), ref)
    kw = {**KW, "method": "efficientsam", "min_mask_region_area": 50}
    ref = segment_everything(img, model, points_per_batch=64, **kw)
    assert_same_records(segment_everything(img, model, points_per_batch=5, **kw), ref)


@pytest.mark.parametrize("model_cls", [VariedFake, InclusiveFake])
def test_efficientsam_method_matches_notebook(model_cls):
    img = _image()
    model = model_cls()
    details: dict = {}
    ours = segment_everything(
        img,
        model,
        method="efficientsam",
        points_per_side=5,
        points_per_batch=7,
        pred_iou_thresh=0.8,
        stability_score_thresh=0.85,
        stability_score_offset=1.0,
        min_mask_region_area=300,
        box_nms_thresh=0.8,
        details=details,
    )
    ref = naive_efficientsam(img, model, 5, 0.8, 0.85, 1.0, 300, 0.8)
    assert len(ours) == len(ref) > 0
    grid = efficientsam_grid(5, (80, 96))
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["predicted_iou"] == b["predicted_iou"]
        assert a["stability_score"] == b["stability_score"]
        assert a["point_coords"] == [grid[b["query"]].tolist()]
        assert a["area"] == a["segmentation"].sum() and a["crop_box"] == [0, 0, 96, 80]
    assert details["candidate_query_index"][details["nms_keep"]].tolist() == [
        b["query"] for b in ref
    ]


def test_efficientsam_grid_definition():
    g = efficientsam_grid(4, (30, 50))
    assert g.shape == (16, 2)
    assert g[:4].tolist() == [[0.5, 0.5], [0.5, 8.0], [0.5, 15.5], [0.5, 23.0]]  # y inner
    assert g[4].tolist() == [13.0, 0.5]


def test_progress_and_cancel():
    img = _image()
    calls = []
    segment_everything(
        img, VariedFake(), points_per_batch=10, progress=lambda d, t: calls.append((d, t)), **KW
    )
    assert calls == [(i, 5) for i in range(1, 6)]  # 36 points / 10 per batch + the final step
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(Cancelled):
        segment_everything(img, VariedFake(), points_per_batch=10, cancel=cancel, **KW)
    with pytest.raises(Cancelled):
        segment_everything(
            img, VariedFake(), method="efficientsam", cancel=lambda: True, **KW
        )


def test_inputs_model_predictor_grayscale_and_reuse():
    model = VariedFake()
    img16 = (np.arange(80 * 96).reshape(80, 96) * 7).astype(np.uint16)
    recs = segment_everything(img16, model, **KW)
    assert recs and recs[0]["segmentation"].shape == (80, 96)
    pred = Predictor(model)
    pred.set_image(img16)
    calls = pred.encoder_calls
    again = segment_everything(img16, pred, **KW)
    assert pred.encoder_calls == calls  # same image: no re-encoding
    assert_same_records(again, recs)
    assert_same_records(segment_everything(None, pred, **KW), recs)  # the predictor's image
    with pytest.raises(ValueError, match="no image"):
        segment_everything(None, Predictor(model), **KW)
    with pytest.raises(ValueError, match="method"):
        segment_everything(img16, model, method="fast", **KW)
    with pytest.raises(ValueError, match="crop"):
        segment_everything(img16, model, method="efficientsam", crop_n_layers=1, **KW)
    with pytest.raises(TypeError):
        segment_everything(img16, object(), **KW)


def test_explicit_point_grid_and_nothing_found():
    img = _image()
    model = VariedFake()
    grid = np.array([[0.5, 0.5], [0.25, 0.25]])
    kw = {k: v for k, v in KW.items() if k != "points_per_side"}
    recs = segment_everything(img, model, points_per_side=None, point_grids=grid, **kw)
    pts = sorted(tuple(r["point_coords"][0]) for r in recs)
    assert set(pts) <= {(48.0, 40.0), (24.0, 20.0)} and pts
    assert segment_everything(img, model, **{**KW, "pred_iou_thresh": 5.0}) == []
    kw = {**KW, "pred_iou_thresh": 5.0}
    assert segment_everything(img, model, method="efficientsam", **kw) == []


def test_auto_points_per_batch():
    n = auto_points_per_batch("cpu", (1024, 1024))
    assert 8 <= n <= 64 and n % 8 == 0
