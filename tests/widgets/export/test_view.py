"""The batch widget's "Export labels" section: Zarr/TIFF export in a worker, overwrite
confirmation, cancel, and its Qt-free helpers."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from qtpy.QtWidgets import QMessageBox

from napari_esam.core.io.label_files import read_labels, write_labels
from napari_esam.widgets.everything.view import EverythingWidget
from napari_esam.widgets.export import view as ES
from napari_esam.widgets.export.controller import (
    ExportController,
    ExportForm,
    format_of,
    with_format,
)
from napari_esam.widgets.workers import run_sync


def labels_data(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.zeros((3, 40, 50), np.uint32)
    for z in range(3):
        for k in range(1, 6):
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            data[z, y : y + 8, x : x + 9] = z * 1000 + k * 70_000  # needs uint32
    return data


@pytest.fixture
def section(make_napari_viewer):
    """The export section as the batch widget adds it, with a 3-D Labels layer."""
    viewer = make_napari_viewer()
    viewer.add_labels(labels_data(), name="cells", scale=(2.0, 0.5, 0.25),
                      translate=(1.0, 0.0, 3.0))
    widget = EverythingWidget(viewer)
    viewer.window.add_dock_widget(widget)  # owned by the window, as from the plugin menu
    sec = widget.export_section
    assert widget.sections.indexOf(sec) >= 0  # added through add_section
    return viewer, sec


def export_and_wait(qtbot, sec):
    worker = sec.export(start=False)
    assert worker is not None, sec.status.text()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        worker.start()
    qtbot.waitUntil(lambda: sec.export_button.isEnabled(), timeout=10_000)


@pytest.mark.parametrize("fmt", [".zarr", ".tif"])
def test_exports_a_labels_layer_that_reads_back_equal(section, qtbot, tmp_path, fmt):
    viewer, sec = section
    assert sec.layer_combo.currentText() == "cells"
    sec.format_combo.setCurrentIndex(sec.format_combo.findData(fmt))
    sec.path_edit.setText(str(tmp_path / "cells_out"))  # the suffix follows the format
    export_and_wait(qtbot, sec)

    target = tmp_path / f"cells_out{fmt}"
    assert sec.path_edit.text() == str(target)
    assert sec.status.text() == f"Exported to {target}"
    assert sec.progress.value() == sec.progress.maximum()
    data, meta = read_labels(target)
    np.testing.assert_array_equal(np.asarray(data), viewer.layers["cells"].data)
    assert meta["scale"] == [2.0, 0.5, 0.25] and meta["translate"] == [1.0, 0.0, 3.0]
    assert meta["napari_esam"] and meta["name"] == "cells"


def test_compression_choice_reaches_the_file(section, qtbot, tmp_path):
    _, sec = section
    sec.path_edit.setText(str(tmp_path / "z.zarr"))
    sec.compression_combo.setCurrentText("zlib")
    export_and_wait(qtbot, sec)
    codecs = zarr.open_array(tmp_path / "z.zarr" / "0", mode="r").metadata.codecs
    assert any(type(c).__name__ == "GzipCodec" for c in codecs)


def ask(monkeypatch, answer):
    """Make the confirmation dialog answer ``answer`` and record that it was asked."""
    asked = []

    def question(parent, title, text, *args, **kwargs):
        asked.append(text)
        return answer

    monkeypatch.setattr(ES.QMessageBox, "question", staticmethod(question))
    return asked


def test_existing_path_declined_leaves_the_old_file_untouched(section, qtbot, tmp_path,
                                                              monkeypatch):
    _, sec = section
    target = tmp_path / "old.tif"
    old = np.full((4, 4), 7, np.uint8)
    write_labels(target, old)
    before = target.read_bytes()
    asked = ask(monkeypatch, QMessageBox.StandardButton.No)
    sec.format_combo.setCurrentIndex(sec.format_combo.findData(".tif"))
    sec.path_edit.setText(str(target))

    assert sec.export() is None
    assert len(asked) == 1 and "old.tif" in asked[0]
    assert target.read_bytes() == before
    assert "kept the existing old.tif" in sec.status.text()
    assert sec.export_button.isEnabled()


def test_existing_path_accepted_is_overwritten(section, qtbot, tmp_path, monkeypatch):
    viewer, sec = section
    target = tmp_path / "old.zarr"
    write_labels(target, np.full((4, 4), 7, np.uint8))
    asked = ask(monkeypatch, QMessageBox.StandardButton.Yes)
    sec.path_edit.setText(str(target))
    export_and_wait(qtbot, sec)

    assert len(asked) == 1
    data, meta = read_labels(target)
    np.testing.assert_array_equal(np.asarray(data), viewer.layers["cells"].data)
    assert meta["scale"] == [2.0, 0.5, 0.25]


def test_no_question_for_a_new_path_and_bad_choices_are_reported(section, tmp_path,
                                                                 monkeypatch):
    _, sec = section
    asked = ask(monkeypatch, QMessageBox.StandardButton.No)
    sec.path_edit.setText("")
    assert sec.export() is None and "choose a path" in sec.status.text()
    sec.path_edit.setText(str(tmp_path / "missing-dir" / "x.zarr"))
    assert sec.export() is None and "does not exist" in sec.status.text()
    assert asked == []
    assert sec.export_button.isEnabled() and not sec.cancel_button.isEnabled()


def test_layer_list_and_format_follow_the_viewer(section):
    viewer, sec = section
    viewer.add_image(np.zeros((8, 8), np.uint8), name="img")  # not a Labels layer
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="new")
    items = [sec.layer_combo.itemText(i) for i in range(sec.layer_combo.count())]
    assert items == ["cells", "new"] and sec.layer_combo.currentText() == "new"
    sec.path_edit.setText("/data/a.zarr")
    sec.format_combo.setCurrentIndex(sec.format_combo.findData(".tif"))
    assert sec.path_edit.text() == "/data/a.tif"
    sec.path_edit.setText("/data/b.zarr")
    sec.path_edit.editingFinished.emit()
    assert sec.format_combo.currentData() == ".zarr"
    viewer.layers.remove("new")
    assert sec.layer_combo.currentText() == "cells"


def test_cancelled_export_writes_nothing_and_keeps_an_old_file(section, qtbot, tmp_path,
                                                               monkeypatch):
    _, sec = section
    target = tmp_path / "keep.tif"
    write_labels(target, np.full((4, 4), 7, np.uint8))
    before = target.read_bytes()
    ask(monkeypatch, QMessageBox.StandardButton.Yes)
    sec.format_combo.setCurrentIndex(sec.format_combo.findData(".tif"))
    sec.path_edit.setText(str(target))
    worker = sec.export(start=False)
    sec.cancel()  # before the first page is done: write_labels stops at its first report
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        worker.start()
    qtbot.waitUntil(lambda: sec.export_button.isEnabled(), timeout=10_000)
    assert sec.status.text() == "Export cancelled; nothing was written"
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tif"]  # no temporary left


# ----------------------------------------------------------------- controller (no Qt)


def test_a_layer_is_not_exported_onto_its_own_store(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    store = tmp_path / "mine.zarr"
    write_labels(store, labels_data())
    data, _ = read_labels(store)
    viewer.add_labels(data, name="lazy")
    ctl = ExportController(viewer, runner=run_sync)
    with pytest.raises(ValueError, match="is read from"):
        ctl.start(ExportForm("lazy", ".zarr", str(store)), overwrite=True)
    assert read_labels(store)[0].shape == (3, 40, 50)
    with pytest.raises(ValueError, match="choose a Labels layer"):
        ctl.start(ExportForm("nope", ".zarr", str(tmp_path / "x.zarr")))


def test_path_suffix_helpers():
    assert with_format("a/cells", ".zarr") == "a/cells.zarr"
    assert with_format("a/cells.tif", ".zarr") == "a/cells.zarr"
    assert with_format("a/cells.TIFF", ".tif") == "a/cells.TIFF"
    assert with_format("a/cells.zarr", ".tif") == "a/cells.tif"
    assert with_format("  ", ".tif") == ""
    assert format_of("x.tiff") == ".tif" and format_of("x.zarr") == ".zarr"
    assert format_of("x.png") is None
