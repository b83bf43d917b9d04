"""The "Refine labels" dock widget, headless, with the FakeModel stand-in."""

from __future__ import annotations

import numpy as np

from napari_esam.widgets.refine.view import RefineWidget
from tests.fakes import FakeModel, refine_scene, run_and_wait


def test_widget_refines_the_layer_and_lists_kept_objects(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image, labels = refine_scene()
    viewer.add_image(image, name="cells")
    layer = viewer.add_labels(labels.copy(), name="nuclei")
    widget = RefineWidget(viewer)
    widget.controller.model_factory = FakeModel
    widget.device_combo.setCurrentText("cpu")
    assert widget.image_combo.currentText() == "cells"
    assert widget.labels_combo.currentText() == "nuclei"

    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)

    assert "Refined 3 objects in 1 / 1 slice" in widget.status.text()
    assert widget.kept_list.count() == 1
    item = widget.kept_list.item(0)
    assert item.text() == "id 9 (IoU 0.01)"
    widget._select_kept(item)
    assert layer.selected_label == 9
    assert not np.array_equal(layer.data, labels)
    layer.undo()
    np.testing.assert_array_equal(layer.data, labels)


def test_widget_reports_a_bad_choice(make_napari_viewer):
    viewer = make_napari_viewer()
    image, labels = refine_scene()
    viewer.add_image(image, name="cells")
    viewer.add_labels(np.zeros_like(labels), name="empty")
    widget = RefineWidget(viewer)
    assert widget.run() is None
    assert widget.status.text().startswith("Error: ") and "no objects" in widget.status.text()
    assert widget.run_button.isEnabled()
