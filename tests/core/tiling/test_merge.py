"""Tiled planes in the one pipeline: the seam rule (one label per object), stores, stacks,
size filter, ids, crops per tile, resume from the scratch group, a real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.draw import disk

from napari_esam.core.runs.outputs import SCRATCH_SUFFIX, TileScratch
from napari_esam.core.runs.pipeline import run_batch
from napari_esam.core.runs.settings import BatchSettings, EverythingParams, ModelSpec, TilingParams
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.merge import PlaneMerger, keep_tile_masks
from napari_esam.core.tiling.store import EmbeddingStore, read_signature
from tests.fakes import ObjectsModel


def scene(shape, grid: TileGrid, seed=1, r_small=48, n_random=40):
    """uint16 image of bright disks placed on core junctions, tile edges and at random,
    plus two objects larger than the overlap; returns (image, truth labels)."""
    h, w = shape
    img = np.full(shape, 1000, np.uint16)
    truth = np.zeros(shape, np.int32)
    rng = np.random.default_rng(seed)
    cy, cx = [int(v) for v in grid.core_ys[1:-1]], [int(v) for v in grid.core_xs[1:-1]]
    edges_y = sorted({int(v) for v in grid.ys[1:]} | {int(v) + grid.tile_h for v in grid.ys[:-1]})
    edges_x = sorted({int(v) for v in grid.xs[1:]} | {int(v) + grid.tile_w for v in grid.xs[:-1]})
    centres = [(cy[len(cy) // 2], cx[len(cx) // 2], 150), (cy[-1] + 40, cx[0] - 30, 130)]
    centres += [(y, x, r_small) for y in cy for x in cx]
    centres += [(e, int(rng.integers(60, w - 60)), r_small) for e in edges_y]
    centres += [(int(rng.integers(60, h - 60)), e, r_small + 2) for e in edges_x]
    centres += [
        (int(rng.integers(60, h - 60)), int(rng.integers(60, w - 60)),
         int(rng.integers(r_small, r_small + 12)))
        for _ in range(n_random)
    ]
    k = 0
    for y, x, r in centres:
        if (truth[disk((y, x), r + 3, shape=shape)] > 0).any():
            continue
        k += 1
        rr, cc = disk((y, x), r, shape=shape)
        truth[rr, cc] = k
        img[rr, cc] = 30000
    return img, truth


def run(image, model, output=None, *, tile=512, halo=128, id_scope="stack", **kw):
    """run_batch with ObjectsModel (given as the loaded model) on tiled planes."""
    params = {k: kw.pop(k) for k in list(kw) if k in EverythingParams.__dataclass_fields__}
    settings = BatchSettings(
        ModelSpec("objects", device="cpu", factory="tests.fakes:ObjectsModel"),
        EverythingParams(**{"points_per_side": 8, **params}), id_scope,
        TilingParams("on", tile, halo),
    )
    return run_batch(image, settings, output, model=model, **kw)


def assert_one_label_per_object(out, truth, first=1):
    n = int(truth.max())
    fg = out > 0
    assert not fg[truth == 0].any(), "labels outside the objects"
    seen = set()
    for i in range(1, n + 1):
        ids = np.unique(out[truth == i])
        assert len(ids) == 1 and ids[0] != 0, f"object {i} has labels {ids}"
        assert ids[0] not in seen, f"label {ids[0]} covers two objects"
        seen.add(int(ids[0]))
    assert sorted(seen) == list(range(first, first + n))  # consecutive ids, no leftovers


# ----------------------------------------------------------------------- merge rule, by hand


def plane_merger(shape=(400, 896), tile=512, halo=128):
    grid = TileGrid(shape, tile, halo)
    out = np.zeros(shape, np.uint32)
    return grid, out, PlaneMerger(out, grid, 0.5)


def masks_in(tile, *objects):
    """Per-object records as seen through ``tile``'s window (the part inside it)."""
    return [{"segmentation": o[tile.window.slices].copy()} for o in objects]


def add_tile(merger, tile, records):
    merger.add(keep_tile_masks(merger.grid, tile, records))


