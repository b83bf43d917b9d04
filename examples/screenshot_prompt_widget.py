"""Screenshot of napari with the "Segment with prompts" widget over the sample nuclei (headless).

    python examples/screenshot_prompt_widget.py [--checkpoint mobile_sam.pt] [--output PNG]

Opens the ``napari-esam:cells`` sample, docks the widget, commits four nuclei (labels 1–4)
by clicking them and leaves a fifth object in preview (a positive and a negative click),
then saves the window to ``docs/images/prompt_widget.png``.

Model: MobileSAM with ``--checkpoint``, or with the official weights if they are already in
the napari-esam cache. Otherwise (an offline machine has no weights) the masks come from a
small *classical* stand-in engine (local Otsu threshold + connected component around the
click) plugged into the same engine hook the tiled mode uses; a text overlay then says so.
Without a display it starts a virtual X server (Xvfb, via ``pyvirtualdisplay``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "images" / "prompt_widget.png"


class ClassicalDemoEngine:
    """A model-free engine for offline screenshots: Otsu threshold + connected component.

    Implements the controller's engine interface (``embed``/``predict``); candidate masks are
    the component around each positive click at three thresholds (score = contrast).
    """

    name = "classical demo (no model weights)"
    max_points = None
    has_negative_point_embedding = True

    def __init__(self) -> None:
        self.encoder_calls = 0

    def embed(self, image: np.ndarray, contrast_limits: Any) -> np.ndarray:
        from scipy import ndimage as ndi

        from napari_esam.core.plane.image import to_model_rgb

        self.encoder_calls += 1
        gray = to_model_rgb(image, contrast_limits).mean(axis=2)
        return ndi.gaussian_filter(gray, 1.0)

    def predict(self, embedding, point_coords, point_labels, boxes):
        from scipy import ndimage as ndi
        from skimage.filters import threshold_otsu

        img = embedding
        h, w = img.shape
        n_obj = len(boxes) if boxes is not None else 1
        masks = np.zeros((n_obj, 3, h, w), dtype=bool)
        scores = np.zeros((n_obj, 3), dtype=np.float32)
        for b in range(n_obj):
            pts = [] if point_coords is None else point_coords[b]
            lbl = [] if point_labels is None else point_labels[b]
            pos = [(int(y), int(x)) for (x, y), v in zip(pts, lbl, strict=True) if v == 1]
            neg = [(int(y), int(x)) for (x, y), v in zip(pts, lbl, strict=True) if v == 0]
            if boxes is not None:
                x0, y0, x1, y1 = (int(round(v)) for v in boxes[b])
                window = (slice(y0, y1 + 1), slice(x0, x1 + 1))
                pos.append(((y0 + y1) // 2, (x0 + x1) // 2))
            else:
                r = 40
                cy, cx = pos[0] if pos else (h // 2, w // 2)
                window = (slice(max(0, cy - r), cy + r), slice(max(0, cx - r), cx + r))
            local = img[window]
            otsu = threshold_otsu(local) if np.ptp(local) > 0 else local.max()
            for k, factor in enumerate((1.0, 0.7, 1.3)):
                fg = np.zeros((h, w), dtype=bool)
                fg[window] = local > otsu * factor
                fg = ndi.binary_fill_holes(ndi.binary_opening(fg, iterations=1))
                comp, _ = ndi.label(fg)
                ids = {comp[p] for p in pos if comp[p] > 0} - {comp[p] for p in neg}
                masks[b, k] = np.isin(comp, list(ids)) if ids else False
                scores[b, k] = 0.95 - 0.1 * k
        return masks, scores


def _ensure_display(width: int, height: int) -> Any:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    if os.environ.get("DISPLAY"):
        return None
    from pyvirtualdisplay import Display

    display = Display(visible=False, size=(width, height), color_depth=24)
    display.start()
    return display


def _official_checkpoint() -> str | None:
    from napari_esam.models.weights import CheckpointError, checkpoint_path

    try:
        return str(checkpoint_path("mobilesam", download=False))
    except CheckpointError:
        return None


def isolated_nucleus_centres(min_gap: float = 10.0) -> list[tuple[float, float]]:
    """(row, col) centres of the sample's nuclei at least ``min_gap`` px from any other."""
    from scipy import ndimage as ndi

    from napari_esam._sample_data import synthetic_nuclei

    _, labels = synthetic_nuclei()
    out = []
    for i in range(1, int(labels.max()) + 1):
        own = labels == i
        others = (labels > 0) & ~own
        gap = ndi.distance_transform_edt(~others)[own].min()
        if gap >= min_gap and own.sum() > 500:
            out.append(ndi.center_of_mass(own))
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--checkpoint", help="a MobileSAM checkpoint (default: cache or demo)")
    parser.add_argument("--size", default="1500x950", help="window size WxH")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    display = _ensure_display(width + 100, height + 100)
    try:
        import napari
        from qtpy.QtWidgets import QApplication

        from napari_esam.widgets.workers import run_sync

        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(width, height)
        viewer.open_sample("napari-esam", "cells")
        _, widget = viewer.window.add_plugin_dock_widget("napari-esam", "Segment with prompts")
        ctrl = widget.controller
        ctrl.runner = run_sync  # deterministic for a script: encode inline
        checkpoint = args.checkpoint or _official_checkpoint()
        if checkpoint:
            widget.checkpoint_edit.setText(checkpoint)
            widget._on_checkpoint()
            title = "MobileSAM"
        else:
            ctrl.engine_factory = lambda *key: ClassicalDemoEngine()
            title = "classical stand-in engine (no weights offline)"
        for _ in range(5):
            QApplication.processEvents()
        if ctrl.points_layer is None:
            ctrl.ensure_prompt_layers()
        ctrl.notify = False  # scripted clicks: no notification toasts over the canvas
        points = ctrl.points_layer
        centres = isolated_nucleus_centres()
        picks = [centres[i] for i in np.linspace(0, len(centres) - 1, 5).astype(int)]
        for r, c in picks[:4]:
            ctrl.set_polarity("positive")
            points.add([r, c])
            ctrl.commit()
        r, c = picks[4]  # the current object: a negative click nearby, then a positive one
        ctrl.set_polarity("negative")
        points.add([r + 30, c - 25])
        ctrl.set_polarity("positive")
        points.add([r, c])
        if not checkpoint:
            overlay = viewer.canvas.overlays.text
            overlay.visible = True
            overlay.position = "top_center"
            overlay.font_size = 11
            overlay.text = (
                "offline screenshot: masks from a classical stand-in engine, not a SAM model"
            )
        viewer.layers.selection.active = points
        viewer.reset_view()
        for _ in range(20):
            QApplication.processEvents()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(path=str(args.output), canvas_only=False, flash=False)
        print(f"wrote {args.output} ({title}); status: {ctrl.status}")
        viewer.close()
    finally:
        if display is not None:
            display.stop()
    return args.output


if __name__ == "__main__":
    main(sys.argv[1:])
