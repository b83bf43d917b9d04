"""Tile grid geometry, routing helpers, multiscale input and the lazy global sample."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_esam.core.tiling.grid import (
    SAMPLE_MAX_CHUNKS,
    TileGrid,
    Window,
    centred_window,
    content_hash,
    full_resolution,
    global_contrast_limits,
    global_sample,
    iter_planes,
    leading_shape,
    needs_tiling,
    plane_contrast_limits,
    plane_sample,
    plane_shape,
    read_window,
)
from tests.fakes import CountingSource


@pytest.mark.parametrize(
    "shape,tile,halo",
    [((3000, 3000), 1024, 256), ((1024, 1024), 1024, 256), ((500, 3000), 1024, 256),
     ((2049, 1025), 1024, 256), ((5000, 3100), 1024, 256), ((1000, 1300), 256, 64),
     ((777, 901), 300, 0)],
)
def test_cores_partition_the_image_and_tiles_overlap_by_halo(shape, tile, halo):
    g = TileGrid(shape, tile, halo)
    cover = np.zeros(shape, dtype=np.int32)
    for t in g:
        assert t.window.shape == (min(tile, shape[0]), min(tile, shape[1]))
        assert 0 <= t.window.y0 and t.window.y1 <= shape[0]
        assert 0 <= t.window.x0 and t.window.x1 <= shape[1]
        assert t.window.contains(t.core)
        cover[t.core.slices] += 1
        # a core pixel is at least halo // 2 from the tile's inner edges
        top, left, bottom, right = g.inner_edges(t)
        if top:
            assert t.core.y0 - t.window.y0 >= halo // 2
        if left:
            assert t.core.x0 - t.window.x0 >= halo // 2
        if bottom:
            assert t.window.y1 - t.core.y1 >= halo // 2
        if right:
            assert t.window.x1 - t.core.x1 >= halo // 2
    assert (cover == 1).all()
    for starts, size in ((g.ys, g.tile_h), (g.xs, g.tile_w)):
        overlaps = starts[:-1] + size - starts[1:]
        assert (overlaps >= halo).all()


def test_tile_counts_grow_with_area():
    counts = [TileGrid((s, s), 1024, 256).n_tiles for s in (2048, 4096, 8192)]
    assert counts == [9, 25, 121]
    assert TileGrid((1024, 1024)).n_tiles == 1


def test_tile_of_is_the_core_owner():
    g = TileGrid((3000, 2500), 1024, 256)
    rng = np.random.default_rng(0)
    for y, x in rng.uniform(0, [3000, 2500], (200, 2)):
        t = g.tile_of(y, x)
        assert t.core.y0 <= int(y) < t.core.y1 and t.core.x0 <= int(x) < t.core.x1
    assert g.tile_of(-5, 1e9).key == (0, g.n_x - 1)  # clamped into the image


def test_bad_grid_parameters():
    with pytest.raises(ValueError, match="halo"):
        TileGrid((3000, 3000), 1024, 600)
    with pytest.raises(ValueError, match="halo"):
        TileGrid((3000, 3000), 1024, -1)
    with pytest.raises(ValueError, match="tile"):
        TileGrid((3000, 3000), 8, 0)
    with pytest.raises(ValueError, match="small"):
        TileGrid((1, 3000), 1024, 256)


def test_inner_margin_ignores_image_borders():
    g = TileGrid((3000, 3000), 1024, 256)
    t = g.tile_at(0, 0)
    assert g.inner_margin(t, Window(0, 0, 10, 10)) == 1024 - 10
    assert g.inner_margin(t, Window(0, 0, 1030, 10)) < 0
    whole = TileGrid((500, 500), 1024, 256).tile_at(0, 0)
    assert TileGrid((500, 500)).inner_margin(whole, Window(0, 0, 500, 500)) == float("inf")


def test_needs_tiling_and_shapes():
    assert not needs_tiling((2048, 2048))
    assert needs_tiling((2049, 100))
    assert needs_tiling((5, 3000, 3000))
    assert not needs_tiling((3000, 3000), threshold=4096)
    assert needs_tiling((3000, 3000, 3), threshold=2048)
    assert not needs_tiling((1000, 1000, 3))
    assert plane_shape((4, 3, 500, 600)) == (500, 600)
    assert plane_shape((500, 600, 3)) == (500, 600)
    assert plane_shape((500, 600, 3), rgb=False) == (600, 3)
    assert leading_shape((4, 3, 500, 600)) == (4, 3)
    assert leading_shape((500, 600, 3)) == ()
    assert list(iter_planes((2, 3, 50, 60))) == [(i, j) for i in range(2) for j in range(3)]
    assert list(iter_planes((50, 60))) == [()]


def test_full_resolution_takes_level_zero():
    big, small = np.zeros((400, 400)), np.zeros((200, 200))
    assert full_resolution([big, small]) is big
    assert full_resolution((small, big)) is big
    assert full_resolution(big) is big
    from napari.layers._multiscale_data import MultiScaleData

    assert full_resolution(MultiScaleData([big, small])) is big


def test_full_resolution_of_an_ome_zarr_group(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    g.create_array("0", shape=(64, 64), dtype="uint16")
    g.create_array("1", shape=(32, 32), dtype="uint16")
    g.attrs["multiscales"] = [{"datasets": [{"path": "0"}, {"path": "1"}]}]
    assert full_resolution(g).shape == (64, 64)


def test_global_sample_of_a_chunked_array_reads_few_chunks():
    src = CountingSource((20000, 20000))
    arr = da.from_array(src, chunks=(1000, 1000))
    sample = global_sample(arr)
    assert 64 <= len(src.reads) <= SAMPLE_MAX_CHUNKS
    assert sample.ndim == 1 and sample.size == 64 * 128 * 128
    aligned = CountingSource((20000, 20000))
    global_sample(da.from_array(aligned, chunks=(512, 512)))
    assert len(aligned.reads) == 64  # one chunk per patch when chunks are multiples of 128


def test_sample_does_not_depend_on_the_array_type(tmp_path):
    import zarr

    img = np.random.default_rng(0).integers(0, 60000, (2500, 3100)).astype(np.uint16)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=img.shape, chunks=(300, 700),
                          dtype="uint16")
    z[:] = img
    views = [img, da.from_array(img, chunks=(1000, 999)), z]
    assert len({content_hash(v) for v in views}) == 1
    assert len({global_contrast_limits(v) for v in views}) == 1
    stack = np.stack([img, img[::-1]])
    zs = da.from_array(stack, chunks=(1, 512, 512))
    assert content_hash(stack) == content_hash(zs)
    assert content_hash(stack) != content_hash(stack[::-1])


def test_global_contrast_is_close_to_the_true_percentiles():
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 500.0, (3000, 3000)).astype(np.uint16)
    lo, hi = global_contrast_limits(da.from_array(img, chunks=(512, 512)))
    true_lo, true_hi = np.percentile(img, (0.5, 99.5))
    assert abs(lo - true_lo) <= 0.05 * true_hi and abs(hi - true_hi) <= 0.05 * true_hi
    lo2, hi2 = global_contrast_limits(img)  # NumPy: strided rows/columns
    assert abs(lo2 - true_lo) <= 0.05 * true_hi and abs(hi2 - true_hi) <= 0.05 * true_hi
    assert global_contrast_limits(img.astype(np.uint8)) is None


def test_contrast_of_a_stack_uses_every_plane():
    stack = np.stack([np.full((600, 600), 100, np.uint16), np.full((600, 600), 9000, np.uint16)])
    stack[0, :300] = 50
    lo, hi = global_contrast_limits(stack)
    assert lo <= 100 and hi >= 9000


def test_contrast_of_a_stack_plane_uses_only_that_plane():
    stack = np.stack([np.full((600, 600), 100, np.uint16), np.full((600, 600), 9000, np.uint16)])
    stack[0, :300] = 50
    stack[1, :300] = 8000
    assert plane_contrast_limits(stack, (0,)) == (50.0, 100.0)
    assert plane_contrast_limits(stack, (1,)) == (8000.0, 9000.0)
    np.testing.assert_array_equal(plane_sample(stack, (1,)), stack[1].ravel())  # whole plane
    assert plane_contrast_limits(stack.astype(np.uint8), (0,)) is None
    # a large lazy plane: a bounded sample, read from that plane only
    src = CountingSource((3, 20000, 20000))
    lo, hi = plane_contrast_limits(da.from_array(src, chunks=(1, 1000, 1000)), (1,))
    assert lo < hi and 0 < len(src.reads) <= SAMPLE_MAX_CHUNKS
    assert {k[0].start for k in src.reads} == {1}


def test_content_hash_sees_shape_dtype_and_sampled_pixels():
    img = np.arange(600 * 700, dtype=np.uint32).reshape(600, 700)
    h = content_hash(img)
    assert content_hash(img.copy()) == h
    assert content_hash(img.astype(np.int64)) != h
    other = img.copy()
    other[100, 100] += 1
    assert content_hash(other) != h  # small images are hashed whole
    assert content_hash(img[:599]) != h


def test_read_window_and_centred_window():
    img = np.arange(100 * 120).reshape(100, 120)
    w = Window(10, 20, 30, 50)
    np.testing.assert_array_equal(read_window(img, w), img[10:30, 20:50])
    stack = np.stack([img, img + 1])
    np.testing.assert_array_equal(read_window(stack, w, (1,)), img[10:30, 20:50] + 1)
    np.testing.assert_array_equal(read_window(da.from_array(img, chunks=40), w), img[10:30, 20:50])
    c = centred_window(Window(0, 0, 10, 10), (100, 120), (50, 50))
    assert c == Window(0, 0, 50, 50)
    c = centred_window(Window(40, 40, 60, 60), (100, 120), (50, 50))
    assert c == Window(25, 25, 75, 75)
    assert centred_window(Window(40, 40, 60, 60), (100, 120), (500, 500)) == Window(0, 0, 100, 120)
    assert Window(0, 0, 10, 10).intersect(Window(10, 10, 20, 20)) is None
    assert Window(0, 0, 10, 10).union(Window(5, 5, 20, 30)) == Window(0, 0, 20, 30)
