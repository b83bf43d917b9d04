"""An on-disk store of per-tile image embeddings (Zarr), so a second session opens instantly.

Layout of ``EMBEDDINGS.zarr`` (a Zarr v3 group; ``L`` = the image's stack axes, ``()`` for a
single 2-D image; ``ny x nx`` = the tile grid of one plane):

* ``embeddings`` (*L, ny, nx, 256, 64, 64) float32, one chunk per tile;
* ``done`` (*L, ny, nx) uint8: 1 once a tile's embedding is written (written last, so an
  interrupted run recomputes at most the tile it was writing: the store is resumable);
* ``input_size`` (*L, ny, nx, 2) int32: the model's ``input_size`` of each tile;
* ``tile_hash`` (*L, ny, nx, 16) uint8: BLAKE2b-128 of the tile's raw pixels (for
  ``verify_tiles``);
* attribute ``napari_esam_embeddings``: the :class:`StoreSignature`.

**Signature**: what must match for a store to be reused (image shape, dtype, RGB-ness,
content hash, contrast limits, model and weights fingerprint, tile and halo); anything else
is rejected with a :class:`StaleEmbeddingStoreError` naming the differences. The rule is
written in ``docs/rules/embedding-store.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.io.chunks import CorruptChunkError, checked
from napari_esam.core.tiling.grid import (
    TileGrid,
    content_hash,
    global_sample,
    is_rgb_shape,
    leading_shape,
    plane_shape,
)

#: 2: automatic contrast limits are per plane (version 1 stores are refused as stale)
FORMAT_VERSION = 2
ATTR = "napari_esam_embeddings"
EMBED_SHAPE = (256, 64, 64)


class StaleEmbeddingStoreError(ValueError):
    """The store on disk was computed for another image, model or grid."""


def model_fingerprint(model: Any) -> str:
    """BLAKE2b-128 of a model's state dict (names, shapes, dtypes and values).

    Cached on the model until a tensor is replaced or modified in place (torch's version
    counters and storage pointers are the cache key).
    """
    state = model.state_dict()
    stamp = tuple((t.data_ptr(), t._version) for t in state.values())
    cached = getattr(model, "_napari_esam_fingerprint", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in state.items():
        arr = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}{tuple(arr.shape)}{arr.dtype}".encode())
        h.update(arr.tobytes())
    value = h.hexdigest()
    try:
        object.__setattr__(model, "_napari_esam_fingerprint", (stamp, value))
    except Exception:  # noqa: BLE001 - caching is optional
        pass
    return value


@dataclass(frozen=True)
class StoreSignature:
    """What an embedding store was computed from (see the module doc)."""

    image_shape: tuple[int, ...]
    dtype: str
    rgb: bool
    content_hash: str
    contrast_limits: tuple[float, float] | None
    model: str
    model_fingerprint: str
    tile: int
    halo: int
    format: int = FORMAT_VERSION

    @classmethod
    def for_image(
        cls,
        data: Any,
        model: Any,
        *,
        tile: int,
        halo: int,
        rgb: bool | None = None,
        contrast_limits: tuple[float, float] | None = None,
        sample: np.ndarray | None = None,
    ) -> StoreSignature:
        """The signature of ``data`` (lazy: reads only :func:`global_sample`)."""
        is_rgb = is_rgb_shape(data.shape, rgb)
        if sample is None:
            sample = global_sample(data, is_rgb)
        return cls(
            image_shape=tuple(int(s) for s in data.shape),
            dtype=str(np.dtype(data.dtype)),
            rgb=is_rgb,
            content_hash=content_hash(data, is_rgb, sample),
            contrast_limits=None
            if contrast_limits is None
            else (float(contrast_limits[0]), float(contrast_limits[1])),
            model=str(getattr(model, "name", type(model).__name__)),
            model_fingerprint=model_fingerprint(model),
            tile=int(tile),
            halo=int(halo),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        d["contrast_limits"] = None if self.contrast_limits is None else list(self.contrast_limits)
        return d

    @classmethod
    def from_json(cls, d: Any) -> StoreSignature:
        """The signature stored as JSON; ``ValueError`` naming the first missing or malformed
        field."""
        if not isinstance(d, dict):
            raise ValueError(f"the signature is {type(d).__name__}, not a mapping")
        try:
            cl = d.get("contrast_limits")
            sig = cls(
                image_shape=tuple(int(s) for s in d["image_shape"]),
                dtype=str(np.dtype(d["dtype"])),
                rgb=_flag(d["rgb"]),
                content_hash=_text(d["content_hash"]),
                contrast_limits=None if cl is None else (float(cl[0]), float(cl[1])),
                model=_text(d["model"]),
                model_fingerprint=_text(d["model_fingerprint"]),
                tile=int(d["tile"]),
                halo=int(d["halo"]),
                format=int(d.get("format", 0)),
            )
        except KeyError as exc:
            raise ValueError(f"the signature has no {exc.args[0]!r}") from None
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"the signature holds a malformed value ({exc})") from None
        if len(sig.image_shape) < 2 or min(sig.image_shape) < 1:
            raise ValueError(f"the signature's image shape {sig.image_shape} is not an image")
        return sig

    def differences(self, other: StoreSignature) -> list[str]:
        """Human-readable list of fields where ``other`` (the current input) differs."""
        names = {
            "format": "store format",
            "image_shape": "image shape",
            "dtype": "image dtype",
            "rgb": "RGB",
            "content_hash": "image content (hash of a sample of the pixels)",
            "contrast_limits": "contrast limits",
            "model": "model",
            "model_fingerprint": "model weights",
            "tile": "tile size",
            "halo": "halo",
        }
        mine, theirs = self.to_json(), other.to_json()
        out = []
        for key, label in names.items():
            if mine[key] != theirs[key]:
                out.append(f"{label}: store has {mine[key]!r}, this input has {theirs[key]!r}")
        return out


#: disk space one stored tile takes at most: its float32 embedding (hardly compressible)
TILE_BYTES = 4 * int(np.prod(EMBED_SHAPE))
#: a store estimated above this size is announced with a warning before it is written
WARN_BYTES = 10 * 2**30


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a store about to be replaced frees them)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_space(path: Path, n_tiles: int, reclaimed: int = 0) -> None:
    """Refuse (or announce) ``n_tiles`` tiles still to write into the store ``path``
    (``reclaimed``: bytes freed first, by replacing an old store)."""
    from napari_esam.core.io.sizes import format_bytes, free_disk

    need, free = n_tiles * TILE_BYTES, free_disk(path) + reclaimed
    size = f"about {format_bytes(need)} ({n_tiles} tiles of {format_bytes(TILE_BYTES)})"
    if need > free:
        raise ValueError(
            f"the embedding store {path} would need {size} but only {format_bytes(free)} are "
            "free on its disk; free space, put the store on another disk, use fewer planes, "
            "or pass --no-space-check (check_space=False) if you know it fits"
        )
    if need > WARN_BYTES:
        warnings.warn(f"the embedding store {path} will take {size} of disk space",
                      stacklevel=3)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def damaged_store(path: Any, what: str) -> ValueError:
    """The error for an embedding store whose metadata or arrays are damaged."""
    return ValueError(
        f"the embedding store {path} is damaged ({what}); delete it to recompute it, or "
        "recreate it with napari-esam embed --overwrite"
    )


def _open_group(path: str | os.PathLike[str]) -> Any:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"{path} is not a napari-esam embedding store (not a Zarr group: {exc})"
        ) from exc
    if ATTR not in group.attrs:
        raise ValueError(f"{path} is a Zarr group but not a napari-esam embedding store")
    return group


def read_signature(path: str | os.PathLike[str]) -> StoreSignature:
    """The signature of an existing store (e.g. to reuse its model, tile and halo);
    ``ValueError`` if it is not a store or its signature is damaged."""
    try:
        return StoreSignature.from_json(_open_group(path).attrs[ATTR])
    except ValueError as exc:
        if "not a napari-esam embedding store" in str(exc):
            raise
        raise damaged_store(path, str(exc)) from None


class EmbeddingStore:
    """Per-tile embeddings of one image on disk (module doc). Open with :meth:`open`."""

    def __init__(self, path: Path, group: Any, signature: StoreSignature, writable: bool) -> None:
        self.path = path
        self.group = group
        self.signature = signature
        self.writable = writable
        shape = signature.image_shape
        self.lead = leading_shape(shape, signature.rgb)
        self.grid = TileGrid(plane_shape(shape, signature.rgb), signature.tile, signature.halo)
        tiles = (*self.lead, self.grid.n_y, self.grid.n_x)
        expected = {"embeddings": (*tiles, *EMBED_SHAPE), "done": tiles,
                    "input_size": (*tiles, 2), "tile_hash": (*tiles, 16)}
        arrays = {}
        for name, shape in expected.items():
            try:
                arrays[name] = group[name]
            except KeyError:
                raise damaged_store(path, f"the array {name!r} is missing") from None
            found = getattr(arrays[name], "shape", None)
            if found is None or tuple(found) != shape:
                raise damaged_store(
                    path, f"{name!r} has shape {found}, not {shape} as its signature says")
        arrays = {k: checked(v, path) for k, v in arrays.items()}
        self._emb = arrays["embeddings"]
        self._done_arr = arrays["done"]
        self._input_size = arrays["input_size"]
        self._hash = arrays["tile_hash"]
        self._done_cache: dict[tuple[int, ...], np.ndarray] = {}
        self._meta_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        #: write only embeddings in :meth:`save`; their records wait in ``deferred``
        self.defer_records = False
        self.deferred: dict[tuple, tuple[tuple[int, int], str]] = {}

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, {self.n_done}/{self.n_total} tiles)"

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        signature: StoreSignature,
        mode: str = "a",
        *,
        check_space: bool = True,
    ) -> EmbeddingStore:
        """Open (``"r"``: must exist; ``"a"``: create if missing) or recreate (``"w"``).

        An existing store must have the same signature, else :class:`StaleEmbeddingStoreError`.
        ``check_space``: before anything is written, the size of the tiles still missing
        (:data:`TILE_BYTES` each) is estimated; more than the free disk space is refused
        (``ValueError``), more than :data:`WARN_BYTES` gives a warning with the size.
        """
        import zarr

        if mode not in ("r", "a", "w"):
            raise ValueError(f"mode must be 'r', 'a' or 'w', not {mode!r}")
        path = Path(path)
        exists = path.exists()
        if mode == "r" and not exists:
            raise FileNotFoundError(f"embedding store {path} does not exist")
        if exists and mode != "w":
            stored = read_signature(path)
            diff = stored.differences(signature)
            if diff:
                raise StaleEmbeddingStoreError(
                    f"the embedding store {path} does not match this image/model/grid: "
                    + "; ".join(diff)
                    + ". Use another store path, or delete it to recompute"
                )
            group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
            store = cls(path, group, stored, writable=mode != "r")
            if check_space and store.writable:
                _check_space(path, store.n_total - store.n_done)
            return store
        if exists:
            if not path.is_dir() or not (path / "zarr.json").exists():
                raise OSError(f"refusing to overwrite {path}: it is not a Zarr store")
            _open_group(path)  # refuse to overwrite a Zarr that is not an embedding store
        if check_space:
            lead = leading_shape(signature.image_shape, signature.rgb)
            grid = TileGrid(plane_shape(signature.image_shape, signature.rgb),
                            signature.tile, signature.halo)
            _check_space(path, int(np.prod(lead, dtype=np.int64)) * grid.n_tiles,
                         _tree_bytes(path) if exists else 0)
        group = zarr.open_group(str(path), mode="w")
        lead = leading_shape(signature.image_shape, signature.rgb)
        grid = TileGrid(
            plane_shape(signature.image_shape, signature.rgb), signature.tile, signature.halo
        )
        ones = (1,) * len(lead)
        tiles = (*lead, grid.n_y, grid.n_x)
        group.create_array(
            "embeddings", shape=(*tiles, *EMBED_SHAPE), chunks=(*ones, 1, 1, *EMBED_SHAPE),
            dtype="float32", fill_value=0.0,
        )
        per_plane = (*ones, grid.n_y, grid.n_x)
        group.create_array("done", shape=tiles, chunks=per_plane, dtype="uint8", fill_value=0)
        group.create_array(
            "input_size", shape=(*tiles, 2), chunks=(*per_plane, 2), dtype="int32", fill_value=0
        )
        group.create_array(
            "tile_hash", shape=(*tiles, 16), chunks=(*per_plane, 16), dtype="uint8", fill_value=0
        )
        group.attrs[ATTR] = json.loads(json.dumps(signature.to_json()))
        return cls(path, group, signature, writable=True)

    # ------------------------------------------------------------------ tiles
    def _plane(self, plane: tuple[int, ...]) -> tuple[int, ...]:
        plane = tuple(int(i) for i in plane)
        if len(plane) != len(self.lead) or any(
            not 0 <= i < n for i, n in zip(plane, self.lead, strict=True)
        ):
            raise IndexError(f"plane index {plane} does not fit the stack shape {self.lead}")
        return plane

    def done_mask(self, plane: tuple[int, ...] = ()) -> np.ndarray:
        """(ny, nx) bool: which tiles of ``plane`` are stored (none when the plane's flags
        or metadata cannot be decoded: its tiles are then recomputed and recorded anew)."""
        plane = self._plane(plane)
        if plane not in self._done_cache:
            try:
                done = np.asarray(self._done_arr[plane]).astype(bool)
                self._meta(plane)
            except CorruptChunkError:
                shape = (self.grid.n_y, self.grid.n_x)
                done = np.zeros(shape, bool)
                self._meta_cache[plane] = (np.zeros((*shape, 2), np.int32),
                                           np.zeros((*shape, 16), np.uint8))
            self._done_cache[plane] = done
        return self._done_cache[plane]

    def has(self, plane: tuple[int, ...], iy: int, ix: int) -> bool:
        return bool(self.done_mask(plane)[iy, ix])

    def _meta(self, plane: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if plane not in self._meta_cache:
            self._meta_cache[plane] = (
                np.asarray(self._input_size[plane]),
                np.asarray(self._hash[plane]),
            )
        return self._meta_cache[plane]

    def load(
        self, plane: tuple[int, ...], iy: int, ix: int
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """(embedding (256, 64, 64) float32, input_size) of a stored tile;
        :class:`~napari_esam.core.io.chunks.CorruptChunkError` when its chunk cannot be
        decoded."""
        plane = self._plane(plane)
        if not self.has(plane, iy, ix):
            raise KeyError(f"tile ({iy}, {ix}) of plane {plane} is not in the store")
        sizes, _ = self._meta(plane)
        features = np.asarray(self._emb[(*plane, iy, ix)], dtype=np.float32)
        return features, (int(sizes[iy, ix, 0]), int(sizes[iy, ix, 1]))

    def stored_tile_hash(self, plane: tuple[int, ...], iy: int, ix: int) -> str:
        _, hashes = self._meta(self._plane(plane))
        return bytes(hashes[iy, ix].astype(np.uint8)).hex()

    def save(
        self,
        plane: tuple[int, ...],
        iy: int,
        ix: int,
        features: np.ndarray,
        input_size: tuple[int, int],
        pixel_hash: str,
    ) -> None:
        """Write one tile (embedding first, then its metadata and ``done`` flag).

        With ``defer_records`` (a Dask worker: several processes must not rewrite the
        per-plane metadata chunks), only the embedding is written; its (input_size, hash)
        wait in ``deferred`` for the one process that calls :meth:`record`.
        """
        if not self.writable:
            raise OSError(f"the embedding store {self.path} is open read-only")
        plane = self._plane(plane)
        feats = np.asarray(features, dtype=np.float32).reshape(EMBED_SHAPE)
        self._emb[(*plane, iy, ix)] = feats  # one chunk per tile: safe from any process
        if self.defer_records:
            self.deferred[(plane, int(iy), int(ix))] = (
                (int(input_size[0]), int(input_size[1])), str(pixel_hash)
            )
        else:
            self.record(plane, iy, ix, input_size, pixel_hash)

    def record(
        self,
        plane: tuple[int, ...],
        iy: int,
        ix: int,
        input_size: tuple[int, int],
        pixel_hash: str,
    ) -> None:
        """Mark a tile whose embedding is written as done (its metadata, then ``done``)."""
        if not self.writable:
            raise OSError(f"the embedding store {self.path} is open read-only")
        plane = self._plane(plane)
        sizes, hashes = self._meta(plane)
        sizes = sizes.copy()
        hashes = hashes.copy()
        sizes[iy, ix] = input_size
        hashes[iy, ix] = np.frombuffer(bytes.fromhex(pixel_hash), dtype=np.uint8)
        self._input_size[plane] = sizes
        self._hash[plane] = hashes
        self._meta_cache[plane] = (sizes, hashes)
        done = self.done_mask(plane).copy()
        done[iy, ix] = True
        self._done_arr[plane] = done.astype(np.uint8)
        self._done_cache[plane] = done

    # ------------------------------------------------------------------ progress
    @property
    def n_total(self) -> int:
        return int(np.prod(self.lead, dtype=np.int64)) * self.grid.n_tiles

    @property
    def n_done(self) -> int:
        return sum(int(self.done_mask(p).sum()) for p in np.ndindex(*self.lead))
