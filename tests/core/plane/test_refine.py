"""Refine labels on one plane (:mod:`napari_esam.core.plane.refine`) with stand-in models:
FakeModel (no mask input, like EfficientSAM: refined mask = the filled box plus a disk around
the interior point) and MaskInputModel (answers with its mask input, records its prompts)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_esam.core.plane.everything import Cancelled
from napari_esam.core.plane.predictor import Predictor
from napari_esam.core.plane.refine import (
    LOGIT_EPS,
    label_objects,
    mask_input_logits,
    refine_labels,
)
from tests.fakes import FakeModel, MaskInputModel, refine_scene

EDGE = float(np.log((1 - LOGIT_EPS) / LOGIT_EPS))  # the mask input's +- logit


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_objects_box_interior_point_and_mask():
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 10:30] = 4  # a 10 x 20 rectangle
    labels[30:33, 0:3] = -2  # any nonzero integer is an id
    labels[20, 40] = 4  # a second piece of id 4: one object
    objs = label_objects(labels)
    assert [o.id for o in objs] == [-2, 4]
    neg, four = objs
    assert neg.box == (30, 0, 33, 3) and neg.point == (1, 31)
    assert four.box == (5, 10, 21, 41)
    x, y = four.point
    dist = ndimage.distance_transform_edt(np.pad(labels == 4, 1))[1:-1, 1:-1]
    assert labels[y, x] == 4 and dist[y, x] == dist.max() == 5
    assert four.area == 201
    np.testing.assert_array_equal(four.mask, labels[5:21, 10:41] == 4)


def test_ids_kept_and_disagreeing_objects_kept_and_listed():
    image, labels = refine_scene()
    before = labels.copy()
    res = refine_labels(image, labels, FakeModel().eval())
    np.testing.assert_array_equal(labels, before)  # the input is not modified
    assert res.labels.dtype == labels.dtype and res.labels.shape == labels.shape
    # the line (id 9) against its filled box: IoU ~0.01, kept exactly as it was, listed
    assert [i for i, _ in res.kept] == [9] and res.kept[0][1] < 0.05
    assert res.ious[9] == res.kept[0][1]
    np.testing.assert_array_equal(res.labels == 9, before == 9)
    # the disks are replaced by the stand-in's answer (their box) and keep their ids
    assert res.refined == [3, 7, 12]
    assert set(np.unique(res.labels)) == {0, 3, 7, 9, 12}
    for obj in label_objects(before):
        if obj.id == 9:
            continue
        y0, x0, y1, x1 = obj.box
        box = np.zeros(labels.shape, bool)
        box[y0:y1, x0:x1] = True
        got = res.labels == obj.id
        assert iou(got, box) > 0.95  # its filled box (up to the stand-in's 256 frame)
        assert 0.7 < res.ious[obj.id] < 0.95
    assert not res.mask_input  # FakeModel has no mask input


def test_threshold_zero_replaces_every_object_and_one_replaces_none():
    image, labels = refine_scene()
    all_in = refine_labels(image, labels, FakeModel().eval(), iou_threshold=0.0)
    assert all_in.kept == [] and all_in.refined == [3, 7, 9, 12]
    assert not np.array_equal(all_in.labels == 9, labels == 9)
    none = refine_labels(image, labels, FakeModel().eval(), iou_threshold=1.0)
    assert [i for i, _ in none.kept] == [3, 7, 9, 12]
    np.testing.assert_array_equal(none.labels, labels)


def test_a_refined_object_never_takes_another_objects_pixels():
    """Id 1's filled box covers part of id 2 (a disk in its corner): id 2 keeps every
    pixel it had; the box takes only background and id 1's own pixels."""
    image = np.full((120, 120), 200, np.uint16)
    labels = np.zeros((120, 120), np.uint8)
    yy, xx = np.mgrid[:120, :120]
    labels[(yy - 60) ** 2 + (xx - 60) ** 2 <= 35**2] = 1
    labels[(yy - 32) ** 2 + (xx - 32) ** 2 <= 8**2] = 2  # in id 1's box corner
    res = refine_labels(image, labels, FakeModel().eval(), iou_threshold=0.0)
    assert (res.labels[labels == 2] == 2).all()
    grown = (res.labels == 1) & (labels == 0)
    assert grown.any()  # the box corners were background
    assert set(np.unique(res.labels[labels == 1])) <= {0, 1}  # never id 2's


def test_smaller_refined_objects_are_painted_on_top():
    """Two objects whose boxes overlap on background: the smaller one wins the overlap."""
    image = np.full((100, 100), 200, np.uint16)
    labels = np.zeros((100, 100), np.uint8)
    yy, xx = np.mgrid[:100, :100]
    labels[(yy - 40) ** 2 + (xx - 40) ** 2 <= 30**2] = 1
    labels[(yy - 78) ** 2 + (xx - 78) ** 2 <= 14**2] = 2
    res = refine_labels(image, labels, FakeModel().eval(), iou_threshold=0.0)
    assert (res.labels[64:71, 64:71] == 2).all()  # both boxes, background before


