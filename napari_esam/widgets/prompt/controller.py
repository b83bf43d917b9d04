"""The interactive prompt segmentation of the "Segment with prompts" widget, without Qt.

:class:`PromptController` reads napari layers (an image, a Points layer of positive/negative
clicks, a Shapes layer of rectangles), maps the prompts from world coordinates into the pixel
grid of the 2-D plane the viewer shows, keeps an LRU cache of image embeddings, shows the
decoded mask in a preview Labels layer and commits it to an output Labels layer through
napari's undo history. It works on a ``napari.Viewer`` or a bare ``napari.components.
ViewerModel``; the Qt view (:mod:`.prompt`) only forwards user input to it.

Conventions (documented in ``docs/interactive.md``):

* A point's polarity is its ``label`` feature: ``"positive"`` (green) or ``"negative"``
  (red); a points layer without that feature counts every point as positive.
* Of the Shapes layer, a rectangle is a box, a path or line a scribble (points sampled along
  it, positive or negative by the shape's ``label`` feature), a polygon or ellipse a lasso
  (its box plus its mask as a mask prompt, for models that take one).
* Points (and at most one box or lasso) form one object; boxes without points are one
  object each, decoded together in one batched decoder call; with "one object per positive
  point" every positive point is an object.
* Each new prompt on the same object passes the previous best low-res logits as a mask
  prompt (SAM's iterative prompting; models with a mask prompt).

The model (built by an injectable factory) is reached through one
:class:`~napari_esam.core.tiling.predictor.PromptEngine` per tile grid: the plane's grid
follows the one tiling rule (``set_tiling``, ``docs/rules/tiling.md``). A plane that is one
tile is resized to the model input, embedded when it is shown and decoded on the GUI thread
at each click; a plane of several tiles (tiled mode, full resolution) is answered from the
tiles under the prompts, whose encoding *and* decoding run in the worker. Heavy work
(building the model, encoding) runs through a :data:`~.workers.Runner`: synchronously by
default, in a napari thread worker in the widget.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_esam.core.tiling.grid import (
    HALO,
    TILE,
    TILED_MODES,
    TILING_THRESHOLD,
    TileGrid,
    Window,
    plane_grid,
)
from napari_esam.core.tiling.predictor import (
    MaskPrompt,
    PlaneEmbedding,
    PromptEngine,
    RegionMask,
    TiledMask,
)
from napari_esam.core.volume.propagation import PropagationParams
from napari_esam.models.base import PromptableModel
from napari_esam.widgets.prompt.propagation import (
    Propagated,
    paint,
    propagation_job,
    slice_plane,
)
from napari_esam.widgets.workers import Progress, Runner, run_sync

POSITIVE = "positive"
NEGATIVE = "negative"
#: ``layer.metadata`` key marking the layers this plugin creates
ROLE_KEY = "napari_esam_role"
PREVIEW_NAME = "ESAM preview"
PROPAGATION_NAME = "ESAM propagation"
LABELS_NAME = "ESAM labels"
POINTS_NAME = "ESAM points"
BOXES_NAME = "ESAM boxes"
DEVICES = ("auto", "cuda", "cpu")
#: tiled mode: "auto" tiles planes whose longer side exceeds ``TILED_THRESHOLD`` pixels
TILED_THRESHOLD = TILING_THRESHOLD
#: keys bound on the prompt layers (documented in ``docs/interactive.md``)
KEYS = {
    "toggle_polarity": "n",
    "next_mask": "m",
    "commit": "c",
    "clear": "Shift-C",
    "undo": "Control-Z",
    "propagate": "Shift-S",
}
#: scribbles are sampled about every this many pixels of the model's 1024-px input
SCRIBBLE_SPACING = 32.0
_POSITIVE_VALUES = {POSITIVE, "pos", "+", "1", "true", "fg", "foreground"}
_PREVIEW_COLORS = ("#ffd700", "#00e5ff", "#ff40ff", "#ff8c00", "#7cfc00", "#1e90ff")


class PromptError(ValueError):
    """A problem the user can fix (shown as a message, never raised to napari)."""


# ------------------------------------------------------------------------------ model

#: builds the model for (name, checkpoint or ``None`` = official weights, device)
ModelFactory = Callable[[str, Any, str], PromptableModel]


def default_model_factory(model_name: str, checkpoint: Any, device: str) -> PromptableModel:
    """Build ``model_name`` with ``checkpoint`` (``None`` = official weights) on ``device``."""
    from napari_esam.models.loading import build_model

    return build_model(model_name, checkpoint, device)


class EmbeddingCache:
    """A small LRU cache of embeddings (one entry per image, plane, model and contrast)."""

    def __init__(self, maxsize: int = 8) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.maxsize = maxsize

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, value: int) -> None:
        self._maxsize = max(1, int(value))
        self._trim()

    def get(self, key: Hashable) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self._trim()

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _trim(self) -> None:
        while len(self._items) > self._maxsize:
            self._items.popitem(last=False)


# ------------------------------------------------------------------------- geometry


def image_array(layer: Any) -> Any:
    """The full-resolution data of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def spatial_shape(layer: Any) -> tuple[int, ...]:
    """The image layer's data shape without the RGB(A) axis."""
    shape = tuple(int(s) for s in image_array(layer).shape)
    return shape[:-1] if layer.rgb else shape


@dataclass(frozen=True)
class Plane:
    """The 2-D plane of an image layer shown by the viewer.

    ``index[a]`` is the slice index on every non-displayed axis ``a`` and ``None`` on the two
    displayed axes; the plane's rows run along ``row_axis`` and its columns along ``col_axis``.
    With a ``channel_axis``, ``index`` holds the channel that is segmented.
    """

    index: tuple[int | None, ...]
    row_axis: int
    col_axis: int
    shape: tuple[int, int]
    channel_axis: int | None = None
    rgb: bool = False

    @property
    def ndim(self) -> int:
        return len(self.index)

    def data_slicer(self) -> tuple:
        """Index into the image data giving this plane (RGB axis kept)."""
        idx = tuple(slice(None) if i is None else i for i in self.index)
        return idx + ((slice(None),) if self.rgb else ())

    def labels_index(self) -> tuple[int | None, ...]:
        """``index`` for the output labels, whose channel axis has size 1."""
        return tuple(
            0 if a == self.channel_axis else i for a, i in enumerate(self.index)
        )

    def labels_slicer(self) -> tuple:
        return tuple(slice(None) if i is None else i for i in self.labels_index())

    def to_plane(self, arr: np.ndarray) -> np.ndarray:
        """Data sliced with a slicer above → (rows, cols[, C]) in the plane's orientation."""
        return np.swapaxes(arr, 0, 1) if self.row_axis > self.col_axis else arr

    def labels_indices(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
        """Fancy indices into the output labels for plane pixels (``rows``, ``cols``)."""
        out = []
        for a, i in enumerate(self.labels_index()):
            if a == self.row_axis:
                out.append(np.asarray(rows, dtype=np.intp))
            elif a == self.col_axis:
                out.append(np.asarray(cols, dtype=np.intp))
            else:
                out.append(np.full(len(rows), i, dtype=np.intp))
        return tuple(out)

    @property
    def key(self) -> tuple:
        return (self.index, self.row_axis, self.col_axis)


def plane_of(
    viewer: Any, layer: Any, channel_axis: int | None = None, channel: int | None = None
) -> Plane:
    """The :class:`Plane` of image ``layer`` that ``viewer`` shows.

    ``channel_axis`` (a data axis of ``layer``) with ``channel`` picks the segmented channel
    (``None`` = the one the slider shows). Raises :class:`PromptError` when the view cannot be
    segmented (3-D display, the image not spanning the displayed axes, a slice off the image).
    """
    if viewer.dims.ndisplay != 2:
        raise PromptError("Switch the viewer to 2-D display to segment with prompts.")
    shape = spatial_shape(layer)
    ndim = len(shape)
    offset = viewer.dims.ndim - ndim
    displayed = [int(d) - offset for d in viewer.dims.displayed]
    if min(displayed) < 0:
        raise PromptError(
            f"Image {layer.name!r} does not span the displayed axes; show two of its axes."
        )
    row_axis, col_axis = displayed
    if channel_axis is not None and not 0 <= channel_axis < ndim:
        raise PromptError(f"Channel axis {channel_axis} does not exist in {layer.name!r}.")
    if channel_axis in (row_axis, col_axis):
        raise PromptError(
            f"The channel axis {channel_axis} is displayed; choose a non-displayed axis."
        )
    position = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)
    index: list[int | None] = []
    for a in range(ndim):
        if a in (row_axis, col_axis):
            index.append(None)
            continue
        i = int(np.round(position[a]))
        if a == channel_axis and channel is not None:
            i = int(channel)
            if not 0 <= i < shape[a]:
                raise PromptError(f"Channel {i} does not exist (axis {a} has {shape[a]}).")
        if not 0 <= i < shape[a]:
            raise PromptError(
                f"The current slice (axis {a}, index {i}) lies outside image {layer.name!r}."
            )
        index.append(i)
    return Plane(
        tuple(index), row_axis, col_axis, (shape[row_axis], shape[col_axis]), channel_axis,
        bool(layer.rgb),
    )