def disk_mask(shape, y, x, r):
    m = np.zeros(shape, bool)
    m[disk((y, x), r, shape=shape)] = True
    return m


def test_merge_rule_cases_by_hand():
    grid, out, merger = plane_merger()
    a, b = grid.tile_at(0, 0), grid.tile_at(0, 1)
    assert (a.window.x1, b.window.x0, a.core.x1) == (512, 384, 448)
    shape = grid.shape
    whole_in_both = disk_mask(shape, 30, 460, 15)  # centred in b's core: a drops it
    cut_by_a = disk_mask(shape, 30, 505, 20)  # a sees it cut, b whole: a drops it
    big = disk_mask(shape, 200, 450, 120)  # cut in both tiles: two pieces merged
    left, right = disk_mask(shape, 365, 415, 18), disk_mask(shape, 365, 458, 18)  # neighbours
    objects = [whole_in_both, cut_by_a, big, left, right]
    for t in (a, b):
        add_tile(merger, t, masks_in(t, *objects))
    assert merger.stats["dropped"] == 4 and merger.stats["merged"] == 1
    merger.relabel(1)
    truth = np.zeros(shape, np.int32)
    for i, o in enumerate(objects, 1):
        truth[o] = i
    assert_one_label_per_object(out, truth)


def test_pieces_that_disagree_in_the_overlap_stay_apart():
    grid, out, merger = plane_merger()
    a, b = grid.tile_at(0, 0), grid.tile_at(0, 1)
    piece_a = np.zeros(grid.shape, bool)
    piece_a[100:300, 300:512] = True
    piece_b = np.zeros(grid.shape, bool)
    piece_b[100:140, 384:700] = True  # overlaps piece_a in the strip, IoU < 0.5
    add_tile(merger, a, [{"segmentation": piece_a[a.window.slices]}])
    add_tile(merger, b, [{"segmentation": piece_b[b.window.slices]}])
    assert merger.relabel(1) == 2 and merger.stats["merged"] == 0
    assert out[200, 400] == 1 and out[120, 600] == 2
    assert out[120, 400] == 1  # b does not overwrite a's unrelated object


# ----------------------------------------------------------------------- seam test


@pytest.fixture(scope="module")
def seam_scene():
    grid = TileGrid((3000, 3000), 512, 128)
    img, truth = scene((3000, 3000), grid)
    return grid, img, truth


@pytest.mark.slow
def test_seam_objects_get_exactly_one_label_each(seam_scene, tmp_path):
    grid, img, truth = seam_scene
    assert truth.max() > 60
    model = ObjectsModel()
    store = tmp_path / "emb.zarr"
    res = run(img, model, tmp_path / "labels.zarr", embeddings=store)
    labels = np.asarray(res.labels[:])
    # ids of one plane: 1.. (plane 0 of the stride rule); dtype: smallest holding the bound
    assert labels.dtype == np.uint32 and labels.shape == img.shape
    assert_one_label_per_object(labels, truth)
    details = res.details
    assert details["encoder_calls"] == grid.n_tiles == model.encode_calls
    assert details["merged"] > 0  # pieces cut by seams were merged
    assert res.counts == {0: int(truth.max())}
    assert EmbeddingStore.open(store, read_signature(store), mode="r").n_done == grid.n_tiles
    assert not Path(str(tmp_path / "labels.zarr") + SCRATCH_SUFFIX).exists()  # removed


def test_stack_planes_get_stride_ids_and_id_scopes():
    grid = TileGrid((880, 890), 512, 128)
    p0, t0 = scene((880, 890), grid, seed=2, n_random=4)
    p1, t1 = scene((880, 890), grid, seed=3, n_random=4)
    stack = np.stack([p0, p1])
    model = ObjectsModel()
    res = run(stack, model)
    out = res.labels
    assert out.shape == stack.shape
    stride = 10 ** len(str(3 * 8 * 8 * grid.n_tiles))  # 4 tiles x 192 masks -> 1000
    assert_one_label_per_object(out[0], t0)
    assert_one_label_per_object(out[1], t1, first=stride + 1)  # plane 1: S+1..
    assert out.dtype == np.uint16  # largest possible id 2 * 1000 - 1
    per_slice = run(stack, model, id_scope="slice", indices=[1])
    assert not per_slice.labels[0].any()
    assert_one_label_per_object(per_slice.labels[1], t1)


