"""Command-line options shared by the subcommands: the model, how the input is cut into
planes, and the tiling (one definition each, so ``everything`` and ``embed`` agree)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from napari_esam.cli import UserError

__all__ = [
    "add_model_args",
    "add_source_args",
    "add_tiling_args",
    "model_spec",
    "stack_source",
    "tiling_params",
]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--checkpoint``."""
    from napari_esam.models.registry import MODEL_NAMES

    g = p.add_argument_group("model")
    g.add_argument("--model", default="mobilesam", choices=MODEL_NAMES)
    g.add_argument("--device", default="auto", help="auto, cuda or cpu")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="autocast dtype on CUDA (default: float32)")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights file (default: the official weights, downloaded once)")


def add_source_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--axis``, ``--channel-axis``, ``--channel``, ``--contrast-limits``."""
    g = p.add_argument_group("stack")
    g.add_argument("--axis", type=int, nargs="+", default=None, metavar="N",
                   help="stack axis (or axes) to iterate; default: every axis but the last "
                   "two (and the channel axis)")
    g.add_argument("--channel-axis", default="auto", metavar="N|none|auto",
                   help="channel axis; auto = the last axis when it has 3 or 4 entries (RGB)")
    g.add_argument("--channel", type=int, default=None, metavar="C",
                   help="channel to segment (default: RGB, the first three channels)")
    g.add_argument("--contrast-limits", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="intensity range mapped to 0-255 for every plane (default: each "
                   "plane's 0.5-99.5 percentiles, docs/rules/tiling.md#contrast)")
    return g


def add_tiling_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--tiled``, ``--tile``, ``--halo``, ``--merge-iou``."""
    from napari_esam.core.runs.settings import MERGE_IOU
    from napari_esam.core.tiling.grid import HALO, TILE, TILED_MODES, TILING_THRESHOLD

    g = p.add_argument_group(
        "tiling (docs/rules/tiling.md)",
        "planes are segmented tile by tile at full resolution and the objects merged across "
        "the seams, or as one tile resized to the model input",
    )
    g.add_argument("--tiled", choices=TILED_MODES, default="auto",
                   help=f"auto: tile planes with a side over {TILING_THRESHOLD} px; on: always; "
                   "off: never (a tile as large as the plane is the same as off)")
    g.add_argument("--tile", type=int, default=TILE, metavar="N",
                   help="tile side in pixels (the model input)")
    g.add_argument("--halo", type=int, default=None, metavar="N",
                   help=f"overlap between neighbouring tiles in pixels (default: {HALO}, at "
                   "most a quarter of the tile)")
    g.add_argument("--merge-iou", type=float, default=MERGE_IOU, metavar="F",
                   help="IoU inside the tiles' overlap from which two tiles' masks are one "
                   "object")
    g.add_argument("--no-space-check", action="store_true",
                   help="write the embedding store even when its estimated size (4 MiB per "
                   "tile) exceeds the free disk space")
    return g


def _channel_axis(text: str) -> int | str | None:
    low = str(text).lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        return int(text)
    except ValueError:
        raise UserError(
            f"--channel-axis must be an integer, 'none' or 'auto', not {text!r}"
        ) from None


def model_spec(args: argparse.Namespace) -> Any:
    """The :class:`~napari_esam.core.runs.settings.ModelSpec` of the model options."""
    from napari_esam.core.runs.settings import ModelSpec

    checkpoint = None
    if args.checkpoint is not None:
        path = Path(args.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint file not found: {str(path)!r}")
        checkpoint = str(path.resolve())
    return ModelSpec(args.model, checkpoint, args.device, args.dtype)


def tiling_params(args: argparse.Namespace) -> Any:
    """The :class:`~napari_esam.core.runs.settings.TilingParams` of the tiling options,
    checked (the errors name the options)."""
    from napari_esam.core.runs.settings import MIN_TILE, TilingParams

    params = TilingParams(args.tiled, args.tile, args.halo, args.merge_iou)
    if params.tile < MIN_TILE:
        raise UserError(f"--tile must be at least {MIN_TILE} pixels, got {params.tile}")
    if not 0 <= params.halo_px <= params.tile // 2:
        raise UserError(f"--halo must be between 0 and tile/2 = {params.tile // 2}, got "
                        f"{params.halo_px}")
    if not (math.isfinite(params.merge_iou) and 0.0 < params.merge_iou <= 1.0):
        raise UserError(f"--merge-iou must be in (0, 1], got {params.merge_iou}")
    params.validate()
    return params


def stack_source(args: argparse.Namespace) -> Any:
    """The :class:`~napari_esam.core.runs.sources.StackSource` of INPUT and the stack
    options."""
    from napari_esam.core.runs.sources import StackSource

    return StackSource.create(args.input, axis=args.axis,
                              channel_axis=_channel_axis(args.channel_axis),
                              channel=args.channel)
