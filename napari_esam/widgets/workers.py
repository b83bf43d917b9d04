"""Run long work off the GUI thread with progress, for every widget of the plugin.

A *job* is a generator function taking no arguments: it ``yield``\\ s :class:`Progress`
objects and ``return``\\ s its result. The same job runs

* in a napari thread worker (:func:`start_worker`): progress and the result arrive on the
  GUI thread through Qt signals, and napari's activity dock shows a progress bar; or
* in the calling thread (:func:`run_sync`), for controllers used without Qt, tests and scripts.

Both report through the same three callbacks (``on_returned``, ``on_errored``,
``on_progress``), so a controller does not know which one runs it: it takes a :data:`Runner`.

Note: superqt's ``GeneratorWorker`` swallows a ``RuntimeError`` raised by the job (it takes it
for "worker deleted" and only warns). Jobs are therefore wrapped so that *every* exception
reaches ``on_errored``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

#: a job: a generator function yielding :class:`Progress` and returning the result
Job = Callable[[], Generator["Progress", None, Any]]


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` steps finished; ``text`` says what runs now."""

    done: int
    total: int
    text: str = ""

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, max(0.0, self.done / self.total))


@dataclass(frozen=True)
class JobFailed:
    """A job's exception with its formatted traceback (travels as a worker's return value)."""

    error: BaseException
    traceback: str


class Runner(Protocol):
    """Something that runs a job and reports back (:func:`run_sync`, :func:`start_worker`)."""

    def __call__(
        self,
        job: Job,
        *,
        on_returned: Callable[[Any], None],
        on_errored: Callable[[BaseException], None],
        on_progress: Callable[[Progress], None] | None = None,
        desc: str = "",
        total: int = 0,
    ) -> Any: ...


def _guarded(job: Job) -> Generator[Progress, None, Any]:
    """Run ``job``, turning any exception into a returned :class:`JobFailed`."""
    try:
        result = yield from job()
    except Exception as exc:  # noqa: BLE001 - reported to on_errored on the GUI thread
        return JobFailed(exc, traceback.format_exc())
    return result


def _dispatch(
    result: Any,
    on_returned: Callable[[Any], None],
    on_errored: Callable[[BaseException], None],
) -> None:
    if isinstance(result, JobFailed):
        on_errored(result.error)
    else:
        on_returned(result)


def run_sync(
    job: Job,
    *,
    on_returned: Callable[[Any], None],
    on_errored: Callable[[BaseException], None],
    on_progress: Callable[[Progress], None] | None = None,
    desc: str = "",
    total: int = 0,
) -> None:
    """Run ``job`` in the calling thread; callbacks are called before this returns."""
    gen = _guarded(job)
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            _dispatch(stop.value, on_returned, on_errored)
            return
        if on_progress is not None:
            on_progress(step)


def start_worker(
    job: Job,
    *,
    on_returned: Callable[[Any], None],
    on_errored: Callable[[BaseException], None],
    on_progress: Callable[[Progress], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    desc: str = "",
    total: int = 0,
    start: bool = True,
) -> Any:
    """Run ``job`` in a ``napari.qt.threading`` worker and return the worker.

    Callbacks run on the GUI thread. ``total`` > 0 (the number of ``yield``\\ s) shows a
    determinate bar in napari's activity dock, labelled ``desc``. With ``start=False`` the
    caller starts it (``worker.start()``), e.g. after connecting ``qtbot.waitSignal``.
    """
    from napari.qt.threading import create_worker

    progress_bar: dict[str, Any] = {"desc": desc or "napari-esam"}
    if total > 0:
        progress_bar["total"] = int(total)
    worker = create_worker(_guarded, job, _progress=progress_bar, _start_thread=False)
    worker.returned.connect(lambda result: _dispatch(result, on_returned, on_errored))
    worker.errored.connect(on_errored)  # only for errors outside the job (should not happen)
    if on_progress is not None:
        worker.yielded.connect(on_progress)
    if on_finished is not None:
        worker.finished.connect(on_finished)
    if start:
        worker.start()
    return worker


def qt_runner(job: Job, **kwargs: Any) -> Any:
    """:func:`start_worker` as a :data:`Runner` (starts at once)."""
    return start_worker(job, **kwargs)
