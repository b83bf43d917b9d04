"""Object-aware prompts: the LoG detector on synthetic nuclei, and segment-everything with
the detected points or their boxes (on fast fake models). No timings here: speed is in
``benchmarks/``."""

from __future__ import annotations

import numpy as np
import pytest

from napari_esam._sample_data import synthetic_nuclei
from napari_esam.core.plane.everything import segment_everything
from napari_esam.core.plane.object_prompts import (
    BOX_SCALE,
    detect_object_prompts,
    max_object_prompts,
    object_boxes,
    object_scales,
    segment_detected_objects,
    segment_everything_objects,
)
from napari_esam.core.plane.predictor import Predictor
from tests.fakes import BlobModel, PromptRecorder, blob_stack

GRID_32 = 32 * 32


def _coverage(points: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the labelled objects with at least one point inside."""
    cols = np.clip(points[:, 0].astype(int), 0, labels.shape[1] - 1)
    rows = np.clip(points[:, 1].astype(int), 0, labels.shape[0] - 1)
    hit = np.setdiff1d(np.unique(labels[rows, cols]), [0])
    return len(hit) / (len(np.unique(labels)) - 1)


@pytest.fixture(scope="module")
def nuclei() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_nuclei()


def test_prompts_every_nucleus_with_far_fewer_points_than_a_grid(nuclei):
    image, labels = nuclei
    points = detect_object_prompts(image)
    n_objects = len(np.unique(labels)) - 1
    assert points.ndim == 2 and points.shape[1] == 2 and points.dtype == np.float64
    assert _coverage(points, labels) >= 0.95
    assert len(points) <= GRID_32 / 5
    assert len(points) <= 2 * n_objects
    # points lie in the image, at pixel centres (SAM's (x, y) convention)
    assert (points >= 0).all() and (points[:, 0] <= image.shape[1]).all()
    assert (points[:, 1] <= image.shape[0]).all()
    # few prompts on the background
    on_bg = labels[points[:, 1].astype(int), points[:, 0].astype(int)] == 0
    assert on_bg.sum() <= 0.05 * len(points)


def test_the_grid_misses_objects_the_detector_finds(nuclei):
    image, labels = nuclei
    h, w = labels.shape
    c = (np.arange(16) + 0.5) / 16
    grid16 = np.stack(np.meshgrid(c * w, c * h), -1).reshape(-1, 2)
    points = detect_object_prompts(image)
    assert _coverage(points, labels) > _coverage(grid16, labels)


@pytest.mark.parametrize("seed", [1, 2])
def test_other_seeds_and_an_uneven_background(seed):
    image, labels = synthetic_nuclei(seed=seed)
    ramp = image.astype(np.float64) + 3.0 * np.arange(image.shape[1])[None, :]
    for img in (image, ramp):
        points = detect_object_prompts(img)
        assert _coverage(points, labels) >= 0.95
        assert len(points) <= 2 * (len(np.unique(labels)) - 1)


def test_dark_polarity(nuclei):
    image, labels = nuclei
    inverted = image.max() - image
    dark = detect_object_prompts(inverted, polarity="dark")
    assert _coverage(dark, labels) >= 0.95
    np.testing.assert_allclose(dark, detect_object_prompts(image))
    # looking for bright objects on the inverted image does not find the nuclei
    assert _coverage(detect_object_prompts(inverted), labels) < 0.8


def test_rgb_float_and_contrast_limits(nuclei):
    image, _ = nuclei
    ref = detect_object_prompts(image)
    np.testing.assert_array_equal(detect_object_prompts(np.dstack([image] * 3)), ref)
    np.testing.assert_array_equal(detect_object_prompts(image[..., None]), ref)
    np.testing.assert_allclose(detect_object_prompts(image.astype(np.float32) / 7.0), ref)
    lo, hi = np.percentile(image, (0.5, 99.5))
    np.testing.assert_allclose(detect_object_prompts(image, contrast_limits=(lo, hi)), ref)


def test_objects_cut_by_the_border_are_prompted_inside():
    image = np.full((64, 96), 10, np.uint16)
    yy, xx = np.mgrid[:64, :96]
    image[(yy - 32) ** 2 + (xx - 2) ** 2 <= 8**2] = 1000  # a disc cut by the left border
    image[(yy - 30) ** 2 + (xx - 60) ** 2 <= 8**2] = 1000
    points = detect_object_prompts(image, min_diameter=8, max_diameter=24)
    assert len(points) == 2
    inside = image[points[:, 1].astype(int), points[:, 0].astype(int)] == 1000
    assert inside.all()


def test_size_range_and_max_prompts(nuclei):
    image, labels = nuclei
    points, info = detect_object_prompts(image, return_details=True)
    assert set(info) == {"radius", "response"}
    assert (np.diff(info["response"]) <= 0).all()  # strongest first
    assert (info["radius"] >= 8 / 2 - 1e-9).all() and (info["radius"] <= 40 / 2 + 1e-9).all()
    top = detect_object_prompts(image, max_prompts=10)
    np.testing.assert_array_equal(top, points[:10])
    # objects much smaller than min_diameter do not count
    assert len(detect_object_prompts(image, min_diameter=60, max_diameter=80)) < len(points) / 2
    sig = object_scales(8, 40)
    assert sig[0] == pytest.approx(8 / (2 * np.sqrt(2)))
    assert sig[-1] == pytest.approx(40 / (2 * np.sqrt(2)))
    assert (sig[1:] / sig[:-1] <= 1.5 + 1e-9).all()
    assert len(object_scales(10, 10)) == 1


def test_constant_image_has_no_prompts():
    points = detect_object_prompts(np.full((40, 50), 7, np.uint16))
    assert points.shape == (0, 2)


@pytest.mark.parametrize(
    "image,kwargs",
    [
        (np.zeros((3, 32, 32)), {}),  # a stack
        (np.zeros((32, 32, 4)), {}),  # RGBA
        (np.zeros((1, 32)), {}),  # too small
        (np.full((32, 32), np.nan), {}),
        (np.array([["a"] * 4] * 4), {}),
        (np.zeros((32, 32)), {"min_diameter": 1}),
        (np.zeros((32, 32)), {"min_diameter": 20, "max_diameter": 10}),
        (np.zeros((32, 32)), {"max_diameter": float("inf")}),
        (np.zeros((32, 32)), {"threshold": 0}),
        (np.zeros((32, 32)), {"threshold": float("nan")}),
        (np.zeros((32, 32)), {"polarity": "auto"}),
        (np.zeros((32, 32)), {"max_prompts": 0}),
        (np.zeros((32, 32)), {"max_prompts": 2.5}),
        (np.zeros((32, 32)), {"contrast_limits": (0, float("nan"))}),
    ],
)
def test_bad_inputs_raise_value_error(image, kwargs):
    with pytest.raises(ValueError):
        detect_object_prompts(image, **kwargs)


# ------------------------------------------------------------------- segment everything

FAST = dict(pred_iou_thresh=0.8, stability_score_thresh=0.9, points_per_batch=4)


def test_segment_everything_objects_finds_each_blob_once():
    stack, counts = blob_stack(5, 64)
    for image, n in zip(stack, counts, strict=True):
        details: dict = {}
        records = segment_everything_objects(
            image, BlobModel(), min_diameter=8, max_diameter=24, details=details, **FAST
        )
        points = details["object_prompts"]
        assert len(points) == n == len(records)
        prompts = {tuple(r["point_coords"][0]) for r in records}
        assert prompts == {tuple(p) for p in points}
        for r in records:
            x, y = (int(v) for v in r["point_coords"][0])
            assert r["segmentation"][y, x]


def test_same_records_as_segment_everything_with_the_points_as_grid():
    image = blob_stack(3, 64)[0][2]
    points = detect_object_prompts(image, min_diameter=8, max_diameter=24)
    predictor = Predictor(BlobModel())
    ours = segment_everything_objects(image, predictor, min_diameter=8, max_diameter=24, **FAST)
    grid = points / np.array([[image.shape[1], image.shape[0]]])
    ref = segment_everything(image, predictor, points_per_side=None, point_grids=grid, **FAST)
    assert predictor.encoder_calls == 1  # the embedding is reused
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref, strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert {k: v for k, v in a.items() if k != "segmentation"} == {
            k: v for k, v in b.items() if k != "segmentation"
        }


def test_efficientsam_procedure_takes_the_points_too():
    image = blob_stack(2, 64)[0][1]
    records = segment_everything_objects(
        image,
        BlobModel(),
        min_diameter=8,
        max_diameter=24,
        method="efficientsam",
        pred_iou_thresh=0.8,
        stability_score_thresh=0.5,
        min_mask_region_area=0,
    )
    assert len(records) == 3


def test_no_candidates_gives_no_records_without_running_the_model():
    model = BlobModel()
    assert segment_everything_objects(np.full((64, 64), 5, np.uint16), model) == []
    assert model.encode_calls == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"points_per_side": 16}, {"point_grids": np.zeros((1, 2))}, {"crop_n_layers": 1}],
)
def test_segment_everything_objects_rejects_grid_and_crop_arguments(kwargs):
    with pytest.raises(ValueError):
        segment_everything_objects(blob_stack(1, 64)[0][0], BlobModel(), **kwargs)


def test_segment_everything_objects_needs_the_image():
    with pytest.raises(ValueError):
        segment_everything_objects(None, BlobModel())


# ------------------------------------------------------------------- box decoding


def test_box_decoding_sends_one_box_per_object_with_single_mask_output():
    image = blob_stack(3, 64)[0][2]
    model = PromptRecorder()
    details: dict = {}
    records = segment_everything_objects(image, model, min_diameter=8, max_diameter=24,
                                         decoding="box", details=details, **FAST)
    points, radii = details["object_prompts"], details["object_radii"]
    assert len(points) == 4 and len(model.calls) == 1  # 4 blobs, one batch of 4
    coords, labels, multimask = model.calls[0]
    assert not multimask and (labels == [2, 3]).all() and coords.shape == (4, 2, 2)
    expected = object_boxes(points, radii, image.shape)
    np.testing.assert_allclose(coords.reshape(4, 4), expected, atol=1e-4)
    # (the blobs lie inside the image: no box is clipped) centre = point, side = 3 radii
    np.testing.assert_allclose(expected[:, 2:] - expected[:, :2],
                               np.repeat(2 * BOX_SCALE * radii[:, None], 2, 1))
    np.testing.assert_allclose((expected[:, 2:] + expected[:, :2]) / 2, points)
    # the fake's box masks (IoU 0.9, stability 1) are kept although pred_iou_thresh is 0.95:
    # box decoding has no quality filters; the records' points are the detected points
    strict = segment_everything_objects(image, PromptRecorder(), min_diameter=8,
                                        max_diameter=24, decoding="box",
                                        pred_iou_thresh=0.95, stability_score_thresh=0.99)
    assert len(records) == len(strict) == 4
    assert sorted(tuple(r["point_coords"][0]) for r in strict) == sorted(map(tuple, points))


def test_point_decoding_sends_positive_points_with_three_candidates():
    image = blob_stack(3, 64)[0][2]
    model = PromptRecorder()
    points = detect_object_prompts(image, min_diameter=8, max_diameter=24)
    segment_everything_objects(image, model, min_diameter=8, max_diameter=24, **FAST)
    coords = np.concatenate([c for c, _, _ in model.calls])
    assert all(m for _, _, m in model.calls)
    assert all((lab == 1).all() and lab.shape[1] == 1 for _, lab, _ in model.calls)
    np.testing.assert_allclose(coords[:, 0], points, atol=1e-4)


def test_object_boxes_are_clipped_and_the_prompt_bound_holds():
    boxes = object_boxes(np.array([[5.0, 60.0], [30.0, 30.0]]), np.array([8.0, 4.0]),
                         (64, 48))
    np.testing.assert_allclose(boxes, [[0, 48, 17, 64], [24, 24, 36, 36]])
    with pytest.raises(ValueError, match="2 points but 1 radii"):
        object_boxes(np.zeros((2, 2)), np.ones(1), (8, 8))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 60000, (96, 120)).astype(np.uint16)  # peaks everywhere
    points = detect_object_prompts(noise, min_diameter=2, max_diameter=3, threshold=1e-6)
    assert 500 < len(points) <= max_object_prompts(noise.shape, 2)
    d = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1))
    assert d[np.triu_indices(len(points), 1)].min() >= 1.0  # at least min_diameter / 2


def test_detected_objects_on_the_image_set_on_the_predictor():
    image = blob_stack(3, 64)[0][2]
    predictor = Predictor(BlobModel())
    predictor.set_image(image)
    points, found = detect_object_prompts(image, min_diameter=8, max_diameter=24,
                                          return_details=True)
    ours = segment_detected_objects(None, predictor, points, found["radius"],
                                    decoding="box", **FAST)
    ref = segment_everything_objects(image, BlobModel(), min_diameter=8, max_diameter=24,
                                     decoding="box", **FAST)
    assert predictor.encoder_calls == 1 and len(ours) == len(ref) == 4
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
    assert segment_detected_objects(None, predictor, np.zeros((0, 2))) == []
    with pytest.raises(ValueError, match="radii"):
        segment_detected_objects(None, predictor, points, decoding="box")
    with pytest.raises(ValueError, match="decoding must be 'point' or 'box'"):
        segment_detected_objects(None, predictor, points, decoding="mask")
    with pytest.raises(ValueError, match="no image"):
        segment_detected_objects(None, Predictor(BlobModel()), points)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"point_grids": np.full((2, 2), 0.5), "prompt_boxes": np.zeros((3, 4))}, "one per"),
        ({"point_grids": np.full((2, 2), 0.5), "prompt_boxes": np.zeros((2, 4)),
          "method": "efficientsam"}, "method='sam'"),
        ({"point_grids": [np.full((2, 2), 0.5)] * 2, "prompt_boxes": np.zeros((2, 4)),
          "crop_n_layers": 1}, "no crops"),
        ({"points_per_side": 4, "prompt_boxes": np.zeros((16, 4))}, "one per"),
        ({"point_grids": np.full((1, 2), 0.5), "prompt_boxes": np.full((1, 4), np.nan)},
         "NaN"),
    ],
)
def test_segment_everything_checks_prompt_boxes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        segment_everything(blob_stack(1, 64)[0][0], BlobModel(), **kwargs)
