"""Segment everything over every 2-D slice of a stack, resumably, into memory or Zarr.

No Qt here: the widget, the CLI and the Dask cluster runner are thin layers over this module.

Pieces (each usable on its own):

* :func:`open_input` opens NumPy / Dask / Zarr arrays, ``.zarr`` folders, TIFFs (lazily,
  through tifffile's Zarr store), ``.npy`` (memory-mapped) and PNG/JPEG files.
* :class:`StackSource` says how an N-D array is cut into 2-D slices: the *stack axes* are
  iterated (flat slice index = C order over them), an optional *channel axis* is picked
  (one channel, or RGB(A)), the two remaining axes form the image plane.
* :func:`segment_slice` ``(source, index, settings) -> labels`` is the pure per-slice
  function; it gets its model from a per-process cache (:func:`get_model`), so it runs the
  same in a thread, another process or on a Dask worker.
* :class:`ZarrOutput` is the on-disk result: an OME-Zarr label group (the layout of
  :mod:`napari_esam.core.io.label_files`, array ``"0"``) chunked 1 along the stack axes, so a
  slice never shares a chunk with another slice and can be written by region from any
  process. Finished slices and their object counts are recorded in the group attributes
  under ``"napari-esam-batch"``; a later run with the same settings skips them.
* :func:`run_batch` drives it: skips finished slices, hands the rest to an *executor*
  (:class:`LocalExecutor` by default; see :class:`SliceExecutor`), records results,
  reports progress with an ETA, stops on ``cancel()``.

Label ids (``id_scope="stack"``, the default): slice ``i`` uses ids
``i * id_stride + 1 ... i * id_stride + n_i``, where ``id_stride`` is the smallest power of ten
above the most masks one slice can produce with the settings (3 candidates per grid point,
summed over crop layers; :func:`max_objects_per_slice`). The ids of a slice depend only on its
index and its pixels — never on which slices ran before — so the result is identical whatever
order slices finish in, and ``label // id_stride`` tells the slice of an object. The dtype is
uint32, or uint64 when ``n_slices * id_stride`` does not fit. ``id_scope="slice"`` numbers
each slice 1..n_i.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from napari_esam.core.plane.image import check_image_shape

__all__ = [
    "BATCH_ATTR",
    "BatchProgress",
    "BatchResult",
    "BatchSettings",
    "EverythingParams",
    "LocalExecutor",
    "MemoryOutput",
    "ModelSpec",
    "SliceExecutor",
    "SliceResult",
    "SliceTask",
    "StackSource",
    "ZarrOutput",
    "clear_model_cache",
    "create_label_group",
    "get_model",
    "input_axes",
    "iter_batch",
    "iter_progress",
    "max_objects_per_slice",
    "open_input",
    "run_batch",
    "segment_slice",
]

#: group attribute holding the batch record (settings, finished slices, counts)
BATCH_ATTR = "napari-esam-batch"
BATCH_FORMAT = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
#: largest tile of the image plane in one output chunk
PLANE_CHUNK = 1024


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run; the key of the per-process model cache.

    ``checkpoint``: ``None`` (official weights, downloaded once) or a path. ``factory``: for
    tests and custom models, a zero-argument callable or an importable ``"module:attr"``
    returning a :class:`~napari_esam.models.base.PromptableModel` (``name`` is then a label).
    """

    name: str = "mobilesam"
    checkpoint: str | None = None
    device: str = "auto"
    dtype: str | None = None
    factory: str | Callable[[], Any] | None = None

    def key(self) -> tuple:
        return (self.name, self.checkpoint, self.device, self.dtype, _factory_name(self.factory))


