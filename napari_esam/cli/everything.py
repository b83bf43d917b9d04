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
    g = p.add_argument_group(
        "3-D objects and tracks",
        "link each slice's objects into one id per 3-D object or per track "
        "(docs/rules/linking.md); the per-slice labels are computed into OUT.partial.zarr "
        "beside OUTPUT (resumable) and linked when every slice is done",
    )
    g.add_argument("--link", choices=("off", "3d", "track"), default="off",
                   help="off: per-slice ids (--ids); 3d: one id per object through z; track: "
                   "one id per track through t")
    g.add_argument("--link-axis", type=int, default=0, metavar="N",
                   help="the stack axis to link along (0 = the first)")
    g.add_argument("--tracks-csv", default=None, metavar="PATH.csv",
                   help="with --link track: also write the tracks (track_id, t, y, x, area)")
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
    p.set_defaults(func=run, kept=kept)
    return p


def work_store(out: Path, link: bool = False) -> Path:
    """The Zarr store a run into ``out`` computes into (``OUT.partial.zarr`` for a TIFF or
    a linked output)."""
    tiff = out.suffix.lower() in (".tif", ".tiff")
    return Path(str(out) + TIFF_WORK_SUFFIX) if tiff or link else out


def kept(args: argparse.Namespace, resume: bool = True) -> str:
    """What an interrupted or failed run kept on disk, and (``resume``) what to do next."""
    from napari_esam.core.io.replacing import replacement_path
    from napari_esam.core.runs.outputs import SCRATCH_SUFFIX, TileScratch, ZarrOutput

    out = Path(args.output).expanduser()
    store = work_store(out, _linked(args))
    sibling = replacement_path(store)
    for path in (sibling, store):
        if ZarrOutput.is_run_output(path):
            n = len(ZarrOutput(path).done())
            tiles = len(TileScratch(str(path) + SCRATCH_SUFFIX).done())
            what = f"{n} finished slice{'s' * (n != 1)}"
            if tiles:
                what += f" and {tiles} finished tile{'s' * (tiles != 1)}"
            where = f"{what} were kept in {str(path)!r}"
            if path == sibling and (out.exists() or store.exists()):
                where = f"{str(out)!r} is unchanged; the new run's {where}"
            return f"{where}: {_how_to_resume(args)}" if resume else where
    if out.exists():
        return f"{str(out)!r} is unchanged"
    return "nothing was written"


def _linked(args: argparse.Namespace) -> bool:
    return getattr(args, "link", "off") != "off"


def _how_to_resume(args: argparse.Namespace) -> str:
    if args.overwrite:  # the same command would start over
        return "run it again without --overwrite to resume"
    return "run the same command again to resume"


def _state(paths: Any) -> list[tuple[bool, int]]:
    """Whether each store exists and how many planes it records (to tell whether a failed
    run changed anything)."""
    from napari_esam.core.runs.outputs import ZarrOutput

    out = []
    for path in paths:
        try:
            n = len(ZarrOutput(path).done()) if ZarrOutput.is_run_output(path) else 0
        except Exception:  # noqa: BLE001 - only compared
            n = -1
        out.append((Path(path).exists(), n))
    return out


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
    from napari_esam.core.io.locks import hold
    from napari_esam.core.io.replacing import check_not_input, replacement_path

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
    if args.tracks_csv is not None and args.link != "track":
        raise UserError("--tracks-csv needs --link track")
    executor = make_executor(args)
    source = stack_source(args)
    linked = _linked(args)
    if linked:
        from napari_esam.core.runs.linked import check_linkable

        try:
            check_linkable(tuple(source.stack_shape), args.link_axis)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if args.tracks_csv is not None:
            csv = Path(args.tracks_csv).expanduser()
            if csv.exists() and not args.overwrite:
                raise UserError(f"{str(csv)!r} already exists; pass --overwrite to replace it")
    tiff = suffix in (".tif", ".tiff")
    if tiff:  # the TIFF's limits, before any work (its pages are the planes)
        _check_tiff_output(source, settings)
    store = work_store(out, linked)
    for path in {out, store}:
        check_not_input(source.data, path)
    with hold(out), hold(store):  # one run per OUTPUT and per working store
        if tiff or linked:
            _clean_damaged_work_store(store)
        if ((tiff or linked) and out.exists() and not args.overwrite
                and not (store.exists() or replacement_path(store).exists())):
            raise UserError(
                f"{str(out)!r} already exists (a finished {'link' if linked else 'export'}); "
                "pass --overwrite to recompute it"
            )
        if not args.overwrite and replacement_path(store).exists():
            print(f"resuming the unfinished --overwrite of {str(store)!r} (kept in "
                  f"{str(replacement_path(store))!r})", file=sys.stderr)
        return _run(args, source, settings, executor, out, store)


