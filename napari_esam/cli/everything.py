"""``napari-esam everything``: segment everything in every slice of an image or stack.

The output is computed slice by slice into a Zarr store, so it can be stopped at any time
and resumed by running the same command again. ``-o OUT.tif`` computes into the working
store ``OUT.tif.partial.zarr`` next to it and exports the TIFF when every slice is done.
``--workers N`` / ``--scheduler ADDRESS`` run the slices on a Dask cluster
(:mod:`napari_esam.core.runs.cluster`).

``--tile N`` turns on tiled mode for planes larger than the model input
(:func:`napari_esam.core.tiling.merge.segment_everything_tiled`): every plane is
segmented tile by tile at full resolution and the objects are merged across the seams;
``--embeddings`` reuses (and fills) a store of ``napari-esam embed``; with ``--workers`` /
``--scheduler`` every tile is one Dask task and the client merges. The run itself is
:func:`napari_esam.core.runs.tiled_batch.run_tiled_batch` (also behind the widget's tiled mode);
this module adds the options, messages and progress bars.
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
    from napari_esam.core.runs.pipeline import EverythingParams
    from napari_esam.core.runs.tiled_batch import MERGE_IOU
    from napari_esam.core.tiling.grid import HALO
    from napari_esam.models.registry import MODEL_NAMES

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
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mobilesam", choices=MODEL_NAMES)
    g.add_argument("--device", default="auto", help="auto, cuda or cpu")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="autocast dtype on CUDA (default: float32)")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights file (default: the official weights, downloaded once)")
    g = p.add_argument_group("stack")
    g.add_argument("--axis", type=int, nargs="+", default=None, metavar="N",
                   help="stack axis (or axes) to iterate; default: every axis but the last "
                   "two (and the channel axis)")
    g.add_argument("--channel-axis", default="auto", metavar="N|none|auto",
                   help="channel axis; auto = the last axis when it has 3 or 4 entries (RGB)")
    g.add_argument("--channel", type=int, default=None, metavar="C",
                   help="channel to segment (default: RGB, the first three channels)")
    g.add_argument("--contrast-limits", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="intensity range mapped to 0-255 for every slice (default: each "
                   "slice's 0.5-99.5 percentiles; tiled mode: those of a sample of the whole "
                   "array, for every tile)")
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
    g = p.add_argument_group(
        "tiled mode (planes larger than the model input)",
        "segment every plane tile by tile at full resolution and merge the objects across "
        "the seams; without --tile a plane is shrunk to the model's 1024 px. Not with "
        "crops, --axis or --channel",
    )
    g.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tile side in pixels, e.g. 1024 (the model input): turns tiled mode on "
                   "(default: off)")
    g.add_argument("--halo", type=int, default=None, metavar="N",
                   help=f"overlap between neighbouring tiles in pixels (default: {HALO}, at "
                   "most a quarter of the tile)")
    g.add_argument("--embeddings", default=None, metavar="PATH.zarr",
                   help="embedding store written by 'napari-esam embed' for this image, model, "
                   "--tile and --halo: reused, and filled with the tiles it lacks")
    g.add_argument("--merge-iou", type=float, default=None, metavar="F",
                   help=f"IoU inside the tiles' overlap from which two tiles' masks are one "
                   f"object (default: {MERGE_IOU})")
    g = p.add_argument_group(
        "Dask cluster (optional; needs napari-esam[cluster])",
        "one task per slice (tiled mode: per tile) on Dask workers, which read INPUT and "
        "write OUTPUT (tiled: a scratch group next to it) themselves: both must be on a "
        "filesystem every worker sees at the same path",
    )
    x = g.add_mutually_exclusive_group()
    x.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run on a local Dask cluster of N worker processes (default: in this "
                   "process)")
    x.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a running Dask cluster, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--retries", type=int, default=2,
                   help="re-runs of a slice task that failed (a worker that dies is handled "
                   "by Dask: its task runs again elsewhere)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _batch_size(text: str) -> int | None:
    if text.lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


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


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~napari_esam.core.runs.pipeline.BatchSettings` of parsed arguments."""
    from napari_esam.core.runs.pipeline import BatchSettings, EverythingParams, ModelSpec

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
    )
    checkpoint = None
    if args.checkpoint is not None:
        path = Path(args.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint file not found: {str(path)!r}")
        checkpoint = str(path.resolve())
    model = ModelSpec(args.model, checkpoint, args.device, args.dtype)
    return BatchSettings(model=model, params=params, id_scope=args.id_scope)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise for ``cli.main``)."""
    from napari_esam.core.runs import pipeline as batch
    from napari_esam.models.weights import CheckpointError

    out = Path(args.output).expanduser()
    suffix = out.suffix.lower()
    if suffix not in (".zarr", ".tif", ".tiff"):
        raise UserError(f"OUTPUT must end in .zarr, .tif or .tiff, not {str(out)!r}")
    if not out.parent.is_dir():
        raise UserError(f"the output directory {str(out.parent)!r} does not exist")
    tiled = check_tiled_options(args)
    settings = settings_from_args(args)
    settings.validate()
    executor = make_executor(args)
    if tiled:
        source = _tiled_source(args)
    else:
        source = batch.StackSource.create(
            args.input, axis=args.axis, channel_axis=_channel_axis(args.channel_axis),
            channel=args.channel,
        )
    if Path(source.data) == out.resolve():
        raise UserError("OUTPUT must not be the INPUT")
    if not tiled:
        _hint_tiling(source.plane_shape)

    tiff = suffix in (".tif", ".tiff")
    store = Path(str(out) + TIFF_WORK_SUFFIX) if tiff else out
    if tiff and out.exists() and not store.exists() and not args.overwrite:
        raise UserError(
            f"{str(out)!r} already exists (a finished export); pass --overwrite to recompute it"
        )
    if args.overwrite and tiff and store.exists():
        batch._remove_store(store)
    # load (and download) the weights before any work to fail early; for a cluster on the
    # CPU (this machine may have no GPU), the workers load their own copy
    spec = settings.model
    if executor is not None:
        spec = dataclasses.replace(spec, device="cpu")
    try:
        model = batch.get_model(spec)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    if tiled:
        return _run_tiled(args, settings, source, model, out, store, executor)

    output = batch.ZarrOutput(store)
    axes = batch.input_axes(args.input)
    output.prepare(source, settings, overwrite=args.overwrite, axes=axes, name=out.stem)
    done_before = len(output.done())
    n = source.n_slices
    if done_before:
        print(f"resuming {str(store)!r}: {done_before} of {n} slices already done",
              file=sys.stderr)
    with executor or contextlib.nullcontext():
        if executor is not None:
            print(f"running on a {executor.describe()}", file=sys.stderr)
        result = _run_with_bar(source, settings, output, disable=args.no_progress,
                               executor=executor)
    if tiff:
        _export_tiff(output, out, axes=_group_axes(output), disable=args.no_progress)
        batch._remove_store(store)
    _print_summary(result.counts, n, out)
    return 0


# ------------------------------------------------------------------------------ tiled mode


def _hint_tiling(plane: tuple[int, int]) -> None:
    """Suggest tiled mode for planes the model would see shrunk a lot (behaviour unchanged)."""
    from napari_esam.core.tiling.grid import TILE, TILING_THRESHOLD

    h, w = plane
    if max(h, w) > TILING_THRESHOLD:
        print(
            f"hint: the image planes are {h}x{w} px; without --tile the model sees them shrunk "
            f"to {TILE} px on the longest side ({max(h, w) / TILE:.1f}x less resolution). Add "
            f"--tile {TILE} to segment at full resolution, tile by tile",
            file=sys.stderr,
        )


def tiled_halo(args: argparse.Namespace) -> int:
    """``--halo``, or the default: HALO, at most a quarter of the tile."""
    from napari_esam.core.runs.tiled_batch import default_halo

    return args.halo if args.halo is not None else default_halo(args.tile)


def check_tiled_options(args: argparse.Namespace) -> bool:
    """Whether tiled mode is on (``--tile``); options it does not take are user errors."""
    if args.tile is None:
        for flag, value in (("--halo", args.halo), ("--embeddings", args.embeddings),
                            ("--merge-iou", args.merge_iou)):
            if value is not None:
                raise UserError(f"{flag} needs tiled mode: add --tile N (e.g. --tile 1024)"
                                + _store_grid_hint(args.embeddings))
        return False
    if args.tile < 16:
        raise UserError(f"--tile must be at least 16 pixels, got {args.tile}")
    halo = tiled_halo(args)
    if not 0 <= halo <= args.tile // 2:
        raise UserError(f"--halo must be between 0 and tile/2 = {args.tile // 2}, got {halo}")
    if args.merge_iou is not None and not 0.0 < args.merge_iou <= 1.0:
        raise UserError(f"--merge-iou must be in (0, 1], got {args.merge_iou}")
    if args.crop_n_layers:
        raise UserError(
            "crops (--crop-n-layers) are not supported in tiled mode: every tile is already "
            "segmented at full resolution (use more --points-per-side for small objects)"
        )
    if args.axis is not None:
        raise UserError("--axis is not supported in tiled mode: it tiles the last two axes "
                        "(before a colour axis) and treats the others as stack axes")
    if args.channel is not None:
        raise UserError("--channel is not supported in tiled mode: it segments gray planes, "
                        "or RGB(A) with the colour axis last")
    if args.embeddings is not None and Path(args.embeddings).suffix.lower() != ".zarr":
        raise UserError(f"--embeddings must be a .zarr store, not {args.embeddings!r}")
    return True


def _store_grid_hint(path: str | None) -> str:
    if path is None:
        return ""
    from napari_esam.core.tiling.store import read_signature

    try:
        sig = read_signature(path)
    except (OSError, ValueError):
        return ""
    return f"; the store was made with --tile {sig.tile} --halo {sig.halo}"


def _tiled_source(args: argparse.Namespace) -> Any:
    """The input as tiled mode cuts it: stack axes first, a colour axis (if any) last."""
    from napari_esam.core.runs.pipeline import StackSource

    source = StackSource.create(args.input, axis=None,
                                channel_axis=_channel_axis(args.channel_axis), channel=None)
    if source.channel_axis is not None and source.channel_axis != len(source.shape) - 1:
        raise UserError(
            f"tiled mode needs the colour axis last; axis {source.channel_axis} of shape "
            f"{source.shape} is not (use --channel-axis none for a gray stack)"
        )
    return source


def _tiled_output_message(exc: Any) -> str:
    """The CLI's words for a :class:`~napari_esam.core.runs.tiled_batch.TiledOutputError`."""
    if exc.reason == "mismatch":
        return (f"{exc.path!r} holds a tiled run with other input or settings ("
                + "; ".join(exc.diffs[:4]) + "); use the same ones, or --overwrite")
    what = ("a napari-esam run without --tile" if exc.reason == "batch"
            else "not a napari-esam tiled output")
    return f"{exc.path!r} exists and is {what}; choose another output or pass --overwrite"


