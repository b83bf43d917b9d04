"""Form pieces the widgets share: the Run/Cancel/progress/status rows, spin boxes and the
model chooser (with each model's size and speed class as its tooltip)."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
)

#: progress bars count in 1/1000
BAR_MAX = 1000


def spin(lo: int, hi: int, value: int, tip: str = "") -> QSpinBox:
    """An integer spin box with range ``lo..hi``, ``value`` and tooltip ``tip``."""
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setValue(value)
    w.setToolTip(tip)
    return w


def dspin(lo: float, hi: float, value: float, step: float = 0.01, tip: str = "") -> QDoubleSpinBox:
    """A float spin box (3 decimals) with range ``lo..hi``, ``value``, ``step`` and ``tip``."""
    w = QDoubleSpinBox()
    w.setDecimals(3)
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setValue(value)
    w.setToolTip(tip)
    return w


def model_combo(current: str) -> QComboBox:
    """The model chooser: every registered model, ``current`` selected; each item's tooltip
    (and the box's, for the chosen one) is the model's size and speed class."""
    from napari_esam.models.registry import MODEL_NAMES, model_description

    combo = QComboBox()
    for i, name in enumerate(MODEL_NAMES):
        combo.addItem(name)
        combo.setItemData(i, model_description(name), Qt.ItemDataRole.ToolTipRole)

    def describe(name: str) -> None:
        combo.setToolTip(model_description(name) if name in MODEL_NAMES else "")

    combo.currentTextChanged.connect(describe)
    combo.setCurrentText(current)
    describe(combo.currentText())
    return combo


class RunRows:
    """The Run and Cancel buttons (one row), a progress bar and a status line.

    ``on_run`` / ``on_cancel`` are connected to the buttons; :meth:`running` switches the
    buttons' states. ``layout_rows()`` gives the three rows to add to a layout.
    """

    def __init__(self, run_text: str, on_run: Callable[[], object],
                 on_cancel: Callable[[], object], idle_text: str = "") -> None:
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(on_run)
        self.cancel_button.clicked.connect(on_cancel)
        self.buttons = QHBoxLayout()
        self.buttons.addWidget(self.run_button)
        self.buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, BAR_MAX)
        self.progress.setValue(0)
        if idle_text:
            self.progress.setTextVisible(True)
            self.progress.setFormat(idle_text)
        self.status = QLabel("")
        self.status.setWordWrap(True)

    def running(self, on: bool) -> None:
        """Run disabled and Cancel enabled while a job runs; the other way round after."""
        self.run_button.setEnabled(not on)
        self.cancel_button.setEnabled(on)

    def layout_rows(self) -> tuple[QHBoxLayout, QProgressBar, QLabel]:
        return self.buttons, self.progress, self.status
