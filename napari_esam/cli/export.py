"""``napari-esam export``: convert/re-export a label mask to OME-Zarr or TIFF, safely."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_esam.cli import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a label mask to OME-Zarr (.zarr) or TIFF (.tif/.tiff)",
        description=(
            "Export LABELS (a .zarr written by napari-esam, any Zarr array / OME-Zarr, or a "
            "TIFF) to OUT; the format follows OUT's extension. The output is written to a "
            "temporary sibling and renamed into place only when complete."
        ),
    )
    parser.add_argument("labels", metavar="LABELS", help="input labels (.zarr, .tif, .tiff)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output path")
    parser.add_argument(
        "--compression",
        choices=("auto", "zstd", "zlib", "none"),
        default="auto",
        help="auto = zstd for Zarr, zlib for TIFF (default: auto)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--scale", type=float, nargs="+", metavar="S", help="pixel size per axis (default: input's)"
    )
    parser.add_argument(
        "--translate", type=float, nargs="+", metavar="T", help="origin per axis (default: input's)"
    )
    parser.add_argument("--axes", help="axis names, e.g. zyx or tzyx (default: input's)")
    parser.add_argument("--name", help="label layer name stored in the metadata")
    parser.set_defaults(func=run, kept=kept)
    return parser


def kept(args: argparse.Namespace) -> str:
    """What an interrupted or failed export left: nothing of its own."""
    out = Path(args.output).expanduser()
    if out.exists():
        return f"the export was discarded and {str(out)!r} was left as it was"
    return "the export was discarded (nothing was written)"


def run(args: argparse.Namespace) -> int:
    """Read ``args.labels`` and write it to ``args.output``."""
    from napari_esam.core.io.label_files import read_labels, write_labels
    from napari_esam.core.io.replacing import check_not_input

    source = Path(args.labels).expanduser()
    if not source.exists():
        raise UserError(f"input {str(source)!r} does not exist")
    out = Path(args.output).expanduser()
    check_not_input(source, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data, meta = read_labels(source)
    result = write_labels(
        out,
        data,
        scale=args.scale if args.scale is not None else meta["scale"],
        translate=args.translate if args.translate is not None else meta["translate"],
        axes=args.axes or meta["axes"],
        units=meta["units"] if args.axes is None else None,
        name=args.name or (meta["name"] if meta["napari_esam"] else None),
        overwrite=args.overwrite,
        compression=args.compression,
        progress=_progress_printer(),
    )
    print(f"napari-esam export: wrote {tuple(data.shape)} labels to {result}")
    return 0


def _progress_printer():
    """A progress callback drawing a tqdm bar on an interactive stderr, else nothing."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, unit="block", file=sys.stderr, leave=False)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return progress
