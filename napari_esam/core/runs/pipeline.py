"""Segment everything over every 2-D plane of a stack, resumably, into memory or Zarr: the
one pipeline, whether planes are tiled or not.

The flow: plane source (:class:`~napari_esam.core.runs.sources.StackSource`) → tile grid (the
whole plane as one tile, or tiles with halo: :class:`~napari_esam.core.runs.settings.
TilingParams`) → tile embeddings (memory LRU, optional embedding store) → segment everything
per tile (:class:`~napari_esam.core.runs.tasks.TileTask`, run by an executor: in this process
or on Dask) → merge (:mod:`napari_esam.core.tiling.merge`; a one-tile plane is painted by its
task) → labels output (:mod:`napari_esam.core.runs.outputs`) → export.

:func:`run_batch` drives it: skips finished planes (and, for several-tile planes, finished
tiles kept in the scratch group), hands the rest to the executor, merges each plane when its
tiles are done, records results, reports progress (:class:`BatchProgress`) with an ETA and
stops on ``cancel()``. The rules it applies (ids, paint order, size filter, dtype, seams,
resume) are written in ``docs/rules/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_esam.core.io.locks import hold
from napari_esam.core.io.replacing import check_not_input, remove_path
from napari_esam.core.io.sizes import check_fits_in_memory
from napari_esam.core.runs.executors import Executor, LocalExecutor
from napari_esam.core.runs.outputs import (
    SCRATCH_SUFFIX,
    MemoryOutput,
    TileScratch,
    ZarrOutput,
)
from napari_esam.core.runs.settings import BatchSettings, get_model, output_dtype
from napari_esam.core.runs.sources import StackSource
from napari_esam.core.runs.tasks import TaskResult, TileTask, forget_predictors, merge_plane
from napari_esam.core.tiling.grid import check_tile_memory
from napari_esam.core.tiling.merge import PlaneView

__all__ = ["BatchProgress", "BatchResult", "iter_batch", "iter_progress", "run_batch"]


@dataclass
class BatchProgress:
    """A progress report: ``kind`` is ``"start"``, ``"step"`` (inside a tile), ``"tile"`` (a
    tile of a several-tile plane finished) or ``"slice"`` (a plane finished).

    ``done``/``total`` count planes (``skipped`` of ``done`` were finished by an earlier
    run); ``tiles_done``/``tiles_total`` count tiles (equal to the planes when every plane
    is one tile); ``index``/``n_objects`` describe the plane just finished (``"slice"``) or
    running; ``step``/``steps``: point batches of the running tile; ``eta``: seconds left
    or None.
    """

    kind: str
    done: int
    total: int
    skipped: int = 0
    index: int | None = None
    n_objects: int | None = None
    step: int = 0
    steps: int = 0
    elapsed: float = 0.0
    eta: float | None = None
    tiles_done: int = 0
    tiles_total: int = 0

    @property
    def fraction(self) -> float:
        """Finished fraction of the work (tiles), counting the running tile's steps."""
        part = self.step / self.steps if self.kind == "step" and self.steps else 0.0
        if self.tiles_total:
            return min(1.0, (self.tiles_done + part) / self.tiles_total)
        return min(1.0, (self.done + part) / self.total) if self.total else 1.0


@dataclass
class BatchResult:
    """``labels``: the result (NumPy, or the Zarr array opened read-only); ``counts``:
    objects per finished plane (all runs); ``total``: planes in the stack; ``cancelled``:
    the run stopped before its planes were done; ``details``: counts of the work (tiles,
    tiles already done, encoder runs, store hits, seam merges, grid; ``store_repairs``:
    stored embeddings that could not be decoded and were recomputed; ``repaired``: one line
    per finished slice of a resumed output whose chunks could not be decoded, recomputed)."""

    labels: Any
    counts: dict[int, int]
    total: int
    cancelled: bool
    elapsed: float
    output: ZarrOutput | MemoryOutput
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.counts) == self.total


class _Clock:
    """ETA from the tiles (and steps) finished in this run."""

    def __init__(self, todo: int) -> None:
        self.t0 = time.perf_counter()
        self.todo, self.finished = todo, 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self, part: float = 0.0) -> float | None:
        done = self.finished + part
        if done <= 0:
            return None
        return self.elapsed() / done * max(0.0, self.todo - done)


