"""The Qt-free core: NumPy/Dask/Zarr in, NumPy/Zarr out. One subpackage per stage of the flow
(``docs/api.md#package-layout``):

* :mod:`~napari_esam.core.io` — opening inputs, label files (export and reading back);
* :mod:`~napari_esam.core.plane` — one 2-D plane with SAM's semantics: image rule, predictor,
  segment-everything, masks to labels, object prompts;
* :mod:`~napari_esam.core.tiling` — the tile grid, tile embeddings and their store, the seam
  merge, the tiled predictor;
* :mod:`~napari_esam.core.runs` — runs over stacks: plane sources, settings, the one pipeline
  driver, tasks, outputs, executors (local, Dask);
* :mod:`~napari_esam.core.linking` — linking per-slice labels into 3-D objects or tracks
  (no model): overlaps, the linking rule, the two-pass stack driver, tracks.
"""