def _run_tiled(args: argparse.Namespace, settings: Any, source: Any, model: Any, out: Path,
               store: Path, executor: Any) -> int:
    """Tiled mode: :func:`~napari_esam.core.runs.tiled_batch.prepare_tiled_batch` and its
    ``run`` into the output group (module doc), with messages and progress bars."""
    from napari_esam.core.runs import pipeline as batch
    from napari_esam.core.runs.tiled_batch import MERGE_IOU, TiledOutputError, prepare_tiled_batch
    from napari_esam.core.tiling.store import StaleEmbeddingStoreError

    tile, halo = args.tile, tiled_halo(args)
    merge_iou = MERGE_IOU if args.merge_iou is None else args.merge_iou
    if args.embeddings is not None:
        target = Path(args.embeddings).expanduser()
        if not target.parent.is_dir():
            raise UserError(
                f"the directory of --embeddings {str(target.parent)!r} does not exist"
            )
    try:
        job = prepare_tiled_batch(
            source, settings, store, tile=tile, halo=halo, merge_iou=merge_iou,
            embeddings=args.embeddings, overwrite=args.overwrite,
            axes=batch.input_axes(args.input), name=out.stem, model=model,
        )
    except StaleEmbeddingStoreError as exc:
        raise UserError(f"{exc} (make it with napari-esam embed and the same --model, "
                        "--checkpoint, --tile, --halo and --contrast-limits)") from None
    except TiledOutputError as exc:
        raise UserError(_tiled_output_message(exc)) from None
    grid = job.grid
    print(f"tiled mode: {grid.n_y}x{grid.n_x} tiles of {tile} px (halo {halo}) per plane, "
          f"{job.n_tiles} in all" + (f"; embeddings in {args.embeddings}" if job.embeddings
                                     else ""),
          file=sys.stderr)
    if job.complete:
        result = job.run()
        print(f"{str(store)!r} is already complete", file=sys.stderr)
    else:
        with _TileBars(job.n_tiles, disable=args.no_progress) as bars:
            # in this process too, tiles go through the scratch group: a stopped run
            # resumes with the tiles it finished (the model comes from the process cache)
            with executor or contextlib.nullcontext():
                if executor is not None:
                    print(f"running on a {executor.describe()}", file=sys.stderr)
                result = job.run(executor=executor, progress=bars)
        _print_tiled_details(result.details)
    if store != out:  # -o OUT.tif
        _export_tiff(job.output, out, axes=_group_axes(job.output), disable=args.no_progress)
        batch._remove_store(store)
    _print_summary(result.counts, job.n_planes, out)
    return 0


