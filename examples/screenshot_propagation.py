"""Screenshot of "Segment through stack": one click on a nucleus of stardist's 3-D example.

    python examples/screenshot_propagation.py [--checkpoint mobile_sam.pt] [--output PNG]

Opens stardist's 3-D example volume (``tests/data/stardist/img3d.tif``, 31 x 61 x 57, z
scaled 4x for its anisotropy), docks the prompt widget, clicks one nucleus on its middle
slice, runs **Segment through stack** and shows the propagated object (yellow) in a side
view (z down, x across, through the click), with the true extent of the nucleus outlined,
then saves the window to ``docs/images/propagation.png``. Model: MobileSAM with ``--checkpoint``
(or the official weights when cached); offline, the classical stand-in model of
``screenshot_prompt_widget.py`` (an overlay then says so). Without a display it starts Xvfb.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "docs" / "images" / "propagation.png"
VOLUME = ROOT / "tests" / "data" / "stardist"


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--checkpoint", help="a MobileSAM checkpoint (default: cache or demo)")
    parser.add_argument("--size", default="1500x950", help="window size WxH")
    args = parser.parse_args(argv)
    shots = _sibling("screenshot_prompt_widget")
    width, height = (int(v) for v in args.size.lower().split("x"))
    display = shots._ensure_display(width + 100, height + 100)
    try:
        import napari
        import tifffile
        from qtpy.QtWidgets import QApplication
        from scipy import ndimage

        from napari_esam.widgets.workers import run_sync

        image = tifffile.imread(VOLUME / "img3d.tif")
        truth = tifffile.imread(VOLUME / "mask3d.tif")
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(width, height)
        layer = viewer.add_image(image, name="stardist img3d", scale=(4, 1, 1))
        _, widget = viewer.window.add_plugin_dock_widget("napari-esam", "Segment with prompts")
        ctrl = widget.controller
        ctrl.runner = run_sync
        ctrl.notify = False
        ctrl.image_layer = layer
        checkpoint = args.checkpoint or shots._official_checkpoint()
        if checkpoint:
            widget.checkpoint_edit.setText(checkpoint)
            widget._on_checkpoint()
            title = "MobileSAM"
        else:
            ctrl.model_factory = lambda *key: shots.classical_demo_model()
            title = "classical stand-in model (no weights offline)"
        ctrl.ensure_prompt_layers()
        obj = truth == 5
        zs = np.nonzero(obj.any(axis=(1, 2)))[0]
        z = int(zs[len(zs) // 2])
        dist = ndimage.distance_transform_edt(np.pad(obj[z], 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        viewer.dims.set_current_step(0, z)
        ctrl.points_layer.add([z, r, c])
        ctrl.propagate()
        prop = ctrl.propagated()
        status = ctrl.status
        outline = viewer.add_labels(
            np.where(obj, 2, 0).astype(np.uint8), name="true nucleus (outline)", scale=(4, 1, 1),
            opacity=1.0,
        )
        outline.contour = 1
        ctrl.preview_layer.visible = False  # the clicked slice's own 2-D preview
        viewer.dims.order = (1, 0, 2)  # side view: rows = z, columns = x, slider on y
        viewer.dims.set_current_step(1, int(r))
        viewer.layers.selection.active = ctrl.points_layer
        viewer.reset_view()
        if not checkpoint:
            overlay = viewer.canvas.overlays.text
            overlay.visible = True
            overlay.position = "top_center"
            overlay.font_size = 11
            overlay.text = "offline: masks from a classical stand-in model, not SAM"
        widget.status_label.setText(status)  # the 3-D view's own hint would replace it
        for _ in range(20):
            QApplication.processEvents()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(path=str(args.output), canvas_only=False, flash=False)
        found = "none" if prop is None else f"slices {prop.slices[0]}-{prop.slices[-1]}"
        print(f"wrote {args.output} ({title}); object through {found} (truth {zs[0]}-{zs[-1]})")
        print(f"status: {status}")
        viewer.close()
    finally:
        if display is not None:
            display.stop()
    return args.output


if __name__ == "__main__":
    main(sys.argv[1:])
