"""Runs on a Dask cluster: :class:`DaskExecutor` for :func:`~napari_esam.core.runs.pipeline.
run_batch`.

``run_batch(path, settings, "out.zarr", executor=DaskExecutor(workers=4))`` runs one Dask task
per tile (a plane that is one tile is one task) on a local cluster of worker processes
(``workers=N``) or on an existing cluster (``scheduler="tcp://host:8786"``, e.g. one started
by dask-jobqueue or dask-kubernetes). No Qt here; ``distributed`` is an optional dependency
(``pip install "napari-esam[cluster]"``).

How the work is split:

* **Inputs travel as paths.** The task is a picklable
  :class:`~napari_esam.core.runs.tasks.TileTask` holding the input *path* and the output
  :class:`~napari_esam.core.runs.outputs.ZarrOutput`: each worker opens the input lazily and
  reads only its tile; the client never ships pixels.
* **Workers write.** A one-tile plane's task writes its labels into the Zarr store by region
  (chunked 1 along the stack axes, so no two tasks share a chunk); a tile of a several-tile
  plane writes its kept masks into its own group of the scratch store. Tasks return counts
  only. Ids need no coordination (``docs/rules/labels.md``). Only the client records finished
  tiles and planes, and merges a several-tile plane when its tiles are done.
* **One model per worker process**: the per-process model cache of ``settings.get_model``. On
  a worker with several visible GPUs the model goes to GPU ``n % count``, ``n`` being the
  number that ends the worker's name (LocalCluster names workers 0..N-1; ``dask worker
  --nworkers k`` names them NAME-0..NAME-(k-1)); with one visible GPU (per-worker
  ``CUDA_VISIBLE_DEVICES``, one GPU per pod/job) that one; CPU without CUDA.
* **Faults.** A task that raises is retried ``retries`` times; a task whose worker process
  dies is re-run on another worker (up to the scheduler's ``allowed-failures`` deaths, set
  for the local cluster from ``allowed_failures``). A failed job keeps every recorded plane
  and tile: running it again resumes.
* **Cancel** (``cancel()`` polled between results, or the generator closed): pending tasks
  are cancelled and a cluster-wide :class:`distributed.Event` tells running tasks to stop at
  their next point batch without writing; finished work stays recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_esam.core.runs.outputs import ZarrOutput
from napari_esam.core.runs.settings import ModelSpec
from napari_esam.core.runs.tasks import TaskResult, TileTask

try:  # optional: the plain module imports without distributed
    from distributed import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - exercised only without distributed
    _WorkerPluginBase = object

__all__ = [
    "DaskExecutor",
    "WorkerOptions",
    "check_task",
    "missing_distributed_message",
    "run_task",
    "worker_gpu",
]

log = logging.getLogger(__name__)

INSTALL_HINT = 'install napari-esam[cluster] (pip install "napari-esam[cluster]")'
#: seconds between checks of the cluster-wide cancel event inside a running task
CANCEL_CHECK_INTERVAL = 0.5
#: at most this many seconds to wait, after a cancel, for running tasks to stop
CANCEL_WAIT = 120.0


def missing_distributed_message() -> str:
    return f"running on a Dask cluster needs the 'distributed' package: {INSTALL_HINT}"


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(missing_distributed_message()) from exc
    return distributed


# ------------------------------------------------------------------------- worker side


def worker_gpu(name: Any, n_gpus: int) -> int | None:
    """The GPU index a worker called ``name`` uses among ``n_gpus`` visible ones.

    ``None`` without GPUs; the number ending the name modulo ``n_gpus`` (``3`` → 3,
    ``"SLURMCluster-4-1"`` → 1); 0 for a name without a number.
    """
    if n_gpus <= 0:
        return None
    match = re.search(r"(\d+)$", str(name))
    return int(match.group(1)) % n_gpus if match else 0


@dataclass(frozen=True)
class WorkerOptions:
    """How a task sets up its worker thread: ``torch_threads`` (None: leave as is) and
    whether to pin the model to this worker's GPU."""

    torch_threads: int | None = None
    pin_gpus: bool = True


