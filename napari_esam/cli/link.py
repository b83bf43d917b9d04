"""``napari-esam link``: link per-slice labels into 3-D objects or tracks (no model needed)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from napari_esam.cli import UserError

LABEL_SUFFIXES = (".zarr", ".tif", ".tiff")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``link`` subcommand."""
    from napari_esam.core.linking.assign import IOU_THRESHOLD, MAX_STEP, MODES, SPLIT_RATIO

    parser = subparsers.add_parser(
        "link",
        help="link per-slice labels into 3-D objects or tracks",
        description=(
            "Read LABELS (a TIFF, Zarr or .npy stack whose ids may be unrelated between "
            "slices), give one id to each 3-D object (--mode 3d) or track (--mode track) and "
            "write OUT (.zarr or .tif/.tiff; written to a temporary sibling and renamed into "
            "place when complete). The rule: docs/rules/linking.md."
        ),
    )
    parser.add_argument("labels", metavar="LABELS", help="input labels (.zarr, .tif, .tiff, .npy)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output labels (.zarr, .tif, .tiff)")
    parser.add_argument("--axis", type=int, default=0, metavar="N",
                        help="axis to link along (z or t; a leading axis; default: 0)")
    parser.add_argument("--mode", choices=MODES, default="3d",
                        help="3d: one id per object through z; track: one id per track in time "
                        "(default: 3d)")
    parser.add_argument("--iou-threshold", type=float, default=IOU_THRESHOLD, metavar="X",
                        help=f"smallest IoU of a link (default: {IOU_THRESHOLD})")
    parser.add_argument("--gap", type=int, default=1, metavar="N",
                        help="bridge up to N consecutive slices where an object is missing "
                        "(default: 1)")
    parser.add_argument("--max-step", type=float, default=MAX_STEP, metavar="R",
                        help="track mode: distance fallback, in object radii; 0 = off "
                        f"(default: {MAX_STEP})")
    parser.add_argument("--split-ratio", default=str(SPLIT_RATIO), metavar="F|none",
                        help="3d mode: cut objects at area valleys this deep; none = never "
                        f"(default: {SPLIT_RATIO})")
    parser.add_argument("--tracks-csv", default=None, metavar="PATH",
                        help="track mode: also write a CSV of track_id, t, y, x, area")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT (and tracks CSV)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _split_ratio(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--split-ratio must be a number in (0, 1) or 'none', not {text!r}"
                        ) from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise UserError(f"--split-ratio must be in (0, 1) or 'none', got {value}")
    return value


def _check_args(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    source = Path(args.labels).expanduser()
    out = Path(args.output).expanduser()
    csv = Path(args.tracks_csv).expanduser() if args.tracks_csv else None
    if not source.exists():
        raise UserError(f"input {str(source)!r} does not exist")
    if source.suffix.lower() not in (*LABEL_SUFFIXES, ".npy"):
        raise UserError(f"input {str(source)!r}: use a .zarr, .tif, .tiff or .npy file")
    if out.suffix.lower() not in LABEL_SUFFIXES:
        raise UserError(f"output {str(out)!r}: use a .zarr, .tif or .tiff name")
    if out.resolve() == source.resolve() or _same_path(out, source):
        raise UserError("the output is the input: write the linked labels to another path")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise UserError(f"output {str(out)!r} exists; pass --overwrite to replace it")
    if not (math.isfinite(args.iou_threshold) and 0.0 < args.iou_threshold <= 1.0):
        raise UserError(f"--iou-threshold must be in (0, 1], got {args.iou_threshold}")
    if args.gap < 0:
        raise UserError(f"--gap must be 0 or more, got {args.gap}")
    if not (math.isfinite(args.max_step) and args.max_step >= 0):
        raise UserError(f"--max-step must be 0 or more, got {args.max_step}")
    if csv is not None:
        if args.mode != "track":
            raise UserError("--tracks-csv needs --mode track")
        if csv.suffix.lower() != ".csv":
            raise UserError(f"--tracks-csv {str(csv)!r}: use a .csv name")
        if csv.resolve() in (source.resolve(), out.resolve()):
            raise UserError("--tracks-csv must differ from the input and the output")
        if (csv.exists() or csv.is_symlink()) and not args.overwrite:
            raise UserError(f"tracks CSV {str(csv)!r} exists; pass --overwrite to replace it")
    return source, out, csv


def run(args: argparse.Namespace) -> int:
    """Link ``args.labels`` into ``args.output`` (and ``args.tracks_csv``)."""
    import numpy as np

    from napari_esam.core.io.label_files import read_labels
    from napari_esam.core.linking.stack import link_labels
    from napari_esam.core.linking.tracks import write_tracks_csv

    source, out, csv = _check_args(args)
    split_ratio = _split_ratio(args.split_ratio)
    if source.suffix.lower() == ".npy":
        data = np.load(source, mmap_mode="r", allow_pickle=False)
        meta: dict = {}
    else:
        data, meta = read_labels(source)
    if np.dtype(data.dtype).kind not in "biu":
        raise UserError(f"labels must be integers, {str(source)!r} holds {np.dtype(data.dtype)}")
    ndim = len(data.shape)
    if ndim < 3:
        raise UserError(f"labels to link must be a stack (3-D or more), {str(source)!r} has "
                        f"shape {tuple(data.shape)}")
    if not 0 <= (args.axis + ndim if args.axis < 0 else args.axis) < ndim - 2:
        raise UserError(f"--axis must be a leading axis of the {ndim}-D labels "
                        f"(0..{ndim - 3}), got {args.axis}")
    options = {k: meta[k] for k in ("scale", "translate", "axes", "units") if k in meta}
    if meta.get("napari_esam"):
        options["name"] = meta["name"]
    out.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    with tqdm(unit="slice", desc="link (2 passes)", disable=args.no_progress,
              file=sys.stderr, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = link_labels(
            data, mode=args.mode, axis=args.axis, iou_threshold=args.iou_threshold,
            gap=args.gap, max_step=args.max_step, split_ratio=split_ratio, output=out,
            overwrite=args.overwrite, write_options=options, progress=progress,
        )
    print(f"napari-esam link: {result.n_objects} {'tracks' if args.mode == 'track' else 'objects'}"
          f" in {tuple(data.shape)} labels, wrote {out}")
    if csv is not None:
        write_tracks_csv(csv, result, overwrite=args.overwrite, axes=options.get("axes"))
        print(f"napari-esam link: wrote {csv}")
    return 0