def _clean_damaged_work_store(store: Path) -> None:
    """Remove the working store of a TIFF output when it is damaged (e.g. its labels array
    went missing when two runs of an earlier version wrote it at once): it holds no result
    of its own, the next run starts it over."""
    from napari_esam.core.io.replacing import remove_path
    from napari_esam.core.runs.outputs import ZarrOutput

    if ZarrOutput.is_run_output(store):
        problem = ZarrOutput(store).damage()
        if problem is not None:
            print(f"the working store {str(store)!r} was damaged ({problem}); starting it over",
                  file=sys.stderr)
            remove_path(store)


def _run(args: argparse.Namespace, source: Any, settings: Any, executor: Any, out: Path,
         store: Path) -> int:
    """Load the model, run, export a TIFF output and print the summary (lock held)."""
    from napari_esam.core.io.replacing import replacement_path
    from napari_esam.core.runs import outputs
    from napari_esam.core.runs.settings import get_model
    from napari_esam.core.tiling.store import StaleEmbeddingStoreError
    from napari_esam.models.weights import CheckpointError

    tiff = out.suffix.lower() in (".tif", ".tiff")
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
    stores = (store, replacement_path(store))
    before = _state(stores)
    with executor or contextlib.nullcontext():
        if executor is not None:
            print(f"running on a {executor.describe()}", file=sys.stderr)
        try:
            result = _run_with_bars(source, settings, store, model, args, executor)
        except StaleEmbeddingStoreError as exc:
            raise UserError(f"{exc} (make it with napari-esam embed and the same --model, "
                            "--checkpoint, --tiled, --tile, --halo and --contrast-limits)"
                            ) from None
        except ValueError as exc:  # a failure during the work: say what it left
            if _state(stores) == before:
                raise
            raise UserError(f"{exc}; {kept(args, resume=False)}") from None
    _print_details(result.details)
    if _linked(args):
        _link(result.output, out, args)
        return 0
    if tiff:
        _export_tiff(store, out, disable=args.no_progress)
        outputs._remove_store(store)
    _print_summary(result.counts, n, out)
    return 0


def _link(output: Any, out: Path, args: argparse.Namespace) -> None:
    """Link the finished per-slice labels into ``out`` (and the tracks CSV); print a line."""
    from tqdm import tqdm

    from napari_esam.core.linking.tracks import write_tracks_csv
    from napari_esam.core.runs.linked import link_output

    with tqdm(unit="slice", desc=f"linking ({args.link})", disable=args.no_progress,
              file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        link = link_output(output, out, args.link, axis=args.link_axis, progress=progress)
    what = "3-D objects" if args.link == "3d" else "tracks"
    print(f"wrote {str(out)!r}: {link.n_objects} {what} linked along axis {link.axis} "
          f"({link.shape[link.axis]} slices)")
    if args.tracks_csv is not None:
        path = write_tracks_csv(args.tracks_csv, link, overwrite=True)
        print(f"wrote {str(path)!r}: the tracks (track_id, t, y, x, area)")


def _print_details(details: dict) -> None:
    for line in details.get("repaired", []):
        print(f"repaired: {line}", file=sys.stderr)
    grid = details["grid"]
    parts = [f"tiles segmented {details['tiles']} (already done: {details['skipped']})",
             f"encoder runs {details['encoder_calls']}",
             f"embeddings from the store {details['store_hits']}"]
    if details.get("store_repairs"):
        parts.append(f"damaged store tiles recomputed {details['store_repairs']}")
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
                         executor=executor, embeddings=args.embeddings,
                         check_space=not args.no_space_check, progress=progress,
                         axes=input_axes(args.input), name=Path(args.output).stem)
    finally:
        bar.close()
        if tiles is not None:
            tiles.close()


def _check_tiff_output(source: Any, settings: Any) -> None:
    """Refuse (before any work) labels a TIFF cannot hold (more than 5 dimensions, a page too
    large for memory), naming the working store the run would otherwise leave."""
    from napari_esam.core.io.label_files import check_tiff_limits
    from napari_esam.core.runs.settings import output_dtype

    shape = source.out_shape
    planes = source.out_plane_axes
    pages = [s for a, s in enumerate(shape) if a not in planes] + [shape[a] for a in planes]
    dtype = output_dtype(source.n_slices, settings, settings.tiling.grid(source.plane_shape))
    try:
        check_tiff_limits(pages, dtype)
    except ValueError as exc:
        raise UserError(f"OUTPUT: {exc} (nothing was computed)") from None


def _export_tiff(store: Path, target: Path, *, disable: bool) -> None:
    """Write the finished working store as the TIFF (planes as pages, its metadata)."""
    from tqdm import tqdm

    from napari_esam.core.io.label_files import read_labels, write_labels

    data, meta = read_labels(store)
    with tqdm(unit="page", desc=f"writing {target.name}", disable=disable,
              file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        write_labels(target, data, axes=meta["axes"], scale=meta["scale"],
                     translate=meta["translate"], units=meta["units"], overwrite=True,
                     progress=progress)


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
