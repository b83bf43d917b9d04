"""TiledPredictor: lazy per-tile embeddings, routing, full-resolution masks, laziness."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_esam.core.plane.predictor import Predictor
from napari_esam.core.tiling.grid import SAMPLE_MAX_CHUNKS, TileGrid, Window
from napari_esam.core.tiling.predictor import TiledPredictor, paste_mask
from tests import fakes
from tests.fakes import RADIUS, CountingSource, FakeModel


def image(shape=(3000, 3000), seed=0):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


@pytest.fixture(scope="module")
def big():
    return image()


@pytest.fixture
def tp(big):
    p = TiledPredictor(FakeModel().eval(), tile=1024, halo=256)
    p.set_image(big)
    return p


def full_mask(masks, window, shape):
    out = np.zeros(shape, dtype=bool)
    out[window.slices] = masks
    return out


def centre(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def chunks_of(w: Window, size: int) -> set[tuple[int, int]]:
    """(row, col) of the chunks of side ``size`` that window ``w`` touches."""
    return {
        (cy, cx)
        for cy in range(w.y0 // size, (w.y1 - 1) // size + 1)
        for cx in range(w.x0 // size, (w.x1 - 1) // size + 1)
    }


def test_set_image_reads_no_tile_and_a_click_encodes_exactly_one(tp, big):
    assert tp.encoder_calls == 0 and tp.model.encode_calls == 0
    masks, scores, low = tp.predict(np.array([[1500.0, 1700.0]]), np.array([1]))
    assert tp.encoder_calls == 1 and tp.model.encode_calls == 1
    assert masks.shape == (3, 1024, 1024) and scores.shape == (3,) and low.shape == (3, 256, 256)
    owner = tp.grid.tile_of(1700, 1500)
    assert tp.last_window == owner.window
    m = full_mask(masks[int(np.argmax(scores))], tp.last_window, big.shape)
    cx, cy = centre(m)
    assert abs(cx - 1500) < 1.5 and abs(cy - 1700) < 1.5
    assert abs(m.sum() - np.pi * RADIUS**2) / (np.pi * RADIUS**2) < 0.15
    # another click in the same core: cached, no encoder call
    tp.predict(np.array([[owner.core.x0 + 5.0, owner.core.y1 - 5.0]]), np.array([1]))
    assert tp.encoder_calls == 1
    # a click in another tile's core: one more tile
    tp.predict(np.array([[10.0, 10.0]]), np.array([1]))
    assert tp.encoder_calls == 2


def test_tile_mask_equals_the_untiled_mask_at_full_resolution(big):
    """On a tile-sized crop the tiled answer is the untiled predictor's answer."""
    grid = TileGrid(big.shape, 1024, 256)
    t = grid.tile_at(1, 2)
    p = Predictor(FakeModel().eval())
    tp = TiledPredictor(FakeModel().eval(), tile=1024, halo=256)
    tp.set_image(big)
    p.set_image(big[t.window.slices], tp.plane_limits())  # the plane's limits
    x, y = t.core.x0 + 100.0, t.core.y0 + 50.0
    want, s1, _ = p.predict(np.array([[x - t.window.x0, y - t.window.y0]]), np.array([1]))
    got, s2, _ = tp.predict(np.array([[x, y]]), np.array([1]))
    assert tp.last_window == t.window
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(s1, s2)


def test_clicks_on_core_boundaries_stay_in_one_tile(tp):
    g = tp.grid
    for yb in g.core_ys[1:-1]:
        for xb in g.core_xs[1:-1]:
            for dy in (-0.5, 0.5):
                for dx in (-0.5, 0.5):
                    x, y = float(xb) + dx, float(yb) + dy
                    w, tile = tp.route(Window(int(y), int(x), int(y) + 1, int(x) + 1))
                    assert tile is not None and tile.key == g.tile_of(y, x).key
                    assert w == tile.window


def test_box_across_tile_borders_is_segmented_whole(tp, big):
    g = tp.grid
    xb, yb = int(g.core_xs[1]), int(g.core_ys[2])  # a junction of four cores
    box = np.array([xb - 250, yb - 200, xb + 250, yb + 300])
    masks, _, _ = tp.predict(box=box, multimask_output=False)
    m = full_mask(masks[0], tp.last_window, big.shape)
    ys, xs = np.nonzero(m)
    assert abs(xs.min() - box[0]) <= 3 and abs(xs.max() - box[2]) <= 3
    assert abs(ys.min() - box[1]) <= 3 and abs(ys.max() - box[3]) <= 3
    assert tp.encoder_calls == 1  # a grid tile holds it: one embedding


