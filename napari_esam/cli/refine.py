"""``napari-esam refine``: make existing labels accurate, object by object.

Every object of LABELS (any integer labels: Cellpose, StarDist, a threshold, painting) is
decoded again from its box, an interior point and, where the model takes one, its mask as
mask input; it keeps its id. Objects whose refined mask disagrees with the original (IoU
below ``--iou-threshold``) are kept as they were and listed (``docs/rules/refine.md``). The
output is computed plane by plane into a Zarr store, so a stopped run resumes when the same
command runs again; ``-o OUT.tif`` computes into ``OUT.tif.partial.zarr`` and exports the
TIFF when every plane is done. The run is :func:`napari_esam.core.runs.refine.run_refine`.
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

HELP = "refine existing labels with the model, object by object (resumable)"
TIFF_WORK_SUFFIX = ".partial.zarr"
#: at most this many kept objects are listed
MAX_LISTED = 50
#: the defaults of :mod:`napari_esam.core.plane.refine` (IOU_THRESHOLD, DEFAULT_BATCH), as
#: literals: building the parser must not import torch (a test checks they agree)
IOU_THRESHOLD = 0.5
DEFAULT_BATCH = 16


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` and those of flags."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``refine`` subcommand."""
    p = subparsers.add_parser(
        "refine",
        help=HELP,
        description=HELP + ". Each object keeps its id; objects whose refined mask has an "
        "IoU below --iou-threshold with the original are kept as they were and listed. "
        "Finished slices are recorded in the Zarr output; running the same command again "
        "resumes (--overwrite starts over).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("input", metavar="IMAGE", help="TIFF, Zarr, .npy, PNG or JPEG image/stack")
    p.add_argument("labels", metavar="LABELS",
                   help="integer labels of IMAGE (TIFF, Zarr, .npy, PNG), the image's shape "
                   "without its channel axis")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="refined labels: OUT.zarr (OME-Zarr) or OUT.tif/.tiff")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT instead of resuming it")
    g = p.add_argument_group("refine (docs/rules/refine.md)")
    g.add_argument("--iou-threshold", type=float, default=IOU_THRESHOLD, metavar="F",
                   help="objects whose refined mask has a lower IoU with the original are "
                   "kept as they were")
    g.add_argument("--no-mask-input", dest="mask_input", action="store_false",
                   help="prompt with the box and interior point only (models without a mask "
                   "input, e.g. EfficientSAM, always do)")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                   help="objects per decoder call")
    add_model_args(p)
    add_source_args(p)
    g = add_tiling_args(p)
    for action in g._group_actions:  # the seam merge of segment-everything: not used here
        if action.dest == "merge_iou":
            action.help = argparse.SUPPRESS
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~napari_esam.core.runs.refine.RefineSettings` of parsed arguments."""
    from napari_esam.core.runs.refine import RefineSettings

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}")
    if not 0.0 <= args.iou_threshold <= 1.0:
        raise UserError(f"--iou-threshold must be in [0, 1], not {args.iou_threshold}")
    limits = tuple(args.contrast_limits) if args.contrast_limits else None
    settings = RefineSettings(model_spec(args), args.iou_threshold, args.mask_input,
                              args.batch_size, limits, tiling_params(args))
    settings.validate()
    return settings


def _same(a: Path, b: Path) -> bool:
    a, b = a.expanduser().resolve(), b.expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise for ``cli.main``)."""
    from napari_esam.core.runs import outputs
    from napari_esam.core.runs.refine import open_labels
    from napari_esam.core.runs.settings import get_model
    from napari_esam.models.weights import CheckpointError

    out = Path(args.output).expanduser()
    suffix = out.suffix.lower()
    if suffix not in (".zarr", ".tif", ".tiff"):
        raise UserError(f"OUTPUT must end in .zarr, .tif or .tiff, not {str(out)!r}")
    if not out.parent.is_dir():
        raise UserError(f"the output directory {str(out.parent)!r} does not exist")
    for what, path in (("IMAGE", args.input), ("LABELS", args.labels)):
        if not Path(path).expanduser().exists():
            raise UserError(f"{what} not found: {path!r}")
        if _same(out, Path(path)):
            raise UserError(f"OUTPUT must not be the {what} (nor hold it or lie inside it)")
    settings = settings_from_args(args)
    source = stack_source(args)
    open_labels(args.labels, source)  # dtype, shape and emptiness, before the model loads
    tiff = suffix in (".tif", ".tiff")
    store = Path(str(out) + TIFF_WORK_SUFFIX) if tiff else out
    if tiff and out.exists() and not store.exists() and not args.overwrite:
        raise UserError(
            f"{str(out)!r} already exists (a finished export); pass --overwrite to recompute it"
        )
    try:
        model = get_model(settings.model)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    if args.mask_input and not getattr(model, "supports_mask_input", False):
        print(f"{settings.model.name} has no mask input: each object is refined from its box "
              "and interior point only", file=sys.stderr)
    grid = settings.tiling.grid(source.plane_shape)
    if grid.n_tiles > 1:
        print(f"tiled: {grid.n_y}x{grid.n_x} tiles of {grid.tile} px (halo {grid.halo}) per "
              "plane", file=sys.stderr)
    result = _run_with_bar(source, settings, store, model, args)
    if tiff:
        from napari_esam.core.io.label_files import MARKER, write_labels

        axes = result.output.group.attrs.asdict().get(MARKER, {}).get("axes")
        write_labels(out, result.output.read_only(), axes=axes, overwrite=True)
        outputs._remove_store(store)
    _print_summary(result, out)
    return 0


def _run_with_bar(source: Any, settings: Any, store: Path, model: Any,
                  args: argparse.Namespace) -> Any:
    """:func:`~napari_esam.core.runs.refine.run_refine` with a tqdm bar of slices."""
    from tqdm import tqdm

    from napari_esam.core.io.inputs import input_axes
    from napari_esam.core.runs.refine import run_refine

    bar = tqdm(total=source.n_slices, unit="slice", desc="refine", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True)

    def progress(ev: Any) -> None:
        if ev.kind == "start" and ev.done:
            print(f"resuming {str(store)!r}: {ev.done} of {ev.total} slices already done",
                  file=sys.stderr)
        if ev.kind in ("start", "slice"):
            bar.update(ev.done - bar.n)
        if ev.kind == "slice":
            bar.set_postfix_str(f"slice {ev.index}: {ev.n_objects} refined")
        elif ev.kind == "step" and ev.steps:
            bar.set_postfix_str(f"slice {ev.index}: object {ev.step}/{ev.steps}")

    try:
        return run_refine(source, args.labels, settings, store, overwrite=args.overwrite,
                          model=model, progress=progress, axes=input_axes(args.input),
                          name=Path(args.output).stem)
    finally:
        bar.close()


def _print_summary(result: Any, out: Path) -> None:
    refined = sum(result.counts.values())
    print(f"wrote {str(out)!r}: {len(result.counts)} of {result.total} slices, {refined} "
          f"objects refined, {result.n_kept} kept as they were (IoU below the threshold)"
          + ("" if result.mask_input else "; no mask input"))
    rows = [(i, obj, v) for i, kept in result.kept.items() for obj, v in kept]
    for i, obj, v in rows[:MAX_LISTED]:
        where = f"slice {i}: " if result.total > 1 else ""
        print(f"  kept {where}id {obj} (IoU {v:.2f})")
    if len(rows) > MAX_LISTED:
        print(f"  … and {len(rows) - MAX_LISTED} more")