def _print_tiled_details(details: dict) -> None:
    parts = [f"{details['tiles']} tiles merged ({details['merged']} seam merges)",
             f"encoder runs {details['encoder_calls']}",
             f"embeddings from the store {details['store_hits']}"]
    if "tasks" in details:
        parts.append(f"tile tasks {details['tasks']} (already done: {details['skipped']})")
    print("; ".join(parts), file=sys.stderr)


class _TileBars:
    """tqdm bars for tiled mode: tiles segmented, then (distributed) tiles merged."""

    def __init__(self, total: int, *, disable: bool) -> None:
        from tqdm import tqdm

        self._tqdm, self.total, self.disable = tqdm, total, disable
        self.bar = tqdm(total=total, unit="tile", desc="segment everything (tiled)",
                        disable=disable, file=sys.stderr, dynamic_ncols=True)
        self.merge_bar: Any = None

    def __call__(self, ev: Any) -> None:
        """Show a :class:`~napari_esam.core.runs.tiled_batch.TiledProgress` report."""
        if ev.kind == "merge":
            self.merge(ev.done, ev.total)
        else:
            self.tiles(ev.done, ev.total)

    def tiles(self, done: int, total: int) -> None:
        self.bar.update(done - self.bar.n)

    def merge(self, done: int, total: int) -> None:
        if self.merge_bar is None:
            self.merge_bar = self._tqdm(total=total, unit="tile", desc="merge seams",
                                        disable=self.disable, file=sys.stderr,
                                        dynamic_ncols=True)
        self.merge_bar.update(done - self.merge_bar.n)

    def __enter__(self) -> _TileBars:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
        if self.merge_bar is not None:
            self.merge_bar.close()


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


def _run_with_bar(source: Any, settings: Any, output: Any, *, disable: bool,
                  executor: Any = None) -> Any:
    from tqdm import tqdm

    from napari_esam.core.runs.pipeline import run_batch

    bar = tqdm(total=source.n_slices, unit="slice", desc="segment everything",
               disable=disable, file=sys.stderr, dynamic_ncols=True)
    state = {"done": 0}

    def progress(ev: Any) -> None:
        if ev.kind == "start":
            bar.n = state["done"] = ev.done
            bar.refresh()
        elif ev.kind == "slice":
            bar.update(ev.done - state["done"])
            state["done"] = ev.done
            bar.set_postfix_str(f"slice {ev.index}: {ev.n_objects} objects")
        elif ev.kind == "step" and ev.steps:
            bar.set_postfix_str(f"slice {ev.index}: batch {ev.step}/{ev.steps}")

    with bar:
        return run_batch(source, settings, output, progress=progress, executor=executor)


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
