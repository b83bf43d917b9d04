"""Refine labels over every 2-D plane of a stack, resumably, into memory or Zarr.

:func:`run_refine` cuts the image into planes (:class:`~napari_esam.core.runs.sources.
StackSource`), reads the labels plane that lies on each, refines it tile by tile
(:func:`~napari_esam.core.tiling.refine.refine_plane`; a plane that is not tiled is a grid of
one tile) and writes the refined plane to the output. A Zarr output is an OME-Zarr labels
group like a segment-everything run's, with the run record under
:data:`~napari_esam.core.runs.outputs.RUN_ATTR` (``docs/rules/resume.md``,
``docs/rules/refine.md#resume``): the image and the labels (geometry and content hash) and the
refine settings must match to resume; finished planes are skipped. The rule for each object
is ``docs/rules/refine.md``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.io.inputs import open_input
from napari_esam.core.plane.everything import Cancelled
from napari_esam.core.plane.refine import (
    DEFAULT_BATCH,
    IOU_THRESHOLD,
    check_iou_threshold,
    uses_mask_input,
)
from napari_esam.core.runs.outputs import (
    LEGACY_ATTRS,
    RUN_ATTR,
    MemoryOutput,
    ZarrOutput,
    _diff,
    _remove_store,
    _root_attrs,
)
from napari_esam.core.runs.pipeline import BatchProgress
from napari_esam.core.runs.settings import (
    ModelSpec,
    TilingParams,
    _factory_name,
    checkpoint_identity,
    get_model,
)
from napari_esam.core.runs.sources import StackSource
from napari_esam.core.tiling.grid import TileGrid, content_hash
from napari_esam.core.tiling.predictor import TiledPredictor
from napari_esam.core.tiling.refine import refine_plane

__all__ = ["RefineOutput", "RefineRun", "RefineSettings", "open_labels", "run_refine"]


@dataclass(frozen=True)
class RefineSettings:
    """Everything that decides a refine result (``docs/rules/refine.md``).

    ``iou_threshold``: objects whose refined mask has a lower IoU with the original are kept
    as they were; ``use_mask_input``: give each mask to the decoder as mask input (where the
    model takes one); ``batch_size``: objects per decoder call (does not change results);
    ``contrast_limits``: applied to every plane (``None``: each plane's own);
    ``tiling``: the tile grid (``docs/rules/tiling.md``; ``merge_iou`` is not used).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    iou_threshold: float = IOU_THRESHOLD
    use_mask_input: bool = True
    batch_size: int = DEFAULT_BATCH
    contrast_limits: tuple[float, float] | None = None
    tiling: TilingParams = field(default_factory=TilingParams)

    def validate(self) -> None:
        if self.model.factory is None:
            from napari_esam.models.registry import check_model_name

            check_model_name(self.model.name)
        check_iou_threshold(self.iou_threshold)
        if int(self.batch_size) < 1:
            raise ValueError(f"the batch size must be at least 1, got {self.batch_size}")
        if self.contrast_limits is not None:
            lo, hi = (float(v) for v in self.contrast_limits)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(
                    f"contrast limits must be finite (low, high) with low < high, got "
                    f"{self.contrast_limits}"
                )
        self.tiling.validate()

    def record(self, grid: TileGrid, mask_input: bool) -> dict[str, Any]:
        """The JSON settings record compared on resume (``mask_input``: whether the masks go
        to the decoder, which depends on the model too; device and batch size are left out:
        they do not change results)."""
        limits = self.contrast_limits
        return {
            "command": "refine",
            "model": self.model.name,
            "checkpoint": checkpoint_identity(self.model.checkpoint),
            "dtype": self.model.dtype,
            "factory": _factory_name(self.model.factory),
            "iou_threshold": float(self.iou_threshold),
            "mask_input": bool(mask_input),
            "contrast_limits": None if limits is None else [float(v) for v in limits],
            "tiling": {"tile": grid.tile, "halo": grid.halo},
        }


def open_labels(labels: Any, source: StackSource) -> Any:
    """The labels input (a path or an array) checked against the image ``source``: integer
    dtype, the shape of the image without its channel axis, at least one object.
    ``ValueError`` (one line) otherwise; a missing file: ``FileNotFoundError``."""
    arr = open_input(str(Path(labels).expanduser()) if isinstance(labels, (str, os.PathLike))
                     else labels)
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "iub":
        raise ValueError(
            f"the labels must be integers (one id per object, 0 = background), not {dtype}"
        )
    shape = tuple(int(s) for s in arr.shape)
    if shape != source.out_shape:
        raise ValueError(
            f"the labels' shape {shape} does not match the image's {source.out_shape}"
            + (" (without its channel axis)" if source.channel_axis is not None else "")
        )
    for i in range(source.n_slices):
        if np.any(_plane(arr, source, i)):
            return arr
    raise ValueError("the labels hold no objects (every pixel is 0): nothing to refine")


def _plane(labels: Any, source: StackSource, index: int) -> np.ndarray:
    part = labels[source.out_region(index)]
    if hasattr(part, "compute") and not isinstance(part, np.ndarray):
        part = part.compute()
    return np.asarray(part)


def _labels_dtype(labels: Any) -> np.dtype:
    dtype = np.dtype(labels.dtype)
    return np.dtype(np.uint8) if dtype.kind == "b" else dtype


class RefineOutput(ZarrOutput):
    """A refine run's Zarr output: an OME-Zarr labels group with the run record (the refine
    record: image, labels, settings; finished planes with their refined and kept objects)."""

    def prepare_refine(
        self,
        source: StackSource,
        record: dict,
        dtype: Any,
        *,
        overwrite: bool = False,
        axes: str | None = None,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] | None = None,
        name: str | None = None,
    ) -> bool:
        """Create the store, or check that an existing one holds this run; returns whether
        it is resumed (the errors are those of :meth:`ZarrOutput.prepare`)."""
        target = Path(self.path)
        if target.exists() or target.is_symlink():
            attrs = _root_attrs(target) or {}
            if not overwrite and RUN_ATTR in attrs:
                self._check_resumable(record)
                return True
            if not overwrite:
                legacy = [a for a in LEGACY_ATTRS if a in attrs]
                if legacy:
                    raise ValueError(
                        f"{self.path!r} was written by an earlier napari-esam (record "
                        f"{legacy[0]!r}); run again with overwrite (CLI: --overwrite) to "
                        "start over, or choose another output"
                    )
                raise FileExistsError(
                    f"{self.path!r} exists and is not a napari-esam run output; choose "
                    "another output or overwrite it (CLI: --overwrite)"
                )
            _remove_store(target)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist")
        self._create(source, dtype, {**record, "kept": {}}, axes, scale, translate, name)
        return False

    def _check_resumable(self, record: dict) -> None:
        old = self.group.attrs.asdict()[RUN_ATTR]
        diffs = []
        for key, prefix in (("source", "input "), ("labels", "labels "), ("settings", "")):
            diffs += _diff(old.get(key, {}) or {}, record[key], prefix)
        if diffs:
            raise ValueError(
                f"{self.path!r} holds a run with other input or settings ("
                + "; ".join(diffs[:4])
                + "); use the same ones to resume, or overwrite it (CLI: --overwrite)"
            )

    def kept(self) -> dict[int, list[tuple[int, float]]]:
        """Finished planes → the objects kept as they were, ``(id, iou)``."""
        rec = self.group.attrs.asdict()[RUN_ATTR]
        return {int(k): [(int(i), float(v)) for i, v in rows]
                for k, rows in rec.get("kept", {}).items()}

    def record_plane(self, index: int, n_refined: int, kept: list[tuple[int, float]]) -> None:
        """Mark a written plane finished with its counts (one rewrite of the record)."""
        rec = dict(self.group.attrs.asdict()[RUN_ATTR])
        slices = dict(rec.get("slices", {}))
        slices[str(int(index))] = int(n_refined)
        rec["slices"] = dict(sorted(slices.items(), key=lambda kv: int(kv[0])))
        rows = dict(rec.get("kept", {}))
        rows[str(int(index))] = [[int(i), float(v)] for i, v in kept]
        rec["kept"] = dict(sorted(rows.items(), key=lambda kv: int(kv[0])))
        self.group.attrs.update({RUN_ATTR: rec})


