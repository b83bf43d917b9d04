"""The "Segment everything" widget, headless, with the fast blob model."""

from __future__ import annotations

import dataclasses

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_esam.core.runs.outputs import RUN_ATTR, ZarrOutput
from napari_esam.core.runs.pipeline import run_batch
from napari_esam.core.runs.settings import (
    OBJECT_FIELDS,
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
)
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.store import EmbeddingStore, read_signature
from napari_esam.widgets.everything.controller import (
    EverythingController,
    EverythingForm,
    format_seconds,
    progress_text,
)
from napari_esam.widgets.everything.view import EverythingWidget
from napari_esam.widgets.workers import run_sync
from tests.fakes import (
    FAST,
    FAST_TILED,
    HALO,
    TILE,
    BlobModel,
    blob_image,
    blob_stack,
    make_widget,
    run_and_wait,
)


def test_widget_segments_a_stack_into_a_labels_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack, counts = blob_stack(3)
    viewer.add_image(stack, name="cells", scale=(2.0, 0.5, 0.5))
    widget = make_widget(viewer)
    assert widget.layer_combo.currentText() == "cells"
    assert [widget.axis_combo.itemData(i) for i in range(widget.axis_combo.count())] == [0, 1, 2]
    progress: list = []
    widget.controller.on_progress = lambda ev: (progress.append(ev), widget._on_progress(ev))

    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)

    layer = viewer.layers["cells everything"]
    labels = np.asarray(layer.data)
    assert labels.shape == stack.shape and list(layer.scale) == [2.0, 0.5, 0.5]
    ids = [set(np.unique(labels[i]).tolist()) - {0} for i in range(3)]
    assert [len(s) for s in ids] == counts
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    # stride ids: 8 x 8 points, one tile -> at most 192 masks a plane -> S = 1000 ids a plane;
    # the largest possible id 2999 fits uint16
    assert ids == [set(range(i * 1000 + 1, i * 1000 + n + 1)) for i, n in enumerate(counts)]
    assert labels.dtype == np.uint16
    assert layer.metadata["napari-esam"]["counts"] == dict(enumerate(counts))
    # the progress bar and the per-slice counts
    assert [e.index for e in progress if e.kind == "slice"] == [0, 1, 2]
    assert widget.progress.value() == widget.progress.maximum()
    assert widget.progress.format() == "3 / 3 slices"
    assert widget.status.text().startswith(f"Done: 3 / 3 slices, {sum(counts)} objects")
    table = widget.counts_table
    assert table.isVisibleTo(widget) and table.rowCount() == 3
    assert [int(table.item(r, 1).text()) for r in range(3)] == counts
    assert not widget.cancel_button.isEnabled()


def test_widget_opens_from_the_plugin_menu(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.uint8), name="img")
    _, widget = viewer.window.add_plugin_dock_widget("napari-esam", "Segment everything")
    assert isinstance(widget, EverythingWidget)
    assert widget.layer_combo.currentText() == "img"
    assert widget.axis_combo.count() == 1 and widget.axis_combo.itemData(0) is None
    viewer.add_image(np.zeros((4, 16, 16), np.uint8), name="stack")
    assert widget.layer_combo.findText("stack") >= 0  # follows the layer list
    # the tiled-mode note follows the layer and its stack axis (judged on the planes)
    viewer.add_image(da.zeros((3000, 64, 100), dtype=np.uint16, chunks=1024), name="tall",
                     contrast_limits=(0, 1))
    widget.layer_combo.setCurrentText("tall")
    assert widget.axis_combo.currentData() == 0
    assert widget.tiled_note.text().startswith("this layer: whole planes")
    widget.axis_combo.setCurrentIndex(widget.axis_combo.findData(2))  # planes of 3000 x 64
    assert widget.tiled_note.text() == "this layer: tiled, full resolution"


