"""Executors: what runs a run's :class:`~napari_esam.core.runs.tasks.TileTask` s.

:class:`LocalExecutor` runs them in this process, in order; the Dask one
(:class:`~napari_esam.core.runs.cluster.DaskExecutor`) as one Dask task each. Any object
with the :class:`Executor` protocol can be given to
:func:`~napari_esam.core.runs.pipeline.run_batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from napari_esam.core.runs.tasks import TaskResult, TileTask

__all__ = ["Executor", "LocalExecutor"]


class Executor(Protocol):
    """Runs tile tasks; the hook for other back-ends (e.g. a Dask cluster).

    ``map`` runs ``task(i)`` for every index and yields :class:`TaskResult` s as they
    finish, in any order. ``cancel()`` becoming true should stop it soon (pending work
    dropped); ``step(index, done, total)``, when given, may be called with progress inside a
    task. The driver may close the generator early (cancel, error): release resources in a
    ``finally``. A remote executor needs a picklable task: a path source and a Zarr output
    on storage the workers share.
    """

    def map(
        self,
        task: TileTask,
        indices: Sequence[int],
        *,
        cancel: Callable[[], bool],
        step: Callable[[int, int, int], None] | None = None,
    ) -> Iterator[TaskResult]: ...


class LocalExecutor:
    """In-process, one task at a time, in index order; cancellable within a task.

    With ``read_ahead`` (default) the next tile is read (and decompressed) in a background
    thread while the model works on the current one, so disk I/O overlaps model work.
    """

    read_ahead: bool = True

    def __init__(self, read_ahead: bool = True) -> None:
        self.read_ahead = read_ahead

    def map(
        self,
        task: TileTask,
        indices: Sequence[int],
        *,
        cancel: Callable[[], bool],
        step: Callable[[int, int, int], None] | None = None,
    ) -> Iterator[TaskResult]:
        indices = list(indices)
        pool = ThreadPoolExecutor(1, thread_name_prefix="napari-esam-read") if (
            self.read_ahead and len(indices) > 1
        ) else None
        try:
            ahead = pool.submit(task.read, indices[0]) if pool is not None else None
            for n, i in enumerate(indices):
                if cancel():
                    return
                pixels = ahead.result() if ahead is not None else None
                ahead = (
                    pool.submit(task.read, indices[n + 1])
                    if pool is not None and n + 1 < len(indices) else None
                )
                prog = None if step is None else (lambda d, t, i=i: step(i, d, t))
                yield task(i, cancel=cancel, progress=prog, pixels=pixels)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
