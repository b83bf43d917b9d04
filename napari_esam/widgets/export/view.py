"""The "Export labels" section of the batch widget: a thin Qt view over
:mod:`.export_controller`.

Layer (any Labels layer), format (OME-Zarr or TIFF), path, compression, Export / Cancel and
a progress bar. The export runs in a background worker; an existing path is replaced only
after the user confirms (:meth:`ExportSection.confirm_overwrite`), and then safely (the new
file is written beside it and renamed into place when complete).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QWidget,
)
from superqt import QCollapsible

from napari_esam.widgets.export.controller import (
    COMPRESSIONS,
    FORMATS,
    ExportController,
    ExportForm,
    default_path,
    format_of,
    with_format,
)
from napari_esam.widgets.forms import BAR_MAX, RunRows
from napari_esam.widgets.workers import Progress


class ExportSection(QCollapsible):
    """Export a Labels layer to ``.zarr`` or ``.tif`` (collapsible, for the batch widget)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__("Export labels", parent)
        self.viewer = napari_viewer
        self.controller = ExportController(napari_viewer)
        self.controller.on_progress = self._on_progress
        self.controller.on_finished = self._on_finished
        self.controller.on_error = self._on_error

        body = QWidget()
        form = QFormLayout(body)
        self.layer_combo = QComboBox()
        self.format_combo = QComboBox()
        for suffix, label in FORMATS:
            self.format_combo.addItem(label, suffix)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("path/to/labels.zarr")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.path_edit)
        row.addWidget(browse)
        self.compression_combo = QComboBox()
        self.compression_combo.addItems(COMPRESSIONS)
        self.compression_combo.setToolTip(
            "auto: zstd for Zarr, zlib for TIFF (zstd TIFFs need imagecodecs and are not "
            "ImageJ-readable)"
        )
        form.addRow("Labels layer", self.layer_combo)
        form.addRow("Format", self.format_combo)
        form.addRow("Path", row)
        form.addRow("Compression", self.compression_combo)
        self.run_rows = RunRows("Export", self._export_clicked, self.cancel)
        self.export_button, self.cancel_button = (self.run_rows.run_button,
                                                  self.run_rows.cancel_button)
        self.progress, self.status = self.run_rows.progress, self.run_rows.status
        for row in self.run_rows.layout_rows():
            form.addRow(row)
        self.addWidget(body)

        self.format_combo.currentIndexChanged.connect(self._format_changed)
        self.path_edit.editingFinished.connect(self._path_edited)
        events = napari_viewer.layers.events
        events.inserted.connect(self._layer_inserted)
        events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ choices
    def _refresh_layers(self, *_: Any) -> None:
        current = self.layer_combo.currentText()
        names = self.controller.labels_layers()
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)

    def _layer_inserted(self, event: Any = None) -> None:
        self._refresh_layers()
        name = getattr(getattr(event, "value", None), "name", None)
        if name in self.controller.labels_layers():  # a new Labels layer: offer it
            self.layer_combo.setCurrentText(name)

    def _format_changed(self, *_: Any) -> None:
        text = self.path_edit.text()
        if text.strip():
            self.path_edit.setText(with_format(text, self.format_combo.currentData()))

    def _path_edited(self) -> None:
        fmt = format_of(self.path_edit.text())
        if fmt is not None and fmt != self.format_combo.currentData():
            self.format_combo.setCurrentIndex(self.format_combo.findData(fmt))

    def _browse(self) -> None:
        fmt = self.format_combo.currentData()
        start = self.path_edit.text().strip() or default_path(self.layer_combo.currentText(), fmt)
        pattern = "OME-Zarr (*.zarr)" if fmt == ".zarr" else "TIFF (*.tif *.tiff)"
        path, _ = QFileDialog.getSaveFileName(
            self, "Export labels", start, pattern,
            options=QFileDialog.Option.DontConfirmOverwrite,  # asked at Export instead
        )
        if path:
            self.path_edit.setText(with_format(path, fmt))

    def form(self) -> ExportForm:
        """The current choices."""
        return ExportForm(
            layer=self.layer_combo.currentText(),
            fmt=self.format_combo.currentData(),
            path=self.path_edit.text(),
            compression=self.compression_combo.currentText(),
        )

    # --------------------------------------------------------------------- run
    def confirm_overwrite(self, path: Path) -> bool:
        """Ask whether to replace an existing ``path`` (default answer: no)."""
        answer = QMessageBox.question(
            self, "Replace existing file?",
            f"{str(path)!r} already exists.\nReplace it with the export?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def _export_clicked(self) -> None:
        self.export()

    def export(self, start: bool = True) -> Any:
        """Export with the current choices; returns the worker, or None when nothing started
        (a bad choice, or the user kept an existing file)."""
        form = self.form()
        try:
            target = self.controller.target(form)
            overwrite = False
            if target.exists() or target.is_symlink():
                if not self.confirm_overwrite(target):
                    self.status.setText(f"Not exported: kept the existing {target.name}")
                    return None
                overwrite = True
            self.path_edit.setText(str(target))
            self.run_rows.running(True)
            self.progress.setValue(0)
            self.status.setText(f"exporting to {target.name}…")
            return self.controller.start(form, overwrite=overwrite, start=start)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._on_error(exc)
            return None

    def cancel(self) -> None:
        """Stop the export; an existing file at the path stays untouched."""
        self.controller.cancel()
        self.cancel_button.setEnabled(False)
        self.status.setText("cancelling…")

    def _on_progress(self, step: Progress) -> None:
        self.progress.setValue(int(round(step.fraction * BAR_MAX)))

    def _on_finished(self, path: Path | None) -> None:
        self.run_rows.running(False)
        if path is None:
            self.progress.setValue(0)
            self.status.setText("Export cancelled; nothing was written")
        else:
            self.progress.setValue(BAR_MAX)
            self.status.setText(f"Exported to {path}")

    def _on_error(self, exc: BaseException) -> None:
        self.run_rows.running(False)
        self.status.setText(f"Error: {exc}")
        from napari.utils.notifications import show_error

        show_error(f"Export labels: {exc}")
