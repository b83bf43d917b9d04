"""Predictor behaviour: prompt geometry, batching, caching and input errors (fast fake model)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_esam.core.plane.predictor import Predictor
from tests.fakes import RADIUS, FakeModel


@pytest.fixture
def predictor():
    p = Predictor(FakeModel().eval())
    p.set_image(np.random.default_rng(0).integers(0, 4000, (600, 800)).astype(np.uint16))
    return p


def centre(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def test_point_gives_mask_at_the_point(predictor):
    masks, scores, low = predictor.predict(np.array([[500.0, 200.0]]), np.array([1]))
    assert masks.shape == (3, 600, 800) and masks.dtype == bool
    assert scores.shape == (3,) and low.shape == (3, 256, 256)
    cx, cy = centre(masks[int(np.argmax(scores))])
    assert abs(cx - 500) < 2 and abs(cy - 200) < 2
    area = masks[1].sum()
    assert abs(area - np.pi * RADIUS**2) / (np.pi * RADIUS**2) < 0.15


def test_single_mask_output_and_logits(predictor):
    logits, scores, _ = predictor.predict(
        np.array([[100.0, 100.0]]), np.array([1]), multimask_output=False, return_logits=True
    )
    assert logits.shape == (1, 600, 800) and logits.dtype == np.float32
    assert scores.shape == (1,)


def test_box_gives_the_box(predictor):
    masks, _, _ = predictor.predict(box=np.array([100, 50, 300, 150]))
    ys, xs = np.nonzero(masks[0])
    assert abs(xs.min() - 100) <= 2 and abs(xs.max() - 300) <= 2
    assert abs(ys.min() - 50) <= 2 and abs(ys.max() - 150) <= 2


def test_swapped_box_corners_are_normalised(predictor):
    a, _, _ = predictor.predict(box=np.array([300, 150, 100, 50]))
    b, _, _ = predictor.predict(box=np.array([100, 50, 300, 150]))
    np.testing.assert_array_equal(a, b)


def test_negative_point_removes_area(predictor):
    pos, _, _ = predictor.predict(np.array([[400.0, 300.0]]), np.array([1]))
    both, _, _ = predictor.predict(np.array([[400.0, 300.0], [410.0, 300.0]]), np.array([1, 0]))
    assert both[1].sum() < pos[1].sum()


def test_batch_of_boxes_in_one_decoder_call(predictor, monkeypatch):
    calls = []
    original = predictor.model.decode
    monkeypatch.setattr(
        predictor.model, "decode", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    boxes = np.array([[10, 10, 60, 60], [200, 200, 260, 280]])
    masks, scores, low = predictor.predict_batch(boxes=boxes, multimask_output=False)
    assert masks.shape == (2, 1, 600, 800) and len(calls) == 1
    assert masks[0, 0, 30, 30] and not masks[0, 0, 240, 230]
    assert masks[1, 0, 240, 230] and not masks[1, 0, 30, 30]


def test_same_image_is_not_encoded_twice(predictor):
    image = np.random.default_rng(0).integers(0, 4000, (600, 800)).astype(np.uint16)
    assert predictor.encoder_calls == 1
    predictor.set_image(image)
    assert predictor.encoder_calls == 1
    predictor.set_image(image[::-1].copy())
    assert predictor.encoder_calls == 2


def test_embedding_shape(predictor):
    assert tuple(predictor.get_image_embedding().shape) == (1, 256, 64, 64)


def test_predict_before_set_image():
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(FakeModel()).predict(np.array([[1.0, 1.0]]), np.array([1]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no prompt"),
        ({"point_coords": np.array([[900.0, 10.0]]), "point_labels": [1]}, "outside"),
        ({"point_coords": np.array([[-1.0, 10.0]]), "point_labels": [1]}, "outside"),
        ({"point_coords": np.array([[10.0, 10.0]])}, "point_labels are required"),
        ({"point_coords": np.array([[10.0, 10.0]]), "point_labels": [2]}, "1 \\(foreground\\)"),
        ({"point_coords": np.array([[10.0, 10.0]]), "point_labels": [1, 1]}, "does not match"),
        ({"point_coords": np.array([10.0, 10.0, 3.0]), "point_labels": [1]}, "\\(N, 2\\)"),
        ({"point_coords": np.array([[np.nan, 10.0]]), "point_labels": [1]}, "NaN"),
        ({"box": np.array([900, 700, 1000, 800])}, "entirely outside"),
        ({"box": np.array([1, 2, 3])}, "x0, y0, x1, y1"),
        ({"point_labels": [1]}, "without point_coords"),
    ],
)
def test_bad_prompts_raise_clear_errors(predictor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_point_limit_is_enforced_never_truncated(predictor):
    predictor.model.max_points = 6
    pts = np.stack([np.arange(5) * 10 + 5.0, np.full(5, 20.0)], 1)
    with pytest.raises(ValueError, match="at most 6 prompt points per object"):
        predictor.predict(pts, np.ones(5), box=np.array([0, 0, 100, 100]))
    masks, _, _ = predictor.predict(pts[:4], np.ones(4), box=np.array([0, 0, 100, 100]))
    assert masks.shape[0] == 3
