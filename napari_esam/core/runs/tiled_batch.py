"""Tiled segment-everything of an image or stack into a resumable OME-Zarr labels group.

The tiled counterpart of :func:`napari_esam.core.runs.pipeline.run_batch`, shared by
``napari-esam everything --tile`` and the tiled mode of the "Segment everything" widget (no
Qt, no argparse here). Every 2-D plane is segmented tile by tile at full resolution and the
objects are merged across the seams (:func:`~napari_esam.core.tiling.merge.
segment_everything_tiled`); planes larger than the model input are not shrunk.

* :func:`prepare_tiled_batch` checks everything, computes the contrast rule (one for every
  tile), checks or creates the embedding store and creates (or reopens, to resume) the
  labels group; :meth:`TiledBatch.run` does the work. :func:`run_tiled_batch` is both.
* The labels group is the batch module's OME-Zarr label group (array ``"0"``, uint32) with
  the run's record under :data:`TILED_ATTR` (input geometry, settings, tile, halo,
  merge IoU, objects per plane, ``complete``).
* The map step always goes through the scratch group ``OUTPUT.tiles.zarr`` (a
  :class:`~napari_esam.core.tiling.merge.LocalTileExecutor` in this process, or the
  executor given, e.g. a :class:`~napari_esam.core.runs.cluster.DaskExecutor`): a run that is
  cancelled, crashes or is killed keeps its finished tiles, and the next run with the same
  output computes only the others, then merges the seams and deletes the scratch group.
* A complete output of the same run is returned as it is (no work); an output of another
  run is refused (:class:`TiledOutputError`, naming the differences) unless ``overwrite``.

Errors the user can fix are ``ValueError`` s (a stale embedding store:
:class:`~napari_esam.core.tiling.store.StaleEmbeddingStoreError`; an output that cannot be
resumed: :class:`TiledOutputError`) or ``OSError`` s (missing folders), raised before any
work.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.runs.pipeline import BatchResult, BatchSettings, StackSource, ZarrOutput
from napari_esam.core.tiling.grid import HALO, TILE, TileGrid

__all__ = [
    "MERGE_IOU",
    "SCRATCH_SUFFIX",
    "TILED_ATTR",
    "TiledBatch",
    "TiledBatchResult",
    "TiledOutputError",
    "TiledProgress",
    "check_tiled_settings",
    "check_tiled_source",
    "default_halo",
    "prepare_tiled_batch",
    "read_tiled_record",
    "run_tiled_batch",
    "tiled_record",
]

#: group attribute of a tiled run's output (its record, objects per plane, completeness)
TILED_ATTR = "napari-esam-tiled"
TILED_FORMAT = 1
#: suffix of the scratch group of the tiles' results (next to the Zarr output)
SCRATCH_SUFFIX = ".tiles.zarr"
#: default IoU inside the tiles' overlap from which two tiles' masks are one object
MERGE_IOU = 0.5
#: smallest tile side accepted
MIN_TILE = 16


class TiledOutputError(ValueError):
    """The output exists and is not a resumable output of this tiled run.

    ``reason``: ``"mismatch"`` (a tiled run with other input or settings; ``diffs`` names
    the differences), ``"batch"`` (a batch output made without tiled mode) or ``"foreign"``
    (not a napari-esam tiled output). Pass ``overwrite=True`` to replace it.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str,
                 diffs: Sequence[str] = ()) -> None:
        self.path, self.reason, self.diffs = str(path), reason, list(diffs)
        if reason == "mismatch":
            text = (f"{self.path!r} holds a tiled run with other input or settings ("
                    + "; ".join(self.diffs[:4]) + "); use the same ones, or overwrite it "
                    "(CLI: --overwrite)")
        else:
            what = ("a napari-esam batch output made without tiled mode" if reason == "batch"
                    else "not a napari-esam tiled output")
            text = (f"{self.path!r} exists and is {what}; choose another output or overwrite "
                    "it (CLI: --overwrite)")
        super().__init__(text)


