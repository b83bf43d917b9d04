"""Linking per-slice labels into 3-D objects or tracks (no model; ``docs/rules/linking.md``):

* :mod:`~napari_esam.core.linking.overlaps` — one plane's objects and pixel overlaps between
  planes;
* :mod:`~napari_esam.core.linking.assign` — the linking rule (:class:`Linker`) and final ids;
* :mod:`~napari_esam.core.linking.stack` — :func:`link_labels`: two streaming passes over a
  NumPy/Dask/Zarr stack, output to memory, an array or a label file;
* :mod:`~napari_esam.core.linking.tracks` — the tracks table, napari ``Tracks`` data, CSV.
"""
