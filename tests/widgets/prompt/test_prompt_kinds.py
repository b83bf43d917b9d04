"""Prompt kinds of the prompt controller: iterative clicks (mask input), scribbles, lassos and
one object per positive point. The stand-in model records what its decoder receives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from napari.components import ViewerModel

from napari_esam.core.plane.mask_prompts import mask_to_logits
from napari_esam.widgets.prompt.controller import SCRIBBLE_SPACING, PromptController, plane_of
from tests.fakes import CountingFake, Factory, MaskFake, add_point, blobs


def make(image, model_class=MaskFake, **image_kwargs):
    viewer = ViewerModel()
    factory = Factory(model_class)
    ctrl = PromptController(viewer, model_factory=factory, notify=False)
    ctrl.image_layer = viewer.add_image(image, **image_kwargs)
    ctrl.ensure_prompt_layers()
    return viewer, ctrl, factory


def _best_low_res(model, call):
    """The best candidate's low-res logits of a recorded decoder call, recomputed."""
    coords, labels, size, mask = call
    extra = {} if mask is None else {"mask_input": torch.from_numpy(mask)}
    low, iou = model.decode(None, torch.from_numpy(coords), torch.from_numpy(labels), size,
                            True, **extra)
    return low[0, int(torch.argmax(iou[0]))].numpy()


def test_each_new_click_passes_the_previous_best_logits_as_mask_input():
    _, ctrl, factory = make(blobs())
    add_point(ctrl, (40, 50))
    model = factory.model
    first = model.calls[-1]
    assert first[3] is None  # the first click has no mask prompt
    add_point(ctrl, (44, 58))
    second = model.calls[-1]
    assert second[0].shape == (1, 2, 2)  # two clicks
    expected = _best_low_res(model, first)
    np.testing.assert_array_equal(second[3][0, 0], expected)
    add_point(ctrl, (70, 90), "negative")
    np.testing.assert_array_equal(model.calls[-1][3][0, 0], _best_low_res(model, second))
    # removing the last click decodes the two-click set on the first click's logits again
    ctrl.points_layer.data = ctrl.points_layer.data[:2]
    np.testing.assert_array_equal(model.calls[-1][3][0, 0], expected)
    # a new object starts without a mask prompt
    assert ctrl.commit() == [1]
    add_point(ctrl, (90, 120))
    assert model.calls[-1][3] is None


def test_models_without_a_mask_prompt_get_none():
    _, ctrl, factory = make(blobs(), model_class=CountingFake)  # like EfficientSAM
    add_point(ctrl, (40, 50))
    add_point(ctrl, (44, 58))  # CountingFake.decode takes no mask_input: it would fail
    assert factory.model.decode_calls == 2 and ctrl.preview_mask() is not None


def test_a_scribble_becomes_points_every_32_px_of_the_model_input():
    _, ctrl, factory = make(blobs((120, 160)))
    ctrl.shapes_layer.add_paths([np.array([[20.0, 20.0], [20.0, 120.0], [100.0, 120.0]])])
    coords, labels, size, _ = factory.model.calls[-1]
    assert size == (120, 160)
    pts = coords[0][labels[0] == 1]
    model_frame = pts * 1024 / 160  # the plane (its one tile) is resized to 1024 px
    steps = np.linalg.norm(np.diff(model_frame, axis=0), axis=1)
    assert len(pts) == int(np.ceil(180 * 1024 / 160 / SCRIBBLE_SPACING)) + 1
    assert steps.max() <= SCRIBBLE_SPACING + 1e-6 and steps.min() > SCRIBBLE_SPACING * 0.9
    np.testing.assert_allclose(pts[[0, -1]], [[20, 20], [120, 100]])  # (x, y) ends
    assert ctrl.commit() == [1]


def test_a_negative_scribble_gives_negative_points():
    _, ctrl, factory = make(blobs((120, 160)))
    add_point(ctrl, (60, 80))
    ctrl.set_polarity("negative")
    ctrl.shapes_layer.add_paths([np.array([[10.0, 10.0], [10.0, 60.0]])])
    coords, labels, _, _ = factory.model.calls[-1]
    assert labels[0, 0] == 1 and (labels[0, 1:] == 0).all() and labels.shape[1] > 3
    assert (coords[0, 1:, 1] == 10).all()  # the scribble's points lie on row 10 (y)


