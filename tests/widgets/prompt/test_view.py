"""The "Segment with prompts" dock widget in a real (headless) napari viewer."""

from __future__ import annotations

import time

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from napari_esam.widgets.prompt.controller import KEYS, NEGATIVE, POSITIVE
from napari_esam.widgets.prompt.view import PromptWidget
from napari_esam.widgets.workers import Progress, start_worker
from tests.fakes import Factory, FakeModel, add_box, add_point, blobs, centre, model_input

PLUGIN, WIDGET = "napari-esam", "Segment with prompts"

# PySide6 6.12.0 on Python 3.11 (where None/True/False are not immortal) *decrements* the
# refcount of None on every call of a void Qt method and of True on every signal emit. One
# napari viewer test costs ~6-16k None references, so after ~15 of them the interpreter aborts
# ("none_dealloc: deallocating None", rc 134, at exit or mid-run) although every test passed.
# Python >= 3.12 makes these singletons immortal; do the same here. PyQt6 does not need it.
# This belongs in tests/conftest.py (the lead's call); it lives here until then.


@pytest.fixture(scope="module")
def mobilesam_checkpoint(tmp_path_factory):
    """A MobileSAM checkpoint file with the deterministic synthetic weights."""
    import torch

    from napari_esam.models.synthetic import synthetic_state_dict

    path = tmp_path_factory.mktemp("weights") / "mobilesam_synthetic.pt"
    synthetic = synthetic_state_dict("mobilesam")
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in synthetic.items()}
    torch.save(state, path)
    return path


def open_widget(viewer) -> PromptWidget:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert isinstance(widget, PromptWidget)
    return widget


def open_with_fake(viewer, qtbot, image=None, **kwargs):
    """Widget with the fast fake model; returns (widget, controller, factory)."""
    if image is not None:
        viewer.add_image(image, **kwargs)
    widget = open_widget(viewer)
    factory = Factory()
    ctrl = widget.controller
    ctrl.model_factory = factory
    if image is not None:
        qtbot.waitUntil(lambda: ctrl.points_layer is not None, timeout=5000)
    return widget, ctrl, factory


def wait_ready(qtbot, ctrl, timeout=60_000):
    qtbot.waitUntil(lambda: not ctrl.busy, timeout=timeout)


class TickCounter:
    """Counts QTimer ticks: proof that the GUI event loop keeps turning."""

    def __init__(self, interval_ms: int = 20) -> None:
        self.ticks = 0
        self.timer = QTimer()
        self.timer.timeout.connect(self._tick)
        self.timer.start(interval_ms)

    def _tick(self) -> None:
        self.ticks += 1

    def stop(self) -> int:
        self.timer.stop()
        return self.ticks


# ---------------------------------------------------------------------- opening