@dataclass
class TiledProgress:
    """A progress report of a tiled run, counting tiles (all planes).

    ``kind``: ``"start"`` (``done`` = ``skipped``: tiles finished by an earlier run),
    ``"tile"`` (the map step: ``done`` tiles segmented) or ``"merge"`` (the seams: ``done``
    tiles merged into the labels). ``eta``: seconds left in the map step, or None.
    """

    kind: str
    done: int
    total: int
    skipped: int = 0
    elapsed: float = 0.0
    eta: float | None = None

    @property
    def fraction(self) -> float:
        """Finished fraction of the current step (tiles segmented, or tiles merged)."""
        return min(1.0, self.done / self.total) if self.total else 1.0


@dataclass
class TiledBatchResult(BatchResult):
    """:class:`~napari_esam.core.runs.pipeline.BatchResult` of a tiled run: ``counts`` are objects
    per plane (flat plane index, C order over the stack axes; empty until the run is
    complete), ``total`` the planes; ``labels`` the Zarr array opened read-only.

    ``tiles_done`` / ``tiles_total``: tiles segmented (kept in the scratch group after a
    cancel) / all tiles; ``details``: the statistics of
    :func:`~napari_esam.core.tiling.merge.segment_everything_tiled` (tiles, seam
    merges, encoder runs, store hits, tile tasks, skipped); ``already_complete``: the
    output was complete before this run (nothing was computed).
    """

    tiles_done: int = 0
    tiles_total: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    already_complete: bool = False


def default_halo(tile: int) -> int:
    """The default overlap for ``tile``: :data:`~napari_esam.core.tiling.grid.HALO` (256), at
    most a quarter of the tile."""
    return min(HALO, int(tile) // 4)


def check_tiled_settings(tile: int, halo: int, merge_iou: float = MERGE_IOU,
                         params: Any = None) -> None:
    """``ValueError`` for a tile, halo, merge IoU or parameters tiled mode does not take."""
    if tile < MIN_TILE:
        raise ValueError(f"the tile must be at least {MIN_TILE} pixels, got {tile}")
    if not 0 <= halo <= tile // 2:
        raise ValueError(f"the halo must be between 0 and tile/2 = {tile // 2}, got {halo}")
    if not 0.0 < merge_iou <= 1.0:
        raise ValueError(f"the merge IoU must be in (0, 1], got {merge_iou}")
    if params is not None and params.crop_n_layers:
        raise ValueError(
            "crops (crop_n_layers > 0) are not supported in tiled mode: every tile is already "
            "segmented at full resolution (use more points per side for small objects)"
        )


def check_tiled_source(source: StackSource) -> None:
    """``ValueError`` unless ``source`` is cut as tiled mode cuts it: the image plane is the
    last two axes (before a colour axis), the other axes are stack axes, and colour is
    RGB(A) (the first three channels), not one channel picked out of several."""
    ndim = len(source.shape)
    if source.channel is not None:
        raise ValueError("tiled mode segments gray planes or RGB(A), not one channel picked "
                         "out of several")
    if source.channel_axis is not None and source.channel_axis != ndim - 1:
        raise ValueError(
            f"tiled mode needs the colour axis last; axis {source.channel_axis} of shape "
            f"{source.shape} is not"
        )
    last = ndim - 1 - (source.channel_axis is not None)
    if source.plane_axes != (last - 1, last):
        raise ValueError(
            f"tiled mode tiles the last two axes of shape {source.shape} and iterates the "
            f"others; the stack axes {list(source.stack_axes)} leave the plane "
            f"{list(source.plane_axes)}"
        )


def tiled_record(source: StackSource, settings: BatchSettings, tile: int, halo: int,
                 merge_iou: float) -> dict[str, Any]:
    """The record a resumed run must match: input geometry, settings, tile, halo, IoU."""
    rec = settings.record()
    rec.pop("id_stride", None)
    rec.update({"tile": int(tile), "halo": int(halo), "merge_iou": float(merge_iou)})
    return {"source": source.describe(), "settings": rec}


def read_tiled_record(path: str | os.PathLike[str]) -> dict | None:
    """The :data:`TILED_ATTR` record of the group at ``path`` (``None``: not a tiled output)."""
    try:
        with open(Path(path) / "zarr.json", encoding="utf-8") as fh:
            return json.load(fh).get("attributes", {}).get(TILED_ATTR)
    except (OSError, ValueError):
        return None


def _prepare_output(
    path: Path,
    source: StackSource,
    record: dict,
    *,
    overwrite: bool,
    axes: str | None,
    scale: Sequence[float] | None,
    translate: Sequence[float] | None,
    name: str | None,
) -> tuple[ZarrOutput, bool]:
    """Create the labels group, or reuse the one of the same tiled run; → (output, complete)."""
    from napari_esam.core.runs import pipeline as batch
    if path.exists() or path.is_symlink():
        old = read_tiled_record(path)
        if old is not None and not overwrite:
            old = json.loads(json.dumps(old))
            new = json.loads(json.dumps(record))
            diffs = batch._diff(old.get("source", {}), new["source"], "input ")
            diffs += batch._diff(old.get("settings", {}), new["settings"], "")
            if diffs:
                raise TiledOutputError(path, "mismatch", diffs)
            return ZarrOutput(path), bool(old.get("complete"))
        if not overwrite:
            reason = "batch" if ZarrOutput.is_batch_output(path) else "foreign"
            raise TiledOutputError(path, reason)
        batch._remove_store(path)
    attrs = {TILED_ATTR: {"format": TILED_FORMAT, **record, "slices": {}, "complete": False}}
    batch.create_label_group(path, source, np.uint32, attrs, axes=axes, scale=scale,
                             translate=translate, name=name)
    return ZarrOutput(path), False


def _open_embeddings(path: str | os.PathLike[str], data: Any, model: Any, tile: int,
                     halo: int, rgb: bool, limits: Any) -> Any:
    """Check (or create) the embedding store before any work (a store of another image,
    model or grid: :class:`~napari_esam.core.tiling.store.StaleEmbeddingStoreError`)."""
    from napari_esam.core.tiling.store import EmbeddingStore, StoreSignature

    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"the directory of the embedding store {str(target.parent)!r} does not exist"
        )
    signature = StoreSignature.for_image(data, model, tile=tile, halo=halo, rgb=rgb,
                                         contrast_limits=limits)
    return EmbeddingStore.open(target, signature, "a")


