"""Tiled mode of the prompt controller: large planes answered tile by tile, at full resolution.

FakeModel masks are disks of radius RADIUS px around positive points and filled boxes, in the
pixels of whatever window the model sees, so a mask at the right place and size proves the
tile → plane → world mapping; encoder counts prove that only the tiles under the prompts are
embedded.
"""

from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_esam.core.tiling.predictor import PromptEngine, TiledPredictor
from napari_esam.widgets.prompt.controller import (
    TILED_THRESHOLD,
    PromptController,
    plane_of,
    tiled_source,
)
from tests.fakes import RADIUS, Factory, FakeModel, add_box, add_point, blobs, centre


def make_large(shape=(2600, 3000), **kwargs):
    viewer = ViewerModel()
    factory = Factory()
    ctrl = PromptController(viewer, model_factory=factory, notify=False)
    layer = viewer.add_image(blobs(shape), **kwargs)
    ctrl.image_layer = layer
    ctrl.ensure_prompt_layers()
    return viewer, ctrl, factory, layer


def test_large_plane_switches_to_tiled_mode_and_encodes_one_tile_per_click():
    viewer, ctrl, factory, layer = make_large()
    plane = plane_of(viewer, layer)
    assert max(plane.shape) > TILED_THRESHOLD and ctrl.is_tiled(plane)
    add_point(ctrl, (2300, 2700))
    # the plane was never encoded whole: one 1024-px tile was
    assert [e.shape for e in factory.embedded] == [(1024, 1024, 3)]
    assert ctrl.encoder_calls == 1 and factory.model.encode_calls == 1
    part, (r0, c0) = ctrl.preview_region()
    assert part.shape == (1024, 1024)  # the preview covers the answering tile only
    assert r0 <= 2300 < r0 + 1024 and c0 <= 2700 < c0 + 1024
    mask = ctrl.preview_mask() > 0
    r, c = centre(mask)
    assert abs(r - 2300) < 1 and abs(c - 2700) < 1
    # full resolution: the disk has RADIUS plane pixels (a 1024-px resize would shrink it 3x)
    assert abs(mask.sum() - np.pi * RADIUS**2) / (np.pi * RADIUS**2) < 0.2
    assert "Preview: 1 object" in ctrl.status

    assert ctrl.commit() == [1]
    labels = ctrl.labels_layer.data
    assert labels.shape == (2600, 3000)
    assert np.array_equal(labels == 1, mask)
    # a click in the same tile reuses its embedding; one in another tile encodes that tile
    add_point(ctrl, (2250, 2650))
    assert ctrl.encoder_calls == 1
    ctrl.clear_object()
    add_point(ctrl, (100, 120))
    assert ctrl.encoder_calls == 2
    assert ctrl.commit() == [2]
    r, c = centre(ctrl.labels_layer.data == 2)
    assert abs(r - 100) < 1 and abs(c - 120) < 1


def test_box_across_tile_borders_is_segmented_whole():
    _, ctrl, _, _ = make_large()
    ctrl.set_tiling(tile=512, halo=128)
    # the box crosses the cores of four 512-px tiles
    add_box(ctrl, (700, 650), (1100, 1160))
    assert ctrl.commit() == [1]
    got = ctrl.labels_layer.data == 1
    rows, cols = np.nonzero(got)
    # the box is filled whole (edges within the fake model's 256-px logit resolution)
    bounds = np.array([rows.min(), rows.max(), cols.min(), cols.max()])
    assert np.abs(bounds - [700, 1100, 650, 1160]).max() <= 3
    assert got[703:1098, 653:1158].all()