def test_open_through_manifest_without_image(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    assert "image layer" in widget.status_label.text()
    widget.commit_button.click()  # no exception
    widget.undo_button.click()
    widget.next_mask_button.click()
    widget.prepare_button.click()
    assert "image layer" in widget.status_label.text()
    assert [lyr.name for lyr in viewer.layers] == []


def test_image_added_later_is_picked_up(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    viewer.add_image(blobs(), name="cells")
    ctrl = widget.controller
    qtbot.waitUntil(lambda: ctrl.points_layer is not None, timeout=5000)
    assert ctrl.image_layer.name == "cells"
    assert widget.image_combo.currentText() == "cells"
    assert widget.points_combo.currentText() == "ESAM points"
    assert widget.shapes_combo.currentText() == "ESAM boxes"
    assert viewer.layers.selection.active is ctrl.points_layer
    assert ctrl.points_layer.mode == "add"


def test_sample_data_opens_through_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cells")
    (layer,) = viewer.layers
    assert layer.data.dtype == np.uint16 and layer.data.shape == (512, 512)


def test_closing_the_dock_is_safe(make_napari_viewer, qtbot):
    from qtpy.QtCore import QCoreApplication, QEvent

    viewer = make_napari_viewer()
    viewer.add_image(blobs())
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    ctrl = widget.controller
    qtbot.waitUntil(lambda: ctrl.points_layer is not None, timeout=5000)
    viewer.window.remove_dock_widget(dock)
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    del dock, widget
    viewer.add_image(blobs(seed=3))  # layer events after the widget is gone: no error
    viewer.layers.clear()


# ------------------------------------------------------------------- real model


def test_real_mobilesam_preview_without_blocking_and_one_encoder_call(
    make_napari_viewer, qtbot, mobilesam_checkpoint
):
    viewer = make_napari_viewer()
    viewer.add_image(blobs((256, 320)), name="cells")
    widget = open_widget(viewer)
    ctrl = widget.controller
    qtbot.waitUntil(lambda: ctrl.points_layer is not None, timeout=5000)
    widget.model_combo.setCurrentText("mobilesam")
    widget.device_combo.setCurrentText("cpu")
    widget.checkpoint_edit.setText(str(mobilesam_checkpoint))
    widget.checkpoint_edit.editingFinished.emit()
    assert ctrl.model_key == ("mobilesam", str(mobilesam_checkpoint), "cpu")

    ticks = TickCounter()
    start = time.perf_counter()
    add_point(ctrl, (100, 150))  # starts model loading + encoding in a worker
    assert ctrl.busy and ctrl.encoder_calls == 0  # the click handler returned at once
    assert "Computing the image embedding" in widget.status_label.text()
    wait_ready(qtbot, ctrl, timeout=180_000)
    elapsed = time.perf_counter() - start
    n_ticks = ticks.stop()
    # the event loop kept turning while the encoder ran (> 1/10 of the possible 20 ms ticks,
    # a margin for a loaded 2-core machine; a blocked GUI thread gives ~0)
    assert n_ticks > max(5, elapsed / 0.02 / 10), (n_ticks, elapsed)
    assert ctrl.encoder_calls == 1
    preview = ctrl.preview_mask()
    assert preview is not None and preview.shape == (256, 320) and preview.any()
    assert "Preview: 1 object" in widget.status_label.text()
    assert widget.progress.value() == widget.progress.maximum()

    # prompt changes only re-run the decoder, within the same event-loop turn
    before = preview.copy()
    add_point(ctrl, (100, 190), NEGATIVE)
    after = ctrl.preview_mask()  # no event processing in between
    assert not np.array_equal(before, after)
    add_point(ctrl, (30, 40))
    widget.next_mask_button.click()
    assert ctrl.encoder_calls == 1 and not ctrl.busy
    widget.commit_button.click()
    assert ctrl.labels_layer.data.max() == 1


def test_gui_thread_turns_while_a_slow_encoder_runs(make_napari_viewer, qtbot):
    class SlowFake(FakeModel):
        def encode(self, x):
            time.sleep(1.0)
            return super().encode(x)

    viewer = make_napari_viewer()
    widget, ctrl, _ = open_with_fake(viewer, qtbot, blobs())
    ctrl.model_factory = lambda *key: SlowFake().eval()
    ticks = TickCounter(10)
    add_point(ctrl, (50, 50))
    assert ctrl.busy
    wait_ready(qtbot, ctrl, timeout=30_000)
    assert ticks.stop() >= 30  # ~100 possible ticks in the 1 s the encoder slept
    assert ctrl.preview_mask() is not None


# ---------------------------------------------------------------- fake model


def test_commit_buttons_label_ids_and_undo(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget, ctrl, _ = open_with_fake(viewer, qtbot, blobs())
    add_point(ctrl, (40, 40))
    wait_ready(qtbot, ctrl)
    assert ctrl.preview_mask() is not None
    widget.commit_button.click()
    labels = ctrl.labels_layer
    assert labels.name == "ESAM labels" and labels.data[40, 40] == 1
    assert widget.labels_combo.currentText() == "ESAM labels"
    assert "Committed label 1" in widget.status_label.text()
    first = labels.data.copy()
    add_point(ctrl, (90, 120))
    wait_ready(qtbot, ctrl)
    widget.commit_button.click()
    assert labels.data[90, 120] == 2
    np.testing.assert_array_equal(labels.data == 1, first == 1)
    # undo button restores the previous labels
    widget.undo_button.click()
    np.testing.assert_array_equal(labels.data, first)
    # napari's own Ctrl+Z on the labels layer undoes a commit as well
    from napari.utils.key_bindings import KeymapHandler

    handler = KeymapHandler()
    handler.keymap_providers = [labels]
    assert handler.press_key("Control-Z")
    assert not labels.data.any()


def test_clear_next_mask_and_polarity_controls(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget, ctrl, _ = open_with_fake(viewer, qtbot, blobs())
    add_point(ctrl, (60, 80))
    wait_ready(qtbot, ctrl)
    area = (ctrl.preview_mask() > 0).sum()
    widget.next_mask_button.click()
    assert (ctrl.preview_mask() > 0).sum() != area
    assert "mask 2/3" in widget.status_label.text()
    widget.negative_radio.setChecked(True)
    assert ctrl.polarity == NEGATIVE
    ctrl.toggle_polarity()  # what the key does: the radio follows
    assert widget.positive_radio.isChecked() and ctrl.polarity == POSITIVE
    widget.clear_button.click()
    assert len(ctrl.points_layer.data) == 0 and not np.any(ctrl.preview_layer.data)
    assert "Click a positive point" in widget.status_label.text()


def test_two_boxes_two_labels_and_overwrite_checkbox(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget, ctrl, factory = open_with_fake(viewer, qtbot, blobs())
    add_box(ctrl, (10, 10), (40, 50))
    wait_ready(qtbot, ctrl)
    calls = factory.model.decode_calls
    add_box(ctrl, (30, 40), (80, 90))  # overlaps the first box
    assert factory.model.decode_calls == calls + 1
    widget.commit_button.click()
    data = ctrl.labels_layer.data
    assert data[20, 20] == 1 and data[60, 70] == 2
    assert data[35, 45] == 1  # the second object did not overwrite the first
    widget.overwrite_check.setChecked(True)
    add_box(ctrl, (20, 20), (30, 30))
    widget.commit_button.click()
    assert data[25, 25] == 3


def test_3d_stack_with_scale_and_translate(make_napari_viewer, qtbot):
    stack = np.stack([blobs(seed=s) for s in range(4)])
    viewer = make_napari_viewer()
    widget, ctrl, factory = open_with_fake(
        viewer, qtbot, stack, scale=(1, 2, 2), translate=(0, 10, 5)
    )
    viewer.dims.set_current_step(0, 2)
    add_point(ctrl, (2, 10 + 2 * 30, 5 + 2 * 50))
    wait_ready(qtbot, ctrl)
    np.testing.assert_array_equal(factory.embedded[-1], model_input(stack[2]))
    r, c = centre(ctrl.preview_mask() > 0)
    assert abs(r - 30) < 1.5 and abs(c - 50) < 1.5
    widget.commit_button.click()
    data = ctrl.labels_layer.data
    assert data.shape == stack.shape and data[2, 30, 50] == 1
    assert not data[[0, 1, 3]].any()
    # going to another slice and back: the embedding comes from the cache
    viewer.dims.set_current_step(0, 1)
    wait_ready(qtbot, ctrl)
    n = ctrl.encoder_calls
    viewer.dims.set_current_step(0, 2)
    assert ctrl.encoder_calls == n and not ctrl.busy


def test_channel_controls(make_napari_viewer, qtbot):
    img = np.stack([blobs(seed=1), blobs(seed=2)])
    viewer = make_napari_viewer()
    widget, ctrl, factory = open_with_fake(viewer, qtbot, img)
    assert widget.channel_axis_combo.count() == 2
    widget.channel_axis_combo.setCurrentIndex(1)  # axis 0
    widget.channel_combo.setCurrentIndex(2)  # channel 1
    assert (ctrl.channel_axis, ctrl.channel) == (0, 1)
    add_point(ctrl, (0, 60, 60))
    wait_ready(qtbot, ctrl)
    np.testing.assert_array_equal(factory.embedded[-1], model_input(img[1]))
    widget.commit_button.click()
    assert ctrl.labels_layer.data.shape == (1, 120, 160)


def test_user_errors_are_messages(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget, ctrl, _ = open_with_fake(viewer, qtbot, blobs())
    widget.commit_button.click()  # empty prompts
    assert "Nothing to commit" in widget.status_label.text()
    add_point(ctrl, (500, 500))  # outside the image
    assert "outside the image" in widget.status_label.text()
    assert ctrl.preview_mask() is None and not ctrl.busy
    widget.model_combo.setCurrentText("efficientsam_ti")
    assert "at most 6 prompt points" in widget.note_label.text()
    viewer.layers.remove(ctrl.image_layer)
    assert "image layer" in widget.status_label.text()


def test_big_image_note(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget, _, _ = open_with_fake(viewer, qtbot, np.zeros((1100, 1300), np.uint16))
    assert "Turn tiled mode on for full resolution" in widget.note_label.text()


def test_tiled_mode_controls_and_tile_encoding_off_the_gui_thread(make_napari_viewer, qtbot):
    class SlowFake(FakeModel):
        def encode(self, x):
            time.sleep(1.0)
            return super().encode(x)

    viewer = make_napari_viewer()
    widget, ctrl, _ = open_with_fake(viewer, qtbot, blobs((2600, 3000)))
    ctrl.model_factory = lambda *key: SlowFake().eval()
    assert widget.tiled_combo.currentData() == "auto"
    assert widget.note_label.text() == ""  # auto tiles this image: no resize warning
    widget.halo_spin.setValue(300)
    widget.halo_spin.editingFinished.emit()  # 300 > 512 / 2 below: refused later
    assert ctrl.halo == 300
    widget.tile_spin.setValue(512)
    widget.tile_spin.editingFinished.emit()
    assert (ctrl.tile, ctrl.halo) == (1024, 300)
    assert "must be in 0..256 for tile 512" in widget.status_label.text()
    assert widget.tile_spin.value() == 1024  # the spin box shows the setting in force
    widget.halo_spin.setValue(128)
    widget.halo_spin.editingFinished.emit()
    widget.tile_spin.setValue(512)
    widget.tile_spin.editingFinished.emit()
    assert (ctrl.tile, ctrl.halo) == (512, 128)

    ticks = TickCounter(10)
    add_point(ctrl, (2300, 2700))
    assert ctrl.busy
    wait_ready(qtbot, ctrl, timeout=30_000)
    assert ticks.stop() >= 30  # the 1 s tile encoding ran in a worker
    assert ctrl.encoder_calls == 1
    part, (r0, c0) = ctrl.preview_region()
    assert part.shape == (512, 512)
    r, c = centre(ctrl.preview_mask() > 0)
    assert abs(r - 2300) < 1 and abs(c - 2700) < 1
    widget.commit_button.click()
    assert ctrl.labels_layer.data.shape == (2600, 3000)
    assert ctrl.labels_layer.data[2300, 2700] == 1

    widget.tiled_combo.setCurrentIndex(widget.tiled_combo.findData("off"))
    assert ctrl.tiled_mode == "off"
    assert "Turn tiled mode on" in widget.note_label.text()


def test_key_bindings_are_on_the_prompt_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, ctrl, _ = open_with_fake(viewer, qtbot, blobs())
    for layer in (ctrl.points_layer, ctrl.shapes_layer):
        bound = {str(k) for k in layer.keymap}
        assert {"N", "M", "C", "Shift+C", "Ctrl+Z"} <= bound, bound
    assert KEYS["commit"] == "c"


# ---------------------------------------------------------------------- workers


def test_start_worker_reports_progress_result_and_every_error(qtbot):
    def job():
        for i in range(3):
            yield Progress(i, 3, f"step {i}")
        return "done"

    seen, results, errors = [], [], []
    worker = start_worker(
        job, on_returned=results.append, on_errored=errors.append, on_progress=seen.append,
        desc="test", total=3, start=False,
    )
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        worker.start()
    assert [p.done for p in seen] == [0, 1, 2] and results == ["done"] and errors == []
    assert worker.pbar.n == 3

    def failing():
        yield Progress(0, 1)
        raise RuntimeError("checkpoint does not fit")  # superqt alone would swallow this

    worker = start_worker(failing, on_returned=results.append, on_errored=errors.append)
    qtbot.waitUntil(lambda: bool(errors), timeout=10_000)
    assert isinstance(errors[0], RuntimeError) and results == ["done"]


def test_segment_through_stack_runs_off_the_gui_thread_and_can_be_cancelled(
    make_napari_viewer, qtbot
):
    from tests.fakes import ObjectsModel, moving_disc_frames

    class SlowObjects(ObjectsModel):
        def encode(self, x):
            time.sleep(0.3)
            return super().encode(x)

    frames, truth = moving_disc_frames(n=10, shape=(96, 128), step=(2, 3))
    viewer = make_napari_viewer()
    widget, ctrl, _ = open_with_fake(viewer, qtbot, frames)
    ctrl.model_factory = lambda *key: SlowObjects().eval()
    rows, cols = np.nonzero(truth[0] == 1)
    add_point(ctrl, (0, rows.mean(), cols.mean()))
    wait_ready(qtbot, ctrl)
    ticks = TickCounter(10)
    widget.propagate_button.click()
    assert ctrl.busy and widget.cancel_button.isEnabled()
    wait_ready(qtbot, ctrl)
    assert ticks.stop() >= 30  # ~300 possible ticks in the ~3 s the encoder slept
    assert ctrl.propagated().slices == list(range(10))
    assert widget.propagate_button.isEnabled() and not widget.cancel_button.isEnabled()
    widget.commit_button.click()
    assert set(np.unique(ctrl.labels_layer.data[:, :, :])) == {0, 1}

    add_point(ctrl, (0, 70, 100))  # another object; cancelled after the first slices
    wait_ready(qtbot, ctrl)
    widget.propagate_button.click()
    qtbot.waitUntil(lambda: ctrl.status.startswith("Segmenting"), timeout=5_000)
    widget.cancel_button.click()
    wait_ready(qtbot, ctrl)
    assert "cancelled" in ctrl.status and ctrl.propagated() is None
    assert ctrl.labels_layer.data.max() == 1  # nothing more was committed
