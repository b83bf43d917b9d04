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
from tests.fakes import (
    RADIUS,
    SCALES,
    SCORES,
    FakeModel,
    assert_same_records,
    naive_efficientsam,
    naive_sam,
)


class VariedFake(FakeModel):
    """FakeModel's disks around one positive point per row (vectorised), with a predicted IoU
    that varies with the point."""

    def decode(self, embedding, coords, labels, original_size, multimask_output=True,
               iou_gate=None):
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


@pytest.mark.slow
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
    assert segment_everything(img, model, **{**KW, "pred_iou_thresh": 1.0}) == []
    kw = {**KW, "pred_iou_thresh": 1.0}
    assert segment_everything(img, model, method="efficientsam", **kw) == []


def test_auto_points_per_batch():
    n = auto_points_per_batch("cpu", (1024, 1024))
    assert 8 <= n <= 64 and n % 8 == 0