@dataclass
class RefineRun:
    """The result of :func:`run_refine`.

    ``labels``: the refined labels (NumPy, or the Zarr array opened read-only); ``counts``:
    refined objects per finished plane (all runs); ``kept``: per finished plane, the objects
    kept as they were ``(id, iou)``; ``total``: planes in the stack; ``mask_input``: whether
    the masks went to the decoder as mask input.
    """

    labels: Any
    counts: dict[int, int]
    kept: dict[int, list[tuple[int, float]]]
    total: int
    cancelled: bool
    elapsed: float
    output: RefineOutput | MemoryOutput
    mask_input: bool
    grid: TileGrid | None = None

    @property
    def complete(self) -> bool:
        return len(self.counts) == self.total

    @property
    def n_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())


def _check_not_inputs(paths: Sequence[Any], out: Path) -> None:
    """The output must be neither an input nor a folder holding one or lying in one."""
    out = out.resolve()
    for data in paths:
        if not isinstance(data, (str, os.PathLike)):
            continue
        inp = Path(data).expanduser().resolve()
        if inp == out or out in inp.parents or inp in out.parents:
            raise ValueError(
                f"the output {str(out)!r} must not be an input ({str(inp)!r}), nor hold one "
                "or lie inside one: choose an output elsewhere"
            )