def _open_store(path: str | os.PathLike, source: StackSource, settings: BatchSettings,
                grid: Any, model: Any, check_space: bool = True) -> Any:
    """Check (or create) the embedding store before any work (a store of another image,
    model or grid: :class:`~napari_esam.core.tiling.store.StaleEmbeddingStoreError`)."""
    from napari_esam.core.tiling.store import EmbeddingStore, StoreSignature

    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"the directory of the embedding store {str(target.parent)!r} does not exist"
        )
    signature = StoreSignature.for_image(
        source.planes(), model, tile=grid.tile, halo=grid.halo, rgb=source.rgb,
        contrast_limits=settings.params.contrast_limits,
    )
    return EmbeddingStore.open(target.resolve(), signature, "a", check_space=check_space)


def _check_not_input(source: StackSource, out: Path) -> None:
    """The output must be neither the input nor a folder that holds it or lies in it (an
    overwrite would delete the input)."""
    if isinstance(source.data, str):
        check_not_input(source.data, out)


def run_batch(
    source: StackSource | Any,
    settings: BatchSettings | None = None,
    output: str | os.PathLike | ZarrOutput | MemoryOutput | None = None,
    *,
    overwrite: bool = False,
    indices: Sequence[int] | None = None,
    executor: Executor | None = None,
    progress: Callable[[BatchProgress], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    embeddings: str | os.PathLike | None = None,
    check_space: bool = True,
    model: Any = None,
    axes: str | None = None,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    name: str | None = None,
) -> BatchResult:
    """Segment everything in every plane of ``source`` (or ``indices`` of them).

    ``source``: a :class:`StackSource` or anything :meth:`StackSource.create` takes (a path,
    NumPy, Dask or Zarr). ``settings``: model, segment-everything parameters, tiling and the
    id scheme (:class:`BatchSettings`). ``output``: ``None`` (a new in-memory array), a
    ``.zarr`` path / :class:`ZarrOutput` (created, or resumed: finished planes and tiles are
    skipped; ``overwrite=True`` starts over in the hidden sibling ``.NAME.replacement``,
    which replaces an existing output only once the run is done, and only an output of
    napari-esam), or a :class:`MemoryOutput`. A Zarr output and the embedding store are
    locked for the run: a second run on either raises
    :class:`~napari_esam.core.io.locks.LockedError` naming the first
    (``docs/rules/outputs.md``).
    ``embeddings``: an embedding store path, reused and filled (created when missing);
    ``check_space``: refuse it when the tiles it lacks would not fit on its disk
    (:meth:`~napari_esam.core.tiling.store.EmbeddingStore.open`).
    ``model``: the loaded model of ``settings.model`` (in this process; default: built once
    per process). ``axes``/``scale``/``translate``/``name`` are stored as OME metadata of a
    new Zarr output. ``progress(BatchProgress)`` is called from the running thread;
    ``cancel()`` is polled between point batches and tiles. A cancelled run returns with
    ``cancelled=True``; every finished plane is kept (and, on disk, every finished tile).
    """
    settings = settings or BatchSettings()
    settings.validate()
    if not isinstance(source, StackSource):
        source = StackSource.create(source)
    grid = settings.tiling.grid(source.plane_shape)
    check_tile_memory(grid)
    if output is None:
        dtype = output_dtype(source.n_slices, settings, grid)
        check_fits_in_memory(math.prod(source.out_shape) * dtype.itemsize,
                             f"the {source.out_shape} labels held in memory",
                             "write them to a .zarr output instead")
        output = MemoryOutput(source.out_shape, dtype)
    elif not isinstance(output, (ZarrOutput, MemoryOutput)):
        output = ZarrOutput(output)
    store_path = None if embeddings is None else str(Path(embeddings).expanduser().resolve())
    with contextlib.ExitStack() as held:
        if isinstance(output, ZarrOutput):
            _check_not_input(source, Path(output.path))
            held.enter_context(hold(output.path))  # one run per output (and its sibling)
            if name is None:  # the layer name is the output's, not its replacement's
                name = Path(output.path).stem
        if store_path is not None:
            held.enter_context(hold(store_path))
        return _run(source, settings, output, overwrite=overwrite, indices=indices,
                    executor=executor, progress=progress, cancel=cancel, store_path=store_path,
                    check_space=check_space, model=model, axes=axes, scale=scale,
                    translate=translate, name=name)


def _run(source: StackSource, settings: BatchSettings, target: ZarrOutput | MemoryOutput, *,
         overwrite: bool, indices: Sequence[int] | None, executor: Executor | None,
         progress: Callable[[BatchProgress], Any] | None, cancel: Callable[[], bool] | None,
         store_path: str | None, check_space: bool, model: Any, axes: str | None,
         scale: Sequence[float] | None, translate: Sequence[float] | None,
         name: str | None) -> BatchResult:
    """:func:`run_batch` with its arguments checked and its locks held."""
    from napari_esam.core.plane.everything import Cancelled

    grid = settings.tiling.grid(source.plane_shape)
    n_tiles = grid.n_tiles
    on_disk = isinstance(target, ZarrOutput)
    if not on_disk and tuple(target.array.shape) != source.out_shape:
        raise ValueError(f"output shape {target.array.shape} != labels shape {source.out_shape}")
    wanted = list(range(source.n_slices)) if indices is None else sorted({int(i) for i in indices})
    for i in wanted:
        source.coords(i)  # range check
    # a run that replaces an existing result writes beside it until it is done
    output = target.working_output(overwrite) if on_disk else target
    scratch_path = output.path + SCRATCH_SUFFIX if on_disk and n_tiles > 1 else None
    task = TileTask(source, settings, output if on_disk else None, scratch_path, store_path,
                    model=model)
    executor = executor or LocalExecutor()
    check = getattr(executor, "check", None)
    if check is not None:  # before anything is created (e.g. a Dask run needs files)
        check(task)
    store = None
    new_store = store_path is not None and not Path(store_path).exists()
    if store_path is not None:
        if model is None:
            model = get_model(settings.model)
        store = _open_store(store_path, source, settings, grid, model, check_space)
        task = dataclasses.replace(task, model=model)
    scratch = None
    created = False  # this run made the output store (removed again if it fails at once)
    try:
        if on_disk:
            resumed = output.prepare(source, settings, grid, overwrite=overwrite, axes=axes,
                                     scale=scale, translate=translate, name=name)
            created = not resumed
            if scratch_path is not None:  # a new output starts a new scratch group
                scratch = TileScratch.open(scratch_path,
                                           output.run_record(source, settings, grid),
                                           overwrite=overwrite or not resumed)
        result = _compute(source, settings, output, grid, wanted, task, executor, store,
                          scratch, progress, cancel, Cancelled)
    except BaseException:
        if created:
            output.remove_if_empty()
        if new_store and store is not None and store.n_done == 0:
            remove_path(Path(store_path), strict=False)
        raise
    if on_disk and not result.cancelled:
        if indices is None:
            output.record_many({}, complete=True)
        if scratch is not None and (indices is None or output.replaces):
            scratch.remove()
        output = output.finish_replacement()  # the old result goes only now
        result.output, result.labels = output, output.read_only()
    return result


def _compute(source: StackSource, settings: BatchSettings, output: ZarrOutput | MemoryOutput,
             grid: Any, wanted: list[int], task: TileTask, executor: Executor, store: Any,
             scratch: TileScratch | None, progress: Callable[[BatchProgress], Any] | None,
             cancel: Callable[[], bool] | None, Cancelled: type) -> BatchResult:
    """The tiles of ``wanted`` planes that are not done yet, merged and recorded."""
    n_tiles = grid.n_tiles
    on_disk = isinstance(output, ZarrOutput)
    counts = output.done()
    todo = [i for i in wanted if i not in counts]
    ready: dict[int, set[int]] = {p: set() for p in todo}  # plane -> finished tiles
    if scratch is not None:
        finished = [i for i in scratch.done() if i // n_tiles in ready]
        damaged = scratch.unreadable(finished)
        for index in finished:
            plane, t = divmod(index, n_tiles)
            if index not in damaged:
                ready[plane].add(t)
    tiles = [p * n_tiles + t for p in todo for t in range(n_tiles) if t not in ready[p]]
    tiles_total = len(wanted) * n_tiles
    tiles_done = tiles_total - len(tiles)
    total, skipped = len(wanted), len(wanted) - len(todo)
    clock = _Clock(len(tiles))
    cancel_fn = cancel or (lambda: False)
    kept: dict[int, Any] = {}  # flat tile index -> TileMasks (several-tile planes in memory)
    details: dict[str, Any] = {"grid": grid, "tiles": len(tiles), "skipped": tiles_done,
                               "encoder_calls": 0, "store_hits": 0, "merged": 0,
                               "store_repairs": 0,
                               "repaired": list(getattr(output, "repaired", []))}

    def report(kind: str, **kw: Any) -> None:
        if progress is not None:
            done = sum(1 for i in wanted if i in counts)
            progress(BatchProgress(kind, done, total, skipped, elapsed=clock.elapsed(),
                                   tiles_done=tiles_done, tiles_total=tiles_total, **kw))

    def step(index: int, done: int, steps: int) -> None:
        report("step", index=index // n_tiles, step=done, steps=steps,
               eta=clock.eta(done / steps if steps else 0.0))

    def finish_plane(plane: int, n: int) -> None:
        output.record(plane, n)
        counts[plane] = n
        report("slice", index=plane, n_objects=n, eta=clock.eta())

    def merge(plane: int) -> None:
        """Merge a several-tile plane whose tiles are all done."""
        base = plane * n_tiles
        masks = (kept.pop(base + t) if base + t in kept
                 else scratch.read(base + t, source.coords(plane), *divmod(t, grid.n_x))
                 for t in range(n_tiles))
        region = source.out_region(plane)
        n, stats = merge_plane(PlaneView(output.array, region), grid, masks, settings, plane,
                               clear=on_disk)
        details["merged"] += stats["merged"]
        finish_plane(plane, n)

    def take(res: TaskResult) -> None:
        """A one-tile plane is written and recorded; a tile of a several-tile plane is
        recorded, and its plane merged once all its tiles are done."""
        if n_tiles == 1:
            if res.labels is not None:
                output.write(source.out_region(res.plane), res.labels)
            finish_plane(res.plane, int(res.n_objects or 0))
            return
        if res.masks is not None:
            kept[res.index] = res.masks
        if scratch is not None:
            scratch.record([res.index])
        ready[res.plane].add(res.index % n_tiles)
        report("tile", index=res.plane, eta=clock.eta())
        if len(ready[res.plane]) == n_tiles:
            merge(res.plane)

    report("start", eta=None)
    for plane in todo:  # planes whose tiles were all done by an earlier run
        if n_tiles > 1 and len(ready[plane]) == n_tiles:
            merge(plane)
    results = executor.map(task, tiles, cancel=cancel_fn, step=step) if tiles else iter(())
    try:
        for res in results:
            clock.finished += 1
            tiles_done += 1
            details["encoder_calls"] += res.encoder_calls
            details["store_hits"] += res.store_hits
            details["store_repairs"] += res.store_repairs
            if store is not None and res.embedding is not None:
                plane_t, tile = task.locate(res.index)
                store.record(source.coords(plane_t), tile.iy, tile.ix, *res.embedding)
            take(res)
            if cancel_fn():
                break
    except Cancelled:
        pass
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        forget_predictors(task.token)  # this process's (in-process tasks): free the image
    cancelled = any(p not in counts for p in todo)
    labels = output.read_only() if on_disk else output.array
    counts = {i: counts[i] for i in sorted(counts)}
    details["tiles_done"] = tiles_done
    return BatchResult(labels, counts, source.n_slices, cancelled, clock.elapsed(), output,
                       details)


def iter_batch(
    *args: Any, cancel: Callable[[], bool] | None = None, **kwargs: Any
) -> Generator[BatchProgress, None, BatchResult]:
    """:func:`run_batch` as a generator: yields its progress and returns its result.

    For generator-based workers (napari's ``thread_worker``): the batch runs in a helper
    thread and its reports are handed over here. Closing the generator cancels the run and
    waits for the running point batch to end; the helper's exception is re-raised here.
    """
    if "progress" in kwargs:
        raise TypeError("iter_batch yields the progress; do not pass progress=")
    return (yield from iter_progress(run_batch, *args, cancel=cancel, **kwargs))


def iter_progress(
    func: Callable[..., Any], *args: Any, cancel: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> Generator[Any, None, Any]:
    """``func(*args, progress=..., cancel=..., **kwargs)`` as a generator that yields what
    ``func`` reports to ``progress`` and returns its result (see :func:`iter_batch`; also
    used by the widgets' workers)."""
    if "progress" in kwargs:
        raise TypeError("iter_progress yields the progress; do not pass progress=")
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def cancelled() -> bool:
        return stop.is_set() or (cancel is not None and bool(cancel()))

    def target() -> None:
        try:
            res = func(*args, cancel=cancelled, progress=lambda ev: events.put(("ev", ev)),
                       **kwargs)
            events.put(("result", res))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            events.put(("error", exc))

    thread = threading.Thread(target=target, name="napari-esam-batch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = events.get()
            if kind == "ev":
                yield value
            elif kind == "result":
                return value
            else:
                raise value
    finally:
        stop.set()
        thread.join()
