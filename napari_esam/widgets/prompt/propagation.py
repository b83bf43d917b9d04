""""Segment through stack" for the prompt controller, without Qt: seeds from the prompts of
each slice, the propagation job (``core/volume/propagation.py`` does the rule) and painting
the result. The controller (:mod:`.controller`) owns the state and the layers."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_esam.core.tiling.predictor import MaskPrompt, PromptEngine, TiledMask
from napari_esam.core.volume.propagation import (
    PropagationParams,
    SliceMask,
    SlicePrompt,
    iter_propagate,
)
from napari_esam.widgets.workers import Job, Progress

__all__ = ["Propagated", "propagation_job", "slice_plane", "slice_mask", "paint"]


@dataclass
class Propagated:
    """A propagation result waiting for commit: per slice index along ``axis``, one
    :class:`SliceMask` (or ``None``) per object; ``plane`` is the prompted plane."""

    layer_id: Hashable
    plane: Any  # controller.Plane
    axis: int
    masks: dict[int, list[SliceMask | None]]

    @property
    def n_objects(self) -> int:
        return len(next(iter(self.masks.values()))) if self.masks else 0

    @property
    def slices(self) -> list[int]:
        return sorted(self.masks)


def slice_plane(plane: Any, axis: int, index: int) -> Any:
    """``plane`` moved to slice ``index`` along stack axis ``axis``."""
    new = tuple(int(index) if a == axis else v for a, v in enumerate(plane.index))
    return dataclasses.replace(plane, index=new)


def slice_mask(result: TiledMask) -> SliceMask:
    """The best candidate of a decoded object as a :class:`SliceMask`."""
    best = int(np.argmax(result.scores))
    return SliceMask(
        result.window, np.asarray(result.masks[best], dtype=bool), float(result.scores[best]),
        MaskPrompt(np.asarray(result.low_res[best]), result.window),
    )


def propagation_job(
    engine: Callable[[], PromptEngine],
    embed: Callable[[PromptEngine, int], Any],
    seeds: dict[int, Any],
    n_slices: int,
    params: PropagationParams,
    cancel: threading.Event,
) -> Job:
    """The worker job: decode the seeds' prompts, then propagate (returns the masks).

    Args:
        engine: builds or returns the engine (called in the worker: may load the model).
        embed: ``embed(engine, index)`` → the embedding of slice ``index``.
        seeds: per prompted slice its ``ObjectPrompts`` (the same number of objects each).
        n_slices: the stack's length along the axis.
        params: the stop rule and range.
        cancel: set to stop between slices (the job then raises ``InterruptedError``).
    """

    def job():
        yield Progress(0, 1, "Loading the model…")
        eng = engine()
        takes_masks = bool(getattr(eng.model, "supports_mask_input", False))
        seed_masks: dict[int, list[SliceMask]] = {}
        for n, (index, objects) in enumerate(sorted(seeds.items())):
            if cancel.is_set():
                raise InterruptedError("propagation cancelled")
            yield Progress(n, len(seeds), f"Decoding the prompts of slice {index}…")
            drawn = list(objects.masks) if takes_masks and any(objects.masks) else None
            got = eng.predict_windowed(embed(eng, index), *objects.arrays, drawn)
            seed_masks[index] = [slice_mask(r) for r in got]

        def decode(index: int, prompts: Sequence[SlicePrompt]) -> list[SliceMask]:
            coords = np.stack([p.coords for p in prompts])
            labels = np.stack([p.labels for p in prompts])
            boxes = np.stack([p.box for p in prompts])
            masks = [p.mask_prompt for p in prompts] if takes_masks else None
            got = eng.predict_windowed(embed(eng, index), coords, labels, boxes, masks)
            return [slice_mask(r) for r in got]

        steps = iter_propagate(
            decode, seed_masks, n_slices, params, cancel=cancel.is_set
        )
        while True:
            try:
                done, total = next(steps)
            except StopIteration as stop:
                return eng, stop.value
            yield Progress(done, total, f"Segmenting through the stack: {done}/{total} slices")

    return job


def paint(
    target: Any, plane: Any, axis: int, masks: dict[int, list[SliceMask | None]],
    values: Sequence[int], *, preserve: bool = False,
) -> int:
    """Write object ``b``'s masks into ``target`` (labels geometry) with ``values[b]``;
    ``preserve`` only paints background. Returns the number of pixels written."""
    written = 0
    for index, row in masks.items():
        p = slice_plane(plane, axis, index)
        for m, value in zip(row, values, strict=True):
            if m is None:
                continue
            rows, cols = np.nonzero(m.mask)
            rows, cols = rows + m.window.y0, cols + m.window.x0
            where = p.labels_indices(rows, cols)
            if preserve:
                keep = np.asarray(target[where]) == 0
                where = tuple(w[keep] for w in where)
            target[where] = value
            written += len(where[0])
    return written