def test_widget_cancel_keeps_zarr_slices_and_a_rerun_resumes(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    stack, counts = blob_stack(4)
    viewer.add_image(stack, name="cells")
    widget = make_widget(viewer)
    out = tmp_path / "cells.zarr"
    widget.zarr_edit.setText(str(out))

    def cancel_on_first_slice(ev):
        widget._on_progress(ev)
        if ev.kind == "slice":
            widget.cancel()

    widget.controller.on_progress = cancel_on_first_slice
    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    assert widget.status.text().startswith("Cancelled")
    done = ZarrOutput(out).done()
    assert 1 <= len(done) < 4
    layer = viewer.layers["cells everything"]
    assert isinstance(layer.data, zarr.Array)  # lazy view of the store, opened read-only
    assert layer.data.read_only

    widget.controller.on_progress = widget._on_progress
    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert rec["complete"] and [rec["slices"][str(i)] for i in range(4)] == counts
    final = viewer.layers["cells everything [1]"].data
    assert [len(np.unique(final[i])) - 1 for i in range(4)] == counts


def test_widget_reports_bad_choices_without_starting(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 16, 16), np.uint8), name="img")
    widget = make_widget(viewer)
    widget.to_layer.setChecked(False)
    assert widget.run() is None
    assert "choose an output" in widget.status.text()
    widget.to_layer.setChecked(True)
    widget.zarr_edit.setText("/nonexistent-dir/x.zarr")
    assert widget.run() is None and "does not exist" in widget.status.text()
    assert widget.run_button.isEnabled()
    assert "everything" not in " ".join(layer.name for layer in viewer.layers)


def test_controller_without_qt_threads_handles_rgb_and_2d(make_napari_viewer):
    viewer = make_napari_viewer()
    stack, counts = blob_stack(2)
    gray = (stack > 1000).astype(np.uint8) * 255
    viewer.add_image(np.repeat(gray[..., None], 3, -1), name="rgb", rgb=True)
    viewer.add_image(stack[1], name="plane")
    ctl = EverythingController(viewer, runner=run_sync, model_factory=BlobModel)
    finished = []
    ctl.on_finished = finished.append
    form = EverythingForm(device="cpu")
    form.params = type(form.params)(**FAST)
    ctl.start("rgb", form)
    assert finished[-1].complete and list(finished[-1].counts.values()) == counts
    assert viewer.layers["rgb everything"].data.shape == (2, 64, 64)
    ctl.start("plane", form)
    assert finished[-1].counts == {0: counts[1]}
    assert viewer.layers["plane everything"].data.shape == (64, 64)
    assert ctl.axis_choices("plane") == [("none (2-D image)", None)]
    with pytest.raises(ValueError, match="choose an image layer"):
        ctl.start("", form)


def test_widget_tiled_mode_controls_reach_the_controller_and_a_run_completes(
    make_napari_viewer, qtbot, tmp_path
):
    viewer = make_napari_viewer()
    image = blob_image((300, 400), seed=3)
    viewer.add_image(image, name="slide")
    widget = make_widget(viewer)
    # defaults: auto (this 300 x 400 layer is not tiled), tile 1024, halo 256
    assert widget.tiled_combo.currentData() == "auto"
    assert (widget.tile_spin.value(), widget.halo_spin.value()) == (1024, 256)
    assert widget.form().tiled == "auto"
    assert widget.tiled_note.text().startswith("this layer: whole planes")
    widget.tiled_combo.setCurrentIndex(widget.tiled_combo.findData("on"))
    assert widget.tiled_note.text() == "this layer: tiled, full resolution"
    widget.tile_spin.setValue(TILE)
    assert widget.halo_spin.value() == TILE // 2  # the 256 px halo is clamped to half the tile
    widget.halo_spin.setValue(TILE)
    assert widget.halo_spin.value() == TILE // 2  # never more than half the tile
    widget.halo_spin.setValue(HALO)
    widget.layer_contrast.setChecked(False)  # per-plane percentiles, as the reference
    store = tmp_path / "slide.emb.zarr"
    widget.embeddings_edit.setText(str(store))
    out = tmp_path / "slide_labels.zarr"
    widget.zarr_edit.setText(str(out))
    form = widget.form()
    assert (form.tiled, form.tile, form.halo, form.embeddings) == ("on", TILE, HALO, str(store))
    progress: list = []
    widget.controller.on_progress = lambda ev: (progress.append(ev), widget._on_progress(ev))

    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)

    settings = BatchSettings(ModelSpec("blob", device="cpu", factory=BlobModel),
                             EverythingParams(**FAST_TILED), tiling=TilingParams("on", TILE, HALO))
    ref = run_batch(image, settings).labels
    n = int(ref.max())
    assert n > 5
    layer = viewer.layers["slide everything"]
    np.testing.assert_array_equal(np.asarray(layer.data), ref)
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[:], ref)
    assert layer.metadata["napari-esam"]["tiled"]["tile"] == TILE
    n_tiles = TileGrid(image.shape, TILE, HALO).n_tiles
    assert EmbeddingStore.open(store, read_signature(store), mode="r").n_done == n_tiles
    tiles = [e.tiles_done for e in progress if e.kind == "tile"]
    assert tiles == list(range(1, n_tiles + 1))
    assert all(e.tiles_total == n_tiles for e in progress)
    assert widget.status.text().startswith(f"Done: 1 / 1 slices, {n} objects")
    assert widget.progress.format() == "1 / 1 slices"
    assert [int(widget.counts_table.item(0, 1).text())] == [n]


