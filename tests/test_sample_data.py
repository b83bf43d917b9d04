"""The 'cells' sample: synthetic fluorescent nuclei, generated deterministically."""

from __future__ import annotations

import numpy as np
from napari.components import ViewerModel

from napari_esam._sample_data import make_sample_cells, synthetic_nuclei


def test_sample_is_a_napari_image_layer_tuple():
    (layer,) = make_sample_cells()
    data, meta, kind = layer
    assert kind == "image"
    assert data.dtype == np.uint16 and data.shape == (512, 512)
    assert meta["name"] and meta["colormap"] == "gray"
    lo, hi = meta["contrast_limits"]
    assert data.min() <= lo < hi <= data.max()


def test_sample_is_deterministic():
    a, la = synthetic_nuclei()
    b, lb = synthetic_nuclei()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, _ = synthetic_nuclei(seed=1)
    assert not np.array_equal(a, c)


def test_sample_looks_like_fluorescent_nuclei():
    image, labels = synthetic_nuclei()
    n = len(np.unique(labels)) - 1
    assert 40 <= n <= 60
    inside = image[labels > 0].astype(float)
    background = image[labels == 0].astype(float)
    assert 0.05 < (labels > 0).mean() < 0.3
    assert np.median(inside) > 4 * np.median(background)
    # photon + read noise: a flat background patch is not constant
    corner = image[:20, :20][labels[:20, :20] == 0].astype(float)
    assert corner.size > 100 and corner.std() > 3
    assert image.max() < np.iinfo(np.uint16).max  # not saturated
    # nuclei differ in brightness (uneven staining)
    means = [image[labels == i].mean() for i in range(1, n + 1)]
    assert np.std(means) / np.mean(means) > 0.1


def test_sample_is_declared_in_the_manifest():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    (sample,) = dict(pm.iter_sample_data())["napari-esam"]
    assert sample.key == "cells"
    ((data, meta, kind),) = sample.open()
    assert kind == "image" and data.dtype == np.uint16
    viewer = ViewerModel()
    viewer._add_layer_from_data(data, meta, kind)
    assert viewer.layers[0].name == meta["name"]
