"""Tracks of a ``mode="track"`` link: one row per object per frame (centroid and area), as a
table, as napari ``Tracks`` layer data, and as a CSV file (written atomically).

Division parent links are not produced: a cell that divides keeps its id in one daughter
(the better overlap) and the other daughter starts a new track.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from napari_esam.core.linking.stack import LinkResult

__all__ = ["tracks_data", "tracks_table", "write_tracks_csv"]


def _column_names(result: LinkResult, axes: str | None) -> list[str]:
    """Names of the leading axes other than the linking one (none for a 3-D stack)."""
    ndim = len(result.shape)
    if axes is None:
        axes = {3: "tyx", 4: "tzyx", 5: "tczyx"}.get(ndim, "")
    names = []
    for d in result.outer_axes:
        letter = axes[d] if len(axes) == ndim else ""
        names.append(letter if letter and letter not in ("t", "y", "x") else f"axis{d}")
    return names


def tracks_table(result: LinkResult, axes: str | None = None) -> dict[str, np.ndarray]:
    """One row per track and frame, sorted by track id then frame.

    Args:
        result: a :func:`~napari_esam.core.linking.stack.link_labels` result of ``mode="track"``.
        axes: axis letters of the input (e.g. ``"tzyx"``) naming the columns of leading axes
            other than the linking one (default ``tzyx``/``tczyx`` by dimension).

    Returns:
        Columns ``track_id``, ``t`` (index along the linking axis), one per other leading axis,
        ``y``, ``x`` (centroid, pixels) and ``area`` (pixels). A track's pieces in one frame
        are one row (summed area, area-weighted centroid).
    """
    if result.mode != "track":
        raise ValueError(f"tracks come from mode='track' links, this one is mode={result.mode!r}")
    nodes = result.nodes
    outer_shape = tuple(result.shape[d] for d in result.outer_axes)
    key = np.stack([nodes["id"], nodes["stack"], nodes["slice"]], axis=1)
    rows, inverse = np.unique(key, axis=0, return_inverse=True)  # sorted: id, stack, slice
    inverse = inverse.reshape(-1)
    area = np.bincount(inverse, nodes["area"].astype(np.float64), minlength=len(rows))
    y = np.bincount(inverse, nodes["cy"] * nodes["area"], minlength=len(rows)) / area
    x = np.bincount(inverse, nodes["cx"] * nodes["area"], minlength=len(rows)) / area
    order = np.lexsort((rows[:, 1], rows[:, 2], rows[:, 0]))  # id, then frame, then stack
    rows, area, y, x = rows[order], area[order], y[order], x[order]
    table: dict[str, np.ndarray] = {"track_id": rows[:, 0], "t": rows[:, 2]}
    outer = np.unravel_index(rows[:, 1], outer_shape) if outer_shape else ()
    for name, coord in zip(_column_names(result, axes), outer, strict=True):
        table[name] = np.asarray(coord, np.int64)
    table.update(y=y, x=x, area=area.astype(np.int64))
    return table


def tracks_data(result: LinkResult) -> np.ndarray:
    """napari ``Tracks`` layer data: (N, 4) ``[track_id, t, y, x]`` float array (one more
    column per other leading axis, before ``y``), sorted by track id then frame."""
    table = tracks_table(result)
    table.pop("area")
    return np.stack([np.asarray(v, np.float64) for v in table.values()], axis=1)


def write_tracks_csv(path: str | os.PathLike[str], result: LinkResult, *,
                     overwrite: bool = False, axes: str | None = None) -> Path:
    """Write :func:`tracks_table` to a CSV file (header row; centroids with 3 decimals).

    The file is written to a hidden temporary sibling and renamed into place when complete;
    an existing ``path`` is replaced only with ``overwrite=True`` (else ``FileExistsError``).
    """
    target = Path(os.fspath(path)).expanduser()
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True "
                              "(CLI: --overwrite) to replace it")
    if target.is_dir():
        raise IsADirectoryError(f"{str(target)!r} is a directory, not a CSV file")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist")
    table = tracks_table(result, axes)
    names = list(table)
    formats = ["%.3f" if table[n].dtype.kind == "f" else "%d" for n in names]
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as fh:
            fh.write(",".join(names) + "\n")
            if len(table["track_id"]):
                np.savetxt(fh, np.stack([np.asarray(table[n], np.float64) for n in names], 1),
                           fmt=formats, delimiter=",")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