def _finish(output: ZarrOutput, counts: dict[int, int]) -> None:
    """Record the objects per plane and mark the output complete."""
    rec = dict(output.group.attrs.asdict()[TILED_ATTR])
    rec["slices"] = {str(k): int(v) for k, v in sorted(counts.items())}
    rec["complete"] = True
    output.group.attrs.update({TILED_ATTR: rec})


@dataclass(eq=False)
class TiledBatch:
    """A checked tiled run with its output group created (or reopened): :meth:`run` it.

    Made by :func:`prepare_tiled_batch`. ``grid``: the tile grid of one plane;
    ``contrast_limits``: the one rule for every tile; ``embeddings``: the store's resolved
    path (checked or created) or ``None``; ``complete``: the output already holds this run's
    finished labels.
    """

    source: StackSource
    settings: BatchSettings
    output: ZarrOutput
    tile: int
    halo: int
    merge_iou: float
    grid: TileGrid
    contrast_limits: tuple[float, float] | None
    rgb: bool
    embeddings: str | None
    complete: bool
    overwrite: bool = False

    @property
    def n_planes(self) -> int:
        return self.source.n_slices

    @property
    def n_tiles(self) -> int:
        """Tiles of all planes."""
        return self.source.n_slices * self.grid.n_tiles

    @property
    def scratch(self) -> Path:
        """The scratch group of the tiles' results (``OUTPUT.tiles.zarr``)."""
        return Path(self.output.path + SCRATCH_SUFFIX)

    def recorded_counts(self) -> dict[int, int]:
        """Objects per plane recorded in the output (complete runs)."""
        rec = read_tiled_record(self.output.path) or {}
        return {int(k): int(v) for k, v in rec.get("slices", {}).items()}

    def run(
        self,
        *,
        executor: Any = None,
        progress: Callable[[TiledProgress], Any] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> TiledBatchResult:
        """Segment every tile not finished yet, merge the seams, record the counts.

        ``executor``: ``None`` (this process, through a
        :class:`~napari_esam.core.tiling.merge.LocalTileExecutor`) or an object with
        ``map_tiles`` such as a :class:`~napari_esam.core.runs.cluster.DaskExecutor` (the caller
        starts and closes it; its workers need the input as a file and the output on a
        shared filesystem). ``progress(TiledProgress)`` is called from the running thread;
        ``cancel()`` is polled between tiles and point batches. A cancelled run returns
        ``cancelled=True``; its finished tiles stay in :attr:`scratch` for the next run.
        A complete output returns its recorded counts at once.
        """
        from napari_esam.core.plane.everything import Cancelled
        from napari_esam.core.tiling.merge import (
            LocalTileExecutor,
            TileScratch,
            segment_everything_tiled,
        )

        t0 = time.perf_counter()
        total = self.n_tiles
        emit = progress or (lambda ev: None)
        if self.complete:
            emit(TiledProgress("start", total, total, total))
            return TiledBatchResult(self.output.read_only(), self.recorded_counts(),
                                    self.n_planes, False, time.perf_counter() - t0,
                                    self.output, tiles_done=total, tiles_total=total,
                                    already_complete=True)
        skipped = 0 if self.overwrite else min(total, len(TileScratch(self.scratch).done()))
        state = {"done": skipped}
        emit(TiledProgress("start", skipped, total, skipped))

        def on_tile(done: int, _total: int) -> None:
            state["done"] = done
            elapsed = time.perf_counter() - t0
            ran = done - skipped
            eta = elapsed / ran * (total - done) if ran > 0 else None
            emit(TiledProgress("tile", done, total, skipped, elapsed, eta))

        def on_merge(done: int, _total: int) -> None:
            emit(TiledProgress("merge", done, total, skipped, time.perf_counter() - t0, 0.0))

        params = self.settings.params
        kwargs = params.everything_kwargs()
        for name in ("crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
                     "crop_n_points_downscale_factor", "contrast_limits"):
            kwargs.pop(name)
        details: dict[str, Any] = {}
        try:
            segment_everything_tiled(
                self.source.data, self.settings.model, self.output.array, tile=self.tile,
                halo=self.halo, executor=LocalTileExecutor() if executor is None else executor,
                scratch=self.scratch, overwrite=self.overwrite, embedding_store=self.embeddings,
                progress=on_tile, merge_progress=on_merge, cancel=cancel, details=details,
                contrast_limits=self.contrast_limits, rgb=self.rgb, merge_iou=self.merge_iou,
                min_size=params.min_size, max_size=params.max_size,
                id_scope=self.settings.id_scope, **kwargs,
            )
        except Cancelled:
            return TiledBatchResult(self.output.read_only(), {}, self.n_planes, True,
                                    time.perf_counter() - t0, self.output,
                                    tiles_done=state["done"], tiles_total=total,
                                    details=details)
        finally:
            self.overwrite = False  # the scratch group was started anew once: resume it now
        lead = self.source.stack_shape
        counts = {
            int(np.ravel_multi_index(p, lead)) if lead else 0: int(n)
            for p, n in details["objects_per_plane"].items()
        }
        _finish(self.output, counts)
        self.complete = True
        return TiledBatchResult(self.output.read_only(), dict(sorted(counts.items())),
                                self.n_planes, False, time.perf_counter() - t0, self.output,
                                tiles_done=total, tiles_total=total, details=details)


def prepare_tiled_batch(
    source: StackSource | Any,
    settings: BatchSettings | None,
    output: str | os.PathLike[str],
    *,
    tile: int = TILE,
    halo: int | None = None,
    merge_iou: float = MERGE_IOU,
    embeddings: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    axes: str | None = None,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    name: str | None = None,
    model: Any = None,
) -> TiledBatch:
    """Check a tiled run and create (or reopen) its output; see :func:`run_tiled_batch`.

    ``model``: the model of ``settings.model`` when already loaded (only needed for the
    embedding store's signature; default: :func:`~napari_esam.core.runs.pipeline.get_model`).
    """
    from napari_esam.core.runs.pipeline import get_model
    from napari_esam.core.tiling.grid import global_contrast_limits

    settings = settings or BatchSettings()
    settings.validate()
    if not isinstance(source, StackSource):
        source = StackSource.create(source)
    tile = int(tile)
    halo = default_halo(tile) if halo is None else int(halo)
    check_tiled_settings(tile, halo, merge_iou, settings.params)
    check_tiled_source(source)
    path = Path(output).expanduser()
    if path.suffix.lower() != ".zarr":
        raise ValueError(f"the tiled output must be a .zarr store, not {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {str(path.parent)!r} does not exist")
    if isinstance(source.data, str) and Path(source.data) == path.resolve():
        raise ValueError("the output must not be the input")
    rgb = source.channel_axis is not None
    data = source.array
    grid = TileGrid(source.plane_shape, tile, halo)
    limits = settings.params.contrast_limits
    if limits is None:  # one rule for every tile: a global sample of the whole array
        limits = global_contrast_limits(data, rgb)
    else:
        limits = (float(limits[0]), float(limits[1]))
    store = None
    if embeddings is not None:
        if model is None:
            model = get_model(settings.model)
        store = _open_embeddings(embeddings, data, model, tile, halo, rgb, limits)
    record = tiled_record(source, settings, tile, halo, merge_iou)
    out, complete = _prepare_output(path, source, record, overwrite=overwrite, axes=axes,
                                    scale=scale, translate=translate, name=name)
    return TiledBatch(source, settings, out, tile, halo, float(merge_iou), grid, limits, rgb,
                      None if store is None else str(Path(store.path).resolve()), complete,
                      overwrite)


def run_tiled_batch(
    source: StackSource | Any,
    settings: BatchSettings | None,
    output: str | os.PathLike[str],
    *,
    tile: int = TILE,
    halo: int | None = None,
    merge_iou: float = MERGE_IOU,
    embeddings: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    executor: Any = None,
    progress: Callable[[TiledProgress], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    axes: str | None = None,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    name: str | None = None,
    model: Any = None,
) -> TiledBatchResult:
    """Segment everything in every plane of ``source`` tile by tile into the Zarr ``output``.

    ``source``: a :class:`~napari_esam.core.runs.pipeline.StackSource` (stack axes first, the plane
    last, an RGB(A) axis after it; see :func:`check_tiled_source`) or anything
    :meth:`StackSource.create` takes (a path, NumPy, Dask or Zarr). ``settings``: model and
    segment-everything parameters, applied per tile (``points_per_side`` is per tile; no
    crops; ``params.contrast_limits`` for every tile, default: the 0.5-99.5 percentiles of a
    sample of the whole array; ``min_size``/``max_size`` judge the merged objects;
    ``id_scope="stack"``: ids 1..n over the stack, ``"slice"``: 1..n per plane).
    ``output``: a ``.zarr`` path, created as an OME-Zarr labels group (uint32;
    ``axes``/``scale``/``translate``/``name`` as its metadata) or resumed (see the module
    doc; ``overwrite=True`` starts over). ``tile``/``halo`` (default
    :func:`default_halo`)/``merge_iou``: the grid and the seam rule. ``embeddings``: an
    embedding store path (``napari-esam embed``) reused and filled, created when missing.
    ``executor``, ``progress`` (:class:`TiledProgress`) and ``cancel``: see
    :meth:`TiledBatch.run`; an in-memory ``source`` needs ``executor=None``.

    Returns a :class:`TiledBatchResult` (``counts``: objects per plane; ``cancelled``).
    """
    batch_ = prepare_tiled_batch(
        source, settings, output, tile=tile, halo=halo, merge_iou=merge_iou,
        embeddings=embeddings, overwrite=overwrite, axes=axes, scale=scale,
        translate=translate, name=name, model=model,
    )
    return batch_.run(executor=executor, progress=progress, cancel=cancel)
