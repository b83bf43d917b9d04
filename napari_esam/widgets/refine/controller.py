"""The "Refine labels" widget's logic, without Qt (testable with a bare viewer).

The view (:mod:`napari_esam.widgets.refine.view`) fills a :class:`RefineForm` and calls
:meth:`RefineController.start` / :meth:`~RefineController.cancel`. The run is
:func:`~napari_esam.core.runs.refine.run_refine` in a worker thread on the image layer (its
last two axes are the plane; the current slice or every slice) and the labels layer, into a
scratch array; when it ends, the changed pixels are written into the labels layer on the GUI
thread as **one undo step**, and the objects kept as they were (refined mask disagreeing with
the original) are listed in the widget and in a notification (``docs/rules/refine.md``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.plane.refine import DEFAULT_BATCH, IOU_THRESHOLD
from napari_esam.core.runs.outputs import MemoryOutput
from napari_esam.core.runs.pipeline import BatchProgress, iter_progress
from napari_esam.core.runs.refine import (
    RefineRun,
    RefineSettings,
    _labels_dtype,
    open_labels,
    run_refine,
)
from napari_esam.core.runs.settings import ModelSpec, TilingParams, get_model
from napari_esam.core.runs.sources import StackSource
from napari_esam.core.tiling.grid import HALO, TILE

#: at most this many kept objects are named in the status line and the notification
MAX_NAMED = 12


@dataclass
class RefineForm:
    """What the user chose in the widget."""

    model: str = "mobilesam"
    device: str = "auto"
    checkpoint: str = ""
    iou_threshold: float = IOU_THRESHOLD
    #: give each mask to the decoder as mask input (where the model takes one)
    use_mask_input: bool = True
    #: every slice of a stack (else the slice shown in the viewer)
    whole_stack: bool = False
    #: use the image layer's contrast limits (else each plane's percentiles)
    layer_contrast: bool = True
    tiled: str = "auto"
    tile: int = TILE
    halo: int = HALO
    batch_size: int = DEFAULT_BATCH


@dataclass
class RefineState:
    """The running job: its layers, planes and the labels' fingerprints when it started."""

    labels_name: str
    source: StackSource
    output: MemoryOutput
    planes: list[int]
    fingerprints: dict[int, str]
    threshold: float
    asked_mask_input: bool = True
    worker: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class RefineOutcome:
    """What a finished run did to the labels layer."""

    run: RefineRun
    #: planes written into the layer (changed or not)
    applied: list[int]
    #: planes not written because the layer was edited while the run went
    skipped: list[int]
    changed_pixels: int
    #: planes asked for, the IoU threshold, whether the mask input was asked for
    requested: int = 0
    threshold: float = IOU_THRESHOLD
    asked_mask_input: bool = True
    source: StackSource | None = None


def _fingerprint(plane: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(plane).tobytes(), digest_size=16).hexdigest()


def _layer_data(layer: Any) -> Any:
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def kept_text(run: RefineRun, source: StackSource | None = None, limit: int = MAX_NAMED) -> str:
    """``"9 (IoU 0.01), slice 2: 15 (IoU 0.32)"``: the kept objects, at most ``limit``."""
    rows = []
    for i, kept in run.kept.items():
        where = ""
        if run.total > 1:
            coords = source.coords(i) if source is not None else (i,)
            where = f"slice {', '.join(str(c) for c in coords)}: "
        rows += [f"{where}{obj} (IoU {iou:.2f})" for obj, iou in kept]
    more = f", … {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(rows[:limit]) + more