def rc_to_xy(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Plane (row, col) → SAM (x, y). The one place where the axes are swapped."""
    return np.stack([np.asarray(cols, float), np.asarray(rows, float)], axis=-1)


def _world_points(viewer: Any, layer: Any, data: np.ndarray) -> np.ndarray:
    """Layer data coordinates (N, D) → full world coordinates (N, viewer ndim).

    World axes the layer does not have take the viewer's current position.
    """
    base = np.asarray(viewer.dims.point, dtype=float)
    out = np.tile(base, (len(data), 1))
    for n, p in enumerate(np.asarray(data, dtype=float)):
        world = np.asarray(layer.data_to_world(p), dtype=float)
        k = min(len(world), len(base))
        out[n, len(base) - k :] = world[len(world) - k :]
    return out


def _to_image_data(layer: Any, world: np.ndarray) -> np.ndarray:
    return np.array([np.asarray(layer.world_to_data(w), dtype=float) for w in world]).reshape(
        len(world), -1
    )


def _on_plane(coords: np.ndarray, plane: Plane) -> np.ndarray:
    """Whether image data coordinates (N, D) lie on ``plane`` (channel axis ignored)."""
    ok = np.ones(len(coords), dtype=bool)
    for a, i in enumerate(plane.index):
        if i is None or a == plane.channel_axis:
            continue
        ok &= np.round(coords[:, a]) == i
    return ok


def is_positive(value: Any) -> bool:
    """A point's ``label`` feature value → positive (True) or negative (False)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return bool(value > 0)
    return str(value).strip().lower() in _POSITIVE_VALUES


@dataclass
class PlanePrompts:
    """Prompts mapped onto a plane, in SAM's (x, y) pixel coordinates.

    ``points_xy``/``point_labels``: clicks, then the points sampled along scribbles;
    ``boxes_xyxy``: rectangles and the bounding boxes of lassos, with ``box_masks`` (per box:
    ``None`` for a rectangle, the lasso's :class:`RegionMask`).
    """

    points_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    boxes_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    box_masks: list[RegionMask | None] = field(default_factory=list)
    outside: int = 0
    other_slice: int = 0
    scribbles: int = 0
    lassos: int = 0
    degenerate: int = 0

    @property
    def n_points(self) -> int:
        return len(self.points_xy)

    @property
    def n_boxes(self) -> int:
        return len(self.boxes_xyxy)

    @property
    def empty(self) -> bool:
        return self.n_points == 0 and self.n_boxes == 0


@dataclass(frozen=True)
class ObjectPrompts:
    """The prompts of B objects as the engine takes them (see :meth:`PromptController.objects`).

    ``coords`` (B, N, 2) (x, y) and ``labels`` (B, N) or ``None``; ``boxes`` (B, 4) or
    ``None``; ``masks``: per object a drawn mask (:class:`RegionMask`) or ``None``.
    """

    coords: np.ndarray | None
    labels: np.ndarray | None
    boxes: np.ndarray | None
    masks: tuple[RegionMask | None, ...]

    @property
    def n_objects(self) -> int:
        return len(self.masks)

    @property
    def arrays(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        return self.coords, self.labels, self.boxes

    def key(self) -> tuple:
        """A hashable identity of these prompts (array bytes, drawn masks' pixels)."""
        parts: list[Any] = [
            None if a is None else (a.shape, a.tobytes()) for a in self.arrays
        ]
        for m in self.masks:
            parts.append(None if m is None else (tuple(m.window), m.mask.tobytes()))
        return tuple(parts)


def _shape_labels(shapes: Any) -> np.ndarray:
    """Per shape: positive (True) or negative (False), from the ``label`` feature."""
    n = len(shapes.data)
    feats = shapes.features
    if "label" in feats and len(feats) == n:
        return np.array([is_positive(v) for v in feats["label"]], dtype=bool)
    return np.ones(n, dtype=bool)


def sample_path(rc: np.ndarray, spacing: float) -> np.ndarray:
    """Points along a polyline (M, 2) about every ``spacing`` px, both ends included."""
    rc = np.asarray(rc, dtype=float)
    seg = np.linalg.norm(np.diff(rc, axis=0), axis=1)
    total = float(seg.sum())
    if total == 0:
        return rc[:1]
    n = max(1, int(np.ceil(total / spacing)))
    at = np.linspace(0.0, total, n + 1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    return np.stack([np.interp(at, cum, rc[:, 0]), np.interp(at, cum, rc[:, 1])], axis=1)


def rasterise_shape(rc: np.ndarray, kind: str, window: Window) -> np.ndarray:
    """A polygon or ellipse (napari Shapes vertices, plane (row, col)) → bool mask of
    ``window``. An ellipse is given by the four corners of its (possibly rotated) box."""
    rows, cols = np.mgrid[window.y0 : window.y1, window.x0 : window.x1]
    if kind == "ellipse":
        centre = rc.mean(axis=0)
        u, v = rc[1] - rc[0], rc[2] - rc[1]
        a, b = np.linalg.norm(u) / 2, np.linalg.norm(v) / 2
        if a == 0 or b == 0:
            return np.zeros(window.shape, dtype=bool)
        d = np.stack([rows - centre[0], cols - centre[1]], axis=-1)
        return (d @ (u / (2 * a)) / a) ** 2 + (d @ (v / (2 * b)) / b) ** 2 <= 1.0
    from skimage.draw import polygon

    out = np.zeros(window.shape, dtype=bool)
    rr, cc = polygon(rc[:, 0] - window.y0, rc[:, 1] - window.x0, shape=window.shape)
    out[rr, cc] = True
    return out


def collect_prompts(
    viewer: Any, image: Any, plane: Plane, points: Any, shapes: Any,
    scribble_spacing: float = 32.0,
) -> PlanePrompts:
    """Map the prompts lying on ``plane`` into its pixel grid.

    Points are clicks; of the shapes, a rectangle is a box, a path or line a **scribble**
    (points sampled about every ``scribble_spacing`` plane px, positive or negative by the
    shape's ``label`` feature), a polygon or ellipse a **lasso** (its bounding box plus its
    rasterised mask). Prompts on other slices are skipped; prompts outside the image are
    skipped and counted.
    """
    h, w = plane.shape
    out = PlanePrompts()
    xy: list[np.ndarray] = [np.zeros((0, 2))]
    lab: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    if points is not None and len(points.data):
        coords = _to_image_data(image, _world_points(viewer, points, points.data))
        feats = points.features
        if "label" in feats and len(feats) == len(coords):
            pos = np.array([is_positive(v) for v in feats["label"]], dtype=bool)
        else:
            pos = np.ones(len(coords), dtype=bool)
        on = _on_plane(coords, plane)
        rows, cols = coords[:, plane.row_axis], coords[:, plane.col_axis]
        inside = (rows >= -0.5) & (rows < h - 0.5) & (cols >= -0.5) & (cols < w - 0.5)
        out.other_slice += int((~on).sum())
        out.outside += int((on & ~inside).sum())
        keep = on & inside
        xy.append(rc_to_xy(np.clip(rows[keep], 0, h), np.clip(cols[keep], 0, w)))
        lab.append(pos[keep].astype(np.int64))
    if shapes is not None and len(shapes.data):
        boxes: list[tuple[float, float, float, float]] = []
        polarity = _shape_labels(shapes)
        for n, (verts, kind) in enumerate(zip(shapes.data, shapes.shape_type, strict=False)):
            coords = _to_image_data(image, _world_points(viewer, shapes, np.asarray(verts)))
            centre = coords.mean(axis=0, keepdims=True)
            if not _on_plane(centre, plane)[0]:
                out.other_slice += 1
                continue
            rc = np.stack([coords[:, plane.row_axis], coords[:, plane.col_axis]], axis=1)
            r0, c0 = rc.min(axis=0)
            r1, c1 = rc.max(axis=0)
            if r1 < -0.5 or c1 < -0.5 or r0 >= h - 0.5 or c0 >= w - 0.5:
                out.outside += 1
                continue
            if kind in ("path", "line"):
                pts = sample_path(rc, scribble_spacing)
                ok = (pts[:, 0] >= -0.5) & (pts[:, 0] < h - 0.5)
                ok &= (pts[:, 1] >= -0.5) & (pts[:, 1] < w - 0.5)
                pts = pts[ok]
                xy.append(rc_to_xy(np.clip(pts[:, 0], 0, h), np.clip(pts[:, 1], 0, w)))
                lab.append(np.full(len(pts), int(polarity[n]), dtype=np.int64))
                out.scribbles += 1
                continue
            (x0, y0), (x1, y1) = rc_to_xy(np.clip([r0, r1], 0, h), np.clip([c0, c1], 0, w))
            if kind == "rectangle":
                boxes.append((x0, y0, x1, y1))
                out.box_masks.append(None)
                continue
            window = Window(
                int(np.floor(y0)), int(np.floor(x0)),
                min(h, int(np.ceil(y1)) + 1), min(w, int(np.ceil(x1)) + 1),
            )
            mask = rasterise_shape(rc, kind, window)
            if not mask.any():
                out.degenerate += 1
                continue
            boxes.append((x0, y0, x1, y1))
            out.box_masks.append(RegionMask(mask, window))
            out.lassos += 1
        if boxes:
            out.boxes_xyxy = np.asarray(boxes, dtype=float)
    out.points_xy = np.concatenate(xy)
    out.point_labels = np.concatenate(lab)
    return out


def labels_geometry(image: Any, channel_axis: int | None = None) -> dict[str, Any]:
    """Shape and transform of an output Labels layer for ``image``.

    The labels have the image's spatial shape; a ``channel_axis`` gets size 1, scaled to span
    every channel, so one label image is shown whichever channel the slider shows.
    """
    shape = list(spatial_shape(image))
    scale = np.asarray(image.scale, dtype=float).copy()
    translate = np.asarray(image.translate, dtype=float).copy()
    if channel_axis is not None:
        n = shape[channel_axis]
        translate[channel_axis] += (n - 1) / 2 * scale[channel_axis]
        scale[channel_axis] *= n
        shape[channel_axis] = 1
    return {
        "shape": tuple(shape),
        "scale": tuple(scale),
        "translate": tuple(translate),
        "rotate": np.asarray(image.rotate),
        "shear": np.asarray(image.shear),
        "affine": image.affine.affine_matrix,
    }


def preview_geometry(
    image: Any, plane: Plane, region: tuple[int, int, int, int] | None = None
) -> dict[str, Any]:
    """Shape and transform of a preview layer covering only ``plane`` (or only its
    ``region`` = (row0, col0, rows, cols) in plane pixels)."""
    from napari.utils.transforms import Affine

    geo = labels_geometry(image, plane.channel_axis)
    shape = list(geo["shape"])
    offset = np.zeros(len(shape))
    for a, i in enumerate(plane.index):
        if i is None:
            continue
        shape[a] = 1
        if a != plane.channel_axis:
            offset[a] = i
    if region is not None:
        r0, c0, h, w = region
        shape[plane.row_axis], shape[plane.col_axis] = h, w
        offset[plane.row_axis], offset[plane.col_axis] = r0, c0
    linear = Affine(scale=image.scale, rotate=image.rotate, shear=image.shear).linear_matrix
    geo["shape"] = tuple(shape)
    geo["translate"] = tuple(np.asarray(geo["translate"]) + linear @ offset)
    return geo


def _set_geometry(layer: Any, geo: dict[str, Any]) -> None:
    for name in ("scale", "translate", "rotate", "shear", "affine"):
        current = getattr(layer, name)
        current = current.affine_matrix if name == "affine" else current
        if not np.array_equal(np.asarray(current), np.asarray(geo[name])):
            setattr(layer, name, geo[name])


# ----------------------------------------------------------------------- controller


def _mask_key(prompts: Sequence[MaskPrompt | RegionMask | None] | None) -> tuple | None:
    """A hashable identity of the mask prompts of a decode."""
    if prompts is None:
        return None
    out: list[Any] = []
    for p in prompts:
        if p is None:
            out.append(None)
        elif isinstance(p, MaskPrompt):
            out.append(("logits", tuple(p.window), np.asarray(p.logits).tobytes()))
        else:
            out.append(("region", tuple(p.window), p.mask.tobytes()))
    return tuple(out)


class _PromptHistory:
    """The decoded one-object prompt sets of the current object, for SAM's iterative
    prompting: a prompt set that extends an earlier one (same box and lasso, the earlier
    points first) gets that set's best low-res logits as its mask prompt."""

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._items: list[tuple[tuple, ObjectPrompts, MaskPrompt]] = []

    def add(self, key: tuple, objects: ObjectPrompts, result: MaskPrompt) -> None:
        self._items = [it for it in self._items if not (it[0] == key and _same(it[1], objects))]
        self._items.append((key, objects, result))
        del self._items[: -self.maxsize]

    def previous(self, key: tuple, objects: ObjectPrompts) -> MaskPrompt | None:
        """The result of the longest recorded prompt set that ``objects`` strictly extends."""
        best, best_n = None, -1
        n = 0 if objects.coords is None else objects.coords.shape[1]
        for k, obj, result in self._items:
            m = 0 if obj.coords is None else obj.coords.shape[1]
            if k != key or m >= n or m <= best_n or obj.key()[2:] != objects.key()[2:]:
                continue
            if m and not (
                np.array_equal(obj.coords[0], objects.coords[0, :m])
                and np.array_equal(obj.labels[0], objects.labels[0, :m])
            ):
                continue
            best, best_n = result, m
        return best

    def clear(self) -> None:
        self._items.clear()


def _same(a: ObjectPrompts, b: ObjectPrompts) -> bool:
    return a.key() == b.key()


@dataclass
class _Decoded:
    """The last decoder output, for the preview, mask cycling and commit.

    Per object ``b``: ``masks[b]`` (K, h, w) covers the plane region starting at
    ``offsets[b]`` (row, col): the answering window (the whole plane when it is one tile).
    ``signature`` identifies the prompts and the embedding they were decoded on.
    """

    plane: Plane
    layer_id: Hashable
    masks: list[np.ndarray]
    scores: np.ndarray  # (B, K)
    offsets: list[tuple[int, int]] = field(default_factory=list)
    signature: Hashable = None

    def __post_init__(self) -> None:
        if not self.offsets:
            self.offsets = [(0, 0)] * len(self.masks)

    def chosen(self, rank: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Per object, the mask ranked ``rank`` by score (0 = best) and its score."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        k = rank % self.scores.shape[1]
        pick = order[:, k]
        return [m[p] for m, p in zip(self.masks, pick, strict=True)], self.scores[
            np.arange(len(pick)), pick
        ]

    def frame(self) -> tuple[int, int, int, int]:
        """(row0, col0, rows, cols): the plane region covering every object's masks."""
        r0 = min(o[0] for o in self.offsets)
        c0 = min(o[1] for o in self.offsets)
        r1 = max(o[0] + m.shape[-2] for o, m in zip(self.offsets, self.masks, strict=True))
        c1 = max(o[1] + m.shape[-1] for o, m in zip(self.offsets, self.masks, strict=True))
        return r0, c0, r1 - r0, c1 - c0


def tiled_source(data: Any, plane: Plane) -> tuple[Any, tuple[int, ...]]:
    """(array, leading index) giving ``plane`` to a tiled engine without reading it.

    When the plane's rows and columns are the array's last two spatial axes (in order), the
    whole (lazy) array is used with the plane's index, so tiles stay cached across slices.
    Otherwise a lazy view of the plane: a NumPy view, a Dask slice, or a Dask array over other
    array types (Zarr, ...), transposed to (rows, cols[, C]).
    """
    ndim = plane.ndim
    if (plane.row_axis, plane.col_axis) == (ndim - 2, ndim - 1):
        return data, tuple(int(i) for i in plane.index[:-2])
    if not isinstance(data, np.ndarray) and not hasattr(data, "dask"):
        import dask.array as da

        data = da.from_array(data, chunks=getattr(data, "chunks", "auto"))
    view = data[plane.data_slicer()]
    if plane.row_axis > plane.col_axis:
        view = view.swapaxes(0, 1)
    return view, ()


class PromptController:
    """Prompts in, preview out, labels committed: the widget's logic without Qt.

    Events (``controller.events``): ``status(text, level)``, ``busy(value)``,
    ``progress(value)`` (a :class:`~.workers.Progress`), ``changed()`` (layers or settings).
    """

    def __init__(
        self,
        viewer: Any,
        model_factory: ModelFactory = default_model_factory,
        runner: Runner = run_sync,
        cache_size: int = 8,
        notify: bool = True,
    ) -> None:
        from napari.utils.events import EmitterGroup

        self.viewer = viewer
        self.model_factory = model_factory
        self.runner = runner
        self.notify = notify
        self.events = EmitterGroup(source=self, status=None, busy=None, progress=None, changed=None)
        self.cache = EmbeddingCache(cache_size)
        self.model_name = "mobilesam"
        self.checkpoint: Any = None
        self.device = "auto"
        self.use_contrast_limits = False
        self.overwrite = False
        self.tiled_mode = "auto"
        self.tiled_threshold = TILED_THRESHOLD
        self.tile = TILE
        self.halo = HALO
        self.embedding_store: str | None = None
        self._engines: dict[tuple, PromptEngine] = {}
        self._dropped_encoder_calls = 0
        self._history = _PromptHistory()
        #: the stop rule and slice range of "Segment through stack"
        self.propagation = PropagationParams()
        #: the stack axis to propagate along (``None``: the slider nearest the view)
        self.propagation_axis: int | None = None
        self._propagated: Propagated | None = None
        self._propagation_layer: Any = None
        self._cancel = threading.Event()
        #: every positive point is its own object (``set_one_object_per_point``)
        self.one_object_per_point = False
        self._decode_failed: tuple[Hashable, str] | None = None
        self.channel_axis: int | None = None
        self.channel: int | None = None
        self.polarity = POSITIVE
        self.mask_rank = 0
        self.status = ""
        self.busy = False
        self._image: Any = None
        self._points: Any = None
        self._shapes: Any = None
        self._labels: Any = None
        self._preview: Any = None
        self._preview_region: tuple[Plane, tuple[int, int, int, int]] | None = None
        #: (decoded result, mask rank, image layer) the preview shows, to skip repainting
        self._shown: tuple[Any, int, Any] | None = None
        self._model: PromptableModel | None = None
        self._model_key: tuple | None = None
        self._failed: dict[Hashable, str] = {}
        self._pending = False
        self._decoded: _Decoded | None = None
        self._data_version = 0
        self._last_warning = ""
        self._last_labels: Any = None
        self._updating = False
        self._rerun = False
        viewer.dims.events.current_step.connect(self._on_view_changed)
        viewer.dims.events.order.connect(self._on_view_changed)
        viewer.dims.events.ndisplay.connect(self._on_view_changed)
        viewer.layers.events.removed.connect(self._on_layer_removed)

    # ------------------------------------------------------------------ settings
    @property
    def model_key(self) -> tuple:
        """The model settings (name, checkpoint, device) the loaded model must match."""
        ckpt = self.checkpoint
        ckpt = ("state_dict", id(ckpt)) if isinstance(ckpt, dict) else (str(ckpt) if ckpt else None)
        return (self.model_name, ckpt, self.device)

    @property
    def model(self) -> PromptableModel | None:
        """The loaded model for the current settings (``None`` until first used)."""
        return self._model if self._model_key == self.model_key else None

    @property
    def encoder_calls(self) -> int:
        """Image-encoder runs so far (whole planes, tiles and tile windows)."""
        live = sum(int(e.encoder_calls) for e in self._engines.values())
        return self._dropped_encoder_calls + live

    def _drop_engines(self) -> None:
        """Forget every engine (and its tile cache), keeping the encoder-call count."""
        self._dropped_encoder_calls = self.encoder_calls
        self._engines.clear()

    def grid(self, plane: Plane) -> TileGrid:
        """The tile grid of ``plane`` under the tiling settings (``docs/rules/tiling.md``)."""
        return plane_grid(
            plane.shape, self.tiled_mode, self.tile, self.halo, self.tiled_threshold
        )

    def is_tiled(self, plane: Plane) -> bool:
        """Whether ``plane`` is segmented tile by tile (more than one tile, full resolution)."""
        return self.grid(plane).n_tiles > 1

    def tiling_key(self, plane: Plane) -> tuple:
        """(tile, halo, store) of the engine answering prompts on ``plane``."""
        grid = self.grid(plane)
        store = None if self.embedding_store is None else str(self.embedding_store)
        return (grid.tile, grid.halo, store)

    def set_tiling(
        self,
        mode: str | None = None,
        *,
        tile: int | None = None,
        halo: int | None = None,
        store: Any = ...,
        threshold: int | None = None,
    ) -> None:
        """Tiled-mode settings (``docs/rules/tiling.md``).

        Args:
            mode: ``"auto"`` (planes whose longer side exceeds ``threshold`` px), ``"on"``
                or ``"off"``.
            tile, halo: tile side and overlap in pixels.
            store: an embedding store path (as written by ``napari-esam embed``; ``None``:
                none).
            threshold: the ``"auto"`` threshold in pixels.
        """
        if mode is not None and mode not in TILED_MODES:
            raise ValueError(f"tiled mode must be one of {TILED_MODES}, not {mode!r}")
        tile = self.tile if tile is None else int(tile)
        halo = self.halo if halo is None else int(halo)
        TileGrid((tile, tile), tile, halo)  # the grid's own checks (ValueError), before any change
        if mode is not None:
            self.tiled_mode = mode
        self.tile, self.halo = tile, halo
        if store is not ...:
            self.embedding_store = str(store) if store else None
        if threshold is not None:
            self.tiled_threshold = int(threshold)
        self._decoded = None
        self._decode_failed = None
        self.events.changed()
        self.update()

    def _plane_engine(self, tiling: tuple) -> PromptEngine | None:
        """The engine answering prompts under ``tiling`` (``None`` until it is built)."""
        if self.model is None:
            return None
        return self._engines.get((self.model_key, tiling))

    def set_model(
        self, name: str | None = None, checkpoint: Any = ..., device: str | None = None
    ) -> None:
        """Change the model, its checkpoint (``None`` = official) or the device."""
        if name is not None:
            self.model_name = name
        if checkpoint is not ...:
            self.checkpoint = checkpoint or None
        if device is not None:
            self.device = device
        if self._model_key != self.model_key:
            self._model = None
            self._model_key = None
            self._drop_engines()
            self._failed.clear()
        self._decoded = None
        self.events.changed()
        self.update()

    def set_cache_size(self, size: int) -> None:
        """Keep at most ``size`` embeddings in memory: slices, or tiles in tiled mode."""
        self.cache.maxsize = size
        for engine in self._engines.values():
            engine.predictor.cache_size = self.cache.maxsize

    def set_channel(self, axis: int | None, channel: int | None = None) -> None:
        """Segment channel ``channel`` of ``axis`` (``None``: the one the slider shows)."""
        self.channel_axis = axis
        self.channel = channel if axis is not None else None
        self._decoded = None
        self.update()

    def set_use_contrast_limits(self, value: bool) -> None:
        self.use_contrast_limits = bool(value)
        self.update()

    # -------------------------------------------------------------------- layers
    @property
    def image_layer(self) -> Any:
        return self._image

    @image_layer.setter
    def image_layer(self, layer: Any) -> None:
        if layer is self._image:
            return
        if self._image is not None:
            self._image.events.data.disconnect(self._on_image_data)
            self._image.events.contrast_limits.disconnect(self._on_contrast)
        self._image = layer
        self._decoded = None
        self.channel_axis = self.channel = None
        if layer is not None:
            layer.events.data.connect(self._on_image_data)
            layer.events.contrast_limits.connect(self._on_contrast)
        self.events.changed()
        self.update()

    @property
    def points_layer(self) -> Any:
        return self._points

    @points_layer.setter
    def points_layer(self, layer: Any) -> None:
        if layer is self._points:
            return
        if self._points is not None:
            self._points.events.data.disconnect(self._on_prompts)
            self._points.events.features.disconnect(self._on_prompts)
            _unbind_keys(self._points)
        self._points = layer
        if layer is not None:
            _ensure_label_feature(layer, self.polarity)
            layer.events.data.connect(self._on_prompts)
            layer.events.features.connect(self._on_prompts)
            self._bind_keys(layer)
        self.update()

    @property
    def shapes_layer(self) -> Any:
        return self._shapes

    @shapes_layer.setter
    def shapes_layer(self, layer: Any) -> None:
        if layer is self._shapes:
            return
        if self._shapes is not None:
            self._shapes.events.data.disconnect(self._on_prompts)
            _unbind_keys(self._shapes)
        self._shapes = layer
        if layer is not None:
            layer.events.data.connect(self._on_prompts)
            self._bind_keys(layer)
        self.update()

    @property
    def labels_layer(self) -> Any:
        """The output Labels layer (``None``: one is created on the first commit)."""
        return self._labels

    @labels_layer.setter
    def labels_layer(self, layer: Any) -> None:
        self._labels = layer

    @property
    def preview_layer(self) -> Any:
        return self._preview

    def ensure_prompt_layers(self) -> tuple[Any, Any]:
        """Create (or reuse) the points and boxes layers for the current image."""
        image = self._image
        if image is None:
            self._message("Add or choose an image layer first.", "warning")
            return self._points, self._shapes
        ndim = len(spatial_shape(image))
        geo = {"scale": image.scale, "translate": image.translate}
        size = float(np.clip(max(spatial_shape(image)[-2:]) / 50, 4, 30))
        with self._keep_selection():
            if self._shapes is None:
                shapes = self.viewer.add_shapes(
                    ndim=ndim, name=BOXES_NAME, edge_color="#ffd700", face_color="transparent",
                    edge_width=max(1.0, size / 4), metadata={ROLE_KEY: "boxes"}, **geo,
                )
                _ensure_shape_label_feature(shapes, self.polarity)
                self.shapes_layer = shapes
            if self._points is None:
                points = self.viewer.add_points(
                    np.empty((0, ndim)), name=POINTS_NAME, size=size, border_color="white",
                    border_width=0.1, metadata={ROLE_KEY: "points"}, **geo,
                )
                self.points_layer = points
        self._points.mode = "add"
        self.viewer.layers.selection.active = self._points
        self.events.changed()
        return self._points, self._shapes

    # -------------------------------------------------------------------- prompts
    def set_polarity(self, polarity: str) -> None:
        """Polarity of the next clicks: ``"positive"`` or ``"negative"``."""
        if polarity not in (POSITIVE, NEGATIVE):
            raise ValueError(f"polarity must be {POSITIVE!r} or {NEGATIVE!r}")
        self.polarity = polarity
        if self._points is not None:
            _ensure_label_feature(self._points, polarity)
            self._points.feature_defaults = {"label": polarity}
            _show_current_colour(self._points, polarity)
        if self._shapes is not None:
            _ensure_shape_label_feature(self._shapes, polarity)
        self._status(f"Next clicks are {polarity}.")
        self.events.changed()

    def toggle_polarity(self) -> None:
        self.set_polarity(NEGATIVE if self.polarity == POSITIVE else POSITIVE)

    def next_mask(self) -> None:
        """Show the next of the three candidate masks (by score)."""
        if self._decoded is None:
            self._message("No preview yet: add a point or a box.", "info")
            return
        self.mask_rank = (self.mask_rank + 1) % self._decoded.scores.shape[1]
        self._show_decoded()

    def clear_prompts(self) -> None:
        """Remove all points and boxes (of every slice) and the preview."""
        with self._batch():
            if self._points is not None and len(self._points.data):
                self._points.data = np.empty((0, self._points.ndim))
            if self._shapes is not None and len(self._shapes.data):
                self._shapes.selected_data = set(range(len(self._shapes.data)))
                self._shapes.remove_selected()
        self._decoded = None
        self._history.clear()
        self.mask_rank = 0
        self._clear_preview()

    def set_one_object_per_point(self, value: bool) -> None:
        """Segment every positive point as its own object (one batched decoder call; the
        objects are committed with consecutive ids)."""
        self.one_object_per_point = bool(value)
        self._decoded = None
        self.mask_rank = 0
        self.events.changed()
        self.update()

    def clear_object(self) -> None:
        """Discard the current object (its prompts and preview)."""
        self.clear_prompts()
        self._status("Cleared the current object.")
        self.update()

    # --------------------------------------------------------------------- update
    def _context(self) -> tuple[Any, Plane, tuple]:
        image = self._image
        if image is None or image not in self.viewer.layers:
            raise PromptError("Add or choose an image layer to segment.")
        plane = plane_of(self.viewer, image, self.channel_axis, self.channel)
        cl = tuple(float(c) for c in image.contrast_limits) if self.use_contrast_limits else None
        key = (
            image.unique_id, self._data_version, plane.key, self.model_key, cl,
            self.tiling_key(plane),
        )
        return image, plane, key

    def update(self) -> None:
        """Recompute after any change: embedding (in the background) if needed, then decode."""
        if self._updating:  # e.g. a synchronous runner finishing inside _update
            self._rerun = True
            return
        self._updating = True
        try:
            self._rerun = True
            while self._rerun:
                self._rerun = False
                self._update()
        finally:
            self._updating = False

    def _update(self) -> None:
        try:
            image, plane, key = self._context()
        except PromptError as exc:
            self._decoded = None
            self._clear_preview()
            self._status(str(exc), "warning")
            return
        prompts = self._collect(image, plane)
        notes = self._prompt_notes(prompts)
        embedding = self.cache.get(key)
        engine = self._plane_engine(key[5])
        if embedding is None or engine is None:
            if self._decoded is not None and self._decoded.plane != plane:
                self._decoded = None
                self._clear_preview()
            if prompts.empty and self.model is None:
                self._status(" ".join([*notes, self._hint(plane)]), self._level(notes))
                return
            self._request_embedding(image, plane, key)
            return
        if prompts.empty:
            self._decoded = None
            self._clear_preview()
            self._status(" ".join([*notes, self._hint(plane)]), self._level(notes))
            return
        self._decode(engine, image, plane, key, prompts, embedding, notes)

    def _hint(self, plane: Plane) -> str:
        where = "" if plane.ndim == 2 else f" on slice {self._slice_text(plane)}"
        tiled = (
            f" Tiled mode ({self.tile} px tiles, full resolution)." if self.is_tiled(plane)
            else ""
        )
        return f"Click a positive point or draw a box{where}.{tiled}"

    @staticmethod
    def _slice_text(plane: Plane) -> str:
        return ", ".join(str(i) for i in plane.index if i is not None)

    def _prompt_notes(self, prompts: PlanePrompts) -> list[str]:
        notes = []
        if prompts.outside:
            notes.append(f"{prompts.outside} prompt(s) outside the image were ignored.")
        if prompts.degenerate:
            notes.append(f"{prompts.degenerate} shape(s) without area were ignored.")
        return notes

    @staticmethod
    def _level(notes: Sequence[str]) -> str:
        return "warning" if any("ignored" in n for n in notes) else "info"

    def objects(self, prompts: PlanePrompts) -> ObjectPrompts:
        """The objects the prompts define (rules: ``docs/interactive.md#prompts``).

        Points (clicks and scribbles) combine with at most one box or lasso into one object;
        boxes and lassos without points are one object each. With
        :attr:`one_object_per_point`, every positive point is its own object (with all
        negative points). Raises :class:`PromptError` for combinations that define no object.
        """
        n_pts, n_box = prompts.n_points, prompts.n_boxes
        pos = prompts.point_labels == 1
        if self.one_object_per_point and n_pts:
            if n_box:
                raise PromptError(
                    "'One object per positive point' segments points only: remove the boxes "
                    "and lassos, or untick it."
                )
            if not pos.any():
                raise PromptError("Add a positive point: each one becomes an object.")
            neg = prompts.points_xy[~pos]
            coords = np.stack([np.concatenate([p[None], neg]) for p in prompts.points_xy[pos]])
            labels = np.tile(np.r_[1, np.zeros(len(neg), np.int64)], (len(coords), 1))
            return ObjectPrompts(coords, labels.astype(np.int64), None, (None,) * len(coords))
        if n_pts and n_box > 1:
            raise PromptError(
                f"Points combine with one box into one object, but there are {n_box} boxes. "
                "Keep one box, or remove the points to segment each box as its own object."
            )
        if n_pts and not n_box and not pos.any():
            raise PromptError(
                "Negative points alone do not define an object: add a positive point or a box."
            )
        coords = prompts.points_xy[None] if n_pts else None
        labels = prompts.point_labels[None] if n_pts else None
        boxes = prompts.boxes_xyxy if n_box else None
        masks = tuple(prompts.box_masks) if n_box else (None,)
        return ObjectPrompts(coords, labels, boxes, masks)

    @staticmethod
    def _negative_note(engine: PromptEngine, labels: np.ndarray | None) -> list[str]:
        if labels is None or engine.has_negative_point_embedding or labels.all():
            return []
        return [
            f"{engine.name} has no learned embedding for negative points; they may not "
            "remove area (MobileSAM supports them)."
        ]

    # ------------------------------------------------------------------- decoding
    def _current_signature(self, image: Any, plane: Plane, key: tuple) -> tuple | None:
        prompts = self._collect(image, plane)
        try:
            return (key, self.objects(prompts).key())
        except PromptError:
            return None

    def _collect(self, image: Any, plane: Plane) -> PlanePrompts:
        """The prompts on ``plane``; scribbles sampled every :data:`SCRIBBLE_SPACING` px of
        the model input (the plane's tile is resized to 1024 px)."""
        grid = self.grid(plane)
        spacing = SCRIBBLE_SPACING * max(grid.tile_h, grid.tile_w) / 1024
        return collect_prompts(
            self.viewer, image, plane, self._points, self._shapes, scribble_spacing=spacing
        )

    def _mask_prompts(
        self, engine: PromptEngine, key: tuple, objects: ObjectPrompts
    ) -> list[MaskPrompt | RegionMask | None] | None:
        """Per object the mask prompt (``docs/interactive.md#mask-input``): for one object,
        the best low-res logits of the longest earlier prompt set this one extends (SAM's
        iterative prompting); else the object's lasso mask; ``None`` without a mask prompt
        or when the model takes none."""
        if not getattr(engine.model, "supports_mask_input", False):
            return None
        prompts: list[MaskPrompt | RegionMask | None] = list(objects.masks)
        if objects.n_objects == 1:
            previous = self._history.previous(key, objects)
            if previous is not None:
                prompts[0] = previous
        return prompts if any(p is not None for p in prompts) else None

    def _decode(
        self, engine: PromptEngine, image: Any, plane: Plane, key: tuple,
        prompts: PlanePrompts, embedding: PlaneEmbedding, notes: list[str],
    ) -> None:
        """Decode the prompts: at once when the plane's embedding is ready (one tile), else
        in the worker after encoding the tiles under the prompts."""
        try:
            objects = self.objects(prompts)
        except PromptError as exc:
            self._decoded = None
            self._clear_preview()
            self._message(" ".join([*notes, str(exc)]), "warning")
            return
        mask_prompts = self._mask_prompts(engine, key, objects)
        sig = ((key, objects.key()), _mask_key(mask_prompts))
        notes = [*notes, *self._negative_note(engine, objects.labels)]
        if self._decoded is not None and self._decoded.signature == sig:
            self._show_decoded(notes)
            return
        if self._decode_failed is not None and self._decode_failed[0] == sig:
            self._status(self._decode_failed[1], "warning")
            return
        layer_id = image.unique_id
        if embedding.ready:
            try:
                objs = engine.predict_windowed(embedding, *objects.arrays, mask_prompts)
            except Exception as exc:  # noqa: BLE001 - prompt checks, out of memory: a message
                self._decode_error(sig, exc)
                return
            self._set_decoded(sig, plane, layer_id, objs, objects)
            self._show_decoded(notes)
            return
        if self.busy:
            self._pending = True
            return

        def job():
            yield Progress(0, 2, "Computing the embedding of the tile(s) under the prompts…")
            engine.prefetch(embedding, *objects.arrays, mask_prompts)
            yield Progress(1, 2, "Decoding the prompts…")
            objs = engine.predict_windowed(embedding, *objects.arrays, mask_prompts)
            return sig, plane, layer_id, objs, objects

        self.busy = True
        self._pending = False
        self.events.busy(value=True)
        self._status("Tiled mode: computing the tile embedding(s) under the prompts…")
        self.runner(
            job,
            on_returned=self._on_tiled_decoded,
            on_errored=lambda exc: self._on_tiled_error(sig, exc),
            on_progress=lambda p: self.events.progress(value=p),
            desc="napari-esam: tiled prompts",
            total=2,
        )

    def _set_decoded(
        self, sig: tuple, plane: Plane, layer_id: Hashable, objs: list[TiledMask],
        objects: ObjectPrompts,
    ) -> None:
        if len(objs) == 1:
            best = int(np.argmax(objs[0].scores))
            self._history.add(sig[0][0], objects, MaskPrompt(objs[0].low_res[best], objs[0].window))
        previous = self._decoded
        self._decoded = _Decoded(
            plane, layer_id, [np.asarray(o.masks, dtype=bool) for o in objs],
            np.stack([np.asarray(o.scores) for o in objs]),
            [(int(o.window.y0), int(o.window.x0)) for o in objs], sig,
        )
        if previous is None or len(previous.masks) != len(objs):
            self.mask_rank = 0

    def _decode_error(self, sig: tuple, exc: BaseException) -> None:
        if isinstance(exc, ValueError):  # PromptError or the predictor's prompt checks
            text = str(exc)
        else:
            text = f"Decoding the prompts failed: {type(exc).__name__}: {exc}"
        self._decode_failed = (sig, text)
        self._decoded = None
        self._clear_preview()
        self._message(text, "warning")

    def _on_tiled_decoded(self, result: tuple) -> None:
        sig, plane, layer_id, objs, objects = result
        self.busy = False
        self.events.progress(value=Progress(2, 2, "Done"))
        self.events.busy(value=False)
        self._set_decoded(sig, plane, layer_id, objs, objects)
        self.update()

    def _on_tiled_error(self, sig: tuple, exc: BaseException) -> None:
        self.busy = False
        self.events.progress(value=Progress(0, 2, "Failed"))
        self.events.busy(value=False)
        self._decode_error(sig, exc)
        if self._pending:
            self.update()

    def _show_decoded(self, notes: Sequence[str] = ()) -> None:
        dec = self._decoded
        if dec is None or self._image is None:
            return
        masks, scores = dec.chosen(self.mask_rank)
        k = dec.scores.shape[1]
        shown = self._shown
        layer = self._preview
        if not (
            shown is not None and shown[0] is dec and shown[1] == self.mask_rank % k
            and shown[2] is self._image and layer is not None and layer in self.viewer.layers
        ):  # repaint unless the preview already shows this mask (e.g. a second prompt event)
            r0, c0, h, w = region = dec.frame()
            preview = np.zeros((h, w), dtype=np.uint8)
            for b, (m, (mr, mc)) in enumerate(zip(masks, dec.offsets, strict=True)):
                view = preview[mr - r0 : mr - r0 + m.shape[0], mc - c0 : mc - c0 + m.shape[1]]
                view[m] = b % 255 + 1
            self._set_preview(self._image, dec.plane, preview, region)
            self._shown = (dec, self.mask_rank % k, self._image)
        n = len(masks)
        what = "1 object" if n == 1 else f"{n} objects"
        score = ", ".join(f"{s:.2f}" for s in scores)
        text = (
            f"Preview: {what}, mask {self.mask_rank % k + 1}/{k} (score {score}). "
            f"Press {KEYS['commit'].upper()} or Commit to accept."
        )
        self._status(" ".join([*notes, text]), self._level(notes))

    # ----------------------------------------------------------------- embedding
    def prepare(self) -> None:
        """Load the model and compute the current plane's embedding now (in the background)."""
        try:
            image, plane, key = self._context()
        except PromptError as exc:
            self._message(str(exc), "warning")
            return
        self._failed.pop(key, None)
        if key in self.cache and self._plane_engine(key[5]) is not None:
            self._status("The embedding of this slice is ready.")
            return
        self._request_embedding(image, plane, key)

    def _request_embedding(self, image: Any, plane: Plane, key: tuple) -> None:
        if self.busy:
            self._pending = True
            return
        if key in self._failed:
            self._status(self._failed[key], "warning")
            return
        model_key = self.model_key
        # the factory gets the settings themselves (a state-dict checkpoint is keyed by id)
        model_args = (self.model_name, self.checkpoint, self.device)
        model = self.model
        factory = self.model_factory
        data = image_array(image)
        cl, tiling = key[4], key[5]
        engine = self._engines.get((model_key, tiling)) if model is not None else None
        name = self.model_name
        cached = self.cache.get(key)
        one_tile = self.grid(plane).n_tiles == 1
        cache_size = self.cache.maxsize

        def job():
            nonlocal model, engine
            yield Progress(0, 3, f"Loading {name}…" if model is None else f"{name} loaded")
            if model is None:
                model = factory(*model_args)
            if engine is None:
                tile, halo, store = tiling
                engine = PromptEngine(
                    model, tile=tile, halo=halo, store=store, cache_size=cache_size
                )
            if cached is not None:
                yield Progress(1, 3, "Embedding cached")
                yield Progress(2, 3, "Embedding cached")
                return model_key, model, key, cached, engine
            yield Progress(1, 3, "Opening the slice…")
            source, index = tiled_source(data, plane)
            yield Progress(
                2, 3, f"Computing the {name} image embedding…" if one_tile
                else "Reading a contrast sample of the image…",
            )
            return model_key, model, key, engine.embed(
                source, cl, index=index, rgb=plane.rgb
            ), engine

        self.busy = True
        self._pending = False
        self.events.busy(value=True)
        where = "" if plane.ndim == 2 else f" of slice {self._slice_text(plane)}"
        self._status(f"Computing the image embedding{where} with {name}…")
        self.runner(
            job,
            on_returned=self._on_embedding,
            on_errored=lambda exc: self._on_embedding_error(key, exc),
            on_progress=lambda p: self.events.progress(value=p),
            desc=f"napari-esam: {name} embedding",
            total=3,
        )

    def _on_embedding(self, result: tuple) -> None:
        model_key, model, key, embedding, engine = result
        self.busy = False
        self.events.progress(value=Progress(3, 3, "Embedding ready"))
        self.events.busy(value=False)
        if model_key == self.model_key:
            self._model, self._model_key = model, model_key
            self._engines[(model_key, key[5])] = engine
        self.cache.put(key, embedding)
        self.update()

    def _on_embedding_error(self, key: tuple, exc: BaseException) -> None:
        self.busy = False
        self.events.progress(value=Progress(0, 3, "Failed"))
        self.events.busy(value=False)
        text = f"Could not compute the embedding: {exc}"
        self._failed[key] = text
        self._message(text, "warning")
        if self._pending:
            self.update()

    # ------------------------------------------------------- segment through stack
    def stack_axis(self, plane: Plane) -> int:
        """The axis "Segment through stack" follows on ``plane``: :attr:`propagation_axis`
        if set (a stack axis), else the non-displayed axis nearest the displayed ones."""
        axes = [
            a for a, i in enumerate(plane.index) if i is not None and a != plane.channel_axis
        ]
        if not axes:
            raise PromptError("Segment through stack needs a stack: this image is one plane.")
        if self.propagation_axis is None:
            return axes[-1]
        if self.propagation_axis not in axes:
            raise PromptError(
                f"Axis {self.propagation_axis} is not a stack axis here; choose one of {axes}."
            )
        return int(self.propagation_axis)

    def propagate(self) -> None:
        """Segment the prompted object(s) through the stack (in the background).

        Every slice along the stack axis with prompts is a seed (``docs/interactive.md#
        segment-through-stack``); the result is shown as a 3-D preview for :meth:`commit`.
        """
        if self.busy:
            self._message("Wait for the current computation to finish.", "warning")
            return
        try:
            image, plane, key = self._context()
            axis = self.stack_axis(plane)
            n = spatial_shape(image)[axis]
            seeds = self._seed_prompts(image, plane, axis, n)
            if len({s.n_objects for s in seeds.values()}) > 1:
                raise PromptError(
                    "The prompted slices hold different numbers of objects; give each "
                    "prompted slice the same objects (matched in order)."
                )
            self.propagation.validate(n)
        except (PromptError, ValueError) as exc:
            self._message(str(exc), "warning")
            return
        self._discard_propagation()
        engine = self._engine_getter(key)
        data, cl = image_array(image), key[4]

        def embed(eng: PromptEngine, index: int) -> PlaneEmbedding:
            p = slice_plane(plane, axis, index)
            source, idx = tiled_source(data, p)
            return eng.embed(source, cl, index=idx, rgb=p.rgb)

        self._cancel.clear()
        job = propagation_job(engine, embed, seeds, n, self.propagation, self._cancel)
        context = (image.unique_id, plane, axis, key)
        self.busy = True
        self.events.busy(value=True)
        self._status(f"Segmenting through the stack (axis {axis}) from {len(seeds)} slice(s)…")
        self.runner(
            job,
            on_returned=lambda result: self._on_propagated(context, result),
            on_errored=self._on_propagation_error,
            on_progress=lambda p: self.events.progress(value=p),
            desc="napari-esam: segment through stack",
            total=n,
        )

    def cancel(self) -> None:
        """Stop "Segment through stack" after the current slice (nothing is committed)."""
        self._cancel.set()

    def _seed_prompts(self, image: Any, plane: Plane, axis: int, n: int) -> dict[int, Any]:
        seeds = {}
        for index in range(n):
            p = slice_plane(plane, axis, index)
            prompts = self._collect(image, p)
            if not prompts.empty:
                seeds[index] = self.objects(prompts)
        if not seeds:
            raise PromptError("Add prompts to the object on one or more slices first.")
        return seeds

    def _engine_getter(self, key: tuple) -> Callable[[], PromptEngine]:
        """A function giving the engine for ``key``'s tiling, building the model (in the
        worker) when it is not loaded yet; the built one is kept by the caller."""
        model, model_key = self.model, self.model_key
        tiling = key[5]
        engine = self._engines.get((model_key, tiling)) if model is not None else None
        factory, args = self.model_factory, (self.model_name, self.checkpoint, self.device)
        cache_size = self.cache.maxsize

        def get() -> PromptEngine:
            nonlocal model, engine
            if engine is None:
                if model is None:
                    model = factory(*args)
                tile, halo, store = tiling
                engine = PromptEngine(
                    model, tile=tile, halo=halo, store=store, cache_size=cache_size
                )
            return engine

        return get

    def _on_propagated(self, context: tuple, result: tuple) -> None:
        layer_id, plane, axis, key = context
        engine, masks = result
        self.busy = False
        self.events.busy(value=False)
        self.events.progress(value=Progress(1, 1, "Done"))
        if key[3] == self.model_key:
            self._model, self._model_key = engine.model, key[3]
            self._engines[(key[3], key[5])] = engine
        image = self._image
        if image is None or image.unique_id != layer_id:
            self._message("The image changed during the propagation; run it again.", "warning")
            return
        prop = Propagated(layer_id, plane, axis, masks)
        if not prop.masks:
            self._message("Nothing was found on the prompted slices.", "warning")
            return
        self._propagated = prop
        self._show_propagation(image, prop)
        first, last = prop.slices[0], prop.slices[-1]
        what = "1 object" if prop.n_objects == 1 else f"{prop.n_objects} objects"
        self._message(
            f"Segmented {what} through slices {first}–{last} of axis {axis} "
            f"({len(prop.slices)} slices). Press {KEYS['commit'].upper()} or Commit to accept."
        )
        self.events.changed()

    def _on_propagation_error(self, exc: BaseException) -> None:
        self.busy = False
        self.events.busy(value=False)
        self.events.progress(value=Progress(0, 1, "Cancelled" if isinstance(
            exc, InterruptedError) else "Failed"))
        if isinstance(exc, InterruptedError):
            self._message("Segment through stack was cancelled; nothing was committed.")
        else:
            self._message(
                f"Segment through stack failed: {type(exc).__name__}: {exc}", "warning"
            )

    def _show_propagation(self, image: Any, prop: Propagated) -> None:
        geo = labels_geometry(image, prop.plane.channel_axis)
        data = np.zeros(geo["shape"], dtype=np.uint8)
        paint(data, prop.plane, prop.axis, prop.masks,
              [b % 255 + 1 for b in range(prop.n_objects)])
        layer = self._propagation_layer
        if layer is not None and layer in self.viewer.layers:
            _set_geometry(layer, geo)
            layer.data = data
            return
        from napari.utils.colormaps import DirectLabelColormap

        colors = {None: "transparent", 0: "transparent"}
        colors.update({i + 1: _PREVIEW_COLORS[i % len(_PREVIEW_COLORS)] for i in range(255)})
        with self._keep_selection():
            layer = self.viewer.add_labels(
                data, name=PROPAGATION_NAME, scale=geo["scale"], translate=geo["translate"],
                rotate=geo["rotate"], shear=geo["shear"], affine=geo["affine"], opacity=0.55,
                colormap=DirectLabelColormap(color_dict=colors),
                metadata={ROLE_KEY: "preview"},
            )
            self._move_below_prompts(layer)
        self._propagation_layer = layer

    def propagated(self) -> Propagated | None:
        """The propagation result waiting for commit, or ``None``."""
        return self._propagated

    def _discard_propagation(self) -> None:
        self._propagated = None
        layer = self._propagation_layer
        if layer is not None and layer in self.viewer.layers and np.any(layer.data):
            layer.data = np.zeros_like(layer.data)

    def _commit_propagated(self) -> list[int]:
        prop = self._propagated
        image = self._image
        if image is None or image.unique_id != prop.layer_id:
            self._discard_propagation()
            self._message("The propagated object belongs to another image.", "warning")
            return []
        labels = self._output_labels(image, prop.plane)
        if labels is None:
            return []
        next_id = int(np.max(labels.data)) + 1 if np.size(labels.data) else 1
        top = np.iinfo(labels.data.dtype).max if labels.data.dtype.kind in "iu" else 2**53
        ids = list(range(next_id, next_id + prop.n_objects))
        if ids[-1] > top:
            self._message(
                f"Labels layer {labels.name!r} ({labels.data.dtype}) cannot hold label "
                f"{ids[-1]}.", "warning",
            )
            return []
        with labels.block_history():
            written = paint(
                _LayerTarget(labels), prop.plane, prop.axis, prop.masks, ids,
                preserve=not self.overwrite,
            )
        if not written:
            self._message(
                "Nothing was committed: the object lies on existing labels. Tick 'overwrite' "
                "to replace them.", "warning",
            )
            return []
        self._last_labels = weakref.ref(labels)
        self.clear_prompts()
        self._discard_propagation()
        self.update()
        what = f"label {ids[0]}" if len(ids) == 1 else f"labels {ids[0]}–{ids[-1]}"
        self._message(
            f"Committed {what} through {len(prop.slices)} slices to {labels.name!r}."
        )
        return ids

    # -------------------------------------------------------------------- commit
    def commit(self) -> list[int]:
        """Write the previewed object(s) into the output labels; returns the new label ids.

        Each object gets the next free id (largest label + 1). Pixels that already carry a
        label are kept unless ``overwrite`` is set. One commit is one undo step.
        """
        if self._propagated is not None:
            return self._commit_propagated()
        dec = self._decoded
        if self.busy and dec is None:
            self._message("The embedding is still being computed; commit when the preview shows.")
            return []
        if dec is None or self._image is None:
            self._message("Nothing to commit: add a positive point or a box first.", "warning")
            return []
        try:
            image, plane, key = self._context()
        except PromptError as exc:
            self._message(str(exc), "warning")
            return []
        if plane != dec.plane or image.unique_id != dec.layer_id:
            self._message("The preview belongs to another slice; add prompts here.", "warning")
            return []
        if dec.signature is not None and dec.signature[0] != self._current_signature(
            image, plane, key
        ):
            self._message(
                "The preview is still being updated for the latest prompts; commit when it "
                "shows.", "warning",
            )
            return []
        labels = self._output_labels(image, plane)
        if labels is None:
            return []
        masks, _ = dec.chosen(self.mask_rank)
        next_id = int(np.max(labels.data)) + 1 if np.size(labels.data) else 1
        top = np.iinfo(labels.data.dtype).max if labels.data.dtype.kind in "iu" else 2**53
        ids: list[int] = []
        skipped = 0
        with labels.block_history():
            for mask, (r0, c0) in zip(masks, dec.offsets, strict=True):
                where = list(plane.labels_slicer())
                where[plane.row_axis] = slice(r0, r0 + mask.shape[0])
                where[plane.col_axis] = slice(c0, c0 + mask.shape[1])
                current = plane.to_plane(np.array(labels.data[tuple(where)]))
                write = mask if self.overwrite else mask & (current == 0)
                if not write.any():
                    skipped += 1
                    continue
                if next_id > top:
                    self._message(
                        f"Labels layer {labels.name!r} ({labels.data.dtype}) cannot hold label "
                        f"{next_id}.", "warning",
                    )
                    break
                rows, cols = np.nonzero(write)
                labels.data_setitem(plane.labels_indices(rows + r0, cols + c0), next_id)
                ids.append(next_id)
                next_id += 1
        if not ids:
            self._message(
                "Nothing was committed: the object lies on existing labels. Tick 'overwrite' to "
                "replace them.", "warning",
            )
            return []
        self._last_labels = weakref.ref(labels)
        self.clear_prompts()
        self.update()
        what = f"label {ids[0]}" if len(ids) == 1 else f"labels {ids[0]}–{ids[-1]}"
        extra = f" ({skipped} object(s) on existing labels skipped)" if skipped else ""
        self._message(f"Committed {what} to {labels.name!r}{extra}. Next object: click again.")
        return ids

    def undo(self) -> None:
        """Undo the last edit of the output labels (like Ctrl+Z on that layer)."""
        layer = self._last_labels() if self._last_labels is not None else None
        layer = layer if layer is not None and layer in self.viewer.layers else self._labels
        if layer is None or not getattr(layer, "_undo_history", None):
            self._message("Nothing to undo.", "info")
            return
        layer.undo()
        self._message(f"Undid the last edit of {layer.name!r}.")

    def _output_labels(self, image: Any, plane: Plane) -> Any:
        geo = labels_geometry(image, plane.channel_axis)
        labels = self._labels
        if labels is not None and labels not in self.viewer.layers:
            labels = self._labels = None
        if labels is None:
            with self._keep_selection():
                labels = self.viewer.add_labels(
                    np.zeros(geo["shape"], dtype=np.uint32), name=LABELS_NAME,
                    scale=geo["scale"], translate=geo["translate"], rotate=geo["rotate"],
                    shear=geo["shear"], affine=geo["affine"], opacity=0.6,
                    metadata={ROLE_KEY: "labels"},
                )
                self._move_below_prompts(labels)
            self._labels = labels
            self.events.changed()
        if tuple(labels.data.shape) != tuple(geo["shape"]):
            self._message(
                f"Labels layer {labels.name!r} has shape {tuple(labels.data.shape)}, but image "
                f"{image.name!r} needs {tuple(geo['shape'])}; choose another output or a new one.",
                "warning",
            )
            return None
        return labels

    # ------------------------------------------------------------------- preview
    def _set_preview(
        self, image: Any, plane: Plane, preview: np.ndarray,
        region: tuple[int, int, int, int] | None = None,
    ) -> None:
        """Show ``preview`` ((rows, cols) of ``region``, default the whole plane)."""
        region = region or (0, 0, *plane.shape)
        geo = preview_geometry(image, plane, region)
        data = preview.reshape(geo["shape"]) if plane.row_axis < plane.col_axis else (
            preview.T.reshape(geo["shape"])
        )
        self._preview_region = (plane, region)
        layer = self._preview
        if layer is None or layer not in self.viewer.layers:
            from napari.utils.colormaps import DirectLabelColormap

            colors = {None: "transparent", 0: "transparent"}
            colors.update({i + 1: _PREVIEW_COLORS[i % len(_PREVIEW_COLORS)] for i in range(255)})
            with self._keep_selection():
                layer = self.viewer.add_labels(
                    data, name=PREVIEW_NAME, scale=geo["scale"], translate=geo["translate"],
                    rotate=geo["rotate"], shear=geo["shear"], affine=geo["affine"],
                    opacity=0.55, colormap=DirectLabelColormap(color_dict=colors),
                    metadata={ROLE_KEY: "preview"},
                )
                self._move_below_prompts(layer)
            self._preview = layer
            return
        _set_geometry(layer, geo)
        layer.data = data

    def _clear_preview(self) -> None:
        self._shown = None
        layer = self._preview
        if layer is not None and layer in self.viewer.layers and np.any(layer.data):
            layer.data = np.zeros_like(layer.data)

    def preview_region(self) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The preview as ((rows, cols) array, (row0, col0) of it in the plane), or ``None``."""
        if self._preview is None or self._decoded is None or self._preview_region is None:
            return None
        plane, (r0, c0, h, w) = self._preview_region
        data = np.asarray(self._preview.data)
        flat = data.reshape(
            [s for a, s in enumerate(data.shape) if plane.index[a] is None]
        )
        return plane.to_plane(flat), (r0, c0)

    def preview_mask(self) -> np.ndarray | None:
        """The preview of the current plane as an (H, W) array (0 = background)."""
        got = self.preview_region()
        if got is None:
            return None
        part, (r0, c0) = got
        plane = self._preview_region[0]
        out = np.zeros(plane.shape, dtype=part.dtype)
        out[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]] = part
        return out

    # --------------------------------------------------------------------- events
    def _on_prompts(self, event: Any = None) -> None:
        action = getattr(event, "action", None)
        if action is not None and str(action) not in ("added", "removed", "changed"):
            return
        if self._batching:
            return
        self.mask_rank = 0
        self._discard_propagation()
        self.update()

    _batching = False

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Ignore prompt-layer events inside (one update afterwards, by the caller)."""
        prev, self._batching = self._batching, True
        try:
            yield
        finally:
            self._batching = prev

    def _on_view_changed(self, event: Any = None) -> None:
        if self._image is not None:
            self.update()

    def _on_image_data(self, event: Any = None) -> None:
        self._data_version += 1
        self._decoded = None
        # tile caches are keyed by the array object, which may have been changed in place
        self._drop_engines()
        self.update()

    def _on_contrast(self, event: Any = None) -> None:
        if self.use_contrast_limits:
            self.update()

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        for name in ("_image", "_points", "_shapes", "_labels", "_preview", "_propagation_layer"):
            if getattr(self, name) is layer:
                if name == "_image":
                    self.image_layer = None
                else:
                    setattr(self, name, None)
        self.events.changed()

    def _bind_keys(self, layer: Any) -> None:
        actions = {
            "toggle_polarity": self.toggle_polarity,
            "next_mask": self.next_mask,
            "commit": self.commit,
            "clear": self.clear_object,
            "undo": self.undo,
            "propagate": self.propagate,
        }
        for action, key in KEYS.items():
            layer.bind_key(key, _KeyAction(actions[action]), overwrite=True)

    # ------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _keep_selection(self) -> Iterator[None]:
        """Restore the active layer after adding layers (napari activates new layers)."""
        active = self.viewer.layers.selection.active
        try:
            yield
        finally:
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active

    def _move_below_prompts(self, layer: Any) -> None:
        layers = self.viewer.layers
        prompt_layers = [lyr for lyr in (self._points, self._shapes) if lyr in layers]
        if not prompt_layers:
            return
        target = min(layers.index(lyr) for lyr in prompt_layers)
        src = layers.index(layer)
        if src > target:
            layers.move(src, target)

    def _status(self, text: str, level: str = "info") -> None:
        self.status = text
        self.events.status(text=text, level=level)

    def _message(self, text: str, level: str = "info") -> None:
        """Status line plus a napari notification (warnings are not repeated)."""
        self._status(text, level)
        if not self.notify:
            return
        from napari.utils.notifications import show_info, show_warning

        if level == "warning":
            if text != self._last_warning:
                self._last_warning = text
                show_warning(text)
        else:
            self._last_warning = ""
            show_info(text)

    def close(self) -> None:
        """Disconnect from the viewer and layers."""
        self.viewer.dims.events.current_step.disconnect(self._on_view_changed)
        self.viewer.dims.events.order.disconnect(self._on_view_changed)
        self.viewer.dims.events.ndisplay.disconnect(self._on_view_changed)
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        self.image_layer = None
        self.points_layer = None
        self.shapes_layer = None


class _LayerTarget:
    """A Labels layer as a paint target: reads its data, writes through ``data_setitem``
    (napari's undo history)."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def __getitem__(self, where: tuple) -> np.ndarray:
        return np.asarray(self.layer.data[where])

    def __setitem__(self, where: tuple, value: int) -> None:
        if len(where[0]):
            self.layer.data_setitem(where, value)


class _KeyAction:
    """A key binding calling a controller method (napari passes the layer)."""

    def __init__(self, func: Callable[[], Any]) -> None:
        self._func = weakref.WeakMethod(func)
        self.__doc__ = func.__doc__
        self.__name__ = f"napari_esam_{func.__name__}"

    def __call__(self, layer: Any = None) -> None:
        func = self._func()
        if func is not None:
            func()


def _unbind_keys(layer: Any) -> None:
    """Remove this plugin's key bindings from a layer that is no longer a prompt layer."""
    for key in KEYS.values():
        with contextlib.suppress(Exception):
            if isinstance(layer.keymap.get(_coerce_key(key)), _KeyAction):
                layer.bind_key(key, None)


def _coerce_key(key: str) -> Any:
    from napari.utils.key_bindings import coerce_keybinding

    return coerce_keybinding(key)


def _ensure_label_feature(points: Any, polarity: str) -> None:
    """Give a Points layer the categorical ``label`` feature coloured green/red."""
    import pandas as pd

    feats = points.features
    cats = [POSITIVE, NEGATIVE]
    if "label" in feats and isinstance(feats["label"].dtype, pd.CategoricalDtype) and set(
        feats["label"].cat.categories
    ) == set(cats):
        points.feature_defaults = {"label": polarity}
        return
    values = (
        [POSITIVE if is_positive(v) else NEGATIVE for v in feats["label"]]
        if "label" in feats
        else [POSITIVE] * len(points.data)
    )
    new = feats.copy()
    new["label"] = pd.Categorical(values, categories=cats)
    points.features = new
    points.feature_defaults = {"label": polarity}
    points.face_color_cycle = {POSITIVE: "#00ff00", NEGATIVE: "#ff0000"}
    points.face_color = "label"


def _ensure_shape_label_feature(shapes: Any, polarity: str) -> None:
    """Give a Shapes layer the ``label`` feature (scribble polarity), defaulting to
    ``polarity`` for the next shape drawn."""
    import pandas as pd

    feats = shapes.features
    cats = [POSITIVE, NEGATIVE]
    if not ("label" in feats and isinstance(feats["label"].dtype, pd.CategoricalDtype)):
        values = (
            [POSITIVE if is_positive(v) else NEGATIVE for v in feats["label"]]
            if "label" in feats else [POSITIVE] * len(shapes.data)
        )
        new = feats.copy()
        new["label"] = pd.Categorical(values, categories=cats)
        shapes.features = new
    shapes.feature_defaults = {"label": polarity}


def _show_current_colour(points: Any, polarity: str) -> None:
    """Make the layer controls show the colour of the next point.

    napari updates the default feature value (which colours the next point) but not the
    displayed current colour; setting ``current_face_color`` would recolour selected points,
    so the colour manager is updated directly (private API: skipped if it changes).
    """
    colour = "#00ff00" if polarity == POSITIVE else "#ff0000"
    try:
        points._face._update_current_color(colour, update_indices=[])
    except (AttributeError, TypeError):  # pragma: no cover - napari internals changed
        return
    points.events.current_face_color()
