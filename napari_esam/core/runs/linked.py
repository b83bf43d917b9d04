"""Segment everything, then link the slices' objects into 3-D objects or tracks.

:func:`run_linked` is :func:`~napari_esam.core.runs.pipeline.run_batch` into a working store
``OUT.partial.zarr`` beside the output (per-slice labels, resumable as any run), then
:func:`~napari_esam.core.linking.stack.link_labels` from that store into ``OUT`` (Zarr or
TIFF, written beside it and renamed into place), then the working store is removed.

Resume: a killed run leaves the working store; running again resumes the slices and relinks
(linking is cheap and reads the finished per-slice labels only, so it simply reruns when it
did not finish). A finished output is never replaced without ``overwrite``.
Rules: ``docs/rules/linking.md`` (the link), ``docs/rules/resume.md`` (the runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_esam.core.linking.stack import LinkResult, link_labels
from napari_esam.core.runs.outputs import _remove_store
from napari_esam.core.runs.pipeline import BatchResult, run_batch

__all__ = [
    "LINK_MODES", "WORK_SUFFIX", "LinkedResult", "check_linkable", "link_output", "run_linked",
    "work_store",
]

#: the linking choices of segment-everything (``None``/"off": per-slice ids)
LINK_MODES = ("3d", "track")
#: suffix of the working store of per-slice labels beside a linked (or TIFF) output
WORK_SUFFIX = ".partial.zarr"


@dataclass
class LinkedResult:
    """The per-slice run (``batch``) and the link (``link``) of :func:`run_linked`."""

    batch: BatchResult
    link: LinkResult
    output: Path


def work_store(output: str | os.PathLike[str]) -> Path:
    """The working store of per-slice labels for ``output``."""
    return Path(str(Path(os.fspath(output)).expanduser()) + WORK_SUFFIX)


def run_linked(
    source: Any,
    settings: Any,
    output: str | os.PathLike[str],
    mode: str,
    *,
    axis: int = 0,
    overwrite: bool = False,
    link_progress: Any = None,
    **batch_kwargs: Any,
) -> LinkedResult:
    """Segment every slice, then link the objects along stack axis ``axis``.

    Args:
        source: the input (:class:`~napari_esam.core.runs.sources.StackSource` or an array).
        settings: :class:`~napari_esam.core.runs.settings.BatchSettings`.
        output: ``OUT.zarr`` or ``OUT.tif``: the linked labels.
        mode: ``"3d"`` (one id per 3-D object) or ``"track"`` (one id per track).
        axis: the stack axis to link along (an axis of the stack, before the planes).
        overwrite: start over and replace an existing output.
        link_progress: ``link_progress(done, total)`` during the link.
        batch_kwargs: more keyword arguments of
            :func:`~napari_esam.core.runs.pipeline.run_batch` (``progress``, ``cancel``,
            ``executor``, ``embeddings``, ``model``, ...).
    """
    if mode not in LINK_MODES:
        raise ValueError(f"link mode must be one of {LINK_MODES}, not {mode!r}")
    out = Path(os.fspath(output)).expanduser()
    work = work_store(out)
    if out.exists() and not overwrite and not work.exists():
        raise FileExistsError(
            f"{str(out)!r} already exists (a finished linked output); pass overwrite=True "
            "(CLI: --overwrite) to recompute it"
        )
    if hasattr(source, "stack_shape"):
        check_linkable(tuple(source.stack_shape), axis)
    batch = run_batch(source, settings, work, overwrite=overwrite, **batch_kwargs)
    link = link_output(batch.output, out, mode, axis=axis, progress=link_progress)
    return LinkedResult(batch, link, out)


def check_linkable(stack_shape: tuple[int, ...], axis: int) -> None:
    """Refuse (``ValueError``) a stack that cannot be linked along ``axis``, before any work.

    Args:
        stack_shape: the input's shape without the plane (and colour) axes.
        axis: the axis to link along.
    """
    if not 0 <= axis < len(stack_shape) or stack_shape[axis] < 2:
        raise ValueError(
            f"linking needs a stack of 2 or more slices along axis {axis}; the stack axes "
            f"have shape {tuple(stack_shape)}"
        )


def link_output(
    output: Any, target: Path, mode: str, *, axis: int = 0, progress: Any = None
) -> LinkResult:
    """Link a finished run output (:class:`~napari_esam.core.runs.outputs.ZarrOutput`) into
    ``target`` (written beside it, renamed into place), then remove the run's store.

    Args:
        output: the finished per-slice run output (the working store).
        target: ``OUT.zarr`` or ``OUT.tif``.
        mode: ``"3d"`` or ``"track"``.
        axis: the stack axis to link along.
        progress: ``progress(done, total)`` during the link.
    """
    labels = output.read_only()
    check_linkable(tuple(labels.shape[:-2]), axis)
    link = link_labels(
        labels, mode=mode, axis=axis, output=target, overwrite=True,
        write_options=_write_options(output), progress=progress,
    )
    _remove_store(Path(output.path))
    return link


def _write_options(output: Any) -> dict[str, Any]:
    """The geometry of the per-slice output for the linked file (axes, scale, translate)."""
    from napari_esam.core.io.label_files import MARKER

    attrs = output.group.attrs.asdict()
    options: dict[str, Any] = {}
    axes = attrs.get(MARKER, {}).get("axes")
    if axes:
        options["axes"] = axes
    return options
