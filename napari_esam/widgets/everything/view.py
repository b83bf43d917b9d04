"""The "Segment everything" dock widget: a thin Qt view over :mod:`.controller`.

Sections (top to bottom): input, model, parameters (the prompt set, grid or objects, with
its fields; an "Advanced" fold), large images
(tiled mode, tile, halo, embedding store), output, where to run (this process, a local Dask
cluster or a Dask scheduler), the Run/Cancel buttons with the progress bar, and the per-slice
counts of the last run. :meth:`EverythingWidget.add_section`
appends further sections below them: the label export (:mod:`napari_esam.widgets.export.view`).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_esam.core.plane.object_prompts import DECODINGS, POLARITIES
from napari_esam.core.runs.pipeline import BatchProgress, BatchResult
from napari_esam.core.runs.settings import PROMPTS, EverythingParams
from napari_esam.core.tiling.grid import HALO, TILE, TILED_MODES, TILING_THRESHOLD
from napari_esam.widgets.everything.controller import (
    EXECUTORS,
    EverythingController,
    EverythingForm,
    counts_rows,
    progress_text,
)
from napari_esam.widgets.export.view import ExportSection
from napari_esam.widgets.forms import BAR_MAX, RunRows, dspin, model_combo, spin


class EverythingWidget(QWidget):
    """Segment everything in every slice of an image layer, into a Labels layer and/or Zarr."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.controller = EverythingController(napari_viewer)
        self.controller.on_progress = self._on_progress
        self.controller.on_finished = self._on_finished
        self.controller.on_error = self._on_error
        d = EverythingParams()

        layout = QVBoxLayout(self)
        self.setLayout(layout)

        # input
        box = QGroupBox("Input")
        form = QFormLayout(box)
        self.layer_combo = QComboBox()
        self.axis_combo = QComboBox()
        self.axis_combo.setToolTip("the axis whose slices are segmented one by one")
        form.addRow("Image layer", self.layer_combo)
        form.addRow("Stack axis", self.axis_combo)
        layout.addWidget(box)

        # model
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_combo = model_combo("mobilesam")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("official weights (downloaded once)")
        ckpt_btn = QPushButton("…")
        ckpt_btn.setMaximumWidth(30)
        ckpt_btn.clicked.connect(self._browse_checkpoint)
        row = QHBoxLayout()
        row.addWidget(self.checkpoint_edit)
        row.addWidget(ckpt_btn)
        form.addRow("Model", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Checkpoint", row)
        layout.addWidget(box)

        # parameters
        box = QGroupBox("Parameters")
        form = QFormLayout(box)
        self.points_per_side = spin(1, 256, d.points_per_side, "grid of N x N prompt points")
        self.pred_iou_thresh = dspin(0, 1, d.pred_iou_thresh, tip="keep masks above this IoU")
        self.stability_thresh = dspin(0, 1, d.stability_score_thresh, tip="keep stable masks")
        self.box_nms_thresh = dspin(0, 1, d.box_nms_thresh, tip="overlap that removes a mask")
        self.min_size = spin(0, 10**8, d.min_size, "drop objects smaller than this (pixels)")
        self.max_size = spin(0, 10**9, 0, "drop objects larger than this (pixels; 0 = keep)")
        self.layer_contrast = QCheckBox("use the layer's contrast limits")
        self.layer_contrast.setChecked(True)
        self.unique_ids = QCheckBox("label ids unique across the stack")
        self.unique_ids.setChecked(True)
        self._add_prompt_rows(form, d)
        form.addRow("Min predicted IoU", self.pred_iou_thresh)
        form.addRow("Min stability", self.stability_thresh)
        form.addRow("Box NMS", self.box_nms_thresh)
        form.addRow("Min size (px)", self.min_size)
        form.addRow("Max size (px)", self.max_size)
        self.link_combo = QComboBox()
        for text, value in (("off (ids per slice)", "off"), ("3-D objects", "3d"),
                            ("tracks", "track")):
            self.link_combo.addItem(text, value)
        self.link_combo.setToolTip(
            "After a complete run, link each slice's objects into one id per 3-D object (z) "
            "or per track (t) along the first stack axis, as new layers (tracks also as a "
            "Tracks layer)"
        )
        form.addRow(self.layer_contrast)
        form.addRow(self.unique_ids)
        form.addRow("Link slices", self.link_combo)
        adv = QCollapsible("Advanced")
        adv_widget = QWidget()
        adv_form = QFormLayout(adv_widget)
        self.method_combo = QComboBox()
        self.method_combo.addItems(["sam", "efficientsam"])
        self.points_per_batch = spin(1, 1024, d.points_per_batch or 64, "points per model call")
        self.stability_offset = dspin(0, 10, d.stability_score_offset, 0.1)
        self.min_region_area = spin(0, 10**6, d.min_mask_region_area,
                                     "remove holes/islands smaller than this in each mask")
        self.crop_n_layers = spin(0, 4, d.crop_n_layers, "extra passes on zoomed crops")
        self.crop_nms_thresh = dspin(0, 1, d.crop_nms_thresh)
        self.crop_overlap = dspin(0, 0.99, d.crop_overlap_ratio)
        self.crop_downscale = spin(1, 8, d.crop_n_points_downscale_factor)
        adv_form.addRow("Method", self.method_combo)
        adv_form.addRow("Points per batch", self.points_per_batch)
        adv_form.addRow("Stability offset", self.stability_offset)
        adv_form.addRow("Min mask region (px)", self.min_region_area)
        adv_form.addRow("Crop layers", self.crop_n_layers)
        adv_form.addRow("Crop NMS", self.crop_nms_thresh)
        adv_form.addRow("Crop overlap", self.crop_overlap)
        adv_form.addRow("Crop points downscale", self.crop_downscale)
        adv.addWidget(adv_widget)
        form.addRow(adv)
        layout.addWidget(box)

        # large images: tiled mode
        box = QGroupBox("Large images")
        form = QFormLayout(box)
        self.tiled_combo = QComboBox()
        for mode, text in zip(
            TILED_MODES,
            (f"auto (planes over {TILING_THRESHOLD} px)", "on", "off (shrink to 1024 px)"),
            strict=True,
        ):
            self.tiled_combo.addItem(text, mode)
        self.tiled_combo.setToolTip(
            "Tiled mode segments every plane tile by tile at full resolution and merges the "
            "objects across the seams; off: a plane is shrunk to the model's 1024 px"
        )
        self.tile_spin = spin(16, 16384, TILE, "tile side in pixels (the model input: 1024)")
        self.tile_spin.setSingleStep(256)
        self.halo_spin = spin(0, TILE // 2, HALO, "overlap of neighbouring tiles, at most tile/2")
        self.halo_spin.setSingleStep(64)
        # the halo can never exceed half the tile: a smaller tile clamps it
        self.tile_spin.valueChanged.connect(lambda v: self.halo_spin.setMaximum(int(v) // 2))
        self.embeddings_edit = QLineEdit()
        self.embeddings_edit.setPlaceholderText("optional: embeddings.zarr (napari-esam embed)")
        self.embeddings_edit.setToolTip(
            "an embedding store for this image, model and tiling (napari-esam embed, or an "
            "earlier run): reused, and filled with the tiles it lacks (created when missing)"
        )
        emb_btn = QPushButton("…")
        emb_btn.setMaximumWidth(30)
        emb_btn.clicked.connect(self._browse_embeddings)
        row = QHBoxLayout()
        row.addWidget(self.embeddings_edit)
        row.addWidget(emb_btn)
        self.tiled_note = QLabel("")
        self.tiled_note.setWordWrap(True)
        tile_row = QHBoxLayout()
        tile_row.addWidget(self.tile_spin, 1)
        tile_row.addWidget(QLabel("halo"))
        tile_row.addWidget(self.halo_spin, 1)
        form.addRow("Tiled mode", self.tiled_combo)
        form.addRow("Tile (px)", tile_row)
        form.addRow("Embeddings", row)
        form.addRow(self.tiled_note)
        self.tiled_combo.currentIndexChanged.connect(self._refresh_tiled)
        layout.addWidget(box)

        # output
        box = QGroupBox("Output")
        form = QFormLayout(box)
        self.to_layer = QCheckBox("new Labels layer")
        self.to_layer.setChecked(True)
        self.zarr_edit = QLineEdit()
        self.zarr_edit.setPlaceholderText("optional: path/to/labels.zarr (resumable)")
        zarr_btn = QPushButton("…")
        zarr_btn.setMaximumWidth(30)
        zarr_btn.clicked.connect(self._browse_zarr)
        row = QHBoxLayout()
        row.addWidget(self.zarr_edit)
        row.addWidget(zarr_btn)
        self.overwrite = QCheckBox("overwrite an existing Zarr (else resume it)")
        form.addRow(self.to_layer)
        form.addRow("Zarr", row)
        form.addRow(self.overwrite)
        layout.addWidget(box)

        # where the slices run
        box = QGroupBox("Run on")
        form = QFormLayout(box)
        self.executor_combo = QComboBox()
        for value, label in EXECUTORS:
            self.executor_combo.addItem(label, value)
        self.executor_combo.setToolTip(
            "a Dask cluster runs one task per slice in other processes or machines; they read "
            "the layer's file and write the Zarr output themselves (shared filesystem)"
        )
        self.workers_spin = spin(1, 1024, 2, "worker processes of the local Dask cluster")
        self.scheduler_edit = QLineEdit()
        self.scheduler_edit.setPlaceholderText("tcp://host:8786")
        form.addRow("Executor", self.executor_combo)
        form.addRow("Workers", self.workers_spin)
        form.addRow("Scheduler", self.scheduler_edit)
        self._executor_form = form
        self.executor_combo.currentIndexChanged.connect(self._refresh_executor)
        layout.addWidget(box)

        # run
        self.run_rows = RunRows("Run", self._run_clicked, self.cancel, idle_text="idle")
        self.run_button, self.cancel_button = self.run_rows.run_button, self.run_rows.cancel_button
        self.progress, self.status = self.run_rows.progress, self.run_rows.status
        layout.addLayout(self.run_rows.buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        self.counts_table = QTableWidget(0, 2)
        self.counts_table.setHorizontalHeaderLabels(["slice", "objects"])
        self.counts_table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.counts_table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.counts_table.verticalHeader().setVisible(False)
        self.counts_table.setMinimumHeight(120)
        self.counts_table.setVisible(False)
        layout.addWidget(self.counts_table)

        #: later sections (e.g. export) go here, below the run controls
        self.sections = QVBoxLayout()
        layout.addLayout(self.sections)
        layout.addStretch(1)

        self.layer_combo.currentTextChanged.connect(self._refresh_axes)
        self.axis_combo.currentIndexChanged.connect(self._refresh_tiled)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self._refresh_executor()

        self.export_section = ExportSection(napari_viewer)
        self.add_section(self.export_section)

    # ------------------------------------------------------------------ helpers
    def _add_prompt_rows(self, form: QFormLayout, d: EverythingParams) -> None:
        """The prompt set (grid | objects) and its fields: points per side for the grid, the
        detector's fields for objects (only the chosen set's fields are shown)."""
        self.prompts_combo = QComboBox()
        self.prompts_combo.addItems(list(PROMPTS))
        self.prompts_combo.setCurrentText(d.prompts)
        self.prompts_combo.setToolTip(
            "grid: N x N points per tile, for objects of any shape; objects: one prompt per "
            "blob-like object (cells, nuclei) found by a detector, much faster"
        )
        self.min_diameter = dspin(2, 10_000, d.object_diameter[0], 1.0,
                                  "smallest object diameter (pixels)")
        self.max_diameter = dspin(2, 10_000, d.object_diameter[1], 1.0,
                                  "largest object diameter (pixels)")
        self.diameter_row = QWidget()
        row = QHBoxLayout(self.diameter_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.min_diameter, 1)
        row.addWidget(QLabel("to"))
        row.addWidget(self.max_diameter, 1)
        self.object_threshold = dspin(0.001, 10, d.object_threshold, 0.01,
                                      "detector threshold: lower finds fainter objects")
        self.polarity_combo = QComboBox()
        self.polarity_combo.addItems(list(POLARITIES))
        self.polarity_combo.setCurrentText(d.object_polarity)
        self.polarity_combo.setToolTip(
            "bright objects on a dark background (fluorescence) or dark on bright")
        self.decoding_combo = QComboBox()
        self.decoding_combo.addItems(list(DECODINGS))
        self.decoding_combo.setCurrentText(d.object_decoding)
        self.decoding_combo.setToolTip(
            "point: a positive point per object, SAM's IoU/stability filters as for the grid; "
            "box: the object's box, one mask each, no IoU/stability filters (fastest, "
            "MobileSAMv2)"
        )
        form.addRow("Prompts", self.prompts_combo)
        form.addRow("Points per side", self.points_per_side)
        form.addRow("Object diameter (px)", self.diameter_row)
        form.addRow("Object threshold", self.object_threshold)
        form.addRow("Object polarity", self.polarity_combo)
        form.addRow("Object decoding", self.decoding_combo)
        self._prompt_form = form
        self.prompts_combo.currentIndexChanged.connect(self._refresh_prompts)
        self._refresh_prompts()

    def _refresh_prompts(self, *_: Any) -> None:
        """Show the grid's or the detector's fields, as the prompt set says."""
        objects = self.prompts_combo.currentText() == "objects"
        for field, shown in ((self.points_per_side, not objects),
                             (self.diameter_row, objects), (self.object_threshold, objects),
                             (self.polarity_combo, objects), (self.decoding_combo, objects)):
            field.setVisible(shown)  # (QFormLayout.setRowVisible needs Qt >= 6.4)
            self._prompt_form.labelForField(field).setVisible(shown)

    def add_section(self, widget: QWidget) -> None:
        """Append a section below the run controls (used by later features, e.g. export)."""
        self.sections.addWidget(widget)

    def _refresh_layers(self, *_: Any) -> None:
        current = self.layer_combo.currentText()
        names = self.controller.image_layers()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._refresh_axes()

    def _refresh_axes(self, *_: Any) -> None:
        self.axis_combo.clear()
        for label, value in self.controller.axis_choices(self.layer_combo.currentText()):
            self.axis_combo.addItem(label, value)
        self._refresh_tiled()

    def _refresh_tiled(self, *_: Any) -> None:
        """Say whether the chosen layer will be tiled."""
        name = self.layer_combo.currentText()
        mode = self.tiled_combo.currentData()
        if not name or name not in self.viewer.layers:
            self.tiled_note.setText("")
            return
        tiled = self.controller.is_tiled(name, mode, self.axis_combo.currentData())
        self.tiled_note.setText(
            "this layer: tiled, full resolution" if tiled
            else "this layer: whole planes (shrunk to 1024 px when larger)"
        )

    def _refresh_executor(self, *_: Any) -> None:
        value = self.executor_combo.currentData()
        for field, shown in ((self.workers_spin, value == "local-cluster"),
                             (self.scheduler_edit, value == "scheduler")):
            field.setVisible(shown)  # (QFormLayout.setRowVisible needs Qt >= 6.4)
            self._executor_form.labelForField(field).setVisible(shown)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "", "PyTorch (*.pt *.pth *.zip)")
        if path:
            self.checkpoint_edit.setText(path)

    def _browse_embeddings(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Embedding store (.zarr)")
        if path:
            self.embeddings_edit.setText(path)

    def _browse_zarr(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Labels Zarr", "labels.zarr", "Zarr (*.zarr)")
        if path:
            self.zarr_edit.setText(path if path.endswith(".zarr") else path + ".zarr")

    def form(self) -> EverythingForm:
        """The current choices."""
        max_size = self.max_size.value() or None
        params = EverythingParams(
            points_per_side=self.points_per_side.value(),
            points_per_batch=self.points_per_batch.value(),
            pred_iou_thresh=self.pred_iou_thresh.value(),
            stability_score_thresh=self.stability_thresh.value(),
            stability_score_offset=self.stability_offset.value(),
            box_nms_thresh=self.box_nms_thresh.value(),
            crop_n_layers=self.crop_n_layers.value(),
            crop_nms_thresh=self.crop_nms_thresh.value(),
            crop_overlap_ratio=self.crop_overlap.value(),
            crop_n_points_downscale_factor=self.crop_downscale.value(),
            min_mask_region_area=self.min_region_area.value(),
            method=self.method_combo.currentText(),
            min_size=self.min_size.value(),
            max_size=max_size,
            prompts=self.prompts_combo.currentText(),
            object_diameter=(self.min_diameter.value(), self.max_diameter.value()),
            object_threshold=self.object_threshold.value(),
            object_polarity=self.polarity_combo.currentText(),
            object_decoding=self.decoding_combo.currentText(),
        )
        return EverythingForm(
            model=self.model_combo.currentText(),
            device=self.device_combo.currentText(),
            checkpoint=self.checkpoint_edit.text(),
            params=params,
            layer_contrast=self.layer_contrast.isChecked(),
            id_scope="stack" if self.unique_ids.isChecked() else "slice",
            stack_axis=self.axis_combo.currentData(),
            to_layer=self.to_layer.isChecked(),
            zarr_path=self.zarr_edit.text(),
            overwrite=self.overwrite.isChecked(),
            executor=self.executor_combo.currentData(),
            workers=self.workers_spin.value(),
            scheduler=self.scheduler_edit.text(),
            tiled=self.tiled_combo.currentData(),
            tile=self.tile_spin.value(),
            halo=self.halo_spin.value(),
            embeddings=self.embeddings_edit.text(),
            link=self.link_combo.currentData(),
        )

    # ---------------------------------------------------------------------- run
    def _run_clicked(self) -> None:
        self.run()

    def run(self, start: bool = True) -> Any:
        """Start a run with the current choices; returns the worker (None on a bad input)."""
        self.run_rows.running(True)
        self.counts_table.setVisible(False)
        self.progress.setValue(0)
        in_process = self.executor_combo.currentData() == "in-process"
        self.progress.setFormat("loading the model…" if in_process else "starting Dask…")
        self.status.setText("running")
        try:
            return self.controller.start(self.layer_combo.currentText(), self.form(),
                                         start=start)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return None

    def cancel(self) -> None:
        """Stop after the current point batch; finished slices are kept (with a Zarr path,
        finished tiles of tiled planes too, so a rerun resumes)."""
        self.controller.cancel()
        self.cancel_button.setEnabled(False)
        self.status.setText("cancelling…")

    def _on_progress(self, ev: BatchProgress) -> None:
        self.progress.setValue(int(round(ev.fraction * BAR_MAX)))
        self.progress.setFormat(progress_text(ev))
        if ev.kind == "tile":
            self.status.setText(f"slice {ev.index}: segmenting tiles (tiled)")
        elif ev.kind == "slice":
            self.status.setText(f"slice {ev.index}: {ev.n_objects} objects")

    def _on_finished(self, result: BatchResult) -> None:
        self.run_rows.running(False)
        done, total, unit = len(result.counts), result.total, "slices"
        self.progress.setValue(int(round(BAR_MAX * done / total)) if total else 0)
        self.progress.setFormat(f"{done} / {total} {unit}")
        self.status.setText(self.controller.summary(result))
        source = self.controller.last_source
        rows = counts_rows(result, source) if source is not None else []
        self.counts_table.setRowCount(len(rows))
        for r, (label, n) in enumerate(rows):
            self.counts_table.setItem(r, 0, QTableWidgetItem(label))
            item = QTableWidgetItem(str(n))
            item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.counts_table.setItem(r, 1, item)
        self.counts_table.setVisible(bool(rows))

    def _on_error(self, exc: BaseException) -> None:
        self.run_rows.running(False)
        self.progress.setFormat("error")
        self.status.setText(f"Error: {exc}")
        from napari.utils.notifications import show_error

        show_error(f"Segment everything: {exc}")
