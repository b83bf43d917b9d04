"""npe2 reader: reopens napari-esam label exports (OME-Zarr or TIFF) as Labels layers.

Only files carrying our ``napari-esam`` metadata are claimed; anything else returns ``None``
so that napari's built-in reader or napari-ome-zarr can handle it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from napari_esam.core.io.label_files import is_labels_export, read_labels

LayerDataTuple = tuple[Any, dict, str]


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerDataTuple]] | None:
    """Return :func:`read_labels_layer` if ``path`` is one of our label exports, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)) or not is_labels_export(path):
        return None
    return read_labels_layer


def read_labels_layer(path: str | list[str]) -> list[LayerDataTuple]:
    """Open an export as one Labels layer (lazy, read-only Zarr array for ``.zarr``)."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    data, meta = read_labels(path)
    kwargs: dict[str, Any] = {
        "name": meta["name"],
        "scale": tuple(meta["scale"]),
        "translate": tuple(meta["translate"]),
        "metadata": {"napari_esam": {"path": os.fspath(path), "axes": meta["axes"]}},
    }
    if any(meta["units"]):
        kwargs["units"] = tuple(u or "pixel" for u in meta["units"])
    return [(data, kwargs, "labels")]
