"""Reading OME-NGFF ``multiscales`` metadata defensively: the one place that turns a Zarr
group's attributes into its full-resolution array, with a clear error for malformed metadata
(never a ``KeyError``/``TypeError`` from deep inside)."""

from __future__ import annotations

from typing import Any

__all__ = ["first_multiscale", "full_resolution_array"]


def _malformed(where: Any, what: str) -> ValueError:
    return ValueError(
        f"{str(where)!r}: its OME-NGFF 'multiscales' metadata is malformed ({what}); point at "
        "the array itself (e.g. GROUP.zarr/0) or repair the metadata in its zarr.json"
    )


def first_multiscale(attrs: Any, where: Any) -> tuple[dict, dict] | None:
    """``(multiscale, dataset)``: the first multiscale entry of a group's attributes (NGFF 0.5
    under ``"ome"``, 0.4 at the top level) and its first (full-resolution) dataset, checked;
    ``None`` when the group declares no multiscales; ``ValueError`` when they are malformed."""
    if not isinstance(attrs, dict):
        return None
    ome = attrs.get("ome", attrs)
    if not isinstance(ome, dict):
        raise _malformed(where, f"'ome' is {type(ome).__name__}, not a mapping")
    multiscales = ome.get("multiscales")
    if not multiscales:
        return None
    if not isinstance(multiscales, list) or not isinstance(multiscales[0], dict):
        raise _malformed(where, "'multiscales' is not a list of mappings")
    datasets = multiscales[0].get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise _malformed(where, "the first multiscale has no list of 'datasets'")
    path = datasets[0].get("path")
    if not isinstance(path, str) or not path:
        raise _malformed(where, "the first dataset has no 'path'")
    return multiscales[0], datasets[0]


def full_resolution_array(group: Any, where: Any) -> Any | None:
    """The array of the first dataset of ``group``'s multiscales (``None`` without
    multiscales); ``ValueError`` when the metadata is malformed or names a missing array."""
    found = first_multiscale(group.attrs.asdict(), where)
    if found is None:
        return None
    path = found[1]["path"]
    try:
        node = group[path]
    except KeyError:
        raise _malformed(where, f"its dataset {path!r} is not in the group") from None
    if not hasattr(node, "shape"):
        raise _malformed(where, f"its dataset {path!r} is a group, not an array")
    return node
