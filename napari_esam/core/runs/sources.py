"""Plane sources: how an N-D input is cut into the 2-D planes a run segments.

:class:`StackSource` says which axes are iterated (the *stack axes*; flat plane index = C order
over them), which axis is colour (one channel picked, or RGB(A)) and which two form the
plane. :meth:`StackSource.planes` is the input seen as ``(n_planes, H, W[, 3])``, lazily, for
the tile grid and the embeddings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.io.inputs import open_input, opened
from napari_esam.core.plane.image import check_image_shape

__all__ = ["PlanesView", "StackSource"]


@dataclass(frozen=True, eq=False)
class StackSource:
    """How to cut an input into 2-D slices; picklable (a path travels as a path).

    ``data``: a path or an array-like. ``stack_axes``: the iterated axes (``None``: all but
    the channel axis and the last two others). ``channel_axis``: ``None``, an axis, or
    ``"auto"`` (the last axis when it has 3 or 4 entries and the array is >= 3-D).
    ``channel``: with a channel axis, the channel to segment, or ``None`` for RGB (the first
    three channels). Build with :meth:`create`, which resolves and checks everything.
    """

    data: Any
    stack_axes: tuple[int, ...]
    channel_axis: int | None
    channel: int | None
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def create(
        cls,
        data: Any,
        axis: int | Sequence[int] | None = None,
        channel_axis: int | str | None = "auto",
        channel: int | None = None,
    ) -> StackSource:
        if isinstance(data, (str, os.PathLike)):
            data = str(Path(data).expanduser().resolve())
            arr = opened(data)
        else:
            arr = open_input(data)
        shape = tuple(int(s) for s in arr.shape)
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(f"expected an image of at least 2 dimensions, got shape {shape}")
        if np.dtype(arr.dtype).kind not in "biuf":
            raise ValueError(f"unsupported image dtype {arr.dtype}; use integer or float data")
        if channel_axis == "auto":
            channel_axis = ndim - 1 if ndim >= 3 and shape[-1] in (3, 4) else None
        if channel_axis is not None:
            channel_axis = _axis_index(channel_axis, ndim, "channel axis")
            size = shape[channel_axis]
            if channel is None:
                if size not in (3, 4):
                    raise ValueError(
                        f"the channel axis {channel_axis} has {size} channels: choose one to "
                        "segment (channel=..., CLI --channel), or RGB needs 3 (or 4) channels"
                    )
            elif not -size <= channel < size:
                raise ValueError(f"channel {channel} out of range for {size} channels")
            else:
                channel %= size
        elif channel is not None:
            raise ValueError("a channel was given but no channel axis")
        others = [a for a in range(ndim) if a != channel_axis]
        if len(others) < 2:
            raise ValueError(f"shape {shape} has no 2-D image plane besides the channel axis")
        if axis is None:
            stack = tuple(others[:-2])
        else:
            axes = [axis] if isinstance(axis, (int, np.integer)) else list(axis)
            stack = tuple(sorted({_axis_index(a, ndim, "stack axis") for a in axes}))
            if channel_axis in stack:
                raise ValueError(f"axis {channel_axis} is the channel axis, not a stack axis")
            plane = [a for a in others if a not in stack]
            if len(plane) != 2:
                raise ValueError(
                    f"stack axes {list(stack)} of shape {shape} leave {len(plane)} image axes "
                    f"{plane}; a slice needs exactly 2 (for a {ndim}-D stack give "
                    f"{ndim - 2 - (channel_axis is not None)} stack axes, e.g. "
                    f"{others[:-2]})"
                )
        src = cls(data, stack, channel_axis, channel, shape, str(np.dtype(arr.dtype)))
        h, w = src.plane_shape
        check_image_shape((h, w))
        return src

    # -- geometry
    @property
    def array(self) -> Any:
        return opened(self.data) if isinstance(self.data, str) else self.data

    @property
    def plane_axes(self) -> tuple[int, int]:
        a, b = (i for i in range(len(self.shape)) if i not in self.stack_axes
                and i != self.channel_axis)
        return a, b

    @property
    def plane_shape(self) -> tuple[int, int]:
        a, b = self.plane_axes
        return self.shape[a], self.shape[b]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.stack_axes)

    @property
    def n_slices(self) -> int:
        return math.prod(self.stack_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the labels: the input's without its channel axis."""
        return tuple(s for i, s in enumerate(self.shape) if i != self.channel_axis)

    def _out_axis(self, a: int) -> int:
        return a - int(self.channel_axis is not None and a > self.channel_axis)

    @property
    def out_stack_axes(self) -> tuple[int, ...]:
        return tuple(self._out_axis(a) for a in self.stack_axes)

    @property
    def out_plane_axes(self) -> tuple[int, int]:
        a, b = self.plane_axes
        return self._out_axis(a), self._out_axis(b)

    def coords(self, index: int) -> tuple[int, ...]:
        """Stack-axis coordinates of flat slice ``index`` (C order)."""
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} out of range for {self.n_slices} slices")
        if not self.stack_axes:
            return ()
        return tuple(int(i) for i in np.unravel_index(index, self.stack_shape))

    def out_region(self, index: int) -> tuple:
        """Index into the labels array selecting slice ``index``."""
        coords = dict(zip(self.out_stack_axes, self.coords(index), strict=True))
        return tuple(coords.get(a, slice(None)) for a in range(len(self.out_shape)))

    @property
    def rgb(self) -> bool:
        """Whether planes are colour (RGB, the first three channels of the colour axis)."""
        return self.channel_axis is not None and self.channel is None

    def planes(self) -> Any:
        """The input seen as ``(*stack_shape, H, W[, 3])``, lazily: the array itself when it
        is laid out so already, else a :class:`PlanesView` (reads only what is indexed)."""
        arr = self.array
        ndim = len(self.shape)
        k = len(self.stack_axes)
        plain = self.stack_axes == tuple(range(k)) and self.plane_axes == (k, k + 1) and (
            self.channel_axis is None or (self.rgb and self.channel_axis == ndim - 1))
        return arr if plain else PlanesView(self)

    def read(self, index: int, window: Any = None) -> np.ndarray:
        """Plane ``index`` (or the ``window`` of it: a tiling ``Window``) as (h, w) or
        (h, w, 3), read from the (lazy) input."""
        from napari_esam.core.tiling.grid import Window, read_window

        h, w = self.plane_shape
        window = Window(0, 0, h, w) if window is None else window
        return read_window(self.planes(), window, self.coords(index), self.rgb)

    def read_slice(self, index: int) -> np.ndarray:
        """Slice ``index`` as (H, W) or (H, W, 3), read from the (lazy) input."""
        return self.read(index)

    def describe(self) -> dict[str, Any]:
        """JSON record of the geometry (compared on resume)."""
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "stack_axes": list(self.stack_axes),
            "channel_axis": self.channel_axis,
            "channel": self.channel,
        }


