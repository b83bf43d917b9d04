"""Tiling geometry for images far larger than the model input (no Qt, no torch).

The grid (the rule is written in ``docs/rules/tiling.md``):

* ``tile`` is the side of one tile, i.e. of the encoder's input (1024 = the model's own
  resolution, so pixels are neither up- nor down-sampled); ``halo`` is the **overlap** between
  neighbouring tiles (at least ``halo`` pixels, spread evenly; an axis no longer than ``tile``
  is one tile as long as the axis).
* Every tile has a **core**: the tile minus half of each overlap with a neighbour (image
  borders are not trimmed). Cores partition the image: every pixel lies in exactly one core,
  and a point in a tile's core is at least ``halo // 2`` pixels from that tile's inner edges.

Inputs are NumPy, Dask or Zarr arrays (or anything sliceable with ``.shape``/``.dtype``); the
helpers here only ever slice the windows they need. Arrays may be 2-D ``(H, W)``, RGB
``(H, W, 3)``, or stacks ``(..., H, W[, 3])`` that are tiled per 2-D plane.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from napari_esam.core.plane.image import contrast_limits_of
from napari_esam.core.plane.params import check_integer

#: default tile side (the models' input size) and overlap
TILE = 1024
HALO = 256
#: smallest tile side
MIN_SIDE = 16
#: longest plane side (pixels) above which tiled mode "auto" tiles (widgets, CLI, Python)
TILING_THRESHOLD = 2048
#: smallest tile side accepted
MIN_TILE = 16
#: the lazy global sample (contrast limits and content hash): images up to this many pixels
#: are read whole, larger ones through SAMPLE_GRID² patches of SAMPLE_PATCH² pixels
SAMPLE_MAX_VALUES = 1 << 20
SAMPLE_PATCH = 128
SAMPLE_GRID = 8
SAMPLE_PLANES = 4
#: most chunks the sample reads (each patch touches at most 4 chunks)
SAMPLE_MAX_CHUNKS = 4 * SAMPLE_GRID * SAMPLE_GRID


# ------------------------------------------------------------------------------ inputs


def full_resolution(data: Any) -> Any:
    """The full-resolution array of ``data``: level 0 of a multiscale pyramid, else ``data``.

    Accepts napari ``MultiScaleData``, a list/tuple of arrays (napari's multiscale layer data,
    largest first; the level with the most pixels is taken whatever the order) and an
    OME-Zarr multiscale ``zarr.Group`` (its first dataset). A plain array is returned as is.
    """
    attrs = getattr(data, "attrs", None)
    if attrs is not None and not hasattr(data, "shape"):
        from napari_esam.core.io.ngff import full_resolution_array

        level = full_resolution_array(data, getattr(data, "store_path", "the Zarr group"))
        if level is not None:
            return level
    if hasattr(data, "shape") and hasattr(data, "dtype") and not hasattr(data, "shapes"):
        return data
    if isinstance(data, (list, tuple)) or hasattr(data, "shapes"):
        levels = list(data)
        if not levels:
            raise ValueError("an empty multiscale pyramid has no full-resolution level")
        return max(levels, key=lambda a: math.prod(int(s) for s in a.shape))
    return np.asarray(data)


def is_rgb_shape(shape: Sequence[int], rgb: bool | None = None) -> bool:
    """Whether the last axis is colour: ``rgb`` if given (napari's ``layer.rgb``; RGBA uses
    its first three channels), else ndim >= 3 and a last axis of 3."""
    if rgb is not None:
        return bool(rgb)
    return len(shape) >= 3 and int(shape[-1]) == 3


def plane_shape(shape: Sequence[int], rgb: bool | None = None) -> tuple[int, int]:
    """(H, W) of the 2-D planes of an array of ``shape``."""
    shape = tuple(int(s) for s in shape)
    spatial = shape[:-1] if is_rgb_shape(shape, rgb) else shape
    if len(spatial) < 2:
        raise ValueError(f"expected an image with at least 2 spatial axes, got shape {shape}")
    return spatial[-2], spatial[-1]


def leading_shape(shape: Sequence[int], rgb: bool | None = None) -> tuple[int, ...]:
    """Shape of the stack axes in front of the 2-D planes (``()`` for a single image)."""
    shape = tuple(int(s) for s in shape)
    n = len(shape) - (3 if is_rgb_shape(shape, rgb) else 2)
    return shape[:n]


def needs_tiling(
    shape: Sequence[int], threshold: int = TILING_THRESHOLD, rgb: bool | None = None
) -> bool:
    """True when the 2-D planes of ``shape`` have a side longer than ``threshold`` pixels."""
    h, w = plane_shape(shape, rgb)
    return max(h, w) > int(threshold)


#: tiled-mode choices: ``"auto"`` (planes with a side over the threshold), ``"on"``, ``"off"``
TILED_MODES = ("auto", "on", "off")


def use_tiling(
    mode: str, shape: Sequence[int], rgb: bool | None = None,
    threshold: int = TILING_THRESHOLD,
) -> bool:
    """Whether tiled mode ``mode`` tiles an image of ``shape`` (``rgb``: the last axis is
    colour): ``"on"`` always, ``"off"`` never, ``"auto"`` when a plane has a side longer
    than ``threshold`` px (:func:`needs_tiling`)."""
    if mode not in TILED_MODES:
        raise ValueError(f"tiled mode must be one of {TILED_MODES}, not {mode!r}")
    if mode == "auto":
        return needs_tiling(tuple(shape), threshold, rgb)
    return mode == "on"


def plane_grid(
    shape: Sequence[int], mode: str, tile: int = TILE, halo: int = HALO,
    threshold: int = TILING_THRESHOLD,
) -> TileGrid:
    """The tile grid of an (H, W) plane under tiled mode ``mode`` (``docs/rules/tiling.md``):
    tiles of ``tile`` px with ``halo`` overlap when the mode tiles the plane and it is larger
    than one tile; otherwise the whole plane as one tile (side ``max(H, W)``, no halo), so a
    tile as large as the plane gives the same grid as ``"off"``."""
    h, w = (int(s) for s in shape[:2])
    if use_tiling(mode, (h, w), threshold=threshold) and max(h, w) > int(tile):
        return TileGrid((h, w), int(tile), int(halo))
    return TileGrid((h, w), max(h, w, MIN_TILE), 0)


def read_window(
    data: Any, window: Window, index: tuple[int, ...] = (), rgb: bool = False
) -> np.ndarray:
    """The pixels of ``window`` in plane ``index`` as NumPy (reads only that region; an
    RGB(A) image keeps its first three channels)."""
    key = tuple(int(i) for i in index) + window.slices + ((slice(0, 3),) if rgb else ())
    part = data[key]
    if hasattr(part, "compute") and not isinstance(part, np.ndarray):
        part = part.compute()
    part = np.asarray(part)
    return part if part.flags.writeable else part.copy()


# ------------------------------------------------------------------------------ windows


class Window(NamedTuple):
    """A rectangle of pixels ``[y0, y1) x [x0, x1)`` in full-image coordinates."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def offset_xy(self) -> np.ndarray:
        """(x0, y0): subtract from full-image (x, y) to get window coordinates."""
        return np.array([self.x0, self.y0], dtype=np.float64)

    @property
    def area(self) -> int:
        return max(0, self.y1 - self.y0) * max(0, self.x1 - self.x0)

    def contains(self, other: Window) -> bool:
        return (
            self.y0 <= other.y0 and self.x0 <= other.x0
            and other.y1 <= self.y1 and other.x1 <= self.x1
        )

    def intersect(self, other: Window) -> Window | None:
        w = Window(
            max(self.y0, other.y0), max(self.x0, other.x0),
            min(self.y1, other.y1), min(self.x1, other.x1),
        )
        return w if w.y1 > w.y0 and w.x1 > w.x0 else None

    def union(self, other: Window) -> Window:
        return Window(
            min(self.y0, other.y0), min(self.x0, other.x0),
            max(self.y1, other.y1), max(self.x1, other.x1),
        )

    def relative_to(self, outer: Window) -> tuple[slice, slice]:
        """Slices of this window inside the array of ``outer``."""
        return (
            slice(self.y0 - outer.y0, self.y1 - outer.y0),
            slice(self.x0 - outer.x0, self.x1 - outer.x0),
        )


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`: its grid position, window and core."""

    iy: int
    ix: int
    window: Window
    core: Window

    @property
    def key(self) -> tuple[int, int]:
        return self.iy, self.ix


def _axis_starts(length: int, tile: int, halo: int) -> np.ndarray:
    """Evenly spread tile starts along one axis with overlaps of at least ``halo``."""
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((length - halo) / (tile - halo))
    return np.array([(i * (length - tile)) // (n - 1) for i in range(n)], dtype=np.int64)


def _axis_cores(starts: np.ndarray, size: int, length: int) -> np.ndarray:
    """Core boundaries (n + 1 values): 0, midpoints of the overlaps, ``length``."""
    ends = starts + size
    mids = [(int(starts[i + 1]) + int(ends[i])) // 2 for i in range(len(starts) - 1)]
    return np.array([0, *mids, length], dtype=np.int64)


class TileGrid:
    """The tiles of one (H, W) plane (see the module doc for the geometry)."""

    def __init__(self, shape: Sequence[int], tile: int = TILE, halo: int = HALO) -> None:
        h, w = (int(s) for s in shape[:2])
        tile = check_integer("tile", tile)
        halo = check_integer("halo", halo)
        if h < 2 or w < 2:
            raise ValueError(f"the image is too small to tile (shape {(h, w)})")
        if tile < MIN_TILE:
            raise ValueError(f"tile must be at least {MIN_TILE} pixels, got {tile}")
        if not 0 <= halo <= tile // 2:
            raise ValueError(
                f"halo (the overlap between tiles) must be in 0..{tile // 2} for tile {tile}, "
                f"got {halo}"
            )
        self.shape = (h, w)
        self.tile, self.halo = tile, halo
        self.tile_h, self.tile_w = min(tile, h), min(tile, w)
        self.ys = _axis_starts(h, tile, halo)
        self.xs = _axis_starts(w, tile, halo)
        self.core_ys = _axis_cores(self.ys, self.tile_h, h)
        self.core_xs = _axis_cores(self.xs, self.tile_w, w)

    def __repr__(self) -> str:
        return (
            f"TileGrid(shape={self.shape}, tile={self.tile}, halo={self.halo}, "
            f"tiles={self.n_y}x{self.n_x})"
        )

    @property
    def n_y(self) -> int:
        return len(self.ys)

    @property
    def n_x(self) -> int:
        return len(self.xs)

    @property
    def n_tiles(self) -> int:
        return self.n_y * self.n_x

    def __len__(self) -> int:
        return self.n_tiles

    def __iter__(self) -> Iterator[Tile]:
        """Tiles in raster order (row by row)."""
        for iy in range(self.n_y):
            for ix in range(self.n_x):
                yield self.tile_at(iy, ix)

    def tile_at(self, iy: int, ix: int) -> Tile:
        if not (0 <= iy < self.n_y and 0 <= ix < self.n_x):
            raise IndexError(f"tile ({iy}, {ix}) is outside the {self.n_y}x{self.n_x} grid")
        y0, x0 = int(self.ys[iy]), int(self.xs[ix])
        window = Window(y0, x0, y0 + self.tile_h, x0 + self.tile_w)
        core = Window(
            int(self.core_ys[iy]), int(self.core_xs[ix]),
            int(self.core_ys[iy + 1]), int(self.core_xs[ix + 1]),
        )
        return Tile(iy, ix, window, core)

    def tile_of(self, y: float, x: float) -> Tile:
        """The tile whose core contains pixel position (y, x) (clamped into the image)."""
        h, w = self.shape
        yi = min(max(int(math.floor(y)), 0), h - 1)
        xi = min(max(int(math.floor(x)), 0), w - 1)
        iy = int(np.searchsorted(self.core_ys, yi, side="right")) - 1
        ix = int(np.searchsorted(self.core_xs, xi, side="right")) - 1
        return self.tile_at(iy, ix)

    def tiles_touching(self, window: Window) -> list[Tile]:
        """Tiles whose window intersects ``window``."""
        return [t for t in self if t.window.intersect(window) is not None]

    def inner_margin(self, tile: Tile, extent: Window) -> float:
        """Distance from ``extent`` to the tile's inner edges (image borders do not count);
        negative when ``extent`` sticks out; ``inf`` when no inner edge limits it."""
        h, w = self.shape
        t = tile.window
        margins = [math.inf]
        if t.y0 > 0:
            margins.append(extent.y0 - t.y0)
        if t.x0 > 0:
            margins.append(extent.x0 - t.x0)
        if t.y1 < h:
            margins.append(t.y1 - extent.y1)
        if t.x1 < w:
            margins.append(t.x1 - extent.x1)
        if t.y0 == 0 and extent.y0 < 0 or t.x0 == 0 and extent.x0 < 0:
            margins.append(-1)
        return min(margins)

    def inner_edges(self, tile: Tile) -> tuple[bool, bool, bool, bool]:
        """Which edges of the tile (top, left, bottom, right) lie inside the image."""
        h, w = self.shape
        t = tile.window
        return t.y0 > 0, t.x0 > 0, t.y1 < h, t.x1 < w

    def signature(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "tile": self.tile, "halo": self.halo}


#: memory a tile needs at least per pixel while it is encoded and segmented (its pixels as
#: float32 RGB and 8-bit RGB, and a few full-size masks)
TILE_BYTES_PER_PIXEL = 16


def check_tile_memory(grid: TileGrid) -> None:
    """``ValueError`` when one tile of ``grid`` (a whole plane when untiled) would need more
    than half the available memory (:data:`TILE_BYTES_PER_PIXEL`), before anything is read."""
    from napari_esam.core.io.sizes import available_memory, check_fits_in_memory

    side = max(MIN_SIDE, math.isqrt(available_memory() // 2 // TILE_BYTES_PER_PIXEL))
    check_fits_in_memory(
        grid.tile_h * grid.tile_w * TILE_BYTES_PER_PIXEL,
        f"segmenting a tile of {grid.tile_h} x {grid.tile_w} px (a whole plane when it is "
        "not tiled)",
        f"cut the planes into tiles of at most {min(side, TILE)} px (tiled mode on; CLI "
        f"--tiled on --tile {min(side, TILE)})",
    )


def centred_window(extent: Window, shape: Sequence[int], size: tuple[int, int]) -> Window:
    """A window of ``size`` (clipped to the image) centred on ``extent``, shifted inside."""
    h, w = (int(s) for s in shape[:2])
    sh, sw = min(int(size[0]), h), min(int(size[1]), w)
    cy, cx = (extent.y0 + extent.y1) / 2, (extent.x0 + extent.x1) / 2
    y0 = int(round(cy - sh / 2))
    x0 = int(round(cx - sw / 2))
    y0 = min(max(y0, 0), h - sh)
    x0 = min(max(x0, 0), w - sw)
    return Window(y0, x0, y0 + sh, x0 + sw)


# ------------------------------------------------------------------- global sample/contrast


def _spread(n_total: int, n_pick: int) -> list[int]:
    """``n_pick`` indices spread evenly over ``range(n_total)`` (centres of equal parts)."""
    n_pick = max(1, min(n_pick, n_total))
    return sorted({int((i + 0.5) * n_total / n_pick) for i in range(n_pick)})


def _patch_starts(length: int, n: int, size: int) -> list[int]:
    """Starts of ``n`` patches of ``size`` spread over an axis, aligned to ``size``."""
    starts = set()
    for i in range(n):
        centre = (i + 0.5) * length / n
        start = int(round((centre - size / 2) / size)) * size
        starts.add(min(max(start, 0), max(length - size, 0)))
    return sorted(starts)


def sample_patches(shape: Sequence[int], rgb: bool | None = None) -> list[tuple]:
    """The index keys of :func:`global_sample` (they depend on the shape only)."""
    shape = tuple(int(s) for s in shape)
    lead = leading_shape(shape, rgb)
    h, w = plane_shape(shape, rgb)
    n_planes = math.prod(lead)
    planes = _spread(n_planes, SAMPLE_PLANES)
    per_side = SAMPLE_GRID if len(planes) == 1 else max(1, SAMPLE_GRID // 2)
    size = SAMPLE_PATCH
    keys = []
    for p in planes:
        idx = tuple(int(i) for i in np.unravel_index(p, lead)) if lead else ()
        for y in _patch_starts(h, per_side, size):
            for x in _patch_starts(w, per_side, size):
                keys.append(idx + (slice(y, min(h, y + size)), slice(x, min(w, x + size))))
    return keys


def global_sample(data: Any, rgb: bool | None = None) -> np.ndarray:
    """A lazy, deterministic subsample of the whole array (for contrast limits and hashing).

    Arrays of at most ``SAMPLE_MAX_VALUES`` pixels are read whole. Larger ones give a grid of
    ``SAMPLE_PATCH``-pixel square patches (8 x 8 on one plane; 4 x 4 on each of up to 4
    evenly spread planes of a stack), evenly spread and aligned to multiples of the patch
    size, so a patch lies in a single chunk whenever chunk sides are multiples of 128, and at
    most 4 chunks otherwise. The sample depends on the shape and pixels only, never on the
    array type or its chunking (so NumPy, Dask and Zarr views of one image agree).
    Returns a flat array (RGB: (N, 3)).
    """
    shape = tuple(int(s) for s in data.shape)
    is_rgb = is_rgb_shape(shape, rgb)

    def flat(a: Any) -> np.ndarray:
        if hasattr(a, "compute") and not isinstance(a, np.ndarray):
            a = a.compute()
        a = np.asarray(a)
        return a[..., :3].reshape(-1, 3) if is_rgb else a.reshape(-1)

    h, w = plane_shape(shape, is_rgb)
    if math.prod(leading_shape(shape, is_rgb)) * h * w <= SAMPLE_MAX_VALUES:
        return flat(data[...])
    return np.concatenate([flat(data[key]) for key in sample_patches(shape, is_rgb)])


def global_contrast_limits(
    data: Any, rgb: bool | None = None, sample: np.ndarray | None = None
) -> tuple[float, float] | None:
    """Contrast limits for every tile of ``data``: one (lo, hi) for the whole array.

    ``None`` for ``uint8`` and ``bool`` images (they are used unscaled, as by
    :func:`~napari_esam.core.plane.image.to_model_rgb`); otherwise the 0.5/99.5 percentiles of
    :func:`global_sample` (64 small patches; never the whole image).
    """
    dtype = np.dtype(data.dtype)
    if dtype == np.uint8 or dtype.kind == "b":
        return None
    if dtype.kind not in "iuf":
        raise ValueError(f"unsupported image dtype {dtype}; use an integer or float image")
    if sample is None:
        sample = global_sample(data, rgb)
    lo, hi = contrast_limits_of(sample)
    return lo, hi


def plane_sample(data: Any, index: tuple[int, ...] = (), rgb: bool | None = None) -> np.ndarray:
    """:func:`global_sample` of one 2-D plane of ``data`` (``index``: its leading indices):
    the whole plane up to ``SAMPLE_MAX_VALUES`` pixels, else 8 x 8 patches of
    ``SAMPLE_PATCH`` px. Flat (RGB: (N, 3))."""
    shape = tuple(int(s) for s in data.shape)
    is_rgb = is_rgb_shape(shape, rgb)
    h, w = plane_shape(shape, is_rgb)
    index = tuple(int(i) for i in index)

    def flat(a: Any) -> np.ndarray:
        if hasattr(a, "compute") and not isinstance(a, np.ndarray):
            a = a.compute()
        a = np.asarray(a)
        return a[..., :3].reshape(-1, 3) if is_rgb else a.reshape(-1)

    whole = (slice(0, h), slice(0, w))
    if h * w <= SAMPLE_MAX_VALUES:
        return flat(data[index + whole])
    plane = (h, w, 3) if is_rgb else (h, w)
    return np.concatenate([flat(data[index + key]) for key in sample_patches(plane, is_rgb)])


def plane_contrast_limits(
    data: Any, index: tuple[int, ...] = (), rgb: bool | None = None
) -> tuple[float, float] | None:
    """The contrast rule of a plane (``docs/rules/tiling.md#contrast``): ``None`` for uint8
    and bool (used unscaled), else the 0.5/99.5 percentiles of :func:`plane_sample` (the
    whole plane up to 1 Mpx, so then exactly the plane's own percentiles)."""
    dtype = np.dtype(data.dtype)
    if dtype == np.uint8 or dtype.kind == "b":
        return None
    if dtype.kind not in "iuf":
        raise ValueError(f"unsupported image dtype {dtype}; use an integer or float image")
    return contrast_limits_of(plane_sample(data, index, rgb))


def content_hash(data: Any, rgb: bool | None = None, sample: np.ndarray | None = None) -> str:
    """Hash identifying the image content: shape, dtype and :func:`global_sample` bytes.

    Cheap and lazy, and the same for NumPy, Dask and Zarr views of an image; it misses
    edits of pixels outside the sample (images above 1 Mpx); the embedding store
    also keeps a hash of every tile's pixels for a full check (``verify_tiles``).
    """
    if sample is None:
        sample = global_sample(data, rgb)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(int(s) for s in data.shape), str(np.dtype(data.dtype)))).encode())
    h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()


def tile_hash(pixels: np.ndarray) -> str:
    """Hash of one tile's raw pixels (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((pixels.shape, str(pixels.dtype))).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def iter_planes(shape: Sequence[int], rgb: bool | None = None) -> Iterator[tuple[int, ...]]:
    """Leading indices of every 2-D plane (``()`` once for a single image)."""
    lead = leading_shape(shape, rgb)
    yield from np.ndindex(*lead) if lead else iter([()])
