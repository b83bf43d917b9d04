"""The "Refine labels" controller on a bare ``ViewerModel`` (no Qt), run synchronously with
the stand-in models: the layer is refined as one undo step (undo gives the labels back
exactly), ids are kept, disagreeing objects are kept and listed, the current slice or the
whole stack, and slices edited during the run are left alone."""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_esam.core.plane.refine import refine_labels
from napari_esam.widgets.refine.controller import RefineController, RefineForm
from napari_esam.widgets.workers import run_sync
from tests.fakes import FakeModel, MaskInputModel, refine_scene


@pytest.fixture
def notes(monkeypatch):
    """The napari notifications the controller shows: (kind, text)."""
    import napari.utils.notifications as N

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(N, "show_warning", lambda text: seen.append(("warning", text)))
    monkeypatch.setattr(N, "show_info", lambda text: seen.append(("info", text)))
    return seen


def controller(viewer, factory=FakeModel) -> RefineController:
    ctrl = RefineController(viewer, runner=run_sync, model_factory=factory)
    ctrl.on_error = lambda exc: (_ for _ in ()).throw(exc)
    return ctrl


def form(**changes) -> RefineForm:
    return RefineForm(**{"device": "cpu", **changes})


def test_refine_a_plane_as_one_undo_step(notes):
    image, labels = refine_scene()
    viewer = ViewerModel()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels.copy(), name="nuclei")
    before = layer.data.copy()
    ctrl = controller(viewer)
    ctrl.start("cells", "nuclei", form())
    outcome = ctrl.outcome
    want = refine_labels(image, labels, FakeModel().eval(),
                         contrast_limits=tuple(viewer.layers["cells"].contrast_limits))
    np.testing.assert_array_equal(layer.data, want.labels)
    assert outcome.applied == [0] and outcome.changed_pixels == int((want.labels != before).sum())
    # ids kept; the line (id 9) kept as it was and listed
    assert set(np.unique(layer.data)) == set(np.unique(before))
    np.testing.assert_array_equal(layer.data == 9, before == 9)
    text = ctrl.summary(outcome)
    assert "Refined 3 objects in 1 / 1 slice" in text
    assert "1 kept as they were (IoU below 0.5): 9 (IoU 0.01)" in text
    assert "no mask input" in text  # FakeModel, like EfficientSAM
    assert notes == [("warning", "Refine labels: " + text)]
    # one undo step gives the labels back exactly
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    layer.redo()
    np.testing.assert_array_equal(layer.data, want.labels)


def test_the_current_slice_or_every_slice(notes):
    pairs = [refine_scene(seed=s) for s in range(3)]
    image = np.stack([p[0] for p in pairs])
    labels = np.stack([p[1] for p in pairs])
    viewer = ViewerModel()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels.copy(), name="nuclei")
    viewer.dims.set_point(0, 1)
    ctrl = controller(viewer)
    ctrl.start("cells", "nuclei", form())
    assert ctrl.outcome.applied == [1]
    np.testing.assert_array_equal(layer.data[[0, 2]], labels[[0, 2]])  # other slices untouched
    assert not np.array_equal(layer.data[1], labels[1])
    assert "Refined 3 objects in 1 / 1 slice;" in ctrl.summary(ctrl.outcome)
    layer.undo()
    np.testing.assert_array_equal(layer.data, labels)
    # every slice, with a mask input: the echoing stand-in gives the disks back exactly; the
    # 1 px line comes back empty (its low-res cells are under half covered): kept, listed
    ctrl = controller(viewer, MaskInputModel)
    ctrl.start("cells", "nuclei", form(whole_stack=True))
    assert ctrl.outcome.applied == [0, 1, 2] and ctrl.outcome.run.mask_input
    np.testing.assert_array_equal(layer.data, labels)
    text = ctrl.summary(ctrl.outcome)
    assert "Refined 9 objects in 3 / 3 slices" in text and "no mask input" not in text
    assert "slice 2: 9 (IoU 0.00)" in text and notes[-1][0] == "warning"


def test_cancel_writes_the_finished_slices(notes):
    image = np.stack([refine_scene(seed=s)[0] for s in range(3)])
    labels = np.stack([refine_scene(seed=s)[1] for s in range(3)])
    viewer = ViewerModel()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels.copy(), name="nuclei")
    ctrl = controller(viewer)
    ctrl.on_progress = lambda ev: ctrl.cancel() if ev.kind == "slice" else None
    ctrl.start("cells", "nuclei", form(whole_stack=True))
    assert ctrl.outcome.run.cancelled and ctrl.outcome.applied == [0]
    assert ctrl.summary(ctrl.outcome).startswith("Cancelled after refining 3 objects in 1 / 3")
    np.testing.assert_array_equal(layer.data[1:], labels[1:])


def test_a_slice_edited_during_the_run_is_left_alone(notes):
    image, labels = refine_scene()
    viewer = ViewerModel()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels.copy(), name="nuclei")

    def editing_runner(job, **kwargs):
        layer.data[0, 0] = 5  # the user paints while the worker runs
        return run_sync(job, **kwargs)

    ctrl = RefineController(viewer, runner=editing_runner, model_factory=FakeModel)
    ctrl.start("cells", "nuclei", form())
    assert ctrl.outcome.applied == [] and ctrl.outcome.skipped == [0]
    assert layer.data[0, 0] == 5 and np.array_equal(layer.data[1:], labels[1:])
    assert "edited meanwhile" in ctrl.summary(ctrl.outcome) and notes[-1][0] == "warning"


def test_bad_choices():
    image, labels = refine_scene()
    viewer = ViewerModel()
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels[:, :-1].copy(), name="narrow")
    viewer.add_labels(np.zeros_like(labels), name="empty")
    ctrl = controller(viewer)
    assert ctrl.image_layers() == ["cells"] and ctrl.labels_layers() == ["narrow", "empty"]
    with pytest.raises(ValueError, match="differ in shape"):
        ctrl.start("cells", "narrow", form())
    with pytest.raises(ValueError, match="no objects"):
        ctrl.start("cells", "empty", form())
    with pytest.raises(ValueError, match="choose a Labels layer"):
        ctrl.start("cells", "", form())
    with pytest.raises(ValueError, match="IoU threshold"):
        ctrl.start("cells", "empty", form(iou_threshold=2.0))
    assert not ctrl.running