def test_box_larger_than_a_tile_uses_one_centred_window(tp, big):
    box = np.array([200, 300, 2700, 1500])
    masks, _, _ = tp.predict(box=box, multimask_output=False)
    w = tp.last_window
    assert w.shape[0] == w.shape[1] and w.shape[1] >= 2500
    m = full_mask(masks[0], w, big.shape)
    ys, xs = np.nonzero(m)
    # the window is down-sampled by the model but the mask comes back at full resolution
    assert abs(xs.min() - 200) <= 8 and abs(xs.max() - 2700) <= 8
    assert abs(ys.min() - 300) <= 8 and abs(ys.max() - 1500) <= 8
    assert tp.encoder_calls == 1


def test_object_crossing_the_tile_edge_is_refined_on_a_bigger_window(tp, big, monkeypatch):
    monkeypatch.setattr(fakes, "RADIUS", 250.0)  # objects much larger than halo / 2
    g = tp.grid
    x, y = float(g.core_xs[2] - 3), float(g.core_ys[1] + 3)
    masks, scores, _ = tp.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)
    w = tp.last_window
    m = full_mask(masks[0], w, big.shape)
    assert tp.encoder_calls == 2  # the owner tile, then a window holding the whole object
    cx, cy = centre(m)
    assert abs(cx - x) < 3 and abs(cy - y) < 3
    assert abs(m.sum() - np.pi * 250**2) / (np.pi * 250**2) < 0.05
    # without refinement the mask is cut by the tile edge
    tp2 = TiledPredictor(FakeModel().eval(), refine=False)
    tp2.set_image(big)
    cut, _, _ = tp2.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)
    assert cut[0].sum() < 0.9 * m.sum()


def test_full_size_output_and_batches_over_several_tiles(tp, big):
    m, s, low = tp.predict(np.array([[20.0, 30.0]]), np.array([1]), full_size=True)
    assert m.shape == (3, 3000, 3000)
    cx, cy = centre(m[1])
    assert abs(cx - 20) < 1.5 and abs(cy - 30) < 1.5
    pts = np.array([[[100.0, 100.0]], [[2900.0, 2800.0]]])
    masks, scores, low = tp.predict_batch(pts, np.ones((2, 1), int), multimask_output=False)
    assert tp.last_window == Window(0, 0, 3000, 3000)
    assert masks.shape == (2, 1, 3000, 3000) and scores.shape == (2, 1)
    assert masks[0, 0, 100, 100] and not masks[0, 0, 2800, 2900]
    assert masks[1, 0, 2800, 2900] and not masks[1, 0, 100, 100]
    assert tp.encoder_calls == 2


def test_predict_object_and_paste_mask(tp):
    labels = np.zeros((3000, 3000), dtype=np.uint16)
    obj = tp.predict_object(np.array([[1200.0, 900.0]]), np.array([1]))
    paste_mask(labels, obj.best, obj.window, 7)
    assert labels[900, 1200] == 7 and (labels == 7).sum() == obj.best.sum()
    obj2 = tp.predict_object(np.array([[1210.0, 900.0]]), np.array([1]))
    paste_mask(labels, obj2.best, obj2.window, 8, preserve=True)
    assert labels[900, 1200] == 7 and labels[900, 1215] == 8
    z = zarr.zeros((3000, 3000), chunks=(512, 512), dtype="uint16")
    paste_mask(z, obj.best, obj.window, 3)
    assert z[900, 1200] == 3


def test_prompt_errors_are_in_full_image_coordinates(tp):
    with pytest.raises(ValueError, match="outside"):
        tp.predict(np.array([[3100.0, 10.0]]), np.array([1]))
    with pytest.raises(ValueError, match="no prompt"):
        tp.predict()
    with pytest.raises(RuntimeError, match="no image"):
        TiledPredictor(FakeModel()).predict(np.array([[1.0, 1.0]]), np.array([1]))


def test_lru_cache_size(big):
    tp = TiledPredictor(FakeModel().eval(), cache_size=1)
    tp.set_image(big)
    for x in (100.0, 2900.0, 100.0):
        tp.predict(np.array([[x, 100.0]]), np.array([1]))
    assert tp.encoder_calls == 3
    tp = TiledPredictor(FakeModel().eval(), cache_size=2)
    tp.set_image(big)
    for x in (100.0, 2900.0, 100.0):
        tp.predict(np.array([[x, 100.0]]), np.array([1]))
    assert tp.encoder_calls == 2