def test_size_filter_judges_merged_objects():
    grid = TileGrid((880, 890), 512, 128)
    img, truth = scene((880, 890), grid, seed=4, n_random=6)
    areas = np.bincount(truth.ravel())[1:]
    small = int(np.argmin(areas)) + 1
    res = run(img, ObjectsModel(), max_size=int(areas.max()) - 1,
              min_size=int(areas.min()) + 1)
    out = res.labels
    # the largest object (cut in every tile) is judged by its merged area and dropped
    assert not out[truth == 1].any() and not out[truth == small].any()
    rest = np.where((truth == 1) | (truth == small), 0, truth)
    rest = np.unique(rest, return_inverse=True)[1].reshape(truth.shape)
    assert_one_label_per_object(out, rest)


def test_crops_run_per_tile():
    grid = TileGrid((880, 890), 512, 128)
    img, truth = scene((880, 890), grid, seed=6, n_random=4)
    res = run(img, ObjectsModel(), crop_n_layers=1, crop_n_points_downscale_factor=2)
    # crop 0 of every tile finds every object; the crop layer's masks are merged by NMS
    assert_one_label_per_object(res.labels, truth)


def test_cancel_keeps_finished_tiles_and_the_rerun_computes_only_the_others(tmp_path):
    grid = TileGrid((880, 890), 512, 128)
    img, truth = scene((880, 890), grid, seed=7, n_random=4)
    stack = np.stack([img, img])
    out = tmp_path / "o.zarr"
    tiles_seen = []

    def progress(ev):
        if ev.kind == "tile":
            tiles_seen.append(ev.tiles_done)

    first = run(stack, ObjectsModel(), out, progress=progress,
                cancel=lambda: len(tiles_seen) >= 5)  # plane 0 merged, plane 1 has 1 tile
    assert first.cancelled and first.counts == {0: int(truth.max())}
    assert TileScratch(str(out) + SCRATCH_SUFFIX).done() == {0, 1, 2, 3, 4}
    model = ObjectsModel()
    second = run(stack, model, out)
    assert second.complete and model.encode_calls == 3  # tiles 5, 6, 7 only
    assert second.details["skipped"] == 5
    assert_one_label_per_object(np.asarray(second.labels[1]), truth, first=1001)
    fresh = run(stack, ObjectsModel())
    np.testing.assert_array_equal(np.asarray(second.labels[:]), fresh.labels)


def test_cancel_stops_between_tiles():
    img = np.zeros((1100, 1200), np.uint16)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    res = run(img, ObjectsModel(), points_per_side=2, cancel=cancel)
    assert res.cancelled and res.counts == {}


# ----------------------------------------------------------------------- real model, once


@pytest.mark.slow
def test_end_to_end_with_mobilesam_synthetic_weights(tmp_path):
    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    # torch tensors: the loader turns 0-d NumPy arrays (BatchNorm counters) into 1-d ones
    synth = synthetic_state_dict("mobilesam")
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in synth.items()}
    model = build_model("mobilesam", checkpoint=state, device="cpu")
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.standard_normal((1024, 1400)), 10)
    img = (1000 + (img - img.min()) / np.ptp(img) * 30000).astype(np.uint16)
    settings = BatchSettings(
        ModelSpec("mobilesam", device="cpu"),
        EverythingParams(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0),
        tiling=TilingParams("on", 1024, 256),
    )
    store = tmp_path / "emb.zarr"
    first = run_batch(img, settings, tmp_path / "l.zarr", model=model, embeddings=store)
    labels = np.asarray(first.labels[:])
    assert first.details["tiles"] == 2 and first.details["encoder_calls"] == 2
    ids = np.unique(labels[labels > 0])
    assert ids.size == first.counts[0] and (ids == np.arange(1, ids.size + 1)).all()
    second = run_batch(img, settings, model=model, embeddings=store)
    assert second.details["encoder_calls"] == 0 and second.details["store_hits"] == 2
    np.testing.assert_array_equal(second.labels, labels)
