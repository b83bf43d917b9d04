"""Characterisation: outputs pinned before the one-pipeline refactor (issue 12) stay as
they were, except where the unified rules deliberately change them (``docs/rules``).

``tests/data/characterisation.npz`` was written by ``tests/data/make_characterisation.py``
on the last commit before the refactor. Pinned and unchanged: the untiled label values
(ids included), the records of segment-everything, prompt masks; tiled labels keep the same
objects (the same partition of the pixels) while their ids follow the stack id rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_esam.core.runs.pipeline import run_batch
from napari_esam.core.runs.settings import (
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
)
from tests.fakes import (
    FAST,
    FAST_TILED,
    HALO,
    TILE,
    BlobModel,
    FakeModel,
    blob_image,
    blob_stack,
    tiled_blob_stack,
)

PINS = Path(__file__).resolve().parents[2] / "data" / "characterisation.npz"


def settings(tiling: TilingParams | None = None, scope: str = "stack", **params):
    return BatchSettings(ModelSpec(name="blob", factory=BlobModel),
                         EverythingParams(**(params or FAST)), id_scope=scope,
                         tiling=tiling or TilingParams())


@pytest.fixture(scope="module")
def pins():
    with np.load(PINS) as f:
        return {k: f[k] for k in f.files}


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` label the same pixel sets (ids may differ, 0 stays 0)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_same_partition_detects_split_and_merged_objects():
    a = np.array([[1, 1, 0, 2]])
    assert same_partition(a, np.array([[7, 7, 0, 3]]))
    assert not same_partition(a, np.array([[7, 8, 0, 3]]))
    assert not same_partition(a, np.array([[7, 7, 0, 7]]))
    assert not same_partition(a, np.array([[7, 7, 3, 3]]))


@pytest.mark.parametrize("scope", ["stack", "slice"])
def test_untiled_batch_labels_are_unchanged(pins, scope):
    stack, _ = blob_stack(5)
    labels = np.asarray(run_batch(stack, settings(scope=scope)).labels)
    np.testing.assert_array_equal(labels, pins[f"batch_{scope}_labels"])


def test_segment_everything_records_are_unchanged(pins):
    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    stack, _ = blob_stack(5)
    records = segment_everything(stack[2], Predictor(BlobModel()), **FAST)
    np.testing.assert_array_equal([r["bbox"] for r in records], pins["records_bbox"])
    np.testing.assert_array_equal([r["area"] for r in records], pins["records_area"])
    np.testing.assert_allclose([r["predicted_iou"] for r in records], pins["records_iou"])
    np.testing.assert_allclose([r["point_coords"][0] for r in records],
                               pins["records_points"])


def test_tiled_labels_keep_their_objects(pins):
    tiled = TilingParams("on", TILE, HALO)
    labels = run_batch(blob_image((600, 700)), settings(tiled, **FAST_TILED)).labels
    assert same_partition(np.asarray(labels), pins["tiled_plane_labels"])
    stack = run_batch(tiled_blob_stack(2), settings(tiled, **FAST_TILED)).labels
    for i in range(2):
        assert same_partition(np.asarray(stack[i]), pins["tiled_stack_labels"][i])


def test_prompt_masks_are_unchanged(pins):
    from napari_esam.core.plane.predictor import Predictor
    from napari_esam.core.tiling.predictor import TiledPredictor

    plane = blob_image((600, 700))
    pred = Predictor(FakeModel())
    pred.set_image(plane)
    masks, scores, _ = pred.predict(np.array([[300.0, 200.0]]), np.array([1]))
    np.testing.assert_array_equal(masks, pins["prompt_masks"])
    np.testing.assert_allclose(scores, pins["prompt_scores"])
    tp = TiledPredictor(FakeModel())
    tp.set_image(np.tile(plane, (4, 4)))
    masks, scores, _ = tp.predict(np.array([[1500.0, 1100.0]]), np.array([1]))
    np.testing.assert_array_equal(masks, pins["tiled_prompt_masks"])
    np.testing.assert_allclose(scores, pins["tiled_prompt_scores"])