def test_dask_20k_click_reads_only_the_chunks_of_one_tile():
    src = CountingSource((20000, 20000))
    arr = da.from_array(src, chunks=(1000, 1000))
    tp = TiledPredictor(FakeModel().eval())
    tp.set_image(arr, contrast_limits=(0, 5000))
    assert src.reads == []  # nothing read until a prompt needs a tile
    masks, _, _ = tp.predict(np.array([[10500.0, 9500.0]]), np.array([1]))
    w = tp.last_window
    touched = chunks_of(w, 1000)
    read_chunks = {(k[0].start // 1000, k[1].start // 1000) for k in src.reads}
    assert len(src.reads) == len(read_chunks) == len(touched) <= 4
    assert read_chunks == touched
    assert tp.encoder_calls == 1 and masks.shape == (3, 1024, 1024)


def test_dask_20k_with_automatic_contrast_reads_a_bounded_sample():
    src = CountingSource((20000, 20000))
    tp = TiledPredictor(FakeModel().eval())
    tp.set_image(da.from_array(src, chunks=(1000, 1000)))
    assert src.reads == []  # the plane's contrast is sampled when first needed
    lo, hi = tp.plane_limits()
    n_sample = len(src.reads)
    assert 0 < n_sample <= SAMPLE_MAX_CHUNKS and lo < hi
    tp.predict(np.array([[10500.0, 9500.0]]), np.array([1]))
    assert len(src.reads) - n_sample <= 4  # the sample is kept: only the tile is read
    assert tp.plane_limits() == (lo, hi)


def test_contrast_limits_are_per_plane_unless_given():
    stack = np.stack([image((1000, 1000), seed=0), image((1000, 1000), seed=1) // 4])
    stack[1, :200, :200] = 9000  # a bright corner: plane 1's limits are not its tiles'
    tp = TiledPredictor(FakeModel().eval(), tile=512, halo=128)
    tp.set_image(stack)
    assert tp.contrast_limits is None
    # each plane's own 0.5/99.5 percentiles (a plane up to 1 Mpx is sampled whole)
    for i in range(2):
        want = np.percentile(stack[i].astype(np.float64), (0.5, 99.5))
        np.testing.assert_allclose(tp.plane_limits((i,)), want)
    assert tp.plane_limits((0,))[1] < 4000 and tp.plane_limits((1,))[1] == 9000
    # a tile of plane 1 is normalised with plane 1's limits (not the stack's, not the tile's)
    t = tp.grid.tile_at(1, 1)
    assert t.window.y0 >= 200 and t.window.x0 >= 200  # away from the bright corner
    tp.set_index((1,))
    emb, _ = tp.tile_embedding(t)
    p = Predictor(FakeModel().eval())
    p.set_image(stack[1][t.window.slices], tp.plane_limits((1,)))
    np.testing.assert_array_equal(emb.numpy(), p.get_image_embedding().cpu().numpy())
    p.set_image(stack[1][t.window.slices])  # the tile's own percentiles differ
    assert not np.array_equal(emb.numpy(), p.get_image_embedding().cpu().numpy())
    # given limits are used for every plane
    given = TiledPredictor(FakeModel().eval(), tile=512, halo=128)
    given.set_image(stack, (0, 4000))
    assert given.plane_limits((0,)) == given.plane_limits((1,)) == (0.0, 4000.0)


def test_zarr_input_and_multiscale_levels(tmp_path, big):
    z = zarr.create_array(str(tmp_path / "img.zarr"), shape=big.shape, chunks=(512, 512),
                          dtype="uint16")
    z[:] = big
    low = big[::4, ::4]
    tp = TiledPredictor(FakeModel().eval())
    tp.set_image([z, low])  # napari multiscale data: level 0 is used
    assert tp.original_size == (3000, 3000)
    m, _, _ = tp.predict(np.array([[2000.0, 2500.0]]), np.array([1]), full_size=True)
    cx, cy = centre(m[1])
    assert abs(cx - 2000) < 1.5 and abs(cy - 2500) < 1.5


def test_stack_planes_are_tiled_separately():
    stack = np.stack([image((2500, 2600), seed=s) for s in range(3)])
    tp = TiledPredictor(FakeModel().eval())
    tp.set_image(stack, index=(2,))
    single = TiledPredictor(FakeModel().eval())
    single.set_image(stack[2], tp.contrast_limits)
    t = tp.grid.tile_at(1, 1)
    a, _ = tp.tile_embedding(t)
    b, _ = single.tile_embedding(t)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    tp.set_index((0,))
    c, _ = tp.tile_embedding(t)
    assert not np.array_equal(a.numpy(), c.numpy())
    assert tp.encoder_calls == 2
    with pytest.raises(ValueError, match="plane"):
        tp.set_index((3,))
    with pytest.raises(ValueError, match="plane"):
        tp.set_index(())


def test_rgb_input():
    rgb = np.random.default_rng(0).integers(0, 255, (2200, 2300, 3)).astype(np.uint8)
    tp = TiledPredictor(FakeModel().eval())
    tp.set_image(rgb)
    assert tp.original_size == (2200, 2300) and tp.contrast_limits is None
    m, _, _ = tp.predict(np.array([[2250.0, 10.0]]), np.array([1]))
    assert m.shape[1:] == (1024, 1024)


# ------------------------------------------------------------------ the widget's engine


def test_prompt_engine_encodes_a_tiled_plane_only_under_the_prompts(big):
    from napari_esam.core.tiling.predictor import PromptEngine

    engine = PromptEngine(FakeModel().eval())
    assert engine.name == "fake" and engine.max_points is None
    emb = engine.embed(big, None)
    assert engine.encoder_calls == 0 and not emb.ready  # nothing is encoded before a prompt
    assert emb.n_tiles == 16  # 4 x 4 tiles of 1024 px with a 256-px overlap
    pts = np.array([[[1500.0, 1700.0], [1510.0, 1700.0]]])
    assert engine.prefetch(emb, pts, np.array([[1, 0]]), None) == 1
    masks, scores = engine.predict(emb, pts, np.array([[1, 0]]), None)
    assert engine.encoder_calls == 1  # predict reused the prefetched tile
    assert masks.shape == (1, 3, 3000, 3000) and masks.dtype == bool and scores.shape == (1, 3)
    objs = engine.predict_windowed(emb, None, None, np.array([[100, 100, 300, 200]]))
    assert len(objs) == 1 and objs[0].window.contains(Window(100, 100, 200, 300))
    assert engine.encoder_calls == 2


@pytest.mark.parametrize("shape", [(700, 900), (1500, 1200)])
def test_prompt_engine_on_a_one_tile_plane_is_the_whole_plane_predictor(shape):
    from napari_esam.core.tiling.predictor import PromptEngine

    img = image(shape)
    engine = PromptEngine(FakeModel().eval(), tile=max(shape), halo=0)
    emb = engine.embed(img, (0.0, 4000.0))
    assert emb.ready and emb.n_tiles == 1 and engine.encoder_calls == 1
    whole = Predictor(FakeModel().eval())
    whole.set_image(img, (0.0, 4000.0))
    pts, lbl = np.array([[[300.0, 200.0], [320.0, 260.0]]]), np.array([[1, 0]])
    boxes = np.array([[100.0, 120.0, 400.0, 300.0]])
    for args in [(pts, lbl, None), (None, None, boxes)]:
        objs = engine.predict_windowed(emb, *args)
        m2, s2, _ = whole.predict_batch(*args)
        assert objs[0].window == (0, 0, *shape)
        np.testing.assert_array_equal(objs[0].masks, m2[0])
        np.testing.assert_array_equal(objs[0].scores, s2[0])
    assert engine.encoder_calls == 1  # decoding needed no encoder run


def test_prompt_engine_on_a_lazy_stack_plane():
    from napari_esam.core.tiling.predictor import PromptEngine

    src = CountingSource((4, 5000, 5000))
    stack = da.from_array(src, chunks=(1, 1000, 1000))
    engine = PromptEngine(FakeModel().eval())
    emb = engine.embed(stack, (0.0, 5000.0), index=(2,))
    assert src.reads == []
    objs = engine.predict_windowed(emb, np.array([[[2500.0, 2500.0]]]), np.array([[1]]), None)
    w = objs[0].window
    assert {k[0].start for k in src.reads} == {2}  # only plane 2 was read
    assert len(src.reads) == len(chunks_of(w, 1000)) and objs[0].masks.shape == (3, 1024, 1024)


def test_rgba_uses_the_colour_channels():
    rgb = np.random.default_rng(1).integers(0, 255, (2200, 2300, 3)).astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    a, b = TiledPredictor(FakeModel().eval()), TiledPredictor(FakeModel().eval())
    a.set_image(rgb)
    b.set_image(rgba, rgb=True)
    assert b.original_size == (2200, 2300)
    t = a.grid.tile_at(1, 2)
    np.testing.assert_array_equal(a.tile_embedding(t)[0].numpy(), b.tile_embedding(t)[0].numpy())
