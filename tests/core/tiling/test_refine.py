"""Refine labels tile by tile (:func:`napari_esam.core.tiling.refine.refine_plane`): equal to
the untiled refine on a plane that fits one tile; on a plane of several tiles every object is
decoded on one window, with its mask input in that window's frame."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_esam.core.plane.refine import refine_labels
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.predictor import TiledPredictor
from napari_esam.core.tiling.refine import refine_plane
from tests.fakes import FakeModel, MaskInputModel, refine_scene


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("model_cls", [FakeModel, MaskInputModel])
def test_tiled_equals_untiled_on_a_plane_that_fits_one_tile(model_cls):
    image, labels = refine_scene()  # 300 x 400 < one 1024 tile
    untiled = refine_labels(image, labels, model_cls().eval())
    model = model_cls().eval()
    tiled = refine_plane(image, labels, model, tile=1024, halo=256)
    np.testing.assert_array_equal(tiled.labels, untiled.labels)
    assert tiled.kept == untiled.kept and tiled.ious == untiled.ious
    assert tiled.refined == untiled.refined and tiled.mask_input == untiled.mask_input
    assert model.encode_calls == 1


def large_scene():
    """600 x 700 px, 256/64 tiles (3 x 4): small disks everywhere (some across seams) and
    one disk larger than a tile (id 50, radius 140)."""
    shape = (600, 700)
    rng = np.random.default_rng(1)
    image = rng.integers(100, 400, shape).astype(np.uint16)
    labels = np.zeros(shape, np.uint16)
    labels[disk((300, 450), 140, shape=shape)] = 50
    centres = [(40, 40), (214, 100), (250, 240), (60, 600), (520, 80), (560, 650), (420, 250)]
    for k, (y, x) in enumerate(centres, start=1):
        labels[disk((y, x), 18, shape=shape)] = k
    image[labels > 0] = 3000
    return image, labels


def test_several_tiles_ids_kept_and_mask_input_in_each_windows_frame():
    image, labels = large_scene()
    model = MaskInputModel().eval()
    tp = TiledPredictor(model, tile=256, halo=64)
    res = refine_plane(image, labels, tp)
    assert res.kept == [] and res.refined == [1, 2, 3, 4, 5, 6, 7, 50]
    for obj_id in res.refined:
        assert iou(res.labels == obj_id, labels == obj_id) > 0.9, obj_id
    sizes = [c["original_size"] for c in model.calls]
    assert all(c["mask_input"] is not None for c in model.calls)
    # the large disk (281 px across) got an ad-hoc window larger than a tile
    assert max(max(s) for s in sizes) > 256 and min(max(s) for s in sizes) == 256
    # every object was decoded once (no mask touches an inner edge of its window)
    assert sum(len(c["coords"]) for c in model.calls) == 8
    # only the windows that hold objects were encoded
    assert tp.encoder_calls < TileGrid(image.shape, 256, 64).n_tiles + 1


def test_several_tiles_without_mask_input():
    image, labels = large_scene()
    res = refine_plane(image, labels, FakeModel().eval(), tile=256, halo=64,
                       iou_threshold=0.6)
    assert [i for i, _ in res.kept] == []  # disks against their boxes: IoU ~0.78
    assert not res.mask_input
    assert set(np.unique(res.labels)) == set(np.unique(labels))


def test_a_plane_of_a_stack():
    image, labels = refine_scene()
    stack = np.stack([np.zeros_like(image), image])
    model = MaskInputModel().eval()
    got = refine_plane(stack, labels, model, index=(1,), tile=1024, halo=0)
    want = refine_labels(image, labels, MaskInputModel().eval())
    np.testing.assert_array_equal(got.labels, want.labels)
    with pytest.raises(ValueError, match="differ in size"):
        refine_plane(stack, labels[:, :-1], model, index=(0,))