@dataclass(frozen=True)
class EverythingParams:
    """Keyword arguments of ``segment_everything`` plus the object-size filter.

    Defaults (documented in ``docs/batch.md``): SAM's automatic-mask-generator values, which
    suit fluorescence and bright-field cells: a 32x32 grid, predicted IoU > 0.88, stability
    >= 0.95, box NMS at 0.7, no crops, no small-region clean-up. ``min_size``/``max_size``
    drop objects by area (pixels) when building the labels; ``max_size`` is the usual way to
    drop a "background" mask. ``contrast_limits`` are applied to every slice (``None``:
    each slice's own 0.5-99.5 percentiles).
    """

    points_per_side: int = 32
    points_per_batch: int | None = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    method: str = "sam"
    min_size: int = 0
    max_size: int | None = None
    contrast_limits: tuple[float, float] | None = None

    def everything_kwargs(self) -> dict[str, Any]:
        """The keywords for :func:`napari_esam.core.plane.everything.segment_everything`."""
        names = (
            "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
            "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area",
            "method", "contrast_limits",
        )
        return {n: getattr(self, n) for n in names}

    def validate(self) -> None:
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if self.points_per_batch is not None and self.points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if self.method not in ("sam", "efficientsam"):
            raise ValueError(f"method must be 'sam' or 'efficientsam', not {self.method!r}")
        if self.crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")
        if self.crop_n_layers and self.method != "sam":
            raise ValueError("crops (crop_n_layers > 0) are only supported with method 'sam'")
        if self.crop_n_points_downscale_factor < 1:
            raise ValueError("crop_n_points_downscale_factor must be >= 1")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if self.max_size is not None and self.max_size < max(1, self.min_size):
            raise ValueError(
                f"max_size ({self.max_size}) must be >= 1 and >= min_size ({self.min_size})"
            )
        if self.contrast_limits is not None:
            lo, hi = self.contrast_limits
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"contrast_limits must be finite, got {self.contrast_limits}")


@dataclass(frozen=True)
class BatchSettings:
    """Everything that decides a batch result: model, parameters and the id scheme."""

    model: ModelSpec = field(default_factory=ModelSpec)
    params: EverythingParams = field(default_factory=EverythingParams)
    #: ``"stack"``: ids unique across the stack (per-slice ranges); ``"slice"``: 1..n per slice
    id_scope: str = "stack"

    def validate(self) -> None:
        if self.id_scope not in ("stack", "slice"):
            raise ValueError(f"id_scope must be 'stack' or 'slice', not {self.id_scope!r}")
        if self.model.factory is None:
            from napari_esam.models.registry import check_model_name

            check_model_name(self.model.name)
        self.params.validate()

    @property
    def id_stride(self) -> int:
        """Ids reserved per slice: the smallest power of ten > the per-slice bound."""
        return 10 ** (len(str(max_objects_per_slice(self.params))))

    def record(self) -> dict[str, Any]:
        """The JSON record compared on resume (device and batch size do not change results)."""
        params = dataclasses.asdict(self.params)
        params.pop("points_per_batch")
        if params["contrast_limits"] is not None:
            params["contrast_limits"] = [float(v) for v in params["contrast_limits"]]
        ckpt = self.model.checkpoint
        return {
            "model": self.model.name,
            "checkpoint": None if ckpt is None else Path(ckpt).name,
            "factory": _factory_name(self.model.factory),
            "params": params,
            "id_scope": self.id_scope,
            "id_stride": self.id_stride if self.id_scope == "stack" else None,
        }


def max_objects_per_slice(params: EverythingParams) -> int:
    """Upper bound on the masks one slice can give: 3 candidates per point, all crops."""
    n = 0
    for layer in range(params.crop_n_layers + 1):
        per_side = int(params.points_per_side / params.crop_n_points_downscale_factor**layer)
        n += (2**layer) ** 2 * per_side**2
    return 3 * max(n, 1)


def _factory_name(factory: Any) -> str | None:
    if factory is None or isinstance(factory, str):
        return factory
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}"


# ------------------------------------------------------------------------ model cache

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


def get_model(spec: ModelSpec) -> Any:
    """The model for ``spec``, built once per process (thread-safe)."""
    key = spec.key()
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = _build(spec)
            _MODELS[key] = model
    return model