def test_progress_text_and_time_format():
    from napari_esam.core.runs.pipeline import BatchProgress

    assert format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"
    assert format_seconds(None) == "?"
    assert progress_text(BatchProgress("slice", 2, 5, eta=42.0)) == "2 / 5 slices · 0:42 left"


def test_widget_prompts_choice_shows_its_fields_and_object_runs_match_run_batch(
    make_napari_viewer, qtbot
):
    viewer = make_napari_viewer()
    stack, counts = blob_stack(3)
    viewer.add_image(stack, name="cells")
    widget = make_widget(viewer)
    widget.show()
    object_fields = (widget.diameter_row, widget.object_threshold, widget.polarity_combo,
                     widget.decoding_combo)
    # the default: a grid, and the detector's defaults
    d, params = EverythingParams(), widget.form().params
    assert widget.prompts_combo.currentText() == params.prompts == "grid"
    assert [getattr(params, k) for k in OBJECT_FIELDS] == [getattr(d, k) for k in OBJECT_FIELDS]
    assert widget.points_per_side.isVisible()
    assert not any(f.isVisible() for f in object_fields)
    widget.prompts_combo.setCurrentText("objects")
    assert all(f.isVisible() for f in object_fields) and not widget.points_per_side.isVisible()
    assert widget._prompt_form.labelForField(widget.diameter_row).isVisible()
    widget.min_diameter.setValue(8)
    widget.max_diameter.setValue(24)
    widget.decoding_combo.setCurrentText("box")
    params = widget.form().params
    assert (params.prompts, params.object_diameter, params.object_decoding,
            params.object_polarity, params.object_threshold) == (
        "objects", (8.0, 24.0), "box", "bright", 0.05)

    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    labels = np.asarray(viewer.layers["cells everything"].data)
    lo, hi = viewer.layers["cells"].contrast_limits
    ref = run_batch(stack, BatchSettings(ModelSpec("blob", device="cpu", factory=BlobModel),
                                         dataclasses.replace(params, contrast_limits=(lo, hi))))
    np.testing.assert_array_equal(labels, np.asarray(ref.labels))
    assert [len(np.unique(labels[i])) - 1 for i in range(3)] == counts

    widget.min_diameter.setValue(30)  # larger than the largest diameter
    assert widget.run() is None
    assert "object_diameter must be (min, max) pixels" in widget.status.text()


def test_link_slices_adds_3d_objects_and_tracks_layers(make_napari_viewer, qtbot):
    stack, _ = blob_stack(4)
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="stack")
    widget = make_widget(viewer)
    assert widget.form().link == "off"
    widget.link_combo.setCurrentIndex(widget.link_combo.findData("track"))
    assert widget.form().link == "track"
    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    tracks = viewer.layers["stack tracks"]
    assert len({int(tracks.data[z, 16, 16]) for z in range(4)}) == 1  # one track id
    assert viewer.layers["stack tracks (centroids)"].data.shape[1] == 4  # id, t, y, x
