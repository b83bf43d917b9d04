"""Run settings: which model, the segment-everything parameters, the tiling and the label
id scheme (:class:`BatchSettings`), and the per-process model cache (:func:`get_model`).

The rules these settings choose between (label ids, dtype, the tiling rule) are written in
``docs/rules/labels.md`` and ``docs/rules/tiling.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import numbers
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_esam.core.tiling.grid import (
    HALO,
    MIN_TILE,
    TILE,
    TILED_MODES,
    TileGrid,
    plane_grid,
    use_tiling,
)

__all__ = [
    "MERGE_IOU",
    "MIN_TILE",
    "OBJECT_FIELDS",
    "PROMPTS",
    "BatchSettings",
    "EverythingParams",
    "ModelSpec",
    "TilingParams",
    "clear_model_cache",
    "default_halo",
    "get_model",
    "max_objects_per_tile",
    "output_dtype",
]

#: default IoU inside the tiles' overlap from which two tiles' masks are one object
MERGE_IOU = 0.5
#: the prompt sets of segment-everything (``EverythingParams.prompts``)
PROMPTS = ("grid", "objects")
#: the settings of object prompts (recorded only when ``prompts="objects"``)
OBJECT_FIELDS = ("prompts", "object_diameter", "object_threshold", "object_polarity",
                 "object_decoding")


def default_halo(tile: int) -> int:
    """The default overlap for ``tile``: :data:`~napari_esam.core.tiling.grid.HALO` (256), at
    most a quarter of the tile."""
    return min(HALO, int(tile) // 4)


@dataclass(frozen=True)
class TilingParams:
    """How planes are cut into tiles (``docs/rules/tiling.md``).

    ``mode``: ``"auto"`` (tile planes with a side over
    :data:`~napari_esam.core.tiling.grid.TILING_THRESHOLD` px), ``"on"`` or ``"off"`` (the
    whole plane is one tile, resized to the model input). ``tile``/``halo``: tile side and
    overlap in pixels (``halo=None``: :func:`default_halo`); ``merge_iou``: the seam rule's
    IoU. A tile as large as the plane gives a one-tile grid, the same as ``"off"``.
    """

    mode: str = "auto"
    tile: int = TILE
    halo: int | None = None
    merge_iou: float = MERGE_IOU

    @property
    def halo_px(self) -> int:
        return default_halo(self.tile) if self.halo is None else int(self.halo)

    def validate(self) -> None:
        from napari_esam.core.plane.params import check_integer

        if self.mode not in TILED_MODES:
            raise ValueError(f"tiled mode must be one of {TILED_MODES}, not {self.mode!r}")
        check_integer("the tile", self.tile)
        if self.halo is not None:
            check_integer("the halo", self.halo)
        if int(self.tile) < MIN_TILE:
            raise ValueError(f"the tile must be at least {MIN_TILE} pixels, got {self.tile}")
        if not 0 <= self.halo_px <= int(self.tile) // 2:
            raise ValueError(
                f"the halo must be between 0 and tile/2 = {int(self.tile) // 2}, got "
                f"{self.halo_px}"
            )
        if not (math.isfinite(self.merge_iou) and 0.0 < self.merge_iou <= 1.0):
            raise ValueError(f"the merge IoU must be in (0, 1], got {self.merge_iou}")

    def tiled(self, plane_shape: Sequence[int]) -> bool:
        """Whether planes of ``plane_shape`` are cut into tiles (:func:`use_tiling`)."""
        return use_tiling(self.mode, tuple(plane_shape))

    def grid(self, plane_shape: Sequence[int]) -> TileGrid:
        """The tile grid of a plane: tiles with halo, or the whole plane as one tile."""
        return plane_grid(plane_shape, self.mode, int(self.tile), self.halo_px)


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

    Defaults (documented in ``docs/everything.md``): SAM's automatic-mask-generator values, which
    suit fluorescence and bright-field cells: a 32x32 grid, predicted IoU > 0.88, stability
    >= 0.95, box NMS at 0.7, no crops, no small-region clean-up. ``min_size``/``max_size``
    drop objects by area (pixels) when building the labels; ``max_size`` is the usual way to
    drop a "background" mask. ``contrast_limits`` are applied to every plane (``None``:
    each plane's own, ``docs/rules/tiling.md#contrast``).

    ``prompts``: ``"grid"`` (``points_per_side``² points per tile) or ``"objects"`` (one
    prompt per object found by :func:`~napari_esam.core.plane.object_prompts.
    detect_object_prompts` in each tile, ``docs/everything.md#grid-or-object-prompts``), with
    ``object_diameter`` (min, max) in pixels, ``object_threshold``, ``object_polarity``
    (``"bright"``/``"dark"``) and ``object_decoding`` (``"point"``: SAM's filters as for the
    grid; ``"box"``: MobileSAMv2's box prompts, single mask, no IoU/stability filters).
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
    prompts: str = "grid"
    object_diameter: tuple[float, float] = (8.0, 40.0)
    object_threshold: float = 0.05
    object_polarity: str = "bright"
    object_decoding: str = "point"

    def object_kwargs(self) -> dict[str, Any]:
        """The detector's keywords (:func:`~napari_esam.core.plane.object_prompts.
        detect_object_prompts`)."""
        lo, hi = self.object_diameter
        return {"min_diameter": float(lo), "max_diameter": float(hi),
                "threshold": float(self.object_threshold), "polarity": self.object_polarity}

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
        """``ValueError`` naming the first parameter out of range (the rules of
        :func:`~napari_esam.core.plane.params.check_everything_args`, plus the size filter)."""
        from napari_esam.core.plane.params import check_everything_args, check_integer

        check_everything_args(**self.everything_kwargs())
        check_integer("min_size", self.min_size, 0)
        if self.max_size is not None and check_integer("max_size", self.max_size, 0) < max(
                1, self.min_size):
            raise ValueError(
                f"max_size ({self.max_size}) must be >= 1 and >= min_size ({self.min_size})"
            )
        self._validate_prompts()

    def _validate_prompts(self) -> None:
        from napari_esam.core.plane.object_prompts import DECODINGS, POLARITIES

        if self.prompts not in PROMPTS:
            raise ValueError(f"prompts must be 'grid' or 'objects', not {self.prompts!r}")
        try:
            lo, hi = (float(v) for v in self.object_diameter)
            if any(isinstance(v, (bool, str)) for v in self.object_diameter):
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError(f"object_diameter must be (min, max) in pixels, got "
                             f"{self.object_diameter!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 2 <= lo <= hi):
            raise ValueError(f"object_diameter must be (min, max) pixels with 2 <= min <= max, "
                             f"got {self.object_diameter!r}")
        t = self.object_threshold
        if not (isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t)
                and t > 0):
            raise ValueError(f"object_threshold must be > 0 (e.g. 0.05), got "
                             f"{self.object_threshold}")
        if self.object_polarity not in POLARITIES:
            raise ValueError(f"object_polarity must be 'bright' or 'dark', not "
                             f"{self.object_polarity!r}")
        if self.object_decoding not in DECODINGS:
            raise ValueError(f"object_decoding must be 'point' or 'box', not "
                             f"{self.object_decoding!r}")
        if self.prompts == "objects" and self.crop_n_layers:
            raise ValueError("object prompts do not support crops (crop_n_layers must be 0)")


@dataclass(frozen=True)
class BatchSettings:
    """Everything that decides a batch result: model, parameters and the id scheme."""

    model: ModelSpec = field(default_factory=ModelSpec)
    params: EverythingParams = field(default_factory=EverythingParams)
    #: ``"stack"``: ids unique across the stack (per-slice ranges); ``"slice"``: 1..n per slice
    id_scope: str = "stack"
    tiling: TilingParams = field(default_factory=TilingParams)

    def validate(self) -> None:
        if self.id_scope not in ("stack", "slice"):
            raise ValueError(f"id_scope must be 'stack' or 'slice', not {self.id_scope!r}")
        if self.model.factory is None:
            from napari_esam.models.registry import check_model_name

            check_model_name(self.model.name)
        self.params.validate()
        self.tiling.validate()

    def id_stride(self, grid: TileGrid) -> int:
        """Ids reserved per plane: the smallest power of ten above the most objects a plane
        of ``grid`` can give (``docs/rules/labels.md``)."""
        tile = (grid.tile_h, grid.tile_w)
        return 10 ** (len(str(max_objects_per_tile(self.params, tile) * grid.n_tiles)))

    def record(self, grid: TileGrid) -> dict[str, Any]:
        """The JSON record compared on resume (device and batch size do not change results)."""
        params = dataclasses.asdict(self.params)
        params.pop("points_per_batch")
        if params["contrast_limits"] is not None:
            params["contrast_limits"] = [float(v) for v in params["contrast_limits"]]
        objects = {name: params.pop(name) for name in OBJECT_FIELDS[1:]}  # all but prompts
        if self.params.prompts == "grid":  # the record of runs before object prompts
            params.pop("prompts")
        else:  # no grid; the detector's settings in one entry (one line when they differ)
            params.pop("points_per_side")
            objects["object_diameter"] = [float(v) for v in objects["object_diameter"]]
            objects["object_threshold"] = float(objects["object_threshold"])
            params["objects"] = objects
        return {
            "model": self.model.name,
            "checkpoint": checkpoint_identity(self.model.checkpoint),
            "dtype": self.model.dtype,
            "factory": _factory_name(self.model.factory),
            "params": params,
            "id_scope": self.id_scope,
            "id_stride": self.id_stride(grid) if self.id_scope == "stack" else None,
            "tiling": {"tile": grid.tile, "halo": grid.halo,
                       "merge_iou": float(self.tiling.merge_iou) if grid.n_tiles > 1 else None},
        }


def checkpoint_identity(checkpoint: str | None) -> dict[str, Any] | None:
    """What identifies a weights file in a run record: its name, size and a BLAKE2b digest of
    its first and last MiB (cheap, and different for different weights); ``None`` for the
    official weights (their download is verified)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    try:
        size = path.stat().st_size
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 1 << 20:
                fh.seek(max(1 << 20, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    except OSError:
        return {"name": path.name}
    return {"name": path.name, "size": size, "digest": h.hexdigest()}


def max_objects_per_tile(params: EverythingParams,
                         tile_shape: Sequence[int] | None = None) -> int:
    """Upper bound on the masks one tile of ``tile_shape`` (H, W) can give: 3 candidates per
    point of every crop layer; with object prompts, the most objects the detector can find
    in the tile (:func:`~napari_esam.core.plane.object_prompts.max_object_prompts`) times
    3 (point decoding) or 1 (box decoding)."""
    if params.prompts == "objects":
        from napari_esam.core.plane.object_prompts import max_object_prompts

        if tile_shape is None:
            raise ValueError("the bound of object prompts needs the tile shape")
        k = 1 if params.object_decoding == "box" else 3
        shape = (int(tile_shape[0]), int(tile_shape[1]))
        return k * max_object_prompts(shape, float(params.object_diameter[0]))
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


def output_dtype(n_planes: int, settings: BatchSettings, grid: TileGrid) -> np.dtype:
    """The labels dtype: the smallest of uint16/uint32/uint64 that holds the largest id the
    run can give (``docs/rules/labels.md#dtype``)."""
    top = settings.id_stride(grid) - 1
    if settings.id_scope == "stack":
        top = int(n_planes) * settings.id_stride(grid) - 1
    for dt in (np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)
