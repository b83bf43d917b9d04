"""``napari-esam embed``: precompute the per-tile embeddings of a large image into a store.

The store (``EMBEDDINGS.zarr``, see :mod:`napari_esam.core.tiling.store`) is filled tile
by tile; tiles already in it are skipped, so an interrupted run resumes where it stopped.
The prompt widget and ``napari-esam everything`` reuse it, skipping the encoder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_esam.cli import UserError

HELP = "precompute tiled image embeddings of a large image or stack (resumable)"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``embed`` subcommand."""
    from napari_esam.core.tiling.grid import HALO, TILE
    from napari_esam.models.registry import MODEL_NAMES

    p = subparsers.add_parser(
        "embed",
        help=HELP,
        description=HELP + ". Running the same command again resumes; a store made for "
        "another image, model or grid is refused (use --overwrite to recompute it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="TIFF, Zarr, .npy, PNG or JPEG image/stack")
    p.add_argument("-o", "--output", required=True, metavar="EMBEDDINGS.zarr",
                   help="embedding store to create or resume")
    p.add_argument("--model", default="mobilesam", choices=MODEL_NAMES)
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights file (default: the official weights, downloaded once)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="autocast dtype on CUDA (default: float32)")
    p.add_argument("--tile", type=int, default=TILE, help="tile side in pixels (model input)")
    p.add_argument("--halo", type=int, default=HALO,
                   help="overlap between neighbouring tiles in pixels")
    p.add_argument("--contrast-limits", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="intensity range mapped to 0-255 (default: 0.5-99.5 percentiles of a "
                   "sample of the whole image)")
    p.add_argument("--rgb", action=argparse.BooleanOptionalAction, default=None,
                   help="the last axis is RGB (default: when it has 3 entries)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute the store from scratch instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise for ``cli.main``)."""
    from napari_esam.core.runs.pipeline import open_input
    from napari_esam.core.tiling.grid import TileGrid, full_resolution, plane_shape
    from napari_esam.core.tiling.predictor import TiledPredictor
    from napari_esam.models.loading import build_model
    from napari_esam.models.weights import CheckpointError

    out = Path(args.output).expanduser()
    if out.suffix.lower() != ".zarr":
        raise UserError(f"the embedding store must end in .zarr, not {str(out)!r}")
    if not out.parent.is_dir():
        raise UserError(f"the output directory {str(out.parent)!r} does not exist")
    if args.tile < 16:
        raise UserError(f"--tile must be at least 16 pixels, got {args.tile}")
    if not 0 <= args.halo <= args.tile // 2:
        raise UserError(f"--halo must be between 0 and tile/2 = {args.tile // 2}, got {args.halo}")
    checkpoint = None
    if args.checkpoint is not None:
        checkpoint = Path(args.checkpoint).expanduser()
        if not checkpoint.is_file():
            raise UserError(f"checkpoint file not found: {str(checkpoint)!r}")
    data = full_resolution(open_input(args.input))
    plane_shape(data.shape, args.rgb)  # validates the shape before loading a model
    try:
        model = build_model(args.model, checkpoint, device=args.device, dtype=args.dtype)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    tp = TiledPredictor(
        model, tile=args.tile, halo=args.halo, cache_size=1, store=out,
        store_mode="w" if args.overwrite else "a",
    )
    limits = tuple(args.contrast_limits) if args.contrast_limits else None
    tp.set_image(data, limits, rgb=args.rgb)
    store = tp.store
    grid: TileGrid = tp.grid
    total, already = store.n_total, store.n_done
    print(
        f"{args.input}: shape {tuple(data.shape)}, {grid.n_y}x{grid.n_x} tiles of {args.tile} px "
        f"(halo {args.halo}) per plane, {total} in all; {already} already in {out}",
        file=sys.stderr,
    )
    bar = None
    if not args.no_progress and already < total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tile", desc="embed", file=sys.stderr)
    try:

        def progress(done: int, n: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        encoded = tp.embed_all(progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"computed {encoded} tile embeddings; store complete: {out}", file=sys.stderr)
    return 0
