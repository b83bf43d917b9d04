"""Refine labels on planes of any size: every object decoded on a tile window.

The per-object rule (prompts, mask input, IoU check, painting) is the one of
:mod:`napari_esam.core.plane.refine`; this module only chooses where each object is decoded
(``docs/rules/refine.md#tiles``), with :meth:`TiledPredictor.route
<napari_esam.core.tiling.predictor.TiledPredictor.route>` for the object's bounding box:

1. the tile that owns the box's centre when it holds the box plus ``halo // 2`` pixels, else
   the tile with the largest inner margin around it, else (an object larger than a tile)
   an ad-hoc square window centred on it;
2. objects sharing a window are decoded together, ``batch_size`` per decoder call, on that
   window's embedding (computed once, kept in the LRU cache and the optional embedding
   store);
3. a refined mask that touches an inner edge of its window (the object continues past it) is
   decoded once more on the window chosen by the same rule for the union of its box and the
   refined mask's box, grown by ``halo // 2``.

A plane that fits one tile is one window, the whole plane: the result equals
:func:`~napari_esam.core.plane.refine.refine_labels` on the plane.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from napari_esam.core.plane.predictor import Predictor
from napari_esam.core.plane.refine import (
    DEFAULT_BATCH,
    IOU_THRESHOLD,
    ObjectSteps,
    RefinedMask,
    RefineResult,
    check_iou_threshold,
    check_labels,
    decode_objects,
    label_objects,
    paint_refined,
    uses_mask_input,
)
from napari_esam.core.tiling.grid import HALO, TILE, Tile, Window
from napari_esam.core.tiling.predictor import TiledPredictor
from napari_esam.models.base import PromptableModel

__all__ = ["refine_plane"]


def _touches_inner_edge(box: tuple[int, int, int, int], window: Window,
                        shape: tuple[int, int]) -> bool:
    """Whether a mask's box lies on an edge of ``window`` that is inside the plane."""
    y0, x0, y1, x1 = box
    h, w = shape
    return ((window.y0 > 0 and y0 == window.y0) or (window.x0 > 0 and x0 == window.x0)
            or (window.y1 < h and y1 == window.y1) or (window.x1 < w and x1 == window.x1))


def refine_plane(
    image: Any,
    labels: Any,
    model: PromptableModel | TiledPredictor,
    *,
    tile: int = TILE,
    halo: int = HALO,
    index: tuple[int, ...] | None = None,
    rgb: bool | None = None,
    iou_threshold: float = IOU_THRESHOLD,
    use_mask_input: bool = True,
    batch_size: int = DEFAULT_BATCH,
    contrast_limits: tuple[float, float] | None = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> RefineResult:
    """Refine every object of one labels plane, tile by tile (module doc for the routing).

    Args:
        image: the image plane (H, W[, 3]) or a stack (..., H, W[, 3]) with ``index``
            choosing the plane; NumPy, Dask or Zarr (only the windows needed are read).
        labels: (H, W) integer labels of that plane (0 = background); not modified.
        model: a promptable model, or a :class:`TiledPredictor` (its grid, cache and store
            are used; ``tile``/``halo`` are then ignored).
        tile, halo: the tile grid (``docs/rules/tiling.md``); a tile at least as large as
            the plane makes it one window.
        index: the plane's leading indices in a stack.
        rgb: whether the last axis is colour (``None``: guessed).
        iou_threshold, use_mask_input, batch_size: as
            :func:`~napari_esam.core.plane.refine.refine_labels`.
        contrast_limits: applied to every tile (``None``: the plane's own,
            ``docs/rules/tiling.md#contrast``).
        progress: ``progress(done, total)`` objects decoded, after each batch.
        cancel: polled between batches (raises
            :class:`~napari_esam.core.plane.everything.Cancelled`).

    Returns:
        A :class:`~napari_esam.core.plane.refine.RefineResult`.
    """
    check_iou_threshold(iou_threshold)
    tp = model if isinstance(model, TiledPredictor) else TiledPredictor(
        model, tile=tile, halo=halo)
    tp.set_image(image, contrast_limits, rgb=rgb, index=index)
    shape = tp.grid.shape
    labels = check_labels(labels, shape)
    objects = label_objects(labels)
    with_mask = uses_mask_input(tp.model, use_mask_input)
    steps = ObjectSteps(len(objects), progress, cancel)
    steps.check()
    predictor = Predictor(tp.model)
    refined: list[RefinedMask | None] = [None] * len(objects)
    where: list[Window | None] = [None] * len(objects)

    def decode(jobs: Sequence[tuple[int, Window]], first: bool) -> None:
        groups: dict[Window, tuple[Tile | None, list[int]]] = {}
        for i, extent in jobs:
            window, grid_tile = tp.route(extent)
            if window != where[i]:
                groups.setdefault(window, (grid_tile, []))[1].append(i)
        if not first:
            steps.total += sum(len(rows) for _, rows in groups.values())
        for window, (grid_tile, rows) in groups.items():
            feats, input_size = _embedding(tp, window, grid_tile)
            predictor.set_embedding(feats, window.shape, input_size)
            masks = decode_objects(
                predictor, [objects[i] for i in rows], (window.y0, window.x0),
                use_mask_input=use_mask_input, batch_size=batch_size, step=steps.step,
            )
            for i, mask in zip(rows, masks, strict=True):
                refined[i], where[i] = mask, window

    decode([(i, Window(*o.box)) for i, o in enumerate(objects)], True)
    c = tp.context
    again = []
    for i, (obj, ref, window) in enumerate(zip(objects, refined, where, strict=True)):
        if ref.box is not None and _touches_inner_edge(ref.box, window, shape):
            grown = Window(*obj.box).union(Window(*ref.box))
            again.append((i, Window(grown.y0 - c, grown.x0 - c, grown.y1 + c, grown.x1 + c)))
    if again:
        decode(again, False)
    result = paint_refined(labels, objects, refined, iou_threshold)
    result.mask_input = with_mask
    return result


def _embedding(tp: TiledPredictor, window: Window, tile: Tile | None) -> tuple[Any, Any]:
    """(embedding, input size) of a routed window: its grid tile's, or an ad-hoc window's."""
    if tile is not None and tile.window == window:
        return tp.tile_embedding(tile)
    return tp.window_embedding(window)

