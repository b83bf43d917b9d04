"""Segment through stack in the prompt controller, with a deterministic stand-in model
(ObjectsModel: the object under a positive point is the bright connected component of the
slice) on stardist's 3-D nuclei and on a moving-disc time-lapse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from napari.components import ViewerModel

from napari_esam.widgets.prompt.controller import PromptController, plane_of
from tests.fakes import Factory, ObjectsModel, add_point, carved_foreground, moving_disc_frames

DATA = Path(__file__).resolve().parents[2] / "data" / "stardist"


def make(stack, **kwargs):
    viewer = ViewerModel()
    ctrl = PromptController(viewer, model_factory=Factory(ObjectsModel), notify=False)
    ctrl.image_layer = viewer.add_image(stack, **kwargs)
    ctrl.ensure_prompt_layers()
    return viewer, ctrl


@pytest.fixture(scope="module")
def nuclei():
    truth = tifffile.imread(DATA / "mask3d.tif")
    return truth, carved_foreground(truth).astype(np.uint8) * 255


def centre_of(mask):
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.unravel_index(int(np.argmax(dist)), dist.shape)


def test_one_click_segments_a_nucleus_through_z_and_commits_one_id(nuclei):
    truth, image = nuclei
    viewer, ctrl = make(image)
    label = 5  # spans slices 0-7
    obj = truth == label
    zs = np.nonzero(obj.any(axis=(1, 2)))[0]
    z = int(zs[len(zs) // 2])
    viewer.dims.set_current_step(0, z)
    r, c = centre_of(obj[z])
    add_point(ctrl, (z, r, c))
    before = np.zeros(truth.shape, np.uint32)
    ctrl.propagate()
    prop = ctrl.propagated()
    assert prop is not None and prop.axis == 0
    assert abs(prop.slices[0] - zs[0]) <= 1 and abs(prop.slices[-1] - zs[-1]) <= 1
    preview = ctrl._propagation_layer.data > 0  # the 3-D preview shows the object
    assert (preview & obj).sum() / (preview | obj).sum() >= 0.8
    assert ctrl.commit() == [1]
    labels = ctrl.labels_layer
    got = labels.data == 1
    assert (got & obj).sum() / (got | obj).sum() >= 0.8
    assert set(np.unique(labels.data)) == {0, 1}  # one id through every slice
    assert ctrl.propagated() is None and not ctrl._propagation_layer.data.any()
    ctrl.undo()  # one undo step restores the labels exactly
    np.testing.assert_array_equal(labels.data, before)


def test_the_gap_between_two_prompted_frames_is_filled():
    frames, truth = moving_disc_frames(n=12, shape=(96, 128), step=(2, 3))
    viewer, ctrl = make(frames)
    for t in (2, 9):
        viewer.dims.set_current_step(0, t)
        rows, cols = np.nonzero(truth[t] == 1)
        add_point(ctrl, (t, rows.mean(), cols.mean()))
    ctrl.propagation = ctrl.propagation.__class__(start=2, stop=9)
    ctrl.propagate()
    assert ctrl.propagated().slices == list(range(2, 10))
    assert ctrl.commit() == [1]
    got = ctrl.labels_layer.data[2:10] == 1
    ref = truth[2:10] == 1
    assert (got & ref).sum() / (got | ref).sum() >= 0.95


def test_two_objects_propagate_together_and_get_consecutive_ids():
    frames, truth = moving_disc_frames(n=6, shape=(96, 128), step=(1, 2), n_discs=2)
    viewer, ctrl = make(frames)
    viewer.dims.set_current_step(0, 0)
    ctrl.set_one_object_per_point(True)  # (the stand-in model answers points, not boxes)
    for label in (1, 2):
        rows, cols = np.nonzero(truth[0] == label)
        add_point(ctrl, (0, rows.mean(), cols.mean()))
    ctrl.propagate()
    assert ctrl.propagated().n_objects == 2
    assert ctrl.commit() == [1, 2]
    data = ctrl.labels_layer.data
    for label in (1, 2):
        ref = truth == label
        got = data == label
        assert (got & ref).sum() / (got | ref).sum() >= 0.95


def test_cancel_leaves_nothing_committed():
    frames, truth = moving_disc_frames(n=12, shape=(96, 128), step=(2, 3))
    viewer, ctrl = make(frames)
    rows, cols = np.nonzero(truth[0] == 1)
    add_point(ctrl, (0, rows.mean(), cols.mean()))
    seen = []

    def on_progress(event):
        seen.append(event.value)
        if len(seen) == 3:
            ctrl.cancel()

    ctrl.events.progress.connect(on_progress)
    ctrl.propagate()
    assert ctrl.propagated() is None and "cancelled" in ctrl.status
    assert ctrl.labels_layer is None and ctrl.commit() == []  # no 2-D preview either: 0 slice
    ctrl.events.progress.disconnect(on_progress)


def test_a_single_plane_has_no_stack_to_propagate_through():
    _, ctrl = make(np.zeros((64, 64), np.uint8))
    add_point(ctrl, (30, 30))
    ctrl.propagate()
    assert "needs a stack" in ctrl.status and ctrl.propagated() is None


def test_new_prompts_discard_the_propagated_object():
    frames, truth = moving_disc_frames(n=5, shape=(64, 96), step=(1, 1))
    _, ctrl = make(frames)
    rows, cols = np.nonzero(truth[0] == 1)
    add_point(ctrl, (0, rows.mean(), cols.mean()))
    ctrl.propagate()
    assert ctrl.propagated() is not None
    add_point(ctrl, (0, 50, 80))
    assert ctrl.propagated() is None


def test_tiled_planes_follow_the_object_across_tiles_with_scale():
    n, h, w = 6, 2200, 2300
    frames = np.zeros((n, h, w), np.uint8)
    yy, xx = np.ogrid[:h, :w]
    centres = [(1000, 800 + 10 * t) for t in range(n)]  # crosses the tiles' cores at x=831
    for t, (cy, cx) in enumerate(centres):
        frames[t][(yy - cy) ** 2 + (xx - cx) ** 2 <= 40**2] = 255
    viewer, ctrl = make(frames, scale=(2.0, 0.5, 0.5), translate=(0, 10, 20))
    viewer.dims.set_current_step(0, 0)
    add_point(ctrl, (0, 10 + 0.5 * 1000, 20 + 0.5 * 800))
    assert ctrl.is_tiled(plane_of(viewer, ctrl.image_layer))
    ctrl.propagate()
    prop = ctrl.propagated()
    assert prop.slices == list(range(n))
    windows = {tuple(prop.masks[t][0].window) for t in range(n)}
    assert len(windows) > 1  # the answering tile window changed as the disc moved
    assert ctrl.commit() == [1]
    data = ctrl.labels_layer.data
    for t, (cy, cx) in enumerate(centres):
        disc = np.zeros((h, w), bool)
        disc[(yy - cy) ** 2 + (xx - cx) ** 2 <= 40**2] = True
        got = data[t] == 1
        assert (got & disc).sum() / (got | disc).sum() >= 0.95
