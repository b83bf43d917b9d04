"""The "Export labels" section's logic, without Qt: which layer, where, in which format.

The view (:mod:`napari_esam.widgets.export.view`) fills an :class:`ExportForm`, asks the
user before replacing an existing path, then calls :meth:`ExportController.start`. The write
itself is :func:`napari_esam.core.io.label_files.write_labels` (a temporary sibling renamed into
place when complete), run as a job yielding :class:`~napari_esam.widgets.workers.Progress`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_esam.widgets.workers import Progress

#: (suffix, label) of the export formats
FORMATS = ((".zarr", "OME-Zarr (.zarr)"), (".tif", "TIFF (.tif)"))
#: ``write_labels`` compressions ("auto": zstd for Zarr, zlib for TIFF)
COMPRESSIONS = ("auto", "zstd", "zlib", "none")
_SUFFIXES = (".zarr", ".tif", ".tiff")


@dataclass
class ExportForm:
    """What the user chose: layer name, format suffix, target path, compression."""

    layer: str = ""
    fmt: str = ".zarr"
    path: str = ""
    compression: str = "auto"


class ExportCancelled(Exception):
    """Raised from the progress callback to stop ``write_labels`` (which then cleans up)."""


def with_format(path: str, fmt: str) -> str:
    """``path`` ending in the format's suffix: a known suffix is replaced, else appended
    (``cells`` → ``cells.zarr``; ``cells.tif`` + ``.zarr`` → ``cells.zarr``; ``.tiff`` stays
    for TIFF)."""
    text = path.strip()
    if not text:
        return text
    low = text.lower()
    if fmt == ".tif" and low.endswith((".tif", ".tiff")):
        return text
    for suffix in _SUFFIXES:
        if low.endswith(suffix):
            return text[: -len(suffix)] + fmt
    return text + fmt


def format_of(path: str) -> str | None:
    """The format suffix a path names (``.tiff`` → ``.tif``), or None."""
    low = path.strip().lower()
    if low.endswith(".zarr"):
        return ".zarr"
    if low.endswith((".tif", ".tiff")):
        return ".tif"
    return None


def layer_export_kwargs(layer: Any) -> dict[str, Any]:
    """``write_labels`` keywords for a Labels layer: its full-resolution data, scale,
    translate, axis names and units (when napari's fit), and name."""
    from napari_esam._writer import _axes_from_labels, _units

    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    ndim = len(data.shape)
    return {
        "data": data,
        "scale": [float(v) for v in layer.scale],
        "translate": [float(v) for v in layer.translate],
        "axes": _axes_from_labels(getattr(layer, "axis_labels", None), ndim),
        "units": _units(getattr(layer, "units", None), ndim),
        "name": layer.name,
    }


def _reads_from(layer: Any, data: Any, target: Path) -> bool:
    """Whether the layer's data lives at ``target`` (its file, or a store inside it)."""
    places = []
    path = getattr(getattr(layer, "source", None), "path", None)
    if path:
        places.append(Path(path))
    root = getattr(getattr(data, "store", None), "root", None)
    if root is not None:
        places.append(Path(str(root)))
    target = target.resolve()
    for place in places:
        place = place.expanduser().resolve()
        if place == target or target in place.parents:
            return True
    return False


class ExportController:
    """Validates an :class:`ExportForm` and runs the export in a job.

    ``runner``: :func:`~napari_esam.widgets.workers.start_worker` (default) or
    :func:`~napari_esam.widgets.workers.run_sync`. Results arrive through ``on_progress``
    (:class:`Progress`), ``on_finished`` (the written path, or ``None`` when cancelled) and
    ``on_error``.
    """

    def __init__(self, viewer: Any, *, runner: Callable[..., Any] | None = None) -> None:
        self.viewer = viewer
        self.runner = runner
        self.worker: Any = None
        self._cancel = threading.Event()
        self.on_progress: Callable[[Progress], None] | None = None
        self.on_finished: Callable[[Path | None], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

    def labels_layers(self) -> list[str]:
        from napari.layers import Labels

        return [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]

    @property
    def running(self) -> bool:
        return self.worker is not None

    def target(self, form: ExportForm) -> Path:
        """The path the form exports to (its suffix follows the format); raises
        ``ValueError``/``FileNotFoundError`` for a bad choice. Does not look at existence."""
        if not form.layer or form.layer not in self.viewer.layers:
            raise ValueError("choose a Labels layer to export")
        if form.fmt not in {f for f, _ in FORMATS}:
            raise ValueError(f"unknown format {form.fmt!r}")
        if form.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {form.compression!r}")
        text = with_format(form.path, form.fmt)
        if not text:
            raise ValueError("choose a path to export to")
        target = Path(text).expanduser()
        if not target.parent.is_dir():
            raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist")
        return target

    def start(self, form: ExportForm, *, overwrite: bool = False, start: bool = True) -> Any:
        """Export ``form.layer``; ``overwrite`` only after the user agreed to replace the
        path. Returns the worker (``start=False``: not started yet)."""
        if self.running:
            raise RuntimeError("an export is already running")
        target = self.target(form)
        layer = self.viewer.layers[form.layer]
        kwargs = layer_export_kwargs(layer)
        if _reads_from(layer, kwargs["data"], target):
            raise ValueError(
                f"layer {layer.name!r} is read from {str(target)!r}: export it to another path"
            )
        compression = None if form.compression == "none" else form.compression
        self._cancel.clear()
        job = self._job(target, kwargs, overwrite, compression)
        callbacks = {
            "on_returned": self._finished,
            "on_errored": self._errored,
            "on_progress": self._progress,
            "desc": f"Export {layer.name}",
        }
        if self.runner is None:
            from napari_esam.widgets.workers import start_worker

            worker = start_worker(job, start=start, **callbacks)
        else:
            worker = self.runner(job, **callbacks)
            if worker is None:  # a synchronous runner: already finished
                return None
        self.worker = worker
        return worker

    def cancel(self) -> None:
        """Stop the running export; the target stays as it was (nothing half-written)."""
        self._cancel.set()

    def _job(
        self, target: Path, kwargs: dict[str, Any], overwrite: bool, compression: str | None
    ) -> Callable[[], Generator[Progress, None, Path | None]]:
        from napari_esam.core.io.label_files import write_labels

        cancel = self._cancel

        def job() -> Generator[Progress, None, Path | None]:
            events: queue.Queue = queue.Queue()
            stop = threading.Event()

            def progress(done: int, total: int) -> None:
                if stop.is_set() or cancel.is_set():
                    raise ExportCancelled
                events.put(("progress", Progress(done, total, f"writing {target.name}")))

            def write() -> None:
                try:
                    path = write_labels(target, kwargs["data"], scale=kwargs["scale"],
                                        translate=kwargs["translate"], axes=kwargs["axes"],
                                        units=kwargs["units"], name=kwargs["name"],
                                        overwrite=overwrite, compression=compression,
                                        progress=progress)
                    events.put(("done", path))
                except ExportCancelled:
                    events.put(("done", None))
                except BaseException as exc:  # noqa: BLE001 - handed to the job's caller
                    events.put(("error", exc))

            thread = threading.Thread(target=write, name="napari-esam-export", daemon=True)
            thread.start()
            try:
                while True:
                    kind, value = events.get()
                    if kind == "progress":
                        yield value
                    elif kind == "done":
                        return value
                    else:
                        raise value
            finally:
                stop.set()  # a closed job cancels the write, which removes its temporary
                thread.join()

        return job

    def _progress(self, step: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(step)

    def _finished(self, path: Path | None) -> None:
        self.worker = None
        if self.on_finished is not None:
            self.on_finished(path)

    def _errored(self, exc: BaseException) -> None:
        self.worker = None
        if self.on_error is not None:
            self.on_error(exc)
        else:
            raise exc


def default_path(layer_name: str, fmt: str, folder: str | os.PathLike | None = None) -> str:
    """A suggested target: ``FOLDER/<layer name>.zarr`` (characters unsafe in file names
    replaced by ``_``)."""
    safe = "".join(c if c.isalnum() or c in "-_. " else "_" for c in layer_name).strip()
    return str(Path(folder or Path.cwd()) / f"{safe or 'labels'}{fmt}")
