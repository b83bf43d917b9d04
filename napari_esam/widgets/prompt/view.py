"""The "Segment with prompts" dock widget: a thin Qt view over :class:`PromptController`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_esam.core.tiling.grid import plane_grid
from napari_esam.widgets.forms import model_combo
from napari_esam.widgets.prompt.controller import (
    DEVICES,
    KEYS,
    LABELS_NAME,
    NEGATIVE,
    POSITIVE,
    ROLE_KEY,
    TILED_MODES,
    ModelFactory,
    PromptController,
    default_model_factory,
    spatial_shape,
)
from napari_esam.widgets.workers import qt_runner

_NEW_LABELS = f"new layer “{LABELS_NAME}”"
_NONE = "(none)"
_SHOWN = "shown by the slider"


def _key_text(key: str) -> str:
    """napari key name → label text, e.g. ``"Control-Z"`` → ``"Ctrl+Z"``."""
    return key.replace("Control", "Ctrl").replace("-", "+").upper()


def _if_alive(method: Callable[..., None]) -> Callable[..., None]:
    """For callbacks from napari (not Qt) events: do nothing once the widget is deleted."""

    @functools.wraps(method)
    def wrapper(self: QWidget, *args: Any) -> None:
        try:
            self.objectName()
        except RuntimeError:  # the C++ widget was deleted (dock closed)
            return
        method(self, *args)

    return wrapper


class _LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of one kind (objects kept, not names)."""

    def __init__(self, kind: type, none_text: str | None = None, skip_role: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.none_text = none_text
        self.skip_role = skip_role
        self._layers: list[Any] = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)

    def refresh(self, layers: Any, current: Any) -> None:
        """List the matching layers (top first) and select ``current``; rebuild only on change."""
        wanted = [None] if self.none_text is not None else []
        for layer in reversed(list(layers)):
            if not isinstance(layer, self.kind):
                continue
            if self.skip_role and layer.metadata.get(ROLE_KEY) == self.skip_role:
                continue
            wanted.append(layer)
        names = [self.none_text if lyr is None else lyr.name for lyr in wanted]
        self.blockSignals(True)
        try:
            same = len(wanted) == len(self._layers) and all(
                a is b for a, b in zip(wanted, self._layers, strict=True)
            )
            if not same or names != [self.itemText(i) for i in range(self.count())]:
                self.clear()
                self.addItems(names)
                self._layers = wanted
            index = self._layers.index(current) if current in self._layers else 0
            if index != self.currentIndex():
                self.setCurrentIndex(index)
        finally:
            self.blockSignals(False)

    def layer(self) -> Any:
        i = self.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        row.addWidget(w)
    return row


