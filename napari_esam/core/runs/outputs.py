"""Run outputs: where labels go and what a resumed run must match.

* :class:`MemoryOutput`: a NumPy array (for a napari layer); no resume.
* :class:`ZarrOutput`: an OME-Zarr label group (array ``"0"``, chunked 1 along the stack axes
  so a plane never shares a chunk with another plane) with the run's record under
  :data:`RUN_ATTR`: input geometry, settings, the finished planes and their object counts.
* :class:`TileScratch`: for planes cut into several tiles, the tiles' kept masks until their
  plane is merged (``OUTPUT.tiles.zarr``), so a stopped run keeps its finished tiles.

A run that replaces an existing result writes into the hidden sibling
``.OUTPUT.replacement`` (:meth:`ZarrOutput.working_output`) and moves it onto ``OUTPUT``
only when done, so a run that fails or stops leaves the old result as it was.

The resume rule is written in ``docs/rules/resume.md``, the replacement and lock rules in
``docs/rules/outputs.md``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.io.label_files import MARKER
from napari_esam.core.io.replacing import (
    is_own_store,
    move_into_place,
    remove_path,
    replacement_path,
)
from napari_esam.core.runs.settings import BatchSettings, output_dtype
from napari_esam.core.runs.sources import StackSource
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.merge import TileMasks

__all__ = [
    "LEGACY_ATTRS",
    "PLANE_CHUNK",
    "RUN_ATTR",
    "SCRATCH_SUFFIX",
    "MemoryOutput",
    "TileScratch",
    "ZarrOutput",
    "check_run_record",
    "create_label_group",
]

#: group attribute holding the run record (settings, finished planes, counts)
RUN_ATTR = "napari-esam-run"
RUN_FORMAT = 2
#: records of earlier versions, which this version refuses to resume
LEGACY_ATTRS = ("napari-esam-batch", "napari-esam-tiled")
#: largest tile of the image plane in one output chunk
PLANE_CHUNK = 1024
#: suffix of the scratch group of a run's tiles (next to the Zarr output)
SCRATCH_SUFFIX = ".tiles.zarr"
#: group attribute of a scratch group (the run's record and the finished tiles)
SCRATCH_ATTR = "napari-esam-tiles"
SCRATCH_FORMAT = 2
#: the attributes of the stores a run may replace or remove (its own kinds of output)
OWN_ATTRS = (RUN_ATTR, *LEGACY_ATTRS, MARKER)


def _root_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attributes of the Zarr v3 group at ``path`` (``None``: not one, or unreadable)."""
    try:
        with open(Path(path) / "zarr.json", encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def _damaged(path: str, what: str) -> ValueError:
    return ValueError(
        f"{path!r}: its resume record ({RUN_ATTR!r} in zarr.json) is damaged: {what}; run "
        "again with overwrite (CLI: --overwrite) to start over, or choose another output"
    )


def _slice_counts(path: str, slices: Any, n_slices: int | None) -> dict[int, int]:
    """The record's finished slices (flat index -> objects), checked: indices in
    ``0..n_slices-1`` (when known), counts whole numbers >= 0."""
    if not isinstance(slices, Mapping):
        raise _damaged(path, f"'slices' is {type(slices).__name__}, not a mapping")
    out: dict[int, int] = {}
    for key, value in slices.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise _damaged(path, f"slice {key!r} is not a slice index")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _damaged(path, f"slice {key} has {value!r} objects")
        if n_slices is not None and int(key) >= n_slices:
            raise _damaged(path, f"slice {key} is done but the input has {n_slices} slices")
        out[int(key)] = value
    return out


def check_run_record(path: str, rec: Any, n_slices: int | None = None) -> dict:
    """The resume record ``rec`` of the output ``path``, checked (:func:`_damaged` errors:
    not a mapping, ``source``/``settings`` not mappings, bad ``slices`` or ``complete``)."""
    if not isinstance(rec, Mapping):
        raise _damaged(path, f"it is {type(rec).__name__}, not a mapping")
    for key in ("source", "settings"):
        if not isinstance(rec.get(key), Mapping):
            raise _damaged(path, f"{key!r} is missing or not a mapping")
    _slice_counts(path, rec.get("slices", {}), n_slices)
    if not isinstance(rec.get("complete", False), bool):
        raise _damaged(path, f"'complete' is {rec['complete']!r}, not true or false")
    return dict(rec)


class MemoryOutput:
    """Labels in a NumPy array (for a napari layer); no resume record."""

    def __init__(self, shape: Sequence[int], dtype: Any) -> None:
        self.array = np.zeros(tuple(shape), dtype=dtype)
        self.counts: dict[int, int] = {}

    def done(self) -> dict[int, int]:
        return dict(self.counts)

    def write(self, region: tuple, labels: np.ndarray) -> None:
        self.array[region] = labels

    def record(self, index: int, n_objects: int) -> None:
        self.counts[index] = n_objects


class ZarrOutput:
    """On-disk labels (OME-Zarr group, array ``"0"``) with the resume record in its attrs.

    Picklable (a path): workers open the array themselves and :meth:`write` whole slices
    (chunk-aligned, so no locking); only the coordinating process calls :meth:`record`.
    """

    def __init__(self, path: str | os.PathLike, replaces: str | None = None) -> None:
        self.path = str(Path(path).expanduser().resolve())
        #: the output this one will replace when its run is done (a hidden sibling's)
        self.replaces = replaces
        self._array: Any = None
        self._group: Any = None
        #: slices found damaged (and recomputed) when the output was resumed
        self.repaired: list[str] = []

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    # -- creation / resume
    @staticmethod
    def is_run_output(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a Zarr group written by a run of this version."""
        return RUN_ATTR in (_root_attrs(path) or {})

    def working_output(self, overwrite: bool) -> ZarrOutput:
        """The output a run into this one writes: this one, or its hidden sibling
        ``.NAME.replacement`` when the run replaces an existing result (``overwrite``) or
        resumes such an unfinished replacement; :meth:`finish_replacement` moves it here."""
        target = Path(self.path)
        sibling = replacement_path(target)
        if overwrite and (target.exists() or target.is_symlink()):
            _check_own(target)  # before any work: only our own outputs are replaced
            return ZarrOutput(sibling, replaces=self.path)
        if not overwrite and (sibling.exists() or sibling.is_symlink()):
            return ZarrOutput(sibling, replaces=self.path)
        return self

    def finish_replacement(self) -> ZarrOutput:
        """Move this finished replacement onto the output it replaces (whose scratch group
        of tiles, if any, belonged to the replaced run and is removed); returns that
        output."""
        if self.replaces is None:
            return self
        target = ZarrOutput(self.replaces)
        move_into_place(Path(self.path), Path(target.path))
        scratch = Path(target.path + SCRATCH_SUFFIX)
        if TileScratch._attrs(scratch) is not None:
            remove_path(scratch, strict=False)
        return target

    def damage(self) -> str | None:
        """What makes this existing run output unusable (``None``: nothing found)."""
        target = Path(self.path)
        if not (target / "0" / "zarr.json").is_file():
            return "its labels array '0' is missing"
        return None

    def prepare(
        self,
        source: StackSource,
        settings: BatchSettings,
        grid: TileGrid,
        *,
        overwrite: bool = False,
        axes: str | None = None,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] | None = None,
        name: str | None = None,
    ) -> bool:
        """Create the store, or check that an existing one belongs to this run; returns
        whether it is resumed (an existing store of this run)."""
        target = Path(self.path)
        record = self.run_record(source, settings, grid)
        if target.exists() or target.is_symlink():
            attrs = _root_attrs(target) or {}
            if not overwrite and RUN_ATTR in attrs:
                check_run_record(self.path, attrs[RUN_ATTR], source.n_slices)
                problem = self.damage()
                if problem is not None:
                    raise ValueError(
                        f"{self.path!r} is damaged ({problem}): start it over with overwrite "
                        "(CLI: --overwrite), or choose another output"
                    )
                self._check_resumable(record)
                self.repaired = self.repair(source)
                return True
            if not overwrite:
                legacy = [a for a in LEGACY_ATTRS if a in attrs]
                if legacy:
                    raise ValueError(
                        f"{self.path!r} was written by an earlier napari-esam (record "
                        f"{legacy[0]!r}), which this version cannot resume; run again with "
                        "overwrite (CLI: --overwrite) to start over, or choose another output"
                    )
                if MARKER in attrs:
                    raise FileExistsError(
                        f"{self.path!r} holds labels exported by napari-esam, not a run that "
                        "can be resumed; replace it with overwrite (CLI: --overwrite), or "
                        "choose another output"
                    )
                raise FileExistsError(
                    f"{self.path!r} exists and is not an output of napari-esam everything; "
                    "choose another output"
                )
            _remove_store(target)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist")
        if overwrite and self.replaces is None:  # an unfinished replacement: given up
            sibling = replacement_path(target)
            if sibling.exists() or sibling.is_symlink():
                _remove_store(sibling)
        dtype = output_dtype(source.n_slices, settings, grid)
        self._create(source, dtype, record, axes, scale, translate, name)
        return False

    @staticmethod
    def run_record(source: StackSource, settings: BatchSettings, grid: TileGrid) -> dict:
        """What a resumed run must match: the input's geometry and content hash (a lazy
        sample, :func:`~napari_esam.core.tiling.grid.content_hash`) and the settings."""
        from napari_esam.core.tiling.grid import content_hash

        described = {**source.describe(),
                     "content_hash": content_hash(source.planes(), source.rgb)}
        return json.loads(json.dumps({"source": described,
                                      "settings": settings.record(grid)}))

    def _record(self) -> dict:
        """The stored resume record, checked (:func:`check_run_record`)."""
        return check_run_record(self.path, self.group.attrs.asdict().get(RUN_ATTR))

    def _check_resumable(self, record: dict) -> None:
        old = self._record()
        diffs = _diff(old.get("source", {}), record["source"], "input ")
        diffs += _diff(old.get("settings", {}), record["settings"], "")
        if diffs:
            what = (f"{self.path!r} (an unfinished replacement of {self.replaces!r})"
                    if self.replaces else repr(self.path))
            tiling = old.get("settings", {}).get("tiling")
            hint = ""
            if isinstance(tiling, Mapping) and tiling != record["settings"]["tiling"]:
                hint = (f"; it was made with tiles of {tiling.get('tile')} px and halo "
                        f"{tiling.get('halo')} (CLI: --tiled on --tile {tiling.get('tile')} "
                        f"--halo {tiling.get('halo')})"
                        if tiling.get("merge_iou") is not None or tiling.get("halo")
                        else "; it was made without tiling (CLI: --tiled off)")
            raise ValueError(
                f"{what} holds a run with other input or settings ("
                + "; ".join(diffs[:4])
                + f"){hint}; use the same ones to resume, or overwrite it (CLI: --overwrite)"
            )

    def _create(self, source, dtype, record, axes, scale, translate, name) -> None:
        record = {"format": RUN_FORMAT, **record, "slices": {}, "complete": False}
        try:
            self._group = create_label_group(
                self.path, source, dtype, {RUN_ATTR: record},
                axes=axes, scale=scale, translate=translate, name=name,
            )
        except BaseException:  # e.g. a full disk: no half-made store stays behind
            remove_path(Path(self.path), strict=False)
            raise

    def remove_if_empty(self) -> bool:
        """Remove this store (and its scratch group) when it holds no finished plane and
        no finished tile: what a failed new run leaves. Returns whether it was removed."""
        try:
            if self.done() or TileScratch(self.path + SCRATCH_SUFFIX).done():
                return False
        except Exception:  # noqa: BLE001 - unreadable: leave it for the user
            return False
        self._group = self._array = None
        remove_path(Path(self.path + SCRATCH_SUFFIX), strict=False)
        remove_path(Path(self.path), strict=False)
        return True

    # -- access
    @property
    def group(self) -> Any:
        if self._group is None:
            import zarr

            self._group = zarr.open_group(self.path, mode="r+")
        return self._group

    @property
    def array(self) -> Any:
        """The labels array, writable (for the writers)."""
        if self._array is None:
            import zarr

            from napari_esam.core.io.chunks import checked

            self._array = checked(zarr.open_array(Path(self.path) / "0", mode="r+"),
                                  self.path)
        return self._array

    def read_only(self) -> Any:
        """The labels array opened read-only (safe for a napari layer; a damaged chunk is
        named when read: :class:`~napari_esam.core.io.chunks.CheckedArray`)."""
        import zarr

        from napari_esam.core.io.chunks import checked

        return checked(zarr.open_array(Path(self.path) / "0", mode="r"), self.path)

    def repair(self, source: StackSource) -> list[str]:
        """Check that every finished slice's chunks can be read; a slice with a damaged chunk
        has the chunk file removed and is no longer recorded as finished (so the run
        recomputes it). Returns one line per repaired slice."""
        from concurrent.futures import ThreadPoolExecutor

        from napari_esam.core.io.chunks import bad_chunks, chunk_file

        done = self.done()
        array = self.array
        with ThreadPoolExecutor(max_workers=4) as pool:
            found = dict(zip(done, pool.map(
                lambda i: bad_chunks(array, source.out_region(i), plain=True), done),
                strict=True))
        lines, damaged = [], sorted(i for i, bad in found.items() if bad)
        for i in damaged:
            for coords, _exc in found[i]:
                name = chunk_file(array, coords)
                if name is not None and os.path.isfile(name):
                    os.remove(name)
            coords, exc = found[i][0]
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            lines.append(f"slice {i}: chunk {coords} of {self.path!r} could not be decoded "
                         f"({detail}); the slice is recomputed")
        if damaged:
            rec = self._record()
            rec["slices"] = {k: v for k, v in rec.get("slices", {}).items()
                             if int(k) not in damaged}
            rec["complete"] = False
            self.group.attrs.update({RUN_ATTR: rec})
        return lines

    def done(self) -> dict[int, int]:
        """Finished slices → object count, from the record."""
        return _slice_counts(self.path, self._record().get("slices", {}), None)

    def write(self, region: tuple, labels: np.ndarray) -> None:
        self.array[region] = labels

    def record(self, index: int, n_objects: int) -> None:
        """Mark a written slice finished (atomic rewrite of the group's zarr.json)."""
        self.record_many({index: n_objects})

    def record_many(self, counts: Mapping[int, int], complete: bool | None = None) -> None:
        rec = self._record()
        slices = dict(rec.get("slices", {}))
        slices.update({str(int(k)): int(v) for k, v in counts.items()})
        rec["slices"] = dict(sorted(slices.items(), key=lambda kv: int(kv[0])))
        if complete is not None:
            rec["complete"] = complete
        self.group.attrs.update({RUN_ATTR: rec})


def create_label_group(
    path: str | os.PathLike,
    source: StackSource,
    dtype: Any,
    attrs: Mapping[str, Any],
    *,
    axes: str | None = None,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    name: str | None = None,
) -> Any:
    """Create the OME-Zarr label group of ``source``'s labels (array ``"0"``, chunked 1
    along the stack axes and ``PLANE_CHUNK`` in the plane) with ``attrs`` added."""
    import zarr
    from zarr.codecs import BloscCodec

    from napari_esam.core.io import label_files as labels_io
    shape = source.out_shape
    ndim = len(shape)
    chunks = tuple(1 if a in source.out_stack_axes else min(s, PLANE_CHUNK)
                   for a, s in enumerate(shape))
    dtype = np.dtype(dtype)
    axes = _labels_axes(axes, source)
    meta = {
        "name": name or Path(path).stem,
        "axes": axes,
        "scale": [float(v) for v in scale] if scale is not None else [1.0] * ndim,
        "translate": [float(v) for v in translate] if translate is not None else [0.0] * ndim,
        "units": [None] * ndim,
    }
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array(
        "0",
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        compressors=(BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),),
        fill_value=0,
        dimension_names=list(axes) if axes else None,
        config={"write_empty_chunks": False},
    )
    marker = labels_io._marker(meta, dtype)
    if source.out_plane_axes != (ndim - 2, ndim - 1):  # read_labels moves the planes last
        marker["plane_axes"] = list(source.out_plane_axes)
    new_attrs = {**attrs, labels_io.MARKER: marker}
    if axes:
        new_attrs["ome"] = labels_io._ngff_attrs(meta, None)
    group.attrs.update(new_attrs)
    return group


def _labels_axes(axes: str | None, source: StackSource) -> str | None:
    """NGFF axis letters for the labels (from ``axes`` of the input when they fit, else the
    defaults ``yx``/``zyx``/``tzyx``/``tczyx``); None when the plane is not the last two axes."""
    from napari_esam.core.io import label_files as labels_io
    ndim = len(source.out_shape)
    if not 2 <= ndim <= 5 or source.out_plane_axes != (ndim - 2, ndim - 1):
        return None
    if axes is not None and len(axes) == len(source.shape):
        named = "".join(c for i, c in enumerate(axes.lower()) if i != source.channel_axis)
        try:
            return labels_io._check_axes(named, ndim)
        except ValueError:
            pass
    return labels_io.default_axes(ndim)


def _diff(old: Mapping, new: Mapping, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the output, {b!r} now")
    return out


def _check_own(path: Path) -> None:
    """Refuse to replace ``path`` unless it is one of our outputs (:data:`OWN_ATTRS`)."""
    if not is_own_store(path, OWN_ATTRS):
        raise FileExistsError(
            f"refusing to replace {str(path)!r}: it is not an output of napari-esam (move it "
            "away or choose another output)"
        )


def _remove_store(path: Path) -> None:
    """Delete an output we are allowed to replace (one of our own stores, never another
    folder or file)."""
    _check_own(path)
    shutil.rmtree(path)


class TileScratch:
    """The scratch Zarr group of a distributed tiled run.

    One subgroup ``t{index}`` per tile, written whole by the task that computed it (no two
    tasks share a chunk): ``boxes`` (n, 4) int32, ``bits`` (the masks' crops, raveled,
    concatenated and bit-packed), ``scores`` and ``order`` (predicted IoUs and record
    indices, for the paint and id order), attributes ``n`` and ``stats``. The root attribute
    ``napari-esam-tiles`` holds the run's record (what must match to reuse the tiles) and
    the finished tiles, written by the client only.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    @staticmethod
    def _attrs(path: str | os.PathLike[str]) -> dict | None:
        """The scratch attribute, checked: ``None`` when ``path`` is not a scratch group,
        ``{}`` when it is one whose attribute is damaged (its tiles are then recomputed)."""
        attrs = _root_attrs(path) or {}
        if SCRATCH_ATTR not in attrs:
            return None
        value = attrs[SCRATCH_ATTR]
        ok = (isinstance(value, dict) and isinstance(value.get("record"), dict)
              and isinstance(value.get("done", []), list)
              and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                      for i in value.get("done", [])))
        return value if ok else {}

    @classmethod
    def matches(cls, path: str | os.PathLike[str], record: dict) -> bool:
        """Whether ``path`` is a scratch group of a run with this record."""
        attrs = cls._attrs(path)
        return attrs is not None and attrs.get("record") == record

    @classmethod
    def open(cls, path: str | os.PathLike[str], record: dict, *,
             overwrite: bool = False) -> TileScratch:
        """Reuse the scratch group of the same run, or create it (``overwrite``: anew)."""
        import zarr

        target = Path(path)
        if target.exists() or target.is_symlink():
            attrs = cls._attrs(target)
            if attrs is None:
                raise FileExistsError(
                    f"{str(target)!r} exists and is not a napari-esam scratch group; move it "
                    "away or choose another scratch path"
                )
            if not overwrite and attrs:  # a damaged attribute ({}): started anew
                if attrs.get("record") == record:
                    return cls(target)
                diffs = _diff(attrs.get("record", {}), record, "")
                raise ValueError(
                    f"the scratch group {str(target)!r} holds the tiles of another run ("
                    + "; ".join(diffs[:4]) + "); delete it, or start over (overwrite=True, "
                    "CLI --overwrite)"
                )
            shutil.rmtree(target)
        group = zarr.open_group(str(target), mode="w", zarr_format=3)
        group.attrs[SCRATCH_ATTR] = {"format": SCRATCH_FORMAT, "record": record, "done": []}
        return cls(target)

    def done(self) -> set[int]:
        """The recorded (finished) tiles."""
        attrs = self._attrs(self.path) or {}
        return {int(i) for i in attrs.get("done", [])}

    def record(self, indices: Iterable[int]) -> None:
        """Record finished tiles (the client only: it rewrites the root attributes)."""
        indices = [int(i) for i in indices]
        if not indices:
            return
        import zarr

        group = zarr.open_group(self.path, mode="r+")
        rec = dict(self._attrs(self.path) or {})
        rec["done"] = sorted(set(rec.get("done", [])) | set(indices))
        group.attrs[SCRATCH_ATTR] = rec

    def write(self, index: int, kept: TileMasks) -> None:
        """Write one tile's kept masks (a task; only this tile's own subgroup)."""
        import zarr

        n = len(kept)
        bits = (np.packbits(np.concatenate([m.ravel() for m in kept.masks])) if n
                else np.zeros(0, np.uint8))
        group = zarr.open_group(str(Path(self.path) / f"t{int(index)}"), mode="w",
                                zarr_format=3)
        group.create_array("boxes", data=np.asarray(kept.boxes, np.int32).reshape(n, 4))
        group.create_array("bits", data=bits, chunks=(max(1, min(bits.size, 1 << 22)),))
        group.create_array("scores", data=np.asarray(kept.scores, np.float64).reshape(n))
        group.create_array("order", data=np.asarray(kept.order, np.int64).reshape(n))
        group.attrs.update({"n": n, "stats": {k: int(v) for k, v in kept.stats.items()}})

    def unreadable(self, indices: Iterable[int]) -> set[int]:
        """The finished tiles among ``indices`` whose stored masks cannot be read back
        (damaged chunks); they are dropped from the finished tiles, to be recomputed."""
        import zarr

        bad = set()
        for index in indices:
            try:
                group = zarr.open_group(str(Path(self.path) / f"t{int(index)}"), mode="r")
                for name in ("boxes", "bits", "scores", "order"):
                    np.asarray(group[name][...])
                int(group.attrs["n"])
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception:  # noqa: BLE001 - any damage: recompute the tile
                bad.add(int(index))
        if bad:
            import zarr

            group = zarr.open_group(self.path, mode="r+")
            rec = dict(self._attrs(self.path) or {})
            rec["done"] = sorted(set(rec.get("done", [])) - bad)
            group.attrs[SCRATCH_ATTR] = rec
        return bad

    def read(self, index: int, plane: tuple[int, ...], iy: int, ix: int) -> TileMasks:
        """Flat tile ``index``'s :class:`TileMasks` (tile (iy, ix) of ``plane``) back from the
        scratch group."""
        import zarr

        group = zarr.open_group(str(Path(self.path) / f"t{int(index)}"), mode="r")
        n = int(group.attrs["n"])
        boxes = np.asarray(group["boxes"][...], dtype=np.int64).reshape(n, 4)
        sizes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        flat = np.unpackbits(np.asarray(group["bits"][...]), count=int(sizes.sum()))
        flat = flat.astype(bool)
        masks, start = [], 0
        for (y0, x0, y1, x1), size in zip(boxes.tolist(), sizes.tolist(), strict=True):
            masks.append(flat[start : start + size].reshape(y1 - y0, x1 - x0))
            start += size
        stats = {k: int(v) for k, v in dict(group.attrs["stats"]).items()}
        scores = np.asarray(group["scores"][...], dtype=np.float64).reshape(n)
        order = np.asarray(group["order"][...], dtype=np.int64).reshape(n)
        return TileMasks(tuple(plane), iy, ix, boxes, masks, scores, order, stats)

    def remove(self) -> None:
        """Delete the scratch group (after the merge)."""
        if self._attrs(self.path) is not None:
            shutil.rmtree(self.path, ignore_errors=True)


