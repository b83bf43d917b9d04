"""``napari-esam everything``: segment everything in every plane of an image or stack.

The output is computed plane by plane into a Zarr store, so it can be stopped at any time
and resumed by running the same command again. ``-o OUT.tif`` computes into the working
store ``OUT.tif.partial.zarr`` next to it and exports the TIFF when every plane is done.
Planes larger than the tiling threshold are segmented tile by tile at full resolution
(``--tiled auto``, the default; ``docs/rules/tiling.md``); ``--embeddings`` reuses (and
fills) a store of ``napari-esam embed``; ``--workers N`` / ``--scheduler ADDRESS`` run the
tiles on a Dask cluster (:mod:`napari_esam.core.runs.cluster`). The run itself is
:func:`napari_esam.core.runs.pipeline.run_batch`; this module adds the options, messages and
progress bars.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
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

HELP = "segment everything in every 2-D slice of an image or stack (resumable)"
TIFF_WORK_SUFFIX = ".partial.zarr"
#: at most this many per-slice counts are printed
MAX_LISTED = 50


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` (those options say in words what they default to)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``everything`` subcommand."""
    from napari_esam.core.runs.settings import EverythingParams

    d = EverythingParams()
    p = subparsers.add_parser(
        "everything",
        help=HELP,
        description=HELP + ". Finished slices are recorded in the Zarr output; running the "
        "same command again resumes (--overwrite starts over).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="TIFF, Zarr, .npy, PNG or JPEG image/stack")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="labels output: OUT.zarr (OME-Zarr) or OUT.tif/.tiff")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT instead of resuming it")
    add_model_args(p)
    g = add_source_args(p)
    g.add_argument("--ids", dest="id_scope", choices=("stack", "slice"), default="stack",
                   help="label ids unique across the stack, or 1..n in each slice")
    g = p.add_argument_group("segment everything")
    g.add_argument("--method", choices=("sam", "efficientsam"), default=d.method)
    g.add_argument("--points-per-side", type=int, default=d.points_per_side)
    g.add_argument("--points-per-batch", type=_batch_size, default=d.points_per_batch,
                   help="points decoded per model call, or 'auto' (from free memory)")
    g.add_argument("--pred-iou-thresh", type=float, default=d.pred_iou_thresh)
    g.add_argument("--stability-score-thresh", type=float, default=d.stability_score_thresh)
    g.add_argument("--stability-score-offset", type=float, default=d.stability_score_offset)
    g.add_argument("--box-nms-thresh", type=float, default=d.box_nms_thresh)
    g.add_argument("--crop-n-layers", type=int, default=d.crop_n_layers)
    g.add_argument("--crop-nms-thresh", type=float, default=d.crop_nms_thresh)
    g.add_argument("--crop-overlap-ratio", type=float, default=d.crop_overlap_ratio)
    g.add_argument("--crop-n-points-downscale-factor", type=int,
                   default=d.crop_n_points_downscale_factor)
    g.add_argument("--min-mask-region-area", type=int, default=d.min_mask_region_area,
                   help="remove holes and islands smaller than this in each mask (pixels)")
    g.add_argument("--min-size", type=int, default=d.min_size,
                   help="drop objects smaller than this (pixels)")
    g.add_argument("--max-size", type=int, default=d.max_size,
                   help="drop objects larger than this (pixels), e.g. a background mask")
    add_object_prompt_args(p, d)
    g = add_tiling_args(p)
    g.add_argument("--embeddings", default=None, metavar="PATH.zarr",
                   help="embedding store (made by 'napari-esam embed' with the same model and "
                   "tiling, or by an earlier run): reused, and filled with the tiles it lacks")
    g = p.add_argument_group(
        "Dask cluster (optional; needs napari-esam[cluster])",
        "one task per tile (a plane that is one tile: per plane) on Dask workers, which "
        "read INPUT and write OUTPUT (and a scratch group next to it) themselves: both must "
        "be on a filesystem every worker sees at the same path",
    )
    x = g.add_mutually_exclusive_group()
    x.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run on a local Dask cluster of N worker processes (default: in this "
                   "process)")
    x.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a running Dask cluster, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--retries", type=int, default=2,
                   help="re-runs of a task that failed (a worker that dies is handled "
                   "by Dask: its task runs again elsewhere)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def add_object_prompt_args(p: argparse.ArgumentParser, d: Any) -> None:
    """``--prompts`` and the object detector's options (``d``: the default parameters)."""
    from napari_esam.core.plane.object_prompts import DECODINGS, POLARITIES
    from napari_esam.core.runs.settings import PROMPTS

    g = p.add_argument_group(
        "prompts (docs/everything.md#grid-or-object-prompts)",
        "grid: --points-per-side^2 points per tile (any objects); objects: one prompt per "
        "blob-like object (cells, nuclei) found by a detector, much faster",
    )
    g.add_argument("--prompts", choices=PROMPTS, default=d.prompts,
                   help="the prompt set of segment-everything")
    g.add_argument("--object-diameter", type=float, nargs=2, default=list(d.object_diameter),
                   metavar=("MIN", "MAX"),
                   help="with --prompts objects: smallest and largest object diameter (pixels)")
    g.add_argument("--object-threshold", type=float, default=d.object_threshold, metavar="F",
                   help="with --prompts objects: the detector's threshold (lower finds "
                   "fainter objects; ~0.74 x an object's contrast in the display range)")
    g.add_argument("--object-polarity", choices=POLARITIES, default=d.object_polarity,
                   help="with --prompts objects: bright objects on a dark background "
                   "(fluorescence) or dark ones on a bright background")
    g.add_argument("--object-decoding", choices=DECODINGS, default=d.object_decoding,
                   help="with --prompts objects: a positive point per object (SAM's filters "
                   "as for the grid) or its box (MobileSAMv2: one mask per object, no "
                   "IoU/stability filters; fastest)")


