"""npe2 writers for Labels layers: thin adapters over :mod:`napari_esam.core.io.label_files`.

napari's Save dialog asks the user before replacing an existing file and only then calls the
writer, so these adapters pass ``overwrite=True`` (the core API's default is ``False``). The
replacement is still safe: the new file is written to a temporary sibling first.
"""

from __future__ import annotations

from typing import Any

from napari_esam.core.io.label_files import write_labels


def _axes_from_labels(axis_labels: Any, ndim: int) -> str | None:
    """Use napari's axis labels as axes when they are valid (e.g. ``('z', 'y', 'x')``)."""
    if not axis_labels or len(axis_labels) != ndim:
        return None
    axes = "".join(str(a) for a in axis_labels).lower()
    it = iter("tczyx")
    if len(axes) == ndim and all(c in it for c in axes) and axes.endswith("yx"):
        return axes
    return None


def _units(units: Any, ndim: int) -> list[str | None] | None:
    """napari's (pint) units as names; ``pixel`` means no unit."""
    if not units or len(units) != ndim:
        return None
    names = [None if u is None or str(u) == "pixel" else str(u) for u in units]
    return names if any(names) else None


def _write(path: str, data: Any, meta: dict) -> list[str]:
    if meta.get("multiscale") or isinstance(data, (list, tuple)):
        data = data[0]  # export the full-resolution level
    ndim = len(data.shape)
    scale = meta.get("scale")
    translate = meta.get("translate")
    out = write_labels(
        path,
        data,
        scale=None if scale is None else [float(s) for s in scale],
        translate=None if translate is None else [float(t) for t in translate],
        axes=_axes_from_labels(meta.get("axis_labels"), ndim),
        units=_units(meta.get("units"), ndim),
        name=meta.get("name"),
        overwrite=True,  # napari has already asked the user to confirm replacing the file
    )
    return [str(out)]


def write_labels_zarr(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as an OME-Zarr (NGFF 0.5) label image."""
    return _write(path, data, meta)


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as an ImageJ TIFF (uint8/uint16) or OME-TIFF (larger labels)."""
    return _write(path, data, meta)