def test_tiled_mode_can_be_forced_on_and_off():
    viewer, ctrl, factory, layer = make_large()
    ctrl.set_tiling("off")
    add_point(ctrl, (1300, 1500))
    assert len(factory.embedded) == 1 and factory.embedded[0].shape == (2600, 3000, 3)
    assert ctrl.preview_region()[0].shape == (2600, 3000)
    ctrl.clear_object()

    viewer2 = ViewerModel()
    factory2 = Factory()
    small = PromptController(viewer2, model_factory=factory2, notify=False)
    small.image_layer = viewer2.add_image(blobs((500, 600)))
    small.ensure_prompt_layers()
    assert not small.is_tiled(plane_of(viewer2, small.image_layer))
    small.set_tiling("on", tile=256, halo=64)
    add_point(small, (450, 560))
    assert [e.shape for e in factory2.embedded] == [(256, 256, 3)]
    assert small.encoder_calls == 1
    assert small.preview_region()[0].shape == (256, 256)
    r, c = centre(small.preview_mask() > 0)
    assert abs(r - 450) < 1 and abs(c - 560) < 1


def test_invalid_tiling_settings_are_rejected():
    _, ctrl, _, _ = make_large()
    with pytest.raises(ValueError, match="tiled mode"):
        ctrl.set_tiling("sometimes")
    with pytest.raises(ValueError, match=r"halo \(the overlap between tiles\) must be in 0..128"):
        ctrl.set_tiling("off", tile=256, halo=200)
    with pytest.raises(ValueError, match="tile must be at least 16"):
        ctrl.set_tiling(tile=8, halo=0)
    # nothing of a refused call is applied
    assert (ctrl.tiled_mode, ctrl.tile, ctrl.halo) == ("auto", 1024, 256)


def test_stack_slices_are_tiled_per_plane_with_scale():
    stack = np.stack([blobs((2200, 2300), seed=s) for s in range(3)])
    viewer = ViewerModel()
    ctrl = PromptController(viewer, model_factory=Factory(), notify=False)
    ctrl.image_layer = viewer.add_image(stack, scale=(5, 0.5, 0.5), translate=(0, 10, 20))
    ctrl.ensure_prompt_layers()
    viewer.dims.set_current_step(0, 2)
    add_point(ctrl, (10, 10 + 0.5 * 2000, 20 + 0.5 * 1900))
    assert ctrl.encoder_calls == 1
    engine = next(iter(ctrl._engines.values()))
    assert engine.predictor.index == (2,)
    assert ctrl.commit() == [1]
    data = ctrl.labels_layer.data
    assert not data[:2].any()
    r, c = centre(data[2] == 1)
    assert abs(r - 2000) < 1 and abs(c - 1900) < 1


def test_multiscale_dask_image_reads_only_the_chunks_around_a_click():
    da = pytest.importorskip("dask.array")
    reads: list[tuple] = []
    rng = np.random.default_rng(0)
    base = rng.integers(100, 3000, (512, 512)).astype(np.uint16)

    def block(block_info=None):
        reads.append(block_info[None]["chunk-location"])
        return base.copy()

    level0 = da.map_blocks(block, chunks=((512,) * 16, (512,) * 16), dtype=np.uint16)
    levels = [level0, level0[::4, ::4], level0[::16, ::16]]
    viewer = ViewerModel()
    factory = Factory()
    ctrl = PromptController(viewer, model_factory=factory, notify=False)
    layer = viewer.add_image(levels, multiscale=True, contrast_limits=(0, 3000))
    ctrl.image_layer = layer
    ctrl.ensure_prompt_layers()
    ctrl.set_use_contrast_limits(True)  # no global sample: only the tile is read
    reads.clear()
    add_point(ctrl, (5000, 6000))
    assert ctrl.encoder_calls == 1
    # a 1024-px tile window spans at most 3 x 3 chunks of 512 px (of 256)
    assert 0 < len(set(reads)) <= 9
    r, c = centre(ctrl.preview_mask() > 0)
    assert abs(r - 5000) < 1 and abs(c - 6000) < 1
    assert ctrl.labels_layer is None  # nothing allocated until a commit


def test_precomputed_embedding_store_skips_the_encoder(tmp_path):
    image = blobs((2600, 3000))
    store = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), tile=1024, halo=256, store=store)
    tp.set_image(image)
    encoded = tp.embed_all()
    assert encoded == tp.grid.n_tiles

    viewer = ViewerModel()
    factory = Factory()
    ctrl = PromptController(viewer, model_factory=factory, notify=False)
    ctrl.set_tiling(store=store)
    ctrl.image_layer = viewer.add_image(image)
    ctrl.ensure_prompt_layers()
    add_point(ctrl, (2300, 2700))
    assert ctrl.preview_mask() is not None
    ctrl.clear_object()
    add_point(ctrl, (100, 100))
    assert ctrl.preview_mask() is not None
    assert ctrl.encoder_calls == 0 and factory.model.encode_calls == 0
    engine = next(iter(ctrl._engines.values()))
    assert isinstance(engine, PromptEngine) and engine.predictor.store_hits >= 1


