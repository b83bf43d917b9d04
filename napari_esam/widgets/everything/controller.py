"""The "Segment everything" widget's logic, without Qt (testable with a bare viewer).

The view (:mod:`napari_esam.widgets.everything.view`) fills an :class:`EverythingForm`, calls
:meth:`EverythingController.start` and :meth:`~EverythingController.cancel`, and shows what
the controller reports through ``on_progress`` / ``on_finished`` / ``on_error``. The run is
:func:`~napari_esam.core.runs.pipeline.run_batch` in a worker thread, tiled or not by the
one tiling rule (``form.tiled``, ``docs/rules/tiling.md``); progress counts slices, and tiles
when planes are tiled.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_esam.core.linking.stack import link_labels
from napari_esam.core.linking.tracks import tracks_data
from napari_esam.core.runs.linked import check_linkable
from napari_esam.core.runs.outputs import MemoryOutput, ZarrOutput
from napari_esam.core.runs.pipeline import BatchProgress, BatchResult, iter_batch
from napari_esam.core.runs.settings import (
    MERGE_IOU,
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
    get_model,
    output_dtype,
)
from napari_esam.core.runs.sources import StackSource
from napari_esam.core.tiling.grid import HALO, TILE, use_tiling

#: ``stack_axis`` value meaning "every axis but the image plane"
AUTO_AXIS = None
#: the link choices: per-slice ids, 3-D objects, tracks
LINK_CHOICES = ("off", "3d", "track")
#: where the slices run: (value, label) for ``EverythingForm.executor``
EXECUTORS = (
    ("in-process", "this process"),
    ("local-cluster", "local Dask cluster"),
    ("scheduler", "Dask scheduler"),
)

@dataclass
class EverythingForm:
    """What the user chose in the widget."""

    model: str = "mobilesam"
    device: str = "auto"
    checkpoint: str = ""
    params: EverythingParams = field(default_factory=EverythingParams)
    #: use the layer's contrast limits for every slice (else each slice's percentiles)
    layer_contrast: bool = True
    id_scope: str = "stack"
    stack_axis: int | None = AUTO_AXIS
    to_layer: bool = True
    zarr_path: str = ""
    overwrite: bool = False
    #: one of the :data:`EXECUTORS` values; the Dask ones need a file layer and a Zarr path
    executor: str = "in-process"
    #: worker processes of a local Dask cluster
    workers: int = 2
    #: address of a running Dask scheduler (``tcp://host:8786``)
    scheduler: str = ""
    #: tiled mode: one of :data:`TILED_MODES` (see :func:`use_tiling`)
    tiled: str = "auto"
    #: tile side and overlap in pixels (tiled mode)
    tile: int = TILE
    halo: int = HALO
    #: IoU inside the tiles' overlap from which two tiles' masks are one object
    merge_iou: float = MERGE_IOU
    #: embedding store (``napari-esam embed`` or an earlier run; reused and filled; "" = none)
    embeddings: str = ""
    #: link the slices' objects: ``"off"``, ``"3d"`` (3-D objects) or ``"track"`` (tracks)
    link: str = "off"


@dataclass
class RunState:
    """The running (or last) job."""

    layer_name: str
    source: StackSource
    output: ZarrOutput | MemoryOutput
    labels_layer: Any = None
    worker: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    last: BatchProgress | None = None
    #: ``viewer.add_labels`` keywords for a Zarr output's layer, made at the first report
    #: (once the worker has created or reopened the store)
    layer_kwargs: dict[str, Any] | None = None
    #: ``"off"``, ``"3d"`` or ``"track"``; the link's result once the run is complete
    link_mode: str = "off"
    link: Any = None
    #: the run replaces an existing Zarr output (it writes beside it until done)
    overwrite: bool = False


def format_seconds(seconds: float | None) -> str:
    """``75`` → ``"1:15"``; ``3725`` → ``"1:02:05"``; ``None`` → ``"?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_text(ev: BatchProgress) -> str:
    """``"2 / 5 slices · 0:42 left"`` (the progress bar's text); when planes are tiled,
    tiles: ``"7 / 12 tiles · 0:10 left"``."""
    if ev.tiles_total > ev.total:
        text = f"{ev.tiles_done} / {ev.tiles_total} tiles"
    else:
        text = f"{ev.done} / {ev.total} slices"
    if ev.kind == "start":
        return text + " · starting"
    return f"{text} · {format_seconds(ev.eta)} left"


def counts_rows(result: BatchResult, source: StackSource) -> list[tuple[str, int]]:
    """(slice label, object count) rows, labelled by stack coordinates."""
    rows = []
    for index, n in result.counts.items():
        coords = source.coords(index)
        label = ", ".join(str(c) for c in coords) if coords else "image"
        rows.append((label, n))
    return rows