class _CancelEvent:
    """``cancel()`` for a task: the cluster-wide event, checked at most every half second."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.event: Any = None
        self.last = -float("inf")
        self.state = False

    def __call__(self) -> bool:
        if self.state or self.name is None:
            return self.state
        now = time.monotonic()
        if now - self.last < CANCEL_CHECK_INTERVAL:
            return False
        self.last = now
        try:
            if self.event is None:
                self.event = _distributed().Event(self.name)
            self.state = bool(self.event.is_set())
        except Exception:  # noqa: BLE001 - no scheduler (e.g. called outside a cluster)
            log.debug("cannot check the cancel event %s", self.name, exc_info=True)
        return self.state


def _pinned_spec(spec: ModelSpec, options: WorkerOptions) -> ModelSpec:
    """``spec`` on this worker's GPU (and the thread's CUDA device set), else unchanged."""
    if not options.pin_gpus or spec.device not in ("auto", "cuda"):
        return spec
    import torch

    if not torch.cuda.is_available():
        return spec
    try:
        name = _distributed().get_worker().name
    except (ImportError, ValueError):  # not on a worker
        name = 0
    index = worker_gpu(name, torch.cuda.device_count())
    torch.cuda.set_device(index)  # per thread: for code that says just "cuda"
    return dataclasses.replace(spec, device=f"cuda:{index}")


def run_task(
    index: int,
    task: TileTask,
    options: WorkerOptions = WorkerOptions(),  # noqa: B008 - frozen, shared default is fine
    cancel_event: str | None = None,
) -> TaskResult | None:
    """The Dask task: :class:`~napari_esam.core.runs.tasks.TileTask` on flat tile ``index``
    (written into the output or the scratch store by the task).

    Returns the :class:`~napari_esam.core.runs.tasks.TaskResult` (counts only), or ``None``
    when the run was cancelled before the tile was done (nothing written).
    """
    from napari_esam.core.plane.everything import Cancelled

    if options.torch_threads:
        import torch

        torch.set_num_threads(options.torch_threads)
    cancel = _CancelEvent(cancel_event)
    if cancel():
        return None
    spec = _pinned_spec(task.settings.model, options)
    if spec is not task.settings.model:
        task = dataclasses.replace(
            task, settings=dataclasses.replace(task.settings, model=spec))
    try:
        return task(index, cancel=cancel)
    except Cancelled:
        return None


#: worker task states meaning "may still start or is still running"
_ACTIVE_STATES = frozenset(
    {"waiting", "ready", "constrained", "executing", "long-running", "cancelled", "resumed"}
)


def _active_tasks(prefix: str, dask_worker: Any = None) -> int:
    """How many of this worker's tasks whose key starts with ``prefix`` may still run."""
    try:
        tasks = list(dask_worker.state.tasks.values())
    except AttributeError:  # another distributed layout: do not block on it
        return 0
    return sum(1 for ts in tasks if str(ts.key).startswith(prefix) and ts.state in _ACTIVE_STATES)


def _missing_paths(paths: Sequence[str]) -> list[str]:
    """The paths this process cannot see (run on every worker before a job)."""
    return [p for p in paths if not os.path.exists(p)]


# ------------------------------------------------------------------------- client side


