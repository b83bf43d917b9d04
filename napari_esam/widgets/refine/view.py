"""The "Refine labels" dock widget: a thin Qt view over :mod:`.controller`.

Sections: the image and the Labels layer, the model, the refine options (IoU threshold, mask
input, current slice or whole stack, contrast), large images (tiled mode, tile, halo), the
Refine/Cancel buttons with the progress bar, and the list of objects kept as they were
(clicking one selects its id in the Labels layer).
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
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_esam.core.runs.pipeline import BatchProgress
from napari_esam.core.tiling.grid import HALO, TILE, TILED_MODES, TILING_THRESHOLD
from napari_esam.widgets.forms import BAR_MAX, RunRows, dspin, model_combo, spin
from napari_esam.widgets.refine.controller import (
    IOU_THRESHOLD,
    RefineController,
    RefineForm,
    RefineOutcome,
)

HELP = (
    "Each object of the Labels layer is segmented again by the model from its box, an "
    "interior point and (where the model takes one) its own mask, and keeps its id. An "
    "object whose refined mask overlaps its original with an IoU below the threshold is "
    "kept as it was and listed below. The result is one undo step (Ctrl+Z)."
)


class RefineWidget(QWidget):
    """Refine an existing Labels layer object by object with a promptable model."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.controller = RefineController(napari_viewer)
        self.controller.on_progress = self._on_progress
        self.controller.on_finished = self._on_finished
        self.controller.on_error = self._on_error
        layout = QVBoxLayout(self)
        self.setLayout(layout)
        intro = QLabel(HELP)
        intro.setWordWrap(True)
        layout.addWidget(intro)

        box = QGroupBox("Input")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("integer labels of the image (0 = background)")
        form.addRow("Image layer", self.image_combo)
        form.addRow("Labels layer", self.labels_combo)
        layout.addWidget(box)

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

        box = QGroupBox("Refine")
        form = QFormLayout(box)
        self.iou_spin = dspin(0, 1, IOU_THRESHOLD, 0.05,
                              "objects whose refined mask has a lower IoU with the original "
                              "are kept as they were and listed")
        self.mask_input = QCheckBox("give each mask to the model (mask input)")
        self.mask_input.setChecked(True)
        self.mask_input.setToolTip("MobileSAM and EfficientViT-SAM take a mask input; "
                                   "EfficientSAM has none and uses the box and point only")
        self.scope_combo = QComboBox()
        self.scope_combo.addItem("current slice", False)
        self.scope_combo.addItem("whole stack", True)
        self.layer_contrast = QCheckBox("use the layer's contrast limits")
        self.layer_contrast.setChecked(True)
        form.addRow("Min IoU", self.iou_spin)
        form.addRow(self.mask_input)
        form.addRow("Slices", self.scope_combo)
        form.addRow(self.layer_contrast)
        layout.addWidget(box)

        box = QGroupBox("Large images")
        form = QFormLayout(box)
        self.tiled_combo = QComboBox()
        for mode, text in zip(
            TILED_MODES,
            (f"auto (planes over {TILING_THRESHOLD} px)", "on", "off (shrink to 1024 px)"),
            strict=True,
        ):
            self.tiled_combo.addItem(text, mode)
        self.tiled_combo.setToolTip("tiled: each object is decoded on the tile around it, at "
                                    "full resolution")
        self.tile_spin = spin(16, 16384, TILE, "tile side in pixels (the model input: 1024)")
        self.tile_spin.setSingleStep(256)
        self.halo_spin = spin(0, TILE // 2, HALO, "overlap of neighbouring tiles, at most tile/2")
        self.halo_spin.setSingleStep(64)
        self.tile_spin.valueChanged.connect(lambda v: self.halo_spin.setMaximum(int(v) // 2))
        tile_row = QHBoxLayout()
        tile_row.addWidget(self.tile_spin, 1)
        tile_row.addWidget(QLabel("halo"))
        tile_row.addWidget(self.halo_spin, 1)
        form.addRow("Tiled mode", self.tiled_combo)
        form.addRow("Tile (px)", tile_row)
        layout.addWidget(box)

        self.run_rows = RunRows("Refine", self._run_clicked, self.cancel, idle_text="idle")
        self.run_button, self.cancel_button = self.run_rows.run_button, self.run_rows.cancel_button
        self.progress, self.status = self.run_rows.progress, self.run_rows.status
        for part in self.run_rows.layout_rows():
            (layout.addLayout if isinstance(part, QHBoxLayout) else layout.addWidget)(part)
        self.kept_label = QLabel("Kept as they were (click to select):")
        self.kept_list = QListWidget()
        self.kept_list.setMinimumHeight(100)
        self.kept_list.itemClicked.connect(self._select_kept)
        self.kept_label.setVisible(False)
        self.kept_list.setVisible(False)
        layout.addWidget(self.kept_label)
        layout.addWidget(self.kept_list)
        layout.addStretch(1)

        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ helpers
    def _refresh_layers(self, *_: Any) -> None:
        for combo, names in ((self.image_combo, self.controller.image_layers()),
                             (self.labels_combo, self.controller.labels_layers())):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint", "", "PyTorch (*.pt *.pth *.zip)")
        if path:
            self.checkpoint_edit.setText(path)

    def form(self) -> RefineForm:
        """The current choices."""
        return RefineForm(
            model=self.model_combo.currentText(),
            device=self.device_combo.currentText(),
            checkpoint=self.checkpoint_edit.text(),
            iou_threshold=self.iou_spin.value(),
            use_mask_input=self.mask_input.isChecked(),
            whole_stack=bool(self.scope_combo.currentData()),
            layer_contrast=self.layer_contrast.isChecked(),
            tiled=self.tiled_combo.currentData(),
            tile=self.tile_spin.value(),
            halo=self.halo_spin.value(),
        )

    # ---------------------------------------------------------------------- run
    def _run_clicked(self) -> None:
        self.run()

    def run(self, start: bool = True) -> Any:
        """Start refining with the current choices; returns the worker (None on a bad input)."""
        self.run_rows.running(True)
        self.kept_list.clear()
        self.kept_label.setVisible(False)
        self.kept_list.setVisible(False)
        self.progress.setValue(0)
        self.progress.setFormat("loading the model…")
        self.status.setText("running")
        try:
            return self.controller.start(self.image_combo.currentText(),
                                         self.labels_combo.currentText(), self.form(),
                                         start=start)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return None

    def cancel(self) -> None:
        """Stop after the current decoder batch; finished slices are still written."""
        self.controller.cancel()
        self.cancel_button.setEnabled(False)
        self.status.setText("cancelling…")

    def _on_progress(self, ev: BatchProgress) -> None:
        self.progress.setValue(int(round(ev.fraction * BAR_MAX)))
        if ev.kind == "step" and ev.steps:
            self.progress.setFormat(f"{ev.done} / {ev.total} slices · object {ev.step} / "
                                    f"{ev.steps}")
        elif ev.kind in ("start", "slice"):
            self.progress.setFormat(f"{ev.done} / {ev.total} slices")

    def _on_finished(self, outcome: RefineOutcome) -> None:
        self.run_rows.running(False)
        run = outcome.run
        done = len(outcome.applied)
        self.progress.setValue(int(round(BAR_MAX * done / outcome.requested))
                               if outcome.requested else 0)
        self.progress.setFormat(f"{'cancelled' if run.cancelled else 'done'}: {done} / "
                                f"{outcome.requested} slices")
        self.status.setText(self.controller.summary(outcome))
        source = outcome.source
        for i, kept in outcome.run.kept.items():
            for obj, iou in kept:
                where = ""
                if outcome.run.total > 1 and source is not None:
                    where = f"slice {', '.join(str(c) for c in source.coords(i))}: "
                item = QListWidgetItem(f"{where}id {obj} (IoU {iou:.2f})")
                item.setData(Qt.ItemDataRole.UserRole, int(obj))
                self.kept_list.addItem(item)
        shown = self.kept_list.count() > 0
        self.kept_label.setVisible(shown)
        self.kept_list.setVisible(shown)

    def _select_kept(self, item: QListWidgetItem) -> None:
        name = self.labels_combo.currentText()
        if name in self.viewer.layers:
            self.viewer.layers[name].selected_label = int(item.data(Qt.ItemDataRole.UserRole))

    def _on_error(self, exc: BaseException) -> None:
        self.run_rows.running(False)
        self.progress.setFormat("error")
        self.status.setText(f"Error: {exc}")
        from napari.utils.notifications import show_error

        show_error(f"Refine labels: {exc}")