def _axis_index(axis: Any, ndim: int, what: str) -> int:
    try:
        a = int(axis)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {axis!r}") from None
    if not -ndim <= a < ndim:
        raise ValueError(f"{what} {a} is out of range for a {ndim}-D image (0..{ndim - 1})")
    return a % ndim




class PlanesView:
    """A :class:`StackSource`'s input as ``(*stack_shape, H, W[, 3])`` with basic indexing
    (ints, slices, ``...``), reading only the indexed part of the underlying array."""

    def __init__(self, source: StackSource) -> None:
        self.source = source
        extra = (3,) if source.rgb else ()
        self.shape = (*source.stack_shape, *source.plane_shape, *extra)
        self.dtype = np.dtype(source.dtype)
        self.ndim = len(self.shape)
        # the source axis of every view axis
        self._axes = [*source.stack_axes, *source.plane_axes]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        src = self.source
        full: list[Any] = [slice(None)] * len(src.shape)
        for view_axis, axis in enumerate(self._axes):
            full[axis] = key[view_axis]
        if src.channel_axis is not None:
            full[src.channel_axis] = slice(0, 3) if src.rgb else src.channel
        block = src.array[tuple(full)]
        if hasattr(block, "compute") and not isinstance(block, np.ndarray):
            block = block.compute()
        block = np.asarray(block)
        # axes left (sliced), in the source's order -> the view's order (colour last)
        left = [a for a in range(len(src.shape)) if isinstance(full[a], slice)]
        order = [a for a in self._axes if isinstance(full[a], slice)]
        if src.rgb:
            order.append(src.channel_axis)
        block = np.transpose(block, [left.index(a) for a in order])
        if src.rgb:
            block = block[..., key[-1]]
        return block
