"""Screenshot of napari with the "Segment with prompts" widget over the sample nuclei (headless).

    python examples/screenshot_prompt_widget.py [--checkpoint mobile_sam.pt] [--output PNG]

Opens the ``napari-esam:cells`` sample, docks the widget, commits four nuclei (labels 1–4)
by clicking them and leaves a fifth object in preview (a positive and a negative click),
then saves the window to ``docs/images/prompt_widget.png``.

Model: MobileSAM with ``--checkpoint``, or with the official weights if they are already in
the napari-esam cache. Otherwise (an offline machine has no weights) the masks come from a
small *classical* stand-in model (local Otsu threshold + connected component around the
click) plugged into the widget's model factory; a text overlay then says so.
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


def classical_demo_model() -> Any:
    """A model-free stand-in for offline screenshots: Otsu threshold + connected component.

    It implements the model interface the prompt widget drives (``preprocess``, ``encode``,
    ``decode``, ``postprocess_masks``): the "embedding" is the smoothed grey image at the
    decoder's 256-px resolution (packed into the embedding's channels), and the candidate masks
    are the component around the positive clicks (inside the box, if any) of the image above
    its Otsu threshold x 1, 0.7 and 1.3.
    """
    import torch
    import torch.nn.functional as F
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from torch import nn

    from napari_esam.models.base import PromptableModel

    class ClassicalDemoModel(PromptableModel):
        name = "classical demo (no model weights)"
        max_points = None
        has_negative_point_embedding = True

        def __init__(self) -> None:
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

        def preprocess(self, image: np.ndarray):
            h, w = image.shape[:2]
            s = 1024 / max(h, w)
            nh, nw = int(h * s + 0.5), int(w * s + 0.5)
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False)
            return F.pad(x, (0, 1024 - nw, 0, 1024 - nh)), (nh, nw)

        def encode(self, x):
            grey = F.avg_pool2d(x.mean(1, keepdim=True), 4)  # (1, 1, 256, 256)
            grey = torch.from_numpy(ndi.gaussian_filter(grey[0, 0].numpy(), 1.0))[None, None]
            packed = F.pixel_unshuffle(grey, 4)  # (1, 16, 64, 64)
            return F.pad(packed, (0, 0, 0, 0, 0, 256 - 16))

        def decode(self, embedding, coords, labels, original_size, multimask_output=True):
            img = F.pixel_shuffle(embedding[:1, :16], 4)[0, 0].numpy()  # (256, 256)
            otsu = threshold_otsu(img) if np.ptp(img) > 0 else img.max()
            s = 1024 / max(original_size) / 4  # original px -> 256 frame
            n_obj = coords.shape[0]
            low = np.full((n_obj, 3, 256, 256), -10.0, dtype=np.float32)
            for b in range(n_obj):
                pts = (coords[b].numpy() * s).astype(int).clip(0, 255)
                lab = labels[b].numpy()
                pos = [(y, x) for (x, y), v in zip(pts, lab, strict=True) if v == 1]
                neg = [(y, x) for (x, y), v in zip(pts, lab, strict=True) if v == 0]
                corners = pts[(lab == 2) | (lab == 3)]
                inside = np.ones(img.shape, dtype=bool)
                if len(corners) == 2:  # a box: the object lies inside it
                    (x0, y0), (x1, y1) = corners
                    inside[:] = False
                    inside[y0 : y1 + 1, x0 : x1 + 1] = True
                    if not pos:
                        pos.append(((y0 + y1) // 2, (x0 + x1) // 2))
                for k, factor in enumerate((1.0, 0.7, 1.3)):
                    fg = ndi.binary_fill_holes((img > otsu * factor) & inside)
                    comp, _ = ndi.label(fg)
                    ids = {comp[p] for p in pos if comp[p] > 0} - {comp[p] for p in neg}
                    low[b, k][np.isin(comp, list(ids)) & (comp > 0)] = 10.0
            scores = torch.tensor([[0.95, 0.85, 0.75]]).expand(n_obj, -1)
            k = 3 if multimask_output else 1
            return torch.from_numpy(low[:, :k]), scores[:, :k].clone()

        def postprocess_masks(self, low_res, input_size, original_size):
            x = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
            x = x[..., : input_size[0], : input_size[1]]
            return F.interpolate(x, original_size, mode="bilinear", align_corners=False)

    return ClassicalDemoModel().eval()


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
            ctrl.model_factory = lambda *key: classical_demo_model()
            title = "classical stand-in model (no weights offline)"
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
                "offline screenshot: masks from a classical stand-in model, not a SAM model"
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