@pytest.mark.parametrize("kind", ["polygon", "ellipse"])
def test_a_lasso_is_its_box_plus_its_mask_as_mask_input(kind):
    _, ctrl, factory = make(blobs((120, 160)))
    shapes = ctrl.shapes_layer
    if kind == "polygon":
        verts = np.array([[30.0, 40.0], [30.0, 100.0], [90.0, 70.0]])
        shapes.add_polygons([verts])
    else:
        verts = np.array([[30.0, 40.0], [30.0, 100.0], [90.0, 100.0], [90.0, 40.0]])
        shapes.add_ellipses([verts])
    coords, labels, size, mask = factory.model.calls[-1]
    assert labels.tolist() == [[2, 3]]
    np.testing.assert_allclose(coords[0], [[40, 30], [100, 90]])  # the box (x, y)
    rr, cc = np.mgrid[:120, :160]
    if kind == "polygon":  # inside the triangle (a little slack along its edges)
        inside = (rr >= 31) & (rr <= 88) & (np.abs(cc - 70) <= (90 - rr) * 0.5 - 1)
    else:
        inside = ((rr - 60) / 29) ** 2 + ((cc - 70) / 29) ** 2 <= 0.9
    lasso = np.zeros((120, 160), bool)
    lasso[inside] = True
    prompt = mask[0, 0]
    expected = mask_to_logits(lasso)
    assert ((prompt > 0) == (expected > 0)).mean() > 0.97
    assert ctrl.commit() == [1]


def test_a_lasso_and_clicks_refine_from_the_previous_prediction():
    _, ctrl, factory = make(blobs((120, 160)))
    ctrl.shapes_layer.add_polygons([np.array([[30.0, 40.0], [30.0, 100.0], [90.0, 70.0]])])
    first = factory.model.calls[-1]
    add_point(ctrl, (60, 70))
    coords, labels, _, mask = factory.model.calls[-1]
    assert labels.tolist() == [[1, 2, 3]]
    np.testing.assert_array_equal(mask[0, 0], _best_low_res(factory.model, first))


def test_one_object_per_positive_point_batches_and_commits_consecutive_ids():
    _, ctrl, factory = make(blobs((120, 160)))
    ctrl.set_one_object_per_point(True)
    for rc in [(20, 20), (60, 80), (100, 140)]:
        add_point(ctrl, rc)
    add_point(ctrl, (60, 100), "negative")
    coords, labels, _, mask = factory.model.calls[-1]
    assert coords.shape[0] == 3 and mask is None  # one batched call, no mask prompts
    assert labels.tolist() == [[1, 0]] * 3
    np.testing.assert_allclose(coords[:, 0], [[20, 20], [80, 60], [140, 100]])
    np.testing.assert_allclose(coords[:, 1], [[100, 60]] * 3)
    assert ctrl.commit() == [1, 2, 3]
    data = ctrl.labels_layer.data
    assert (data[20, 20], data[60, 80], data[100, 140]) == (1, 2, 3)
    ctrl.shapes_layer.add_rectangles([np.array([[10.0, 10.0], [40.0, 40.0]])])
    add_point(ctrl, (80, 80))
    assert "segments points only" in ctrl.status


def test_scribbles_in_tiled_mode_are_sampled_in_the_tile_frame():
    viewer, ctrl, factory = make(blobs((2600, 3000)))
    assert ctrl.is_tiled(plane_of(viewer, ctrl.image_layer))
    ctrl.shapes_layer.add_paths([np.array([[1200.0, 1200.0], [1200.0, 1400.0]])])
    coords, labels, size, _ = factory.model.calls[-1]
    assert size == (1024, 1024)  # one 1024-px tile answers
    steps = np.linalg.norm(np.diff(coords[0][labels[0] == 1], axis=0), axis=1)
    assert len(steps) == 200 // 32 + 1 and steps.max() <= SCRIBBLE_SPACING