def _batch_size(text: str) -> int | None:
    if text.lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~napari_esam.core.runs.pipeline.BatchSettings` of parsed arguments."""
    from napari_esam.core.runs.settings import BatchSettings, EverythingParams

    params = EverythingParams(
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=args.stability_score_offset,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        crop_nms_thresh=args.crop_nms_thresh,
        crop_overlap_ratio=args.crop_overlap_ratio,
        crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
        min_mask_region_area=args.min_mask_region_area,
        method=args.method,
        min_size=args.min_size,
        max_size=args.max_size,
        contrast_limits=tuple(args.contrast_limits) if args.contrast_limits else None,
        prompts=args.prompts,
        object_diameter=tuple(args.object_diameter),
        object_threshold=args.object_threshold,
        object_polarity=args.object_polarity,
        object_decoding=args.object_decoding,
    )
    return BatchSettings(model=model_spec(args), params=params, id_scope=args.id_scope,
                         tiling=tiling_params(args))


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise for ``cli.main``)."""
    from napari_esam.core.runs import outputs
    from napari_esam.core.runs.settings import get_model
    from napari_esam.core.tiling.store import StaleEmbeddingStoreError
    from napari_esam.models.weights import CheckpointError

    out = Path(args.output).expanduser()
    suffix = out.suffix.lower()
    if suffix not in (".zarr", ".tif", ".tiff"):
        raise UserError(f"OUTPUT must end in .zarr, .tif or .tiff, not {str(out)!r}")
    if not out.parent.is_dir():
        raise UserError(f"the output directory {str(out.parent)!r} does not exist")
    if args.embeddings is not None:
        if Path(args.embeddings).suffix.lower() != ".zarr":
            raise UserError(f"--embeddings must be a .zarr store, not {args.embeddings!r}")
        target = Path(args.embeddings).expanduser()
        if not target.parent.is_dir():
            raise UserError(
                f"the directory of --embeddings {str(target.parent)!r} does not exist")
    settings = settings_from_args(args)
    settings.validate()
    executor = make_executor(args)
    source = stack_source(args)
    if Path(source.data) == out.resolve():
        raise UserError("OUTPUT must not be the INPUT")

    tiff = suffix in (".tif", ".tiff")
    store = Path(str(out) + TIFF_WORK_SUFFIX) if tiff else out
    if tiff and out.exists() and not store.exists() and not args.overwrite:
        raise UserError(
            f"{str(out)!r} already exists (a finished export); pass --overwrite to recompute it"
        )
    # load (and download) the weights before any work to fail early; for a cluster on the
    # CPU (this machine may have no GPU), the workers load their own copy
    spec = settings.model
    if executor is not None:
        spec = dataclasses.replace(spec, device="cpu")
    try:
        model = get_model(spec)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    grid = settings.tiling.grid(source.plane_shape)
    n = source.n_slices
    if grid.n_tiles > 1:
        print(f"tiled: {grid.n_y}x{grid.n_x} tiles of {grid.tile} px (halo {grid.halo}) per "
              f"plane, {n * grid.n_tiles} in all", file=sys.stderr)
    with executor or contextlib.nullcontext():
        if executor is not None:
            print(f"running on a {executor.describe()}", file=sys.stderr)
        try:
            result = _run_with_bars(source, settings, store, model, args, executor)
        except StaleEmbeddingStoreError as exc:
            raise UserError(f"{exc} (make it with napari-esam embed and the same --model, "
                            "--checkpoint, --tiled, --tile, --halo and --contrast-limits)"
                            ) from None
    _print_details(result.details)
    if tiff:
        output = result.output
        _export_tiff(output, out, axes=_group_axes(output), disable=args.no_progress)
        outputs._remove_store(store)
    _print_summary(result.counts, n, out)
    return 0


def _print_details(details: dict) -> None:
    grid = details["grid"]
    parts = [f"tiles segmented {details['tiles']} (already done: {details['skipped']})",
             f"encoder runs {details['encoder_calls']}",
             f"embeddings from the store {details['store_hits']}"]
    if grid.n_tiles > 1:
        parts.append(f"seam merges {details['merged']}")
    print("; ".join(parts), file=sys.stderr)


def make_executor(args: argparse.Namespace) -> Any:
    """The :class:`~napari_esam.core.runs.cluster.DaskExecutor` that ``--workers`` /
    ``--scheduler`` ask for (not started yet), or ``None`` to run in this process."""
    if args.workers is None and args.scheduler is None:
        return None
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, not {args.workers}")
    if args.retries < 0:
        raise UserError(f"--retries must be at least 0, not {args.retries}")
    try:
        from napari_esam.core.runs.cluster import DaskExecutor

        return DaskExecutor(workers=args.workers, scheduler=args.scheduler,
                            retries=args.retries)
    except ImportError as exc:
        raise UserError(str(exc)) from exc


def _run_with_bars(source: Any, settings: Any, store: Path, model: Any,
                   args: argparse.Namespace, executor: Any) -> Any:
    """:func:`~napari_esam.core.runs.pipeline.run_batch` with a tqdm bar of planes (and one
    of tiles when planes are tiled)."""
    from tqdm import tqdm

    from napari_esam.core.io.inputs import input_axes
    from napari_esam.core.runs.pipeline import run_batch

    grid = settings.tiling.grid(source.plane_shape)
    disable = args.no_progress
    bar = tqdm(total=source.n_slices, unit="slice", desc="segment everything",
               disable=disable, file=sys.stderr, dynamic_ncols=True)
    tiles = (tqdm(total=source.n_slices * grid.n_tiles, unit="tile", desc="tiles",
                  disable=disable, file=sys.stderr, dynamic_ncols=True)
             if grid.n_tiles > 1 else None)
    state = {"done": 0}

    def progress(ev: Any) -> None:
        if ev.kind == "start":
            bar.n = state["done"] = ev.done
            bar.refresh()
            if ev.done:
                print(f"resuming {str(store)!r}: {ev.done} of {ev.total} slices already done",
                      file=sys.stderr)
        elif ev.kind == "slice":
            bar.update(ev.done - state["done"])
            state["done"] = ev.done
            bar.set_postfix_str(f"slice {ev.index}: {ev.n_objects} objects")
        elif ev.kind == "step" and ev.steps:
            bar.set_postfix_str(f"slice {ev.index}: batch {ev.step}/{ev.steps}")
        if tiles is not None:
            tiles.update(ev.tiles_done - tiles.n)

    try:
        return run_batch(source, settings, store, overwrite=args.overwrite, model=model,
                         executor=executor, embeddings=args.embeddings, progress=progress,
                         axes=input_axes(args.input), name=Path(args.output).stem)
    finally:
        bar.close()
        if tiles is not None:
            tiles.close()


def _group_axes(output: Any) -> str | None:
    from napari_esam.core.io.label_files import MARKER

    return output.group.attrs.asdict().get(MARKER, {}).get("axes")


def _export_tiff(output: Any, target: Path, *, axes: str | None, disable: bool) -> None:
    from tqdm import tqdm

    from napari_esam.core.io.label_files import write_labels

    with tqdm(unit="page", desc=f"writing {target.name}", disable=disable,
              file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        write_labels(target, output.read_only(), axes=axes, overwrite=True, progress=progress)


def _print_summary(counts: dict[int, int], n: int, out: Path) -> None:
    values = [counts[i] for i in sorted(counts)]
    total = sum(values)
    print(f"wrote {str(out)!r}: {len(values)} of {n} slices, {total} objects")
    if len(values) <= MAX_LISTED:
        for i in sorted(counts):
            print(f"  slice {i}: {counts[i]} objects")
    else:
        srt = sorted(values)
        median = srt[len(srt) // 2]
        mean = total / len(values) if values else math.nan
        print(f"  objects per slice: min {srt[0]}, median {median}, mean {mean:.1f}, "
              f"max {srt[-1]}")