class PromptWidget(QWidget):
    """Dock widget: choose image, model and output; click, preview, commit, undo."""

    def __init__(
        self,
        napari_viewer: Any,
        model_factory: ModelFactory = default_model_factory,
    ) -> None:
        super().__init__()
        from napari.layers import Image, Labels, Points, Shapes

        # napari hands plugins a PublicOnlyProxy; the controller compares layers by identity
        # (layer events carry the real layers), so it works on the viewer itself.
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.controller = PromptController(
            self.viewer, model_factory=model_factory, runner=self._run
        )
        self._worker: Any = None
        ctrl = self.controller

        # -- image
        self.image_combo = _LayerCombo(Image)
        self.channel_axis_combo = QComboBox()
        self.channel_combo = QComboBox()
        self.contrast_check = QCheckBox("use the layer's contrast limits")
        self.contrast_check.setToolTip(
            "Off: 0.5–99.5 percentile scaling of the slice (uint8 is used as is).\n"
            "On: scale with the image layer's contrast limits."
        )
        image_box = QGroupBox("Image")
        form = QFormLayout(image_box)
        form.addRow("image", self.image_combo)
        form.addRow("channel axis", self.channel_axis_combo)
        form.addRow("channel", self.channel_combo)
        form.addRow(self.contrast_check)

        # -- model
        self.model_combo = model_combo(ctrl.model_name)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("official weights (auto-download)")
        self.checkpoint_button = QToolButton()
        self.checkpoint_button.setText("…")
        self.checkpoint_button.setToolTip("Choose a local checkpoint file")
        ckpt_row = QHBoxLayout()
        ckpt_row.setContentsMargins(0, 0, 0, 0)
        ckpt_row.addWidget(self.checkpoint_edit)
        ckpt_row.addWidget(self.checkpoint_button)
        self.cache_spin = QSpinBox()
        self.cache_spin.setRange(1, 256)
        self.cache_spin.setValue(ctrl.cache.maxsize)
        self.cache_spin.setSuffix(" embeddings")
        self.cache_spin.setToolTip(
            "How many image embeddings to keep in memory: slices, or tiles in tiled mode "
            "(about 4 MB each)"
        )
        self.prepare_button = QPushButton("Load model && compute embedding")
        self.note_label = QLabel()
        self.note_label.setWordWrap(True)
        self.note_label.setStyleSheet("color: #e0b040;")
        model_box = QGroupBox("Model")
        form = QFormLayout(model_box)
        form.addRow("model", self.model_combo)
        form.addRow("device", self.device_combo)
        form.addRow("checkpoint", ckpt_row)
        form.addRow("embedding cache", self.cache_spin)
        form.addRow(self.prepare_button)
        form.addRow(self.note_label)

        # -- large images (tiled mode)
        self.tiled_combo = QComboBox()
        for mode, text in zip(
            TILED_MODES,
            (f"auto (planes over {ctrl.tiled_threshold} px)", "on", "off (resize to 1024 px)"),
            strict=True,
        ):
            self.tiled_combo.addItem(text, mode)
        self.tiled_combo.setToolTip(
            "Tiled mode answers each prompt from the 1024-px tile under it, at full "
            "resolution; tiles are embedded when first needed."
        )
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(64, 8192)
        self.tile_spin.setSingleStep(256)
        self.tile_spin.setValue(ctrl.tile)
        self.tile_spin.setSuffix(" px")
        self.halo_spin = QSpinBox()
        self.halo_spin.setRange(0, 4096)
        self.halo_spin.setSingleStep(64)
        self.halo_spin.setValue(ctrl.halo)
        self.halo_spin.setSuffix(" px")
        self.halo_spin.setToolTip("Overlap of neighbouring tiles (context around each tile core)")
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("none (embed tiles on demand)")
        self.store_edit.setToolTip(
            "An embedding store written by `napari-esam embed` (reused and filled)"
        )
        self.store_button = QToolButton()
        self.store_button.setText("…")
        self.store_button.setToolTip("Choose an embedding store (.zarr folder)")
        store_row = QHBoxLayout()
        store_row.setContentsMargins(0, 0, 0, 0)
        store_row.addWidget(self.store_edit)
        store_row.addWidget(self.store_button)
        tiled_box = QGroupBox("Large images")
        form = QFormLayout(tiled_box)
        form.addRow("tiled mode", self.tiled_combo)
        form.addRow("tile / halo", _row(self.tile_spin, self.halo_spin))
        form.addRow("embeddings", store_row)

        # -- prompts
        self.points_combo = _LayerCombo(Points, _NONE)
        self.shapes_combo = _LayerCombo(Shapes, _NONE)
        self.new_prompts_button = QPushButton("New prompt layers")
        self.positive_radio = QRadioButton("positive")
        self.negative_radio = QRadioButton("negative")
        self.positive_radio.setChecked(True)
        self._polarity_group = QButtonGroup(self)
        self._polarity_group.addButton(self.positive_radio)
        self._polarity_group.addButton(self.negative_radio)
        polarity_row = QHBoxLayout()
        polarity_row.setContentsMargins(0, 0, 0, 0)
        polarity_row.addWidget(self.positive_radio)
        polarity_row.addWidget(self.negative_radio)
        polarity_row.addWidget(QLabel(f"({_key_text(KEYS['toggle_polarity'])} toggles)"))
        polarity_row.addStretch()
        self.per_point_check = QCheckBox("one object per positive point")
        self.per_point_check.setToolTip(
            "Segment every positive click as its own object (all at once); commit gives them "
            "consecutive ids"
        )
        prompts_box = QGroupBox("Prompts")
        form = QFormLayout(prompts_box)
        form.addRow("points", self.points_combo)
        form.addRow("shapes", self.shapes_combo)
        form.addRow("next clicks", polarity_row)
        form.addRow(self.per_point_check)
        form.addRow(self.new_prompts_button)

        # -- output
        self.labels_combo = _LayerCombo(Labels, _NEW_LABELS, skip_role="preview")
        self.overwrite_check = QCheckBox("overwrite existing labels")
        output_box = QGroupBox("Output")
        form = QFormLayout(output_box)
        form.addRow("labels", self.labels_combo)
        form.addRow(self.overwrite_check)

        # -- actions
        self.commit_button = QPushButton(f"Commit ({_key_text(KEYS['commit'])})")
        self.clear_button = QPushButton(f"Clear object ({_key_text(KEYS['clear'])})")
        self.undo_button = QPushButton(f"Undo ({_key_text(KEYS['undo'])})")
        self.next_mask_button = QPushButton(f"Next mask ({_key_text(KEYS['next_mask'])})")
        self.commit_button.setToolTip("Write the preview into the output labels with a new id")
        self.clear_button.setToolTip("Remove the prompts and the preview of the current object")
        self.undo_button.setToolTip("Undo the last edit of the output labels")
        self.next_mask_button.setToolTip("Show the next of the three candidate masks")
        self.commit_button.setStyleSheet("font-weight: bold;")
        self.propagate_button = QPushButton(
            f"Segment through stack ({_key_text(KEYS['propagate'])})"
        )
        self.propagate_button.setToolTip(
            "Segment the prompted object(s) in the neighbouring slices, slice by slice, until "
            "the object ends; prompts on several slices of one object fill the gaps between "
            "them. Commit writes one 3-D object with one id."
        )
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop segmenting through the stack (nothing is committed)")
        self.range_from = QSpinBox()
        self.range_to = QSpinBox()
        for spin, text in ((self.range_from, "first slice"), (self.range_to, "last slice")):
            spin.setRange(-1, 1_000_000)
            spin.setValue(-1)
            spin.setSpecialValueText(text)
            spin.setToolTip(f"The {text} considered (the stack's end when not set)")
        actions = QGridLayout()
        actions.addWidget(self.commit_button, 0, 0)
        actions.addWidget(self.next_mask_button, 0, 1)
        actions.addWidget(self.clear_button, 1, 0)
        actions.addWidget(self.undo_button, 1, 1)
        actions.addWidget(self.propagate_button, 2, 0)
        actions.addWidget(self.cancel_button, 2, 1)
        actions.addWidget(self.range_from, 3, 0)
        actions.addWidget(self.range_to, 3, 1)

        self.progress = QProgressBar()
        self.progress.setRange(0, 3)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label.setMinimumHeight(40)
        self.status_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)

        help_label = QLabel(
            "Click objects with the points layer (green = positive, red = negative), or in the "
            "shapes layer draw a rectangle (a box), a path (a scribble: points along it, of "
            "the current polarity) or a polygon/ellipse (a lasso). Each new click refines the "
            "object. The preview updates at once; commit to keep it."
        )
        help_label.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addWidget(help_label)
        for box in (image_box, model_box, tiled_box, prompts_box, output_box):
            layout.addWidget(box)
        layout.addLayout(actions)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addStretch()

        # -- wiring
        self.image_combo.currentIndexChanged.connect(self._on_image_chosen)
        self.channel_axis_combo.currentIndexChanged.connect(self._on_channel_axis)
        self.channel_combo.currentIndexChanged.connect(self._on_channel)
        self.contrast_check.toggled.connect(ctrl.set_use_contrast_limits)
        self.model_combo.currentTextChanged.connect(lambda name: ctrl.set_model(name=name))
        self.device_combo.currentTextChanged.connect(lambda dev: ctrl.set_model(device=dev))
        self.checkpoint_edit.editingFinished.connect(self._on_checkpoint)
        self.checkpoint_button.clicked.connect(self._browse_checkpoint)
        self.cache_spin.valueChanged.connect(ctrl.set_cache_size)
        self.prepare_button.clicked.connect(ctrl.prepare)
        self.tiled_combo.currentIndexChanged.connect(self._on_tiling)
        self.tile_spin.editingFinished.connect(self._on_tiling)
        self.halo_spin.editingFinished.connect(self._on_tiling)
        self.store_edit.editingFinished.connect(self._on_tiling)
        self.store_button.clicked.connect(self._browse_store)
        self.points_combo.currentIndexChanged.connect(self._on_prompt_layers_chosen)
        self.shapes_combo.currentIndexChanged.connect(self._on_prompt_layers_chosen)
        self.new_prompts_button.clicked.connect(self._new_prompt_layers)
        self.positive_radio.toggled.connect(self._on_polarity)
        self.labels_combo.currentIndexChanged.connect(self._on_labels_chosen)
        self.overwrite_check.toggled.connect(lambda v: setattr(ctrl, "overwrite", bool(v)))
        self.per_point_check.toggled.connect(ctrl.set_one_object_per_point)
        self.propagate_button.clicked.connect(self._on_propagate)
        self.cancel_button.clicked.connect(ctrl.cancel)
        self.commit_button.clicked.connect(ctrl.commit)
        self.clear_button.clicked.connect(ctrl.clear_object)
        self.undo_button.clicked.connect(ctrl.undo)
        self.next_mask_button.clicked.connect(ctrl.next_mask)
        ctrl.events.status.connect(self._on_status)
        ctrl.events.busy.connect(self._on_busy)
        ctrl.events.progress.connect(self._on_progress)
        ctrl.events.changed.connect(self._sync_from_controller)
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layers_changed)
        layers.events.moved.connect(self._on_layers_changed)

        self._refresh_combos()
        self._on_image_chosen()
        self._update_notes()
        if ctrl.image_layer is not None and ctrl.points_layer is None:
            ctrl.ensure_prompt_layers()
        ctrl.update()

    # ------------------------------------------------------------------ runner
    def _run(self, job: Any, **kwargs: Any) -> Any:
        self._worker = qt_runner(job, **kwargs)
        return self._worker

    # ------------------------------------------------------------------ combos
    def _refresh_combos(self) -> None:
        ctrl = self.controller
        layers = self.viewer.layers
        self.image_combo.refresh(layers, ctrl.image_layer)
        self.points_combo.refresh(layers, ctrl.points_layer)
        self.shapes_combo.refresh(layers, ctrl.shapes_layer)
        self.labels_combo.refresh(layers, ctrl.labels_layer)

    @_if_alive
    def _on_layers_changed(self, event: Any = None) -> None:
        self._refresh_combos()
        ctrl = self.controller
        if ctrl.image_layer is None and self.image_combo.layer() is not None:
            self._on_image_chosen()
            # create the prompt layers after napari has finished inserting this layer
            QTimer.singleShot(0, self._auto_prompt_layers)

    def _auto_prompt_layers(self) -> None:
        ctrl = self.controller
        if ctrl.image_layer is not None and ctrl.points_layer is None:
            ctrl.ensure_prompt_layers()

    @_if_alive
    def _sync_from_controller(self, event: Any = None) -> None:
        ctrl = self.controller
        self._refresh_combos()
        radio = self.positive_radio if ctrl.polarity == POSITIVE else self.negative_radio
        if not radio.isChecked():
            radio.blockSignals(True)
            radio.setChecked(True)
            radio.blockSignals(False)
        self._update_notes()

    def _on_image_chosen(self, index: int = -1) -> None:
        layer = self.image_combo.layer()
        self.controller.image_layer = layer
        self._fill_channel_axes(layer)
        self._update_notes()

    def _fill_channel_axes(self, layer: Any) -> None:
        self.channel_axis_combo.blockSignals(True)
        self.channel_axis_combo.clear()
        self.channel_axis_combo.addItem("none (segment the slice shown)", None)
        if layer is not None:
            shape = spatial_shape(layer)
            for axis, size in enumerate(shape[:-2]):
                self.channel_axis_combo.addItem(f"axis {axis} ({size})", axis)
        self.channel_axis_combo.blockSignals(False)
        self._fill_channels()

    def _fill_channels(self) -> None:
        self.channel_combo.blockSignals(True)
        self.channel_combo.clear()
        axis = self.channel_axis_combo.currentData()
        layer = self.controller.image_layer
        self.channel_combo.addItem(_SHOWN, None)
        if axis is not None and layer is not None:
            for c in range(spatial_shape(layer)[axis]):
                self.channel_combo.addItem(str(c), c)
        self.channel_combo.setEnabled(axis is not None)
        self.channel_combo.blockSignals(False)

    def _on_channel_axis(self, index: int = -1) -> None:
        self._fill_channels()
        self.controller.set_channel(self.channel_axis_combo.currentData(), None)

    def _on_channel(self, index: int = -1) -> None:
        self.controller.set_channel(
            self.channel_axis_combo.currentData(), self.channel_combo.currentData()
        )

    def _on_prompt_layers_chosen(self, index: int = -1) -> None:
        self.controller.points_layer = self.points_combo.layer()
        self.controller.shapes_layer = self.shapes_combo.layer()

    def _new_prompt_layers(self) -> None:
        ctrl = self.controller
        ctrl.points_layer = None
        ctrl.shapes_layer = None
        ctrl.ensure_prompt_layers()
        self._refresh_combos()

    def _on_labels_chosen(self, index: int = -1) -> None:
        self.controller.labels_layer = self.labels_combo.layer()

    def _on_polarity(self, positive: bool) -> None:
        self.controller.set_polarity(POSITIVE if positive else NEGATIVE)

    def _on_checkpoint(self) -> None:
        text = self.checkpoint_edit.text().strip()
        if (text or None) != self.controller.checkpoint:
            self.controller.set_model(checkpoint=text or None)

    def _on_tiling(self, *args: Any) -> None:
        """Send the tiled-mode settings to the controller (invalid tile/halo: a message)."""
        ctrl = self.controller
        store = self.store_edit.text().strip() or None
        settings = (self.tiled_combo.currentData(), self.tile_spin.value(),
                    self.halo_spin.value(), store)
        if settings == (ctrl.tiled_mode, ctrl.tile, ctrl.halo, ctrl.embedding_store):
            return
        try:
            ctrl.set_tiling(settings[0], tile=settings[1], halo=settings[2], store=store)
        except ValueError as exc:
            ctrl._message(str(exc), "warning")
            self.tile_spin.setValue(ctrl.tile)
            self.halo_spin.setValue(ctrl.halo)
        self._update_notes()

    def _browse_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose an embedding store (.zarr)")
        if path:
            self.store_edit.setText(path)
            self._on_tiling()

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a checkpoint", "", "PyTorch checkpoints (*.pt *.pth *.zip);;All (*)"
        )
        if path:
            self.checkpoint_edit.setText(path)
            self._on_checkpoint()

    # ------------------------------------------------------------------ status
    def _update_notes(self) -> None:
        notes = []
        if self.controller.model_name.startswith("efficientsam"):
            notes.append(
                "EfficientSAM takes at most 6 prompt points per object (a box counts as 2) "
                "and has no learned embedding for negative points: use MobileSAM for "
                "negative clicks."
            )
        ctrl = self.controller
        layer = ctrl.image_layer
        shape = spatial_shape(layer)[-2:] if layer is not None else (0, 0)
        tiled = min(shape) >= 2 and plane_grid(
            shape, ctrl.tiled_mode, ctrl.tile, ctrl.halo, ctrl.tiled_threshold
        ).n_tiles > 1
        if max(shape) > 1024 and not tiled:
            notes.append(
                "This image is larger than 1024 px: each slice is resized to 1024 px for the "
                "model. Turn tiled mode on for full resolution."
            )
        text = "\n".join(notes)
        if text != self.note_label.text():
            self.note_label.setText(text)
            self.note_label.setVisible(bool(notes))

    @_if_alive
    def _on_status(self, event: Any) -> None:
        style = "color: #ff9f43;" if event.level == "warning" else ""
        if style != self.status_label.styleSheet():
            self.status_label.setStyleSheet(style)
        if event.text != self.status_label.text():
            self.status_label.setText(event.text)

    def _on_propagate(self) -> None:
        """Apply the slice range, then segment through the stack."""
        import dataclasses

        ctrl = self.controller
        lo, hi = self.range_from.value(), self.range_to.value()
        ctrl.propagation = dataclasses.replace(
            ctrl.propagation, start=None if lo < 0 else lo, stop=None if hi < 0 else hi
        )
        ctrl.propagate()

    @_if_alive
    def _on_busy(self, event: Any) -> None:
        busy = bool(event.value)
        self.prepare_button.setEnabled(not busy)
        self.propagate_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy:
            self.progress.setValue(0)
            self.progress.setFormat("starting…")

    @_if_alive
    def _on_progress(self, event: Any) -> None:
        p = event.value
        self.progress.setMaximum(max(1, p.total))
        self.progress.setValue(p.done)
        self.progress.setFormat(p.text or "%p%")