class RefineController:
    """Builds the refine job from an image and a labels layer, runs it, writes the result.

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
        self.state: RefineState | None = None
        self.outcome: RefineOutcome | None = None
        self.on_progress: Callable[[BatchProgress], None] | None = None
        self.on_finished: Callable[[RefineOutcome], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

    # ------------------------------------------------------------------- choices
    def image_layers(self) -> list[str]:
        from napari.layers import Image

        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]

    def labels_layers(self) -> list[str]:
        from napari.layers import Labels

        return [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]

    @property
    def running(self) -> bool:
        return self.state is not None and self.state.worker is not None

    # --------------------------------------------------------------------- build
    def settings(self, form: RefineForm, image: Any) -> RefineSettings:
        checkpoint = form.checkpoint.strip() or None
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise ValueError(f"checkpoint file not found: {str(path)!r}")
            checkpoint = str(path.resolve())
        limits = None
        if form.layer_contrast:
            lo, hi = (float(v) for v in image.contrast_limits)
            limits = (lo, hi) if lo < hi else None
        spec = ModelSpec(form.model, checkpoint, form.device, None, self.model_factory)
        settings = RefineSettings(spec, float(form.iou_threshold), bool(form.use_mask_input),
                                  int(form.batch_size), limits,
                                  TilingParams(form.tiled, int(form.tile), int(form.halo)))
        settings.validate()
        return settings

    def current_plane(self, image: Any, source: StackSource) -> int:
        """The flat index of the slice the viewer shows (the image's leading axes)."""
        if not source.stack_axes:
            return 0
        point = np.asarray(image.world_to_data(self.viewer.dims.point), dtype=float)
        coords = []
        for axis, n in zip(source.stack_axes, source.stack_shape, strict=True):
            coords.append(int(min(max(round(float(point[axis])), 0), n - 1)))
        return int(np.ravel_multi_index(coords, source.stack_shape))

    # ----------------------------------------------------------------------- run
    def start(self, image_name: str, labels_name: str, form: RefineForm, *,
              start: bool = True) -> Any:
        """Validate, then start the job; returns the worker (``start=False``: not started,
        for tests that connect signals first)."""
        if self.running:
            raise RuntimeError("a refine run is already going")
        if not image_name or image_name not in self.viewer.layers:
            raise ValueError("choose the image layer the labels belong to")
        if not labels_name or labels_name not in self.viewer.layers:
            raise ValueError("choose a Labels layer to refine")
        image, labels = self.viewer.layers[image_name], self.viewer.layers[labels_name]
        if getattr(labels, "multiscale", False):
            raise ValueError(f"Labels layer {labels.name!r} is multiscale: refine needs one "
                             "level; use the CLI on the full-resolution labels")
        settings = self.settings(form, image)
        source = StackSource.create(_layer_data(image), axis=None,
                                    channel_axis=-1 if image.rgb else None)
        data = labels.data
        if tuple(data.shape) != source.out_shape:
            raise ValueError(
                f"Labels layer {labels.name!r} {tuple(data.shape)} and image layer "
                f"{image.name!r} {source.out_shape} differ in shape"
            )
        open_labels(data, source)  # integer, at least one object
        planes = (list(range(source.n_slices)) if form.whole_stack
                  else [self.current_plane(image, source)])
        output = MemoryOutput(source.out_shape, _labels_dtype(data))
        prints = {i: _fingerprint(np.asarray(data[source.out_region(i)])) for i in planes}
        state = RefineState(labels.name, source, output, planes, prints,
                            float(form.iou_threshold), bool(form.use_mask_input))
        self.state = state
        self.outcome = None
        return self._launch(state, self._job(state, settings, data), start)

    def _job(self, state: RefineState, settings: RefineSettings,
             labels: Any) -> Callable[[], Any]:
        def job():
            model = get_model(settings.model)
            return (yield from iter_progress(
                run_refine, state.source, labels, settings, state.output,
                indices=state.planes, model=model, cancel=state.cancel.is_set,
            ))

        return job

    def _launch(self, state: RefineState, job: Callable[[], Any], start: bool) -> Any:
        callbacks = {
            "on_returned": self._finished,
            "on_errored": self._errored,
            "on_progress": self._progress,
            "desc": "Refine labels",
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
        """Stop after the current decoder batch; finished slices are still written."""
        if self.state is not None:
            self.state.cancel.set()

    # ------------------------------------------------------------------ callbacks
    def _progress(self, ev: BatchProgress) -> None:
        if self.on_progress is not None:
            self.on_progress(ev)

    def _finished(self, run: RefineRun) -> None:
        state, self.state = self.state, None
        if state is None:
            return
        try:
            outcome = self._apply(state, run)
        except Exception as exc:  # noqa: BLE001 - reported like a job error
            self._errored(exc)
            return
        self.outcome = outcome
        self._notify(outcome)
        if self.on_finished is not None:
            self.on_finished(outcome)

    def _apply(self, state: RefineState, run: RefineRun) -> RefineOutcome:
        """Write the refined planes into the labels layer as one undo step (planes edited
        since the start are left alone)."""
        if state.labels_name not in self.viewer.layers:
            raise ValueError(f"the Labels layer {state.labels_name!r} was removed; nothing "
                             "was written")
        layer = self.viewer.layers[state.labels_name]
        source = state.source
        applied, skipped, changed_total = [], [], 0
        with layer.block_history():
            for i in sorted(run.counts):
                region = source.out_region(i)
                old = np.asarray(layer.data[region])
                if _fingerprint(old) != state.fingerprints.get(i):
                    skipped.append(i)
                    continue
                new = state.output.array[region]
                changed = new != old
                applied.append(i)
                if not changed.any():
                    continue
                changed_total += int(changed.sum())
                rows, cols = np.nonzero(changed)
                values = new[changed]
                lead = source.coords(i)
                for value in np.unique(values):
                    sel = values == value
                    where = tuple(np.full(int(sel.sum()), c) for c in lead) + (rows[sel],
                                                                               cols[sel])
                    layer.data_setitem(where, value.item(), refresh=False)
        layer.refresh()
        return RefineOutcome(run, applied, skipped, changed_total, len(state.planes),
                             state.threshold, state.asked_mask_input, source)

    def _notify(self, outcome: RefineOutcome) -> None:
        """A napari notification: a warning when objects were kept as they were or slices
        were left alone, else an info."""
        from napari.utils.notifications import show_info, show_warning

        text = "Refine labels: " + self.summary(outcome)
        if outcome.run.n_kept or outcome.skipped:
            show_warning(text)
        else:
            show_info(text)

    def _errored(self, exc: BaseException) -> None:
        self.state = None
        if self.on_error is not None:
            self.on_error(exc)
        else:
            raise exc

    def summary(self, outcome: RefineOutcome) -> str:
        """``"Refined 12 objects in 1 / 1 slice; 2 kept as they were (IoU below 0.5): 9 (IoU
        0.01), 15 (IoU 0.32)"``, with a note when the model has no mask input, a cancel, or
        slices edited meanwhile."""
        run = outcome.run
        n = sum(run.counts[i] for i in outcome.applied)
        head = "Cancelled after refining" if run.cancelled else "Refined"
        parts = [f"{head} {n} objects in {len(outcome.applied)} / {outcome.requested} "
                 f"slice{'s' if outcome.requested != 1 else ''}"]
        if run.n_kept:
            parts.append(f"{run.n_kept} kept as they were (IoU below {outcome.threshold:g}): "
                         f"{kept_text(run, outcome.source)}")
        if outcome.asked_mask_input and not run.mask_input:
            parts.append("this model has no mask input: box and point only")
        if outcome.skipped:
            parts.append(f"{len(outcome.skipped)} slice(s) edited meanwhile were left alone")
        return "; ".join(parts)
