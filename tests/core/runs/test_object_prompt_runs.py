"""Object prompts in batch runs (``EverythingParams(prompts="objects")``): settings and their
checks, the resume record and the id bound, plain images, stacks and tiled planes (objects
across seams become one label), point and box decoding. The Dask run is in
``test_cluster_tiled.py``; the detector itself in ``tests/core/plane``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr
from scipy import ndimage
from skimage.draw import disk, ellipse

from napari_esam.core.plane.object_prompts import detect_object_prompts, max_object_prompts
from napari_esam.core.runs.outputs import RUN_ATTR
from napari_esam.core.runs.pipeline import run_batch
from napari_esam.core.runs.settings import (
    OBJECT_FIELDS,
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
    max_objects_per_tile,
)
from napari_esam.core.runs.tasks import tile_object_prompts
from napari_esam.core.tiling.grid import TileGrid
from tests.fakes import BlobModel, ObjectsModel, PromptRecorder, blob_stack

#: object prompts for the blobs of ``blob_stack`` (disks of radius 7)
BLOBS = {"prompts": "objects", "object_diameter": (8.0, 24.0), "points_per_batch": 64}
#: the tiled scene: a 1 x 2 grid of 256 px tiles overlapping by 64 px
SHAPE, TILE, HALO = (250, 448), 256, 64


def blob_settings(tiling: TilingParams | None = None, **params) -> BatchSettings:
    return BatchSettings(ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel"),
                         EverythingParams(**{**BLOBS, **params}), "stack",
                         tiling or TilingParams())


def objects_settings(**params) -> BatchSettings:
    return BatchSettings(
        ModelSpec("objects", device="cpu", factory="tests.fakes:ObjectsModel"),
        EverythingParams(**{"prompts": "objects", "object_diameter": (16.0, 120.0),
                            **params}),
        "stack", TilingParams("on", TILE, HALO))


def seam_scene() -> tuple[np.ndarray, np.ndarray]:
    """(image, truth) of a plane cut into two tiles: disks on the seam, on the tiles'
    edges, inside each core, and a bar longer than the overlap (cut in both tiles)."""
    grid = TileGrid(SHAPE, TILE, HALO)
    assert (grid.n_y, grid.n_x) == (1, 2)
    a, b = grid.tile_at(0, 0), grid.tile_at(0, 1)
    seam, edge_a, edge_b = a.core.x1, a.window.x1, b.window.x0
    img = np.full(SHAPE, 1000, np.uint16)
    truth = np.zeros(SHAPE, np.int32)
    objects = [disk((50, seam), 28), disk((205, seam + 4), 18), disk((95, edge_a + 6), 12),
               disk((200, edge_b - 2), 14), disk((60, 60), 20), disk((190, 390), 25),
               ellipse(125, seam, 16, 110)]  # 220 px long, across the 64 px overlap
    for k, (rr, cc) in enumerate(objects, 1):
        grown = np.zeros(SHAPE, bool)
        grown[rr, cc] = True
        assert not truth[ndimage.binary_dilation(grown, iterations=2)].any()
        truth[rr, cc] = k
        img[rr, cc] = 30000
    return img, truth


def assert_one_label_per_object(out: np.ndarray, truth: np.ndarray) -> None:
    assert not out[truth == 0].any(), "labels outside the objects"
    seen = set()
    for i in range(1, int(truth.max()) + 1):
        ids = np.unique(out[truth == i])
        assert len(ids) == 1 and ids[0] != 0, f"object {i} has labels {ids}"
        assert ids[0] not in seen, f"label {ids[0]} covers two objects"
        seen.add(int(ids[0]))
    assert sorted(seen) == list(range(1, int(truth.max()) + 1))


# ------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"prompts": "blobs"}, "prompts must be 'grid' or 'objects'"),
        ({"object_diameter": (1, 40)}, "2 <= min <= max"),
        ({"object_diameter": (40, 8)}, "2 <= min <= max"),
        ({"object_diameter": (8, float("nan"))}, "2 <= min <= max"),
        ({"object_diameter": 8}, r"\(min, max\)"),
        ({"object_threshold": 0}, "object_threshold must be > 0"),
        ({"object_threshold": float("inf")}, "object_threshold must be > 0"),
        ({"object_polarity": "up"}, "object_polarity must be 'bright' or 'dark'"),
        ({"object_decoding": "mask"}, "object_decoding must be 'point' or 'box'"),
        ({"prompts": "objects", "crop_n_layers": 1}, "do not support crops"),
    ],
)
def test_bad_object_settings_raise_a_clear_value_error(change, match):
    params = EverythingParams(**change)
    with pytest.raises(ValueError, match=match):
        params.validate()
    with pytest.raises(ValueError, match=match):
        run_batch(np.zeros((2, 32, 32), np.uint16), blob_settings(**change))


def test_the_record_of_grid_runs_is_unchanged_and_objects_record_their_settings():
    grid = TilingParams().grid((64, 64))
    plain = BatchSettings(params=EverythingParams()).record(grid)
    assert not set(OBJECT_FIELDS) & set(plain["params"])  # as before object prompts
    assert plain["params"]["points_per_side"] == 32
    # object settings do not matter to a grid run
    other = EverythingParams(object_diameter=(4, 9), object_decoding="box")
    assert BatchSettings(params=other).record(grid) == plain
    rec = BatchSettings(params=EverythingParams(prompts="objects")).record(grid)["params"]
    assert rec["prompts"] == "objects" and rec["objects"] == {
        "object_diameter": [8.0, 40.0], "object_threshold": 0.05,
        "object_polarity": "bright", "object_decoding": "point"}
    assert "points_per_side" not in rec  # no grid


def test_the_id_bound_counts_the_most_objects_the_detector_can_give():
    shape = (96, 120)
    point = EverythingParams(prompts="objects", object_diameter=(2, 3))
    box = dataclasses.replace(point, object_decoding="box")
    assert max_objects_per_tile(point, shape) == 3 * max_objects_per_tile(box, shape)
    assert max_objects_per_tile(box, shape) == max_object_prompts(shape, 2)
    with pytest.raises(ValueError, match="tile shape"):
        max_objects_per_tile(point)
    # the stride of a plane: per tile bound x tiles, a power of ten above it
    s = BatchSettings(params=point)
    grid = TilingParams("on", 64, 16).grid(shape)
    bound = max_objects_per_tile(point, (grid.tile_h, grid.tile_w)) * grid.n_tiles
    assert s.id_stride(grid) // 10 <= bound < s.id_stride(grid)


# ------------------------------------------------------------------------ runs


@pytest.mark.parametrize("decoding", ["point", "box"])
def test_a_stack_gets_one_label_per_blob_per_slice(decoding):
    stack, counts = blob_stack(4, 64)
    settings = blob_settings(object_decoding=decoding)
    res = run_batch(stack, settings)
    labels = np.asarray(res.labels)
    stride = settings.id_stride(TilingParams().grid((64, 64)))
    assert res.complete and res.counts == dict(enumerate(counts))
    for i, image in enumerate(stack):
        ids = set(np.unique(labels[i]).tolist()) - {0}
        assert ids == set(range(i * stride + 1, i * stride + counts[i] + 1))
        blobs = image > 2000
        assert ((labels[i] > 0) == blobs).all()  # BlobModel: each blob exactly
    single = run_batch(stack[2], settings)  # a plain image: plane 0, the same objects
    expected = np.where(labels[2] > 0, labels[2] - 2 * stride, 0)
    np.testing.assert_array_equal(np.asarray(single.labels), expected)


def test_point_and_box_decoding_send_what_they_say():
    image = blob_stack(3, 64)[0][2]
    model = PromptRecorder()
    points, found = detect_object_prompts(image, min_diameter=8, max_diameter=24,
                                          return_details=True)
    for decoding in ("point", "box"):
        model.calls.clear()
        run_batch(image, blob_settings(object_decoding=decoding), model=model)
        coords = np.concatenate([c for c, _, _ in model.calls])
        labels = np.concatenate([lab for _, lab, _ in model.calls])
        multimask = {m for _, _, m in model.calls}
        if decoding == "point":
            assert multimask == {True} and (labels == 1).all() and coords.shape[1] == 1
            np.testing.assert_allclose(coords[:, 0], points, atol=1e-4)
        else:
            assert multimask == {False} and (labels == [2, 3]).all()
            half = 1.5 * found["radius"][:, None]
            np.testing.assert_allclose(coords[:, 0], np.clip(points - half, 0, 64), atol=1e-4)
            np.testing.assert_allclose(coords[:, 1], np.clip(points + half, 0, 64), atol=1e-4)


def test_box_decoding_skips_the_quality_filters():
    """Predicted IoU 0.9 for every mask of the fake: a threshold of 0.95 drops every point
    mask; box decoding keeps its masks (single output, no filters), then NMS."""
    image = blob_stack(3, 64)[0][2]
    strict = {"pred_iou_thresh": 0.95, "stability_score_thresh": 0.99}
    point = run_batch(image, blob_settings(**strict), model=PromptRecorder())
    box = run_batch(image, blob_settings(object_decoding="box", **strict),
                    model=PromptRecorder())
    assert point.counts == {0: 0}
    assert box.counts == {0: 4}  # 4 blobs, 4 boxes (FakeModel fills each box)


@pytest.mark.parametrize("decoding", ["point", "box"])
def test_objects_across_a_seam_become_one_label(decoding):
    img, truth = seam_scene()
    settings = objects_settings(object_decoding=decoding)
    res = run_batch(img, settings, model=ObjectsModel())
    labels = np.asarray(res.labels)
    assert_one_label_per_object(labels, truth)
    assert res.details["grid"].n_tiles == 2 and res.details["merged"] >= 1  # the bar


def test_each_tile_prompts_its_core_grown_by_half_the_largest_diameter():
    img, truth = seam_scene()
    grid = TileGrid(SHAPE, TILE, HALO)
    params = objects_settings(object_diameter=(16.0, 40.0)).params
    m = params.object_diameter[1] / 2  # 20 px: less than the 32 px from core to tile edge
    every = {}
    for tile in grid:
        pixels = img[tile.window.slices]
        pts, radii = tile_object_prompts(grid, tile, pixels, params, (1000, 30000))
        every[tile.key] = pts
        all_pts = detect_object_prompts(pixels, contrast_limits=(1000, 30000),
                                        **params.object_kwargs())
        assert len(pts) == len(radii) < len(all_pts)  # the cut disks are left to the other
        x = pts[:, 0] + tile.window.x0
        assert ((x >= tile.core.x0 - m) & (x < tile.core.x1 + m)).all()
    # every object is prompted by at least one tile
    hit = set()
    for (iy, ix), pts in every.items():
        win = grid.tile_at(iy, ix).window
        hit |= set(truth[(pts[:, 1] + win.y0).astype(int), (pts[:, 0] + win.x0).astype(int)])
    assert hit - {0} == set(range(1, int(truth.max()) + 1))


def test_resume_refuses_other_prompt_settings(tmp_path):
    stack, counts = blob_stack(2, 64)
    out = tmp_path / "labels.zarr"
    first = run_batch(stack, blob_settings(), out)
    assert first.complete
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]["settings"]["params"]
    assert rec["prompts"] == "objects" and rec["objects"]["object_diameter"] == [8.0, 24.0]
    for change, what in [({"prompts": "grid"}, "params.prompts: 'objects' in the output"),
                         ({"object_diameter": (8.0, 30.0)}, "objects.object_diameter"),
                         ({"object_threshold": 0.1}, "objects.object_threshold"),
                         ({"object_polarity": "dark"}, "objects.object_polarity"),
                         ({"object_decoding": "box"}, "objects.object_decoding")]:
        with pytest.raises(ValueError, match=what):
            run_batch(stack, blob_settings(**change), out)
    again = run_batch(stack, blob_settings(), out)  # the same settings resume (all done)
    assert again.complete and again.details["tiles"] == 0
    assert again.counts == dict(enumerate(counts))


def test_grid_prompts_ignore_the_object_settings():
    stack, _ = blob_stack(2, 64)
    grid = {"prompts": "grid", "points_per_side": 8}
    a = run_batch(stack, blob_settings(**grid), model=BlobModel())
    b = run_batch(stack, blob_settings(**grid, object_diameter=(30, 31),
                                       object_decoding="box"), model=BlobModel())
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