class EverythingController:
    """Builds the batch job from a layer and a form, runs it, updates the result layer.

    ``runner`` is :func:`napari_esam.widgets.workers.start_worker` (default) or
    :func:`~napari_esam.widgets.workers.run_sync`; ``model_factory`` (tests, custom models)
    replaces loading ``form.model``.
    """

    def __init__(
        self,
        viewer: Any,
        *,
        runner: Callable[..., Any] | None = None,
        model_factory: Callable[[], Any] | str | None = None,
    ) -> None:
        self.viewer = viewer
        self.runner = runner
        self.model_factory = model_factory
        self.state: RunState | None = None
        self.result: BatchResult | None = None
        #: the source of the last run started (for labelling its counts)
        self.last_source: StackSource | None = None
        self.on_progress: Callable[[BatchProgress], None] | None = None
        self.on_finished: Callable[[BatchResult], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

    # ------------------------------------------------------------------- choices
    def image_layers(self) -> list[str]:
        from napari.layers import Image

        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]

    def axis_choices(self, layer_name: str | None) -> list[tuple[str, int | None]]:
        """(label, value) choices for the stack axis of a layer."""
        if not layer_name or layer_name not in self.viewer.layers:
            return [("auto", AUTO_AXIS)]
        layer = self.viewer.layers[layer_name]
        ndim = layer.ndim  # excludes an RGB axis
        if ndim == 2:
            return [("none (2-D image)", AUTO_AXIS)]
        names = list(self.viewer.dims.axis_labels)[-ndim:]
        if ndim == 3:
            return [
                (f"{a} ({names[a]})" if len(names) == 3 and _is_name(names[a]) else str(a), a)
                for a in range(3)
            ]
        return [(f"axes 0-{ndim - 3} (every slice)", AUTO_AXIS)]

    @property
    def running(self) -> bool:
        return self.state is not None and self.state.worker is not None

    def is_tiled(self, layer_name: str | None, mode: str,
                 stack_axis: int | None = AUTO_AXIS) -> bool:
        """Whether tiled mode ``mode`` tiles the planes of layer ``layer_name`` (level 0 of a
        multiscale layer; ``False`` without a layer) cut along ``stack_axis`` (as
        :meth:`source` does: a 3-D layer's planes are its other two axes). See
        :func:`use_tiling`."""
        if not layer_name or layer_name not in self.viewer.layers:
            return False
        layer = self.viewer.layers[layer_name]
        shape = tuple(_layer_data(layer).shape)
        if layer.rgb:
            shape = shape[:-1]
        if stack_axis is not None and len(shape) == 3:
            shape = tuple(s for a, s in enumerate(shape) if a != stack_axis % 3)
        return use_tiling(mode, shape[-2:])

    # --------------------------------------------------------------------- build
    def settings(self, form: EverythingForm, layer: Any) -> BatchSettings:
        params = form.params
        if form.layer_contrast:
            lo, hi = (float(v) for v in layer.contrast_limits)
            params = _replace(params, contrast_limits=(lo, hi))
        else:
            params = _replace(params, contrast_limits=None)
        checkpoint = form.checkpoint.strip() or None
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise ValueError(f"checkpoint file not found: {str(path)!r}")
            checkpoint = str(path.resolve())
        spec = ModelSpec(form.model, checkpoint, form.device, None, self.model_factory)
        tiling = TilingParams(form.tiled, int(form.tile), int(form.halo), form.merge_iou)
        settings = BatchSettings(spec, params, form.id_scope, tiling)
        settings.validate()
        return settings

    def source(self, form: EverythingForm, layer: Any) -> StackSource:
        """The layer's data cut into slices; for a Dask run, the layer's *file* (the workers
        read it themselves), which must hold exactly the layer's data."""
        data = _layer_data(layer)
        channel_axis = -1 if layer.rgb else None
        axis = form.stack_axis
        if axis is not None and layer.ndim == 2:
            axis = None
        if form.executor == "in-process":
            return StackSource.create(data, axis=axis, channel_axis=channel_axis)
        path = getattr(getattr(layer, "source", None), "path", None)
        if not path:
            raise ValueError(
                f"a Dask run reads the image from its file, and layer {layer.name!r} has "
                "none: open the image from a TIFF or Zarr file, or run in this process"
            )
        source = StackSource.create(path, axis=axis, channel_axis=channel_axis)
        if source.shape != tuple(data.shape):
            raise ValueError(
                f"the file of layer {layer.name!r} ({path}) holds an array of shape "
                f"{source.shape}, not the layer's {tuple(data.shape)}: a Dask run needs the "
                "whole file as one layer; run in this process"
            )
        return source

    def executor(self, form: EverythingForm) -> Any:
        """The Dask executor the form asks for (not started), or ``None`` (in-process)."""
        if form.executor == "in-process":
            return None
        if form.executor not in {value for value, _ in EXECUTORS}:
            raise ValueError(f"unknown executor {form.executor!r}")
        if not form.zarr_path.strip():
            raise ValueError("a Dask run writes into a Zarr store: choose a Zarr path")
        from napari_esam.core.runs.cluster import DaskExecutor

        if form.executor == "local-cluster":
            return DaskExecutor(workers=form.workers)
        if not form.scheduler.strip():
            raise ValueError("enter the Dask scheduler's address, e.g. tcp://host:8786")
        return DaskExecutor(scheduler=form.scheduler)

    # ----------------------------------------------------------------------- run
    def start(self, layer_name: str, form: EverythingForm, *, start: bool = True) -> Any:
        """Validate, prepare the output and the result layer, start the job; returns the
        worker (``start=False``: not started yet, for tests that connect signals first)."""
        if self.running:
            raise RuntimeError("a segment-everything run is already going")
        if not layer_name or layer_name not in self.viewer.layers:
            raise ValueError("choose an image layer to segment")
        layer = self.viewer.layers[layer_name]
        if not form.to_layer and not form.zarr_path.strip():
            raise ValueError("choose an output: a new Labels layer and/or a Zarr path")
        settings = self.settings(form, layer)
        executor = self.executor(form)
        source = self.source(form, layer)
        scale = list(layer.scale)[-len(source.out_shape) :]
        translate = list(layer.translate)[-len(source.out_shape) :]
        embeddings = form.embeddings.strip() or None
        if embeddings is not None:
            store = Path(embeddings).expanduser()
            if store.suffix.lower() != ".zarr":
                raise ValueError(f"the embedding store must be a .zarr folder, not {str(store)!r}")
            if not store.parent.is_dir():
                raise ValueError(f"the folder of the embedding store {str(store.parent)!r} does "
                                 "not exist")
            embeddings = str(store)
        name = f"{layer.name} everything"
        layer_kwargs = {"name": name, "scale": scale, "translate": translate,
                        "metadata": {"napari-esam": {"source": layer.name}}}
        if form.zarr_path.strip():
            path = Path(form.zarr_path.strip()).expanduser()
            if path.suffix.lower() != ".zarr":
                raise ValueError(f"the output path must end in .zarr, not {str(path)!r}")
            if not path.parent.is_dir():
                raise ValueError(f"directory {str(path.parent)!r} does not exist")
            output: ZarrOutput | MemoryOutput = ZarrOutput(path)
        else:
            grid = settings.tiling.grid(source.plane_shape)
            output = MemoryOutput(source.out_shape,
                                  output_dtype(source.n_slices, settings, grid))
        if form.link not in LINK_CHOICES:
            raise ValueError(f"link must be one of {LINK_CHOICES}, not {form.link!r}")
        if form.link != "off":
            check_linkable(tuple(source.stack_shape), 0)
        state = RunState(layer_name, source, output, overwrite=form.overwrite,
                         link_mode=form.link)
        if form.to_layer and isinstance(output, MemoryOutput):
            state.labels_layer = self.viewer.add_labels(output.array, **layer_kwargs)
        elif form.to_layer:
            state.layer_kwargs = layer_kwargs
        self.state = state
        self.result = None
        self.last_source = source
        run_kwargs = {"overwrite": form.overwrite, "embeddings": embeddings, "scale": scale,
                      "translate": translate, "name": name}
        job = self._job(state, settings, executor, run_kwargs)
        return self._launch(state, job, start)

    def _launch(self, state: RunState, job: Callable[[], Any], start: bool) -> Any:
        callbacks = {
            "on_returned": self._finished,
            "on_errored": self._errored,
            "on_progress": self._progress,
            "desc": "Segment everything",
        }
        if self.runner is None:
            from napari_esam.widgets.workers import start_worker

            worker = start_worker(job, start=start, **callbacks)
        else:
            worker = self.runner(job, **callbacks)
        if self.state is state:  # a synchronous runner has already finished
            state.worker = worker
        return worker

    def cancel(self) -> None:
        """Ask the running job to stop after the current point batch (finished slices stay;
        on a Dask cluster, pending tasks are dropped and running ones stop). With a Zarr
        output, finished tiles are kept too: running it again computes only the others."""
        if self.state is not None:
            self.state.cancel.set()

    def _job(
        self, state: RunState, settings: BatchSettings, executor: Any,
        run_kwargs: dict[str, Any],
    ) -> Callable[[], Any]:
        def job():
            try:
                model = None
                if run_kwargs["embeddings"] is not None and executor is not None:
                    # only for the store's signature: on this machine (maybe without a GPU)
                    # the CPU copy; the workers load their own
                    model = get_model(dataclasses.replace(settings.model, device="cpu"))
                result = yield from iter_batch(
                    state.source, settings, state.output, cancel=state.cancel.is_set,
                    executor=executor, model=model, **run_kwargs,
                )
                if state.link_mode != "off" and result.complete and not result.cancelled:
                    state.link = link_labels(
                        result.labels, mode=state.link_mode, axis=0,
                        cancel=state.cancel.is_set,
                    )
                return result
            finally:
                if executor is not None:
                    executor.close()  # a local cluster stops; a remote one is left running

        return job

    # ------------------------------------------------------------------ callbacks
    def _progress(self, ev: BatchProgress) -> None:
        state = self.state
        if state is None:
            return
        state.last = ev
        if (ev.kind == "start" and state.labels_layer is None
                and state.layer_kwargs is not None and isinstance(state.output, ZarrOutput)):
            state.labels_layer = self.viewer.add_labels(self._working_labels(state),
                                                        **state.layer_kwargs)
        if ev.kind == "slice" and state.labels_layer is not None:
            state.labels_layer.refresh()
        if self.on_progress is not None:
            self.on_progress(ev)

    @staticmethod
    def _working_labels(state: RunState) -> Any:
        """The labels the run writes into: the output, or the hidden sibling that replaces
        it when done (``docs/rules/outputs.md#replacement``); the output once swapped."""
        try:
            return state.output.working_output(state.overwrite).read_only()
        except Exception:  # noqa: BLE001 - already moved into place by a fast run
            return state.output.read_only()

    def _finished(self, result: BatchResult) -> None:
        state, self.state = self.state, None
        self.result = result
        if state is not None and state.labels_layer is not None:
            layer = state.labels_layer
            if isinstance(result.output, ZarrOutput):  # where the labels are now
                layer.data = result.labels
            meta = {
                "source": state.layer_name,
                "counts": {int(k): int(v) for k, v in result.counts.items()},
                "complete": result.complete,
            }
            grid = result.details.get("grid")
            if grid is not None and grid.n_tiles > 1:
                meta["tiled"] = {"tile": grid.tile, "halo": grid.halo}
            layer.metadata = {**layer.metadata, "napari-esam": meta}
            layer.refresh()
        if state is not None and state.link is not None:
            self._show_link(state)
        if self.on_finished is not None:
            self.on_finished(result)

    def _show_link(self, state: RunState) -> None:
        """Layers of the linked result: labels (one id per 3-D object or track) and, for
        tracks, a Tracks layer (napari's [track_id, t, y, x])."""
        link = state.link
        source_layer = self.viewer.layers[state.layer_name] if (
            state.layer_name in self.viewer.layers) else None
        n = len(link.shape)
        scale = list(source_layer.scale)[-n:] if source_layer is not None else [1.0] * n
        translate = (list(source_layer.translate)[-n:] if source_layer is not None
                     else [0.0] * n)
        what = "3-D objects" if state.link_mode == "3d" else "tracks"
        self.viewer.add_labels(
            link.labels, name=f"{state.layer_name} {what}", scale=scale, translate=translate,
            metadata={"napari-esam": {"source": state.layer_name, "link": state.link_mode,
                                      "objects": int(link.n_objects)}},
        )
        if state.link_mode == "track" and link.n_objects:
            # [track_id, t, (other stack axes,) y, x]: the labels' axes, linked along axis 0
            self.viewer.add_tracks(
                tracks_data(link), name=f"{state.layer_name} tracks (centroids)",
                scale=scale, translate=translate,
            )

    def _errored(self, exc: BaseException) -> None:
        self.state = None
        if self.on_error is not None:
            self.on_error(exc)
        else:
            raise exc

    def summary(self, result: BatchResult) -> str:
        """``"Done: 3 / 3 slices, 42 objects (0:12)"``; a cancelled run with tiled planes
        also says how many tiles it kept (a Zarr run resumes from them)."""
        n = sum(result.counts.values())
        done = len(result.counts)
        head = "Cancelled" if result.cancelled else "Done"
        tiles = ""
        grid = result.details.get("grid")
        if result.cancelled and grid is not None and grid.n_tiles > 1:
            tiles_total = (result.details.get("tiles", 0) + result.details.get("skipped", 0))
            tiles = f" ({result.details.get('tiles_done', 0)} / {tiles_total} tiles)"
        return (
            f"{head}: {done} / {result.total} slices{tiles}, {n} objects "
            f"({format_seconds(result.elapsed)})"
        )


def _replace(params: EverythingParams, **changes: Any) -> EverythingParams:
    return dataclasses.replace(params, **changes)


def _layer_data(layer: Any) -> Any:
    """A layer's full-resolution data (level 0 of a multiscale layer)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def _is_name(label: str) -> bool:
    """Whether a napari axis label is a real name (not the default "0" / "-3")."""
    return not str(label).lstrip("-").isdigit()