class DaskExecutor:
    """An :class:`~napari_esam.core.runs.executors.Executor` running one Dask task per tile.

    Give exactly one of ``workers`` (start a ``LocalCluster`` of that many single-threaded
    worker processes on this machine), ``scheduler`` (the address of a running cluster) or
    ``client`` (a connected ``distributed.Client``). The cluster/connection starts with the
    first :meth:`map` (or :meth:`start`) and is kept for later runs until :meth:`close`
    (also a context manager). A local cluster is closed then; an external one is left
    running.

    ``retries``: re-runs of a task that raised. ``allowed_failures``: worker deaths a task
    survives (local cluster; an external scheduler uses its own
    ``distributed.scheduler.allowed-failures``). ``torch_threads``: PyTorch threads per
    task (default: the CPU cores shared out among the local workers; for an external
    cluster Dask's worker default, 1). ``cluster_kwargs`` go to ``LocalCluster``.
    """

    def __init__(
        self,
        workers: int | None = None,
        scheduler: str | None = None,
        *,
        client: Any = None,
        retries: int = 2,
        allowed_failures: int = 3,
        torch_threads: int | None = None,
        pin_gpus: bool = True,
        dashboard: bool = False,
        poll: float = 0.1,
        cluster_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        given = sum(x is not None for x in (workers, scheduler, client))
        if given != 1:
            raise ValueError("give one of workers=N (a local cluster), scheduler=ADDRESS or "
                             "client=CLIENT")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if scheduler is not None and not str(scheduler).strip():
            raise ValueError("the scheduler address is empty (e.g. tcp://host:8786)")
        if retries < 0 or allowed_failures < 0:
            raise ValueError("retries and allowed_failures must be >= 0")
        _distributed()  # fail now, with the install hint, not at the first run
        self.workers = None if workers is None else int(workers)
        self.scheduler = None if scheduler is None else str(scheduler).strip()
        self.retries = int(retries)
        self.allowed_failures = int(allowed_failures)
        if torch_threads is None and self.workers is not None:
            torch_threads = max(1, (os.cpu_count() or 1) // self.workers)
        self.options = WorkerOptions(torch_threads, pin_gpus)
        self.dashboard = dashboard
        self.poll = poll
        self.cluster_kwargs = dict(cluster_kwargs or {})
        self._client = client
        self._own_client = client is None
        self._cluster: Any = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Any:
        """Start the local cluster / connect to the scheduler (once); returns the client."""
        with self._lock:
            if self._client is None:
                dist = _distributed()
                if self.scheduler is not None:
                    self._client = dist.Client(self.scheduler)
                else:
                    import dask

                    kwargs = {
                        "n_workers": self.workers,
                        "threads_per_worker": 1,
                        "processes": True,
                        "dashboard_address": ":0" if self.dashboard else None,
                        "silence_logs": logging.ERROR,
                        **self.cluster_kwargs,
                    }
                    config = {"distributed.scheduler.allowed-failures": self.allowed_failures}
                    with dask.config.set(config):
                        self._cluster = dist.LocalCluster(**kwargs)
                    self._client = dist.Client(self._cluster)
            return self._client

    @property
    def client(self) -> Any:
        return self.start()

    def describe(self) -> str:
        """``"local Dask cluster, 4 workers at tcp://..."`` (starts it)."""
        client = self.start()
        n = len(client.scheduler_info().get("workers", {}))
        where = "local Dask cluster" if self._cluster is not None else "Dask cluster"
        text = f"{where}, {n} worker{'s' * (n != 1)} at {client.scheduler.address}"
        link = getattr(client, "dashboard_link", None) if self.dashboard else None
        return f"{text} (dashboard {link})" if link else text

    def close(self) -> None:
        """Disconnect; a local cluster is shut down (its workers stop)."""
        with self._lock:
            client, cluster = self._client, self._cluster
            self._cluster = None
            if self._own_client:
                self._client = None
                if client is not None:
                    client.close()
            if cluster is not None:
                cluster.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------- run
    #: the driver calls it before it creates anything (:func:`check_task`)
    check = staticmethod(lambda task: check_task(task))

    def map(
        self,
        task: TileTask,
        indices: Sequence[int],
        *,
        cancel: Callable[[], bool],
        step: Callable[[int, int, int], None] | None = None,
    ) -> Iterator[TaskResult]:
        """Run ``task(i)`` for every index as Dask tasks; yield results as they finish.

        ``step`` (progress inside a task) is not reported from workers.
        """
        check_task(task)
        task = dataclasses.replace(task, model=None)  # workers load their own
        paths = [str(task.source.data), str(task.output.path)]
        paths += [p for p in (task.scratch, task.store) if p]
        yield from self._run(run_task, list(indices), {"task": task}, paths, cancel)

    def _run(
        self,
        func: Callable[..., Any],
        indices: list[int],
        task_kwargs: dict[str, Any],
        paths: Sequence[str],
        cancel: Callable[[], bool],
    ) -> Iterator[Any]:
        """``func(i, **task_kwargs, options=..., cancel_event=...)`` for every index as
        Dask tasks (keys ``napari-esam-task-TOKEN-i``); results (not ``None``) as they
        finish. Pending tasks are cancelled, and running ones told to stop, when this ends
        early."""
        if not indices:
            return
        dist = _distributed()
        client = self.start()
        self._check_paths(client, paths)
        token = uuid.uuid4().hex[:8]
        prefix = f"napari-esam-task-{token}-"
        event = dist.Event(f"napari-esam-cancel-{token}", client=client)
        pending: dict[str, Any] = {}
        try:
            futures = client.map(
                func, indices, **task_kwargs, options=self.options,
                cancel_event=event.name, key=[f"{prefix}{i}" for i in indices],
                pure=False, retries=self.retries,
            )
            pending = {f.key: f for f in futures}
            done = dist.as_completed(futures)
            del futures
            while pending:
                if cancel():
                    return
                ready = done.next_batch(block=False)
                if not ready:
                    time.sleep(self.poll)
                    continue
                for fut in ready:
                    pending.pop(fut.key, None)
                    result = fut.result()  # the task's error (after retries) or KilledWorker
                    fut.release()
                    if result is not None:
                        yield result
        finally:
            with contextlib.suppress(Exception):
                event.set()  # running tasks stop at their next point batch, writing nothing
            if pending:
                with contextlib.suppress(Exception):
                    client.cancel(list(pending.values()))
                    self._wait_stopped(client, prefix)

    def _wait_stopped(self, client: Any, prefix: str) -> None:
        """Wait until no worker runs (or is about to run) a task of this job, so nothing of
        it writes after :meth:`map` ends (a rerun or an overwrite may start at once)."""
        deadline = time.monotonic() + CANCEL_WAIT
        while sum(client.run(_active_tasks, prefix).values()):
            if time.monotonic() > deadline:
                log.warning("tasks %s* are still running after the cancel", prefix)
                return
            time.sleep(self.poll)

    def _check_paths(self, client: Any, paths: Sequence[str]) -> None:
        """Every connected worker must see the input and the output (a shared filesystem)."""
        missing = client.run(_missing_paths, [str(p) for p in paths])
        for worker, lost in sorted(missing.items()):
            if lost:
                raise FileNotFoundError(
                    f"Dask worker {worker} cannot see {lost[0]!r}: the input and the output "
                    "must be on a filesystem that every worker mounts at the same path"
                )


def check_task(task: TileTask) -> None:
    """A task a cluster can run: the input a file path, the output a Zarr store."""
    if not isinstance(task.output, ZarrOutput):
        raise ValueError(
            "a Dask run writes the labels into a Zarr store from the workers: give a .zarr "
            "output (CLI: -o OUT.zarr or OUT.tif; widget: a Zarr path)"
        )
    if not isinstance(task.source.data, str) or not Path(task.source.data).exists():
        raise ValueError(
            "a Dask run reads the input from a file every worker can open (TIFF, Zarr, .npy, "
            "PNG/JPEG), not an in-memory array: save the image to a file, or run in-process"
        )
