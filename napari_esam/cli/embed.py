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
    p.set_defaults(func=run, kept=kept)
    return p


def kept(args: argparse.Namespace) -> str:
    """What an interrupted or failed embed kept on disk, and what to do next."""
    from napari_esam.core.io.replacing import replacement_path
    from napari_esam.core.tiling.store import ATTR

    def n_done(path: Path) -> int:
        import numpy as np
        import zarr

        return int(np.asarray(zarr.open_array(path / "done", mode="r")[...]).astype(bool).sum())

    out = Path(args.output).expanduser()
    sibling = replacement_path(out)
    for path in (sibling, out):
        if _is_store(path, ATTR):
            n = n_done(path)
            where = f"{n} finished tile embedding{'s' * (n != 1)} were kept in {str(path)!r}"
            if path == sibling and out.exists():
                where = f"{str(out)!r} is unchanged; the new run's {where}"
            return f"{where}: " + ("run it again without --overwrite to resume" if
                                   args.overwrite else "run the same command again to resume")
    return "nothing was written"


def _is_store(path: Path, attr: str) -> bool:
    from napari_esam.core.io.replacing import is_own_store

    return is_own_store(path, (attr,))


def _store_target(out: Path, overwrite: bool) -> tuple[Path, str]:
    """Where the store is written, and the store mode: ``out`` itself, or (when an
    existing store is replaced, or such a replacement resumed) its hidden sibling, which
    is moved onto ``out`` once complete."""
    from napari_esam.core.io.replacing import remove_path, replacement_path
    from napari_esam.core.tiling.store import ATTR

    sibling = replacement_path(out)
    if overwrite:
        if out.exists() or out.is_symlink():
            if not _is_store(out, ATTR):
                raise UserError(f"refusing to replace {str(out)!r}: it is not an embedding "
                                "store of napari-esam (move it away or choose another output)")
            return sibling, "w"
        if _is_store(sibling, ATTR):  # an unfinished replacement: given up
            remove_path(sibling)
        return out, "w"
    if sibling.exists():
        print(f"resuming the unfinished --overwrite of {str(out)!r} (kept in {str(sibling)!r})",
              file=sys.stderr)
        return sibling, "a"
    return out, "a"


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise for ``cli.main``)."""
    from napari_esam.core.io.locks import hold
    from napari_esam.core.io.replacing import check_not_input, move_into_place

    out = Path(args.output).expanduser()
    if out.suffix.lower() != ".zarr":
        raise UserError(f"the embedding store must end in .zarr, not {str(out)!r}")
    if not out.parent.is_dir():
        raise UserError(f"the output directory {str(out.parent)!r} does not exist")
    tiling = tiling_params(args)
    tiling.validate()
    spec = model_spec(args)
    source = stack_source(args)  # validates the input before loading a model
    check_not_input(source.data, out)
    with hold(out):
        work, mode = _store_target(out, args.overwrite)
        created = not work.exists() or mode == "w"
        try:
            encoded = _embed(args, source, spec, tiling, work, mode)
        except BaseException:
            if created:
                _remove_if_empty(work)
            raise
        if work != out:
            move_into_place(work, out)  # the old store goes only now
    print(f"computed {encoded} tile embeddings; store complete: {out}", file=sys.stderr)
    return 0


def _remove_if_empty(path: Path) -> None:
    """Remove a store this run made when it holds no finished tile (a failed run)."""
    import numpy as np
    import zarr

    from napari_esam.core.io.replacing import remove_path
    from napari_esam.core.tiling.store import ATTR

    if not _is_store(path, ATTR):
        return
    try:
        if np.asarray(zarr.open_array(path / "done", mode="r")[...]).any():
            return
    except Exception:  # noqa: BLE001 - its arrays were never made: nothing to keep
        pass
    remove_path(path, strict=False)


def _embed(args: argparse.Namespace, source: Any, spec: Any, tiling: Any, work: Path,
           mode: str) -> int:
    """Open (or create) the store at ``work`` and fill it (the lock is held); returns the
    tiles encoded."""
    from napari_esam.core.runs.settings import get_model
    from napari_esam.core.tiling.predictor import TiledPredictor
    from napari_esam.core.tiling.store import StaleEmbeddingStoreError
    from napari_esam.models.weights import CheckpointError

    out = Path(args.output).expanduser()
    grid = tiling.grid(source.plane_shape)
    try:
        model = get_model(spec)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    tp = TiledPredictor(
        model, tile=grid.tile, halo=grid.halo, cache_size=1, store=work, store_mode=mode,
        store_space_check=not args.no_space_check,
    )
    limits = tuple(args.contrast_limits) if args.contrast_limits else None
    try:
        tp.set_image(source.planes(), limits, rgb=source.rgb)
    except StaleEmbeddingStoreError as exc:
        if work == out:
            raise
        raise UserError(f"{exc} (it is an unfinished --overwrite of {str(out)!r}: run with "
                        "--overwrite to start it over)") from None
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
    return encoded