def test_mask_input_in_the_model_frame():
    """The echoing model answers with the mask input: the refined objects land on the
    originals (a wrong frame, scale or padding would move or resize them)."""
    image, labels = refine_scene()  # 300 x 400: padded at the bottom in the 1024 frame
    model = MaskInputModel().eval()
    res = refine_labels(image, labels, model, iou_threshold=0.0)
    assert res.mask_input
    for obj_id in (3, 7, 12):
        assert iou(res.labels == obj_id, labels == obj_id) > 0.93
    (call,) = model.calls
    assert call["mask_input"].shape == (4, 1, 256, 256) and not call["multimask"]
    # the content is 768 x 1024 of the frame: rows 192.. of the 256 grid are padding
    np.testing.assert_allclose(call["mask_input"][:, :, 192:], -EDGE, rtol=1e-5)
    # id 7's disk (centre (60, 60) px = cell (38.4, 38.4)) is inside, far cells outside
    seven = call["mask_input"][1, 0]
    assert seven[38, 38] == pytest.approx(EDGE) and seven[150, 150] == pytest.approx(-EDGE)


def test_mask_input_logits_cover_cells_by_area():
    """A window of 200 x 100 px in a 1024 x 512 content frame: one pixel is a 5.12 px
    square, so a pixel-aligned object's cells get its covered fraction."""
    labels = np.zeros((200, 100), np.uint8)
    labels[0:25, 0:50] = 1
    (obj,) = label_objects(labels)
    logits = mask_input_logits(obj, (0, 0), (200, 100), (1024, 512))
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    # 25 px = 128 frame px = 32 cells; 50 px = 256 frame px = 64 cells; all inside
    assert p[:32, :64].min() == pytest.approx(1 - LOGIT_EPS)
    assert p[32:, :].max() == pytest.approx(LOGIT_EPS)
    assert p[:, 64:].max() == pytest.approx(LOGIT_EPS)
    # a half-covered cell: 1 px = 5.12 frame px, the object's 3rd px ends at 15.36
    labels[:] = 0
    labels[0:3, 0:3] = 1
    (obj,) = label_objects(labels)
    p = 1 / (1 + np.exp(-mask_input_logits(obj, (0, 0), (200, 100), (1024, 512))))
    assert p[3, 3] == pytest.approx((15.36 - 12) ** 2 / 16, abs=1e-6)
    # a window elsewhere in the plane: the object is moved into the window's frame
    shifted = mask_input_logits(obj, (-10, 0), (200, 100), (1024, 512))
    np.testing.assert_array_equal(shifted[:3, :4] > 0, [[False] * 4] * 3)
    assert (shifted[13:16, :3] > 0).all() and (shifted[12, :3] < 0).all()  # 0.2 covered


def test_prompts_the_decoder_receives():
    """Interior point first (label 1), then the box corners (2, 3), inclusive max, in
    original pixels; single-mask output; no mask input when switched off."""
    labels = np.zeros((64, 96), np.uint8)
    labels[10:20, 30:60] = 5
    model = MaskInputModel().eval()
    res = refine_labels(np.zeros((64, 96), np.uint8), labels, model, use_mask_input=False)
    assert not res.mask_input
    (call,) = model.calls
    assert call["mask_input"] is None and not call["multimask"]
    np.testing.assert_array_equal(call["labels"], [[1, 2, 3]])
    x, y = call["coords"][0, 0]
    assert labels[int(y), int(x)] == 5 and 14 <= y <= 15
    np.testing.assert_array_equal(call["coords"][0, 1:], [[30, 10], [59, 19]])
    assert call["original_size"] == (64, 96)


def test_batches_of_the_decoder():
    image, labels = refine_scene()
    model = MaskInputModel().eval()
    one = refine_labels(image, labels, model, batch_size=1)
    assert [len(c["coords"]) for c in model.calls] == [1, 1, 1, 1]
    model.calls.clear()
    three = refine_labels(image, labels, model, batch_size=3)
    assert [len(c["coords"]) for c in model.calls] == [3, 1]
    np.testing.assert_array_equal(one.labels, three.labels)


def test_predictor_reused_and_progress_and_cancel():
    image, labels = refine_scene()
    predictor = Predictor(FakeModel().eval())
    seen = []
    refine_labels(image, labels, predictor, batch_size=3,
                  progress=lambda d, t: seen.append((d, t)))
    refine_labels(image, labels, predictor)
    assert predictor.encoder_calls == 1
    assert seen == [(3, 4), (4, 4)]
    with pytest.raises(Cancelled):
        refine_labels(image, labels, predictor, batch_size=2, cancel=lambda: len(seen) > 2,
                      progress=lambda d, t: seen.append((d, t)))
    assert seen[2:] == [(2, 4)]  # stopped after the first batch


def test_bad_inputs_and_empty_labels():
    image, labels = refine_scene()
    model = FakeModel().eval()
    with pytest.raises(ValueError, match="labels must be integers"):
        refine_labels(image, labels.astype(np.float32), model)
    with pytest.raises(ValueError, match="differ in size"):
        refine_labels(image, labels[:-1], model)
    with pytest.raises(ValueError, match="IoU threshold"):
        refine_labels(image, labels, model, iou_threshold=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        refine_labels(image, labels, model, batch_size=0)
    empty = refine_labels(image, np.zeros_like(labels), model)
    assert empty.kept == [] and empty.refined == [] and not empty.labels.any()