def clear_model_cache() -> None:
    """Forget the cached models (frees their memory once no one else holds them)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def _build(spec: ModelSpec) -> Any:
    if spec.factory is None:
        from napari_esam.models.loading import build_model

        return build_model(spec.name, spec.checkpoint, spec.device, spec.dtype)
    from napari_esam.models.loading import resolve_device

    factory = spec.factory
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory().eval().to(resolve_device(spec.device))


# ----------------------------------------------------------------------------- input


def open_input(source: Any) -> Any:
    """A lazy (H, W[, C]) / N-D array for a path or an array-like.

    Arrays (NumPy, Dask, Zarr, anything with ``shape``/``dtype``/``__getitem__``) are
    returned as they are. Paths: ``.tif``/``.tiff`` open lazily as Zarr over the file
    (first series, full resolution), ``.zarr`` (array, OME-Zarr group or a group with one
    array) lazily, ``.npy`` memory-mapped, PNG/JPEG read into memory (palette/LA images
    are converted to RGB/gray). Missing files raise ``FileNotFoundError``, unreadable ones
    ``ValueError``.
    """
    if not isinstance(source, (str, os.PathLike)):
        if all(hasattr(source, a) for a in ("shape", "dtype", "__getitem__")):
            return source
        raise TypeError(f"cannot use a {type(source).__name__} as an image; pass an array")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            return _open_tiff(path)
        if suffix == ".zarr" or path.is_dir():
            return _open_zarr(path)
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix in IMAGE_SUFFIXES:
            return _open_picture(path)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is "unreadable"
        raise ValueError(f"cannot read {str(path)!r} as an image: {exc}") from exc
    raise ValueError(
        f"unsupported input format {suffix or '(no extension)'!r} for {str(path)!r}: use a "
        "TIFF, Zarr, NumPy .npy, PNG or JPEG file"
    )


def _open_tiff(path: Path) -> Any:
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True)
    node = zarr.open(store, mode="r")
    if isinstance(node, zarr.Group):  # pyramid: level 0 is full resolution
        node = node["0"]
    return node


def _open_zarr(path: Path) -> Any:
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return node
    attrs = node.attrs.asdict()
    ome = attrs.get("ome", attrs)
    if ome.get("multiscales"):
        return node[ome["multiscales"][0]["datasets"][0]["path"]]
    arrays = list(node.array_keys())
    if len(arrays) == 1:
        return node[arrays[0]]
    raise ValueError(
        f"the Zarr group holds {len(arrays)} arrays and no OME-NGFF 'multiscales'; "
        "point at one array (e.g. path/to/group.zarr/name)"
    )


def _open_picture(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        elif img.mode == "LA":
            img = img.convert("L")
        elif img.mode == "1":
            img = img.convert("L")
        return np.asarray(img)


def input_axes(source: Any) -> str | None:
    """Axis letters of a TIFF input (tifffile's series axes, lower case), else ``None``."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tif.series[0].axes.lower()
    except Exception:  # noqa: BLE001 - metadata is optional
        return None


_OPENED: dict[tuple, Any] = {}
_OPENED_LOCK = threading.Lock()
_OPENED_MAX = 8


def _opened(path: str) -> Any:
    """``open_input(path)`` once per process and file version (a path is what travels to
    other processes; a changed file is opened again)."""
    try:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
    except OSError:
        key = (path, None, None)
    with _OPENED_LOCK:
        arr = _OPENED.get(key)
        if arr is None:
            arr = open_input(path)
            while len(_OPENED) >= _OPENED_MAX:
                _OPENED.pop(next(iter(_OPENED)))
            _OPENED[key] = arr
    return arr


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
            arr = _opened(data)
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
        return _opened(self.data) if isinstance(self.data, str) else self.data

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

    def read_slice(self, index: int) -> np.ndarray:
        """Slice ``index`` as (H, W) or (H, W, 3), read from the (lazy) input."""
        coords = dict(zip(self.stack_axes, self.coords(index), strict=True))
        key: list[Any] = []
        for a in range(len(self.shape)):
            if a in coords:
                key.append(coords[a])
            elif a == self.channel_axis:
                key.append(slice(0, 3) if self.channel is None else self.channel)
            else:
                key.append(slice(None))
        block = self.array[tuple(key)]
        if hasattr(block, "compute") and not isinstance(block, np.ndarray):
            block = block.compute()
        block = np.asarray(block)
        if self.channel_axis is not None and self.channel is None:
            kept = [a for a in range(len(self.shape)) if a not in coords]
            block = np.moveaxis(block, kept.index(self.channel_axis), -1)
        if not block.flags.writeable:  # memory maps, PIL buffers: torch wants writable memory
            block = block.copy()
        return block

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


def output_dtype(source: StackSource, settings: BatchSettings) -> np.dtype:
    """uint32, or uint64 when the per-slice id ranges of the whole stack need it."""
    if settings.id_scope == "slice":
        return np.dtype(np.uint32)
    top = source.n_slices * settings.id_stride - 1
    return np.dtype(np.uint32 if top <= np.iinfo(np.uint32).max else np.uint64)


# ------------------------------------------------------------------------ the slice work


def segment_slice(
    source: StackSource,
    index: int,
    settings: BatchSettings,
    *,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """Labels of slice ``index`` (H, W), ids already in the slice's range (module doc).

    Pure: the result depends only on the arguments (and the model's weights), so it can run
    in any process and in any order. Raises ``everything.Cancelled`` when ``cancel()`` does.
    ``image``: the slice's pixels when already read (``source.read_slice(index)``).
    """
    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.labels import masks_to_labels
    from napari_esam.core.plane.predictor import Predictor

    if image is None:
        image = source.read_slice(index)
    predictor = Predictor(get_model(settings.model))  # a predictor per call: thread-safe
    p = settings.params
    records = segment_everything(
        image, predictor, **p.everything_kwargs(), progress=progress, cancel=cancel
    )
    labels = masks_to_labels(records, image.shape[:2], min_size=p.min_size, max_size=p.max_size)
    dtype = output_dtype(source, settings)
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if settings.id_scope == "slice":
        return labels.astype(dtype, copy=False)
    stride = settings.id_stride
    if n >= stride:  # cannot happen with the bound; guards against a changed algorithm
        raise RuntimeError(f"slice {index} has {n} objects, more than its id range {stride}")
    out = labels.astype(dtype)
    out[out > 0] += dtype.type(index * stride)
    return out


@dataclass
class SliceResult:
    """What one slice task reports: ``labels`` is ``None`` when the task wrote them itself."""

    index: int
    n_objects: int
    seconds: float
    labels: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class SliceTask:
    """``task(index)`` → :class:`SliceResult`: segment one slice and, with a Zarr output,
    write it there by region. Picklable (with a path source and a Zarr output), so an
    executor may run it in other processes; writing twice is harmless."""

    source: StackSource
    settings: BatchSettings
    output: ZarrOutput | None = None

    def __call__(
        self,
        index: int,
        cancel: Callable[[], bool] | None = None,
        progress: Callable[[int, int], Any] | None = None,
        image: np.ndarray | None = None,
    ) -> SliceResult:
        t0 = time.perf_counter()
        labels = segment_slice(self.source, index, self.settings, cancel=cancel,
                               progress=progress, image=image)
        n = _count(labels)
        if self.output is not None:
            self.output.write(self.source.out_region(index), labels)
            labels = None
        return SliceResult(index, n, time.perf_counter() - t0, labels)


def _count(labels: np.ndarray) -> int:
    values = np.unique(labels)
    return int(np.count_nonzero(values))


# ----------------------------------------------------------------------------- executors


class SliceExecutor(Protocol):
    """Runs slice tasks; the hook for other back-ends (e.g. a Dask cluster).

    ``map`` runs ``task(i)`` for every index and yields :class:`SliceResult`\\ s as they
    finish, in any order. ``cancel()`` becoming true should stop it soon (pending work
    dropped); ``step(index, done, total)``, when given, may be called with progress inside a
    slice. :func:`run_batch` may close the generator early (cancel, error): release
    resources in a ``finally``. A remote executor needs a picklable task: a path
    :class:`StackSource` and a :class:`ZarrOutput` on storage the workers share.
    """

    def map(
        self,
        task: SliceTask,
        indices: Sequence[int],
        *,
        cancel: Callable[[], bool],
        step: Callable[[int, int, int], None] | None = None,
    ) -> Iterator[SliceResult]: ...


class LocalExecutor:
    """In-process, one slice at a time, in index order; cancellable within a slice.

    With ``read_ahead`` (default) the next slice is read (and decompressed) in a background
    thread while the model works on the current one, so disk I/O overlaps model work.
    """

    read_ahead: bool = True

    def __init__(self, read_ahead: bool = True) -> None:
        self.read_ahead = read_ahead

    def map(
        self,
        task: SliceTask,
        indices: Sequence[int],
        *,
        cancel: Callable[[], bool],
        step: Callable[[int, int, int], None] | None = None,
    ) -> Iterator[SliceResult]:
        indices = list(indices)
        pool = ThreadPoolExecutor(1, thread_name_prefix="napari-esam-read") if (
            self.read_ahead and len(indices) > 1
        ) else None
        read = task.source.read_slice
        try:
            ahead = pool.submit(read, indices[0]) if pool is not None else None
            for n, i in enumerate(indices):
                if cancel():
                    return
                image = ahead.result() if ahead is not None else None
                ahead = (
                    pool.submit(read, indices[n + 1])
                    if pool is not None and n + 1 < len(indices) else None
                )
                prog = None if step is None else (lambda d, t, i=i: step(i, d, t))
                yield task(i, cancel=cancel, progress=prog, image=image)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ outputs


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

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(Path(path).expanduser().resolve())
        self._array: Any = None
        self._group: Any = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    # -- creation / resume
    @staticmethod
    def is_batch_output(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a Zarr group written by :func:`run_batch`."""
        import json

        try:
            with open(Path(path) / "zarr.json", encoding="utf-8") as fh:
                return BATCH_ATTR in json.load(fh).get("attributes", {})
        except (OSError, ValueError):
            return False

    def prepare(
        self,
        source: StackSource,
        settings: BatchSettings,
        *,
        overwrite: bool = False,
        axes: str | None = None,
        scale: Sequence[float] | None = None,
        translate: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        """Create the store, or check that an existing one belongs to this run (resume)."""
        target = Path(self.path)
        record = {"source": source.describe(), "settings": settings.record()}
        if target.exists() or target.is_symlink():
            if not overwrite and self.is_batch_output(target):
                self._check_resumable(record)
                return
            if not overwrite:
                raise FileExistsError(
                    f"{self.path!r} exists and is not a napari-esam batch output; choose "
                    "another output or overwrite it (CLI: --overwrite)"
                )
            _remove_store(target)
        if not target.parent.is_dir():
            raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist")
        self._create(source, settings, record, axes, scale, translate, name)

    def _check_resumable(self, record: dict) -> None:
        old = self.group.attrs.asdict()[BATCH_ATTR]
        diffs = _diff(old.get("source", {}), record["source"], "input ")
        diffs += _diff(old.get("settings", {}), record["settings"], "")
        if diffs:
            raise ValueError(
                f"{self.path!r} holds a run with other input or settings ("
                + "; ".join(diffs[:4])
                + "); use the same ones to resume, or overwrite it (CLI: --overwrite)"
            )

    def _create(self, source, settings, record, axes, scale, translate, name) -> None:
        record = {"format": BATCH_FORMAT, **record, "slices": {}, "complete": False}
        self._group = create_label_group(
            self.path, source, output_dtype(source, settings), {BATCH_ATTR: record},
            axes=axes, scale=scale, translate=translate, name=name,
        )

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

            self._array = zarr.open_array(Path(self.path) / "0", mode="r+")
        return self._array

    def read_only(self) -> Any:
        """The labels array opened read-only (safe for a napari layer)."""
        import zarr

        return zarr.open_array(Path(self.path) / "0", mode="r")

    def done(self) -> dict[int, int]:
        """Finished slices → object count, from the record."""
        rec = self.group.attrs.asdict()[BATCH_ATTR]
        return {int(k): int(v) for k, v in rec.get("slices", {}).items()}

    def write(self, region: tuple, labels: np.ndarray) -> None:
        self.array[region] = labels

    def record(self, index: int, n_objects: int) -> None:
        """Mark a written slice finished (atomic rewrite of the group's zarr.json)."""
        self.record_many({index: n_objects})

    def record_many(self, counts: Mapping[int, int], complete: bool | None = None) -> None:
        rec = dict(self.group.attrs.asdict()[BATCH_ATTR])
        slices = dict(rec.get("slices", {}))
        slices.update({str(int(k)): int(v) for k, v in counts.items()})
        rec["slices"] = dict(sorted(slices.items(), key=lambda kv: int(kv[0])))
        if complete is not None:
            rec["complete"] = complete
        self.group.attrs.update({BATCH_ATTR: rec})


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
    new_attrs = {**attrs, labels_io.MARKER: labels_io._marker(meta, dtype)}
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
            out += _diff(a, b, prefix)
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the output, {b!r} now")
    return out


def _remove_store(path: Path) -> None:
    """Delete an output we are allowed to replace (a Zarr store or a file, never other dirs)."""
    if path.is_dir() and not path.is_symlink():
        if not any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
            raise ValueError(f"refusing to delete {str(path)!r}: it is not a Zarr store")
        shutil.rmtree(path)
    else:
        path.unlink()


# ------------------------------------------------------------------------------ running


@dataclass
class BatchProgress:
    """A progress report: ``kind`` is ``"start"``, ``"step"`` (inside a slice) or ``"slice"``.

    ``done``/``total`` count slices (``skipped`` of ``done`` were finished by an earlier
    run); ``index``/``n_objects`` describe the slice just finished (``"slice"``) or running
    (``"step"``, with ``step``/``steps`` its point batches); ``eta`` is seconds left or None.
    """

    kind: str
    done: int
    total: int
    skipped: int = 0
    index: int | None = None
    n_objects: int | None = None
    step: int = 0
    steps: int = 0
    elapsed: float = 0.0
    eta: float | None = None

    @property
    def fraction(self) -> float:
        """Finished fraction of the work, counting the running slice's steps."""
        part = self.step / self.steps if self.kind == "step" and self.steps else 0.0
        return min(1.0, (self.done + part) / self.total) if self.total else 1.0


@dataclass
class BatchResult:
    """``labels``: the result (NumPy, or the Zarr array opened read-only); ``counts``:
    objects per finished slice (all runs); ``total``: slices in the stack; ``cancelled``:
    the run stopped before its slices were done."""

    labels: Any
    counts: dict[int, int]
    total: int
    cancelled: bool
    elapsed: float
    output: ZarrOutput | MemoryOutput

    @property
    def complete(self) -> bool:
        return len(self.counts) == self.total


class _Clock:
    """ETA from the slices (and steps) finished in this run."""

    def __init__(self, todo: int) -> None:
        self.t0 = time.perf_counter()
        self.todo, self.finished = todo, 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self, part: float = 0.0) -> float | None:
        done = self.finished + part
        if done <= 0:
            return None
        return self.elapsed() / done * max(0.0, self.todo - done)


def run_batch(
    source: StackSource | Any,
    settings: BatchSettings | None = None,
    output: str | os.PathLike | ZarrOutput | MemoryOutput | None = None,
    *,
    overwrite: bool = False,
    indices: Sequence[int] | None = None,
    executor: SliceExecutor | None = None,
    progress: Callable[[BatchProgress], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    axes: str | None = None,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    name: str | None = None,
) -> BatchResult:
    """Segment everything in every slice of ``source`` (or ``indices`` of them).

    ``source``: a :class:`StackSource` or anything :meth:`StackSource.create` takes.
    ``output``: ``None`` (a new in-memory array), a ``.zarr`` path / :class:`ZarrOutput`
    (created, or resumed: finished slices are skipped; ``overwrite=True`` starts over), or
    a :class:`MemoryOutput`. ``axes``/``scale``/``translate``/``name`` are stored as OME
    metadata of a new Zarr output. ``progress(BatchProgress)`` is called from the running
    thread; ``cancel()`` is polled between point batches and slices. A cancelled run
    returns with ``cancelled=True``; every finished slice is kept (and recorded on disk).
    """
    from napari_esam.core.plane.everything import Cancelled

    settings = settings or BatchSettings()
    settings.validate()
    if not isinstance(source, StackSource):
        source = StackSource.create(source)
    if output is None:
        output = MemoryOutput(source.out_shape, output_dtype(source, settings))
    elif not isinstance(output, (ZarrOutput, MemoryOutput)):
        output = ZarrOutput(output)
    if isinstance(output, ZarrOutput):
        if isinstance(source.data, str) and Path(source.data) == Path(output.path):
            raise ValueError("the output must not be the input")
        output.prepare(source, settings, overwrite=overwrite, axes=axes, scale=scale,
                       translate=translate, name=name)
    elif tuple(output.array.shape) != source.out_shape:
        raise ValueError(f"output shape {output.array.shape} != labels shape {source.out_shape}")
    wanted = list(range(source.n_slices)) if indices is None else sorted({int(i) for i in indices})
    for i in wanted:
        source.coords(i)  # range check
    counts = output.done()
    todo = [i for i in wanted if i not in counts]
    total = len(wanted)
    skipped = total - len(todo)
    clock = _Clock(len(todo))
    cancel_fn = cancel or (lambda: False)
    task = SliceTask(source, settings, output if isinstance(output, ZarrOutput) else None)
    executor = executor or LocalExecutor()

    def report(kind: str, **kw: Any) -> None:
        if progress is not None:
            done = sum(1 for i in wanted if i in counts)
            progress(BatchProgress(kind, done, total, skipped, elapsed=clock.elapsed(), **kw))

    def step(index: int, done: int, steps: int) -> None:
        report("step", index=index, step=done, steps=steps,
               eta=clock.eta(done / steps if steps else 0.0))

    report("start", eta=None)
    cancelled = False
    results = executor.map(task, todo, cancel=cancel_fn, step=step)
    try:
        for res in results:
            if res.labels is not None:
                output.write(source.out_region(res.index), res.labels)
            output.record(res.index, res.n_objects)
            counts[res.index] = res.n_objects
            clock.finished += 1
            report("slice", index=res.index, n_objects=res.n_objects, eta=clock.eta())
            if cancel_fn():
                break
    except Cancelled:
        pass
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    cancelled = len(todo) > clock.finished
    if isinstance(output, ZarrOutput) and not cancelled and indices is None:
        output.record_many({}, complete=True)
    labels = output.read_only() if isinstance(output, ZarrOutput) else output.array
    counts = {i: counts[i] for i in sorted(counts)}
    return BatchResult(labels, counts, source.n_slices, cancelled, clock.elapsed(), output)


def iter_batch(
    *args: Any, cancel: Callable[[], bool] | None = None, **kwargs: Any
) -> Generator[BatchProgress, None, BatchResult]:
    """:func:`run_batch` as a generator: yields its progress and returns its result.

    For generator-based workers (napari's ``thread_worker``): the batch runs in a helper
    thread and its reports are handed over here. Closing the generator cancels the run and
    waits for the running point batch to end; the helper's exception is re-raised here.
    """
    if "progress" in kwargs:
        raise TypeError("iter_batch yields the progress; do not pass progress=")
    return (yield from iter_progress(run_batch, *args, cancel=cancel, **kwargs))


def iter_progress(
    func: Callable[..., Any], *args: Any, cancel: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> Generator[Any, None, Any]:
    """``func(*args, progress=..., cancel=..., **kwargs)`` as a generator that yields what
    ``func`` reports to ``progress`` and returns its result (see :func:`iter_batch`; also
    used for :meth:`napari_esam.core.runs.tiled_batch.TiledBatch.run`)."""
    if "progress" in kwargs:
        raise TypeError("iter_progress yields the progress; do not pass progress=")
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def cancelled() -> bool:
        return stop.is_set() or (cancel is not None and bool(cancel()))

    def target() -> None:
        try:
            res = func(*args, cancel=cancelled, progress=lambda ev: events.put(("ev", ev)),
                       **kwargs)
            events.put(("result", res))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            events.put(("error", exc))

    thread = threading.Thread(target=target, name="napari-esam-batch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = events.get()
            if kind == "ev":
                yield value
            elif kind == "result":
                return value
            else:
                raise value
    finally:
        stop.set()
        thread.join()
