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
from napari_esam.cli.options import (
    add_model_args,
    add_source_args,
    add_tiling_args,
    model_spec,
    stack_source,
    tiling_params,
)

HELP = "precompute tiled image embeddings of a large image or stack (resumable)"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``embed`` subcommand."""
    p = subparsers.add_parser(
        "embed",
        help=HELP,
        description=HELP + ". Running the same command again resumes; a store made for "
        "another image, model or grid is refused (use --overwrite to recompute it). The "
        "input, model and tiling options are those of 'napari-esam everything', which reuses "
        "the store when they are the same.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="TIFF, Zarr, .npy, PNG or JPEG image/stack")
    p.add_argument("-o", "--output", required=True, metavar="EMBEDDINGS.zarr",
                   help="embedding store to create or resume")
    add_model_args(p)
    add_source_args(p)
    add_tiling_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="recompute the store from scratch instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise for ``cli.main``)."""
    from napari_esam.core.runs.settings import get_model
    from napari_esam.core.tiling.predictor import TiledPredictor
    from napari_esam.models.weights import CheckpointError

    out = Path(args.output).expanduser()
    if out.suffix.lower() != ".zarr":
        raise UserError(f"the embedding store must end in .zarr, not {str(out)!r}")
    if not out.parent.is_dir():
        raise UserError(f"the output directory {str(out.parent)!r} does not exist")
    tiling = tiling_params(args)
    tiling.validate()
    spec = model_spec(args)
    source = stack_source(args)  # validates the input before loading a model
    grid = tiling.grid(source.plane_shape)
    try:
        model = get_model(spec)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    tp = TiledPredictor(
        model, tile=grid.tile, halo=grid.halo, cache_size=1, store=out,
        store_mode="w" if args.overwrite else "a", store_space_check=not args.no_space_check,
    )
    limits = tuple(args.contrast_limits) if args.contrast_limits else None
    tp.set_image(source.planes(), limits, rgb=source.rgb)
    store = tp.store
    total, already = store.n_total, store.n_done
    print(
        f"{args.input}: shape {source.shape}, {grid.n_y}x{grid.n_x} tiles of {grid.tile} px "
        f"(halo {grid.halo}) per plane, {total} in all; {already} already in {out}",
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