def test_store_of_another_image_is_a_message(tmp_path):
    store = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), tile=1024, halo=256, store=store)
    tp.set_image(blobs((2600, 3000), seed=5))
    tp.embed_all()

    _, ctrl, _, _ = make_large()
    ctrl.set_tiling(store=store)
    add_point(ctrl, (500, 500))
    assert "does not match" in ctrl.status and not ctrl.busy
    assert ctrl.preview_mask() is None
    ctrl.set_tiling(store=None)  # without the store it works
    add_point(ctrl, (520, 520))
    assert ctrl.preview_mask() is not None


def test_invalid_prompts_in_tiled_mode_are_messages():
    _, ctrl, _, _ = make_large()
    add_point(ctrl, (300, 300), "negative")
    assert "Negative points alone" in ctrl.status
    assert ctrl.encoder_calls == 0 and ctrl.commit() == []


def test_tiled_source_keeps_stacks_lazy_and_transposes_other_orders():
    stack = np.arange(2 * 30 * 40).reshape(2, 30, 40)
    viewer = ViewerModel()
    layer = viewer.add_image(stack)
    plane = plane_of(viewer, layer)
    src, index = tiled_source(stack, plane)
    assert src is stack and index == (0,)
    viewer.dims.order = (0, 2, 1)  # rows along axis 2, columns along axis 1
    plane = plane_of(viewer, layer)
    src, index = tiled_source(stack, plane)
    assert index == () and src.shape == (40, 30)
    assert np.array_equal(np.asarray(src), stack[0].T)
    assert np.shares_memory(src, stack)  # a view, not a copy


def test_rgb_and_transposed_views_are_tiled_at_the_right_place():
    rgb = np.repeat(blobs((2200, 2500), dtype=np.uint8)[..., None], 3, axis=2)
    viewer = ViewerModel()
    ctrl = PromptController(viewer, model_factory=Factory(), notify=False)
    ctrl.image_layer = viewer.add_image(rgb, rgb=True)
    ctrl.ensure_prompt_layers()
    add_point(ctrl, (2100, 300))
    assert ctrl.encoder_calls == 1 and ctrl.commit() == [1]
    r, c = centre(ctrl.labels_layer.data == 1)
    assert ctrl.labels_layer.data.shape == (2200, 2500)
    assert abs(r - 2100) < 1 and abs(c - 300) < 1

    # a stack shown with rows along axis 2 and columns along axis 1
    stack = np.stack([blobs((2100, 2300), seed=s) for s in range(2)])
    viewer = ViewerModel()
    ctrl = PromptController(viewer, model_factory=Factory(), notify=False)
    ctrl.image_layer = viewer.add_image(stack)
    ctrl.ensure_prompt_layers()
    viewer.dims.order = (0, 2, 1)
    viewer.dims.set_current_step(0, 1)
    add_point(ctrl, (1, 2000, 150))  # world (slice, axis-1, axis-2)
    assert ctrl.encoder_calls == 1 and ctrl.commit() == [1]
    data = ctrl.labels_layer.data
    assert not data[0].any()
    r, c = centre(data[1] == 1)  # data axes: (axis 1, axis 2)
    assert abs(r - 2000) < 1 and abs(c - 150) < 1


def test_new_image_data_is_encoded_again_even_in_the_same_array():
    _, ctrl, factory, layer = make_large()
    add_point(ctrl, (1200, 1300))
    assert factory.model.encode_calls == 1
    data = layer.data
    data[:] = data[::-1].copy()  # edited in place, then handed back to the layer
    layer.data = data
    assert ctrl.preview_mask() is not None
    assert factory.model.encode_calls == 2  # the tile was not served from a stale cache