def run_refine(
    source: StackSource | Any,
    labels: Any,
    settings: RefineSettings | None = None,
    output: str | os.PathLike | RefineOutput | MemoryOutput | None = None,
    *,
    overwrite: bool = False,
    indices: Sequence[int] | None = None,
    progress: Callable[[BatchProgress], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    model: Any = None,
    axes: str | None = None,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    name: str | None = None,
) -> RefineRun:
    """Refine the labels of every plane of ``source`` (or ``indices`` of them).

    Args:
        source: a :class:`StackSource` or anything :meth:`StackSource.create` takes.
        labels: the labels to refine (a path, NumPy, Dask or Zarr), shaped like the image
            without its channel axis; integer; not modified.
        settings: model, IoU threshold, mask input, tiling (:class:`RefineSettings`).
        output: ``None`` (a NumPy copy of the labels, refined in place), a
            :class:`~napari_esam.core.runs.outputs.MemoryOutput` (the refined planes are
            written into its array, the others left as they are), or a ``.zarr`` path or
            :class:`RefineOutput` (created, or resumed: finished planes are skipped;
            ``overwrite=True`` starts over).
        overwrite: replace an existing Zarr output.
        indices: the flat plane indices to refine (default: all).
        progress: ``progress(BatchProgress)``: ``"start"``, ``"step"`` (objects of the
            running plane: ``step`` of ``steps``), ``"slice"`` (a plane done:
            ``n_objects`` refined objects).
        cancel: polled between decoder batches; the run then returns with ``cancelled``.
        model: the loaded model of ``settings.model`` (default: built once per process).
        axes, scale, translate, name: OME metadata of a new Zarr output.

    Returns:
        A :class:`RefineRun`.
    """
    settings = settings or RefineSettings()
    settings.validate()
    if not isinstance(source, StackSource):
        source = StackSource.create(source)
    labels_arr = open_labels(labels, source)
    grid = settings.tiling.grid(source.plane_shape)
    wanted = list(range(source.n_slices)) if indices is None else sorted({int(i) for i in indices})
    for i in wanted:
        source.coords(i)  # range check
    if output is not None and not isinstance(output, (RefineOutput, MemoryOutput)):
        output = RefineOutput(output)
    if isinstance(output, RefineOutput):
        _check_not_inputs([source.data, labels], Path(output.path))
    elif isinstance(output, MemoryOutput) and tuple(output.array.shape) != source.out_shape:
        raise ValueError(f"output shape {output.array.shape} != labels shape {source.out_shape}")
    if model is None:
        model = get_model(settings.model)
    with_mask = uses_mask_input(model, settings.use_mask_input)
    dtype = _labels_dtype(labels_arr)
    kept: dict[int, list[tuple[int, float]]] = {}
    if output is None:
        out: RefineOutput | MemoryOutput = MemoryOutput(source.out_shape, dtype)
        out.array[...] = np.asarray(labels_arr[...])
    elif isinstance(output, MemoryOutput):
        out = output
    else:
        out = output
        record = {
            "source": {**source.describe(),
                       "content_hash": content_hash(source.planes(), source.rgb)},
            "labels": {"shape": list(labels_arr.shape), "dtype": str(dtype),
                       "content_hash": content_hash(labels_arr, rgb=False)},
            "settings": settings.record(grid, with_mask),
        }
        out.prepare_refine(source, record, dtype, overwrite=overwrite, axes=axes, scale=scale,
                           translate=translate, name=name)
        kept = out.kept()
    counts = out.done()
    todo = [i for i in wanted if i not in counts]
    total, skipped = len(wanted), len(wanted) - len(todo)
    t0 = time.perf_counter()
    cancel_fn = cancel or (lambda: False)
    finished = 0

    def report(kind: str, **kw: Any) -> None:
        if progress is None:
            return
        done = sum(1 for i in wanted if i in counts)
        elapsed = time.perf_counter() - t0
        eta = elapsed / finished * (len(todo) - finished) if finished else None
        progress(BatchProgress(kind, done, total, skipped, elapsed=elapsed, eta=eta, **kw))

    tp = TiledPredictor(model, tile=grid.tile, halo=grid.halo)
    report("start")
    try:
        for i in todo:
            if cancel_fn():
                break
            plane = _plane(labels_arr, source, i)
            if plane.dtype != dtype:
                plane = plane.astype(dtype)
            res = refine_plane(
                source.planes(), plane, tp, index=source.coords(i), rgb=source.rgb,
                iou_threshold=settings.iou_threshold, use_mask_input=settings.use_mask_input,
                batch_size=int(settings.batch_size), contrast_limits=settings.contrast_limits,
                progress=lambda d, t, i=i: report("step", index=i, step=d, steps=t),
                cancel=cancel_fn,
            )
            out.write(source.out_region(i), res.labels)
            if isinstance(out, RefineOutput):
                out.record_plane(i, len(res.refined), res.kept)
            else:
                out.record(i, len(res.refined))
            counts[i] = len(res.refined)
            kept[i] = list(res.kept)
            finished += 1
            report("slice", index=i, n_objects=len(res.refined))
    except Cancelled:
        pass
    finally:
        tp.reset_image()
    cancelled = any(i not in counts for i in wanted)
    if isinstance(out, RefineOutput) and not cancelled and indices is None:
        out.record_many({}, complete=True)
    result_labels = out.read_only() if isinstance(out, RefineOutput) else out.array
    return RefineRun(
        result_labels, {i: counts[i] for i in sorted(counts)},
        {i: kept[i] for i in sorted(kept)}, source.n_slices, cancelled,
        time.perf_counter() - t0, out, with_mask, grid,
    )
