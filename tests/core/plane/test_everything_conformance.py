"""Segment everything vs the reference implementations (synthetic weights, shared fixtures).

MobileSAM: ``SamAutomaticMaskGenerator`` records (``amg``, ``amg_all``, ``amg_cleanup``).
EfficientSAM-Ti: the notebook procedure (``everything``, ``everything_all``) and its
intermediates. Tolerances from the conformance README, section 4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_esam.core.plane.everything import segment_everything
from napari_esam.core.plane.predictor import Predictor
from napari_esam.models.registry import create_model
from tests._conformance import assert_amg_records, load_npz, manifest_state_dict


class CachingPredictor(Predictor):
    """Memoises decoder calls: fixtures that share an image and a grid decode once."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self._memo: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def decode_torch(self, coords, labels, multimask_output=True, iou_gate=None):
        key = (coords.numpy().tobytes() + labels.numpy().tobytes() + bytes([multimask_output])
               + repr(iou_gate).encode())
        if key not in self._memo:
            self._memo[key] = super().decode_torch(
                coords, labels, multimask_output, iou_gate=iou_gate
            )
        return self._memo[key]


def _predictor(name: str) -> CachingPredictor:
    model = create_model(name)
    sd = {k: torch.from_numpy(v) for k, v in manifest_state_dict(name).items()}
    model.load_state_dict(sd, strict=True)
    return CachingPredictor(model.eval())


@pytest.fixture(scope="module")
def mobilesam() -> CachingPredictor:
    return _predictor("mobilesam")


@pytest.fixture(scope="module")
def efficientsam_ti() -> CachingPredictor:
    return _predictor("efficientsam_ti")


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.slow
@pytest.mark.parametrize("fixture,expected", [("amg", 2), ("amg_all", 149), ("amg_cleanup", 38)])
def test_mobilesam_automatic_mask_generator(mobilesam, fixture, expected):
    ref = load_npz("mobilesam", fixture)
    settings = json.loads(str(ref["settings_json"]))
    assert settings.pop("output_mode") == "binary_mask"
    records = segment_everything(ref["image"], mobilesam, **settings)

    assert_amg_records(records, ref, expected)
    n_px = ref["image"].shape[0] * ref["image"].shape[1]
    for i, r in enumerate(records):
        seg, want = r["segmentation"], ref["segmentation"][i]
        assert seg.dtype == bool and seg.shape == want.shape
        assert _mask_iou(seg, want) >= 0.999
        flipped = int((seg != want).sum())
        assert flipped <= 1e-4 * n_px  # float noise flips a few pixels where |logit| ~ 1e-6
        assert r["area"] == int(seg.sum())
        assert abs(r["area"] - int(ref["area"][i])) <= flipped
    # areas agree exactly where the masks do
    ref_seg = ref["segmentation"]
    same = [np.array_equal(r["segmentation"], ref_seg[i]) for i, r in enumerate(records)]
    exact = np.flatnonzero(same)
    assert len(exact) >= 0.8 * len(records)
    np.testing.assert_array_equal([records[i]["area"] for i in exact], ref["area"][exact])


@pytest.mark.slow
@pytest.mark.parametrize("fixture,expected", [("everything", 1), ("everything_all", 196)])
def test_efficientsam_segment_everything(efficientsam_ti, fixture, expected):
    ref = load_npz("efficientsam_ti", fixture)
    s = json.loads(str(ref["settings_json"]))
    details: dict = {}
    records = segment_everything(
        ref["image"],
        efficientsam_ti,
        method="efficientsam",
        points_per_side=s["grid_size"],
        pred_iou_thresh=s["iou_thresh"],
        stability_score_thresh=s["stability_thresh"],
        stability_score_offset=s["stability_offset"],
        min_mask_region_area=s["min_area"],
        box_nms_thresh=s["nms_thresh"],
        details=details,
    )
    np.testing.assert_array_equal(details["grid_points"], ref["grid_points"])
    np.testing.assert_allclose(details["best_iou_all"], ref["best_iou_all"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(details["candidate_query_index"], ref["candidate_query_index"])
    np.testing.assert_allclose(
        details["candidate_best_iou"], ref["candidate_best_iou"], rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        details["candidate_stability"], ref["candidate_stability"], rtol=0, atol=1e-4
    )
    np.testing.assert_array_equal(details["candidate_unchanged"], ref["candidate_unchanged"])
    np.testing.assert_array_equal(details["nms_keep"], ref["nms_keep"])

    assert len(records) == len(ref["masks"]) == expected
    q = ref["candidate_query_index"][ref["nms_keep"]]
    h, w = ref["image"].shape[:2]
    for i, r in enumerate(records):
        assert _mask_iou(r["segmentation"], ref["masks"][i]) >= 0.999
        assert r["point_coords"] == [ref["grid_points"][q[i]].tolist()]
        assert r["crop_box"] == [0, 0, w, h]
        assert r["area"] == int(r["segmentation"].sum())
        assert r["predicted_iou"] == pytest.approx(
            float(ref["candidate_best_iou"][ref["nms_keep"][i]]), abs=1e-5
        )


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mobilesam", "efficientsam_ti"])
def test_either_method_with_either_model(request, model_name):
    """Each procedure with the other family's model equals its step-by-step transcription
    (binarising with that model's own rule)."""
    from tests.fakes import assert_same_records, naive_efficientsam, naive_sam

    predictor = request.getfixturevalue(model_name)
    image = load_npz("mobilesam", "amg")["image"][::2, ::2]  # 256 x 256
    kw = dict(pred_iou_thresh=0.2, stability_score_thresh=0.3, stability_score_offset=0.25)
    ours = segment_everything(image, predictor, points_per_side=4, box_nms_thresh=0.99, **kw)
    ref = naive_sam(
        image, predictor.model, points_per_side=4, box_nms_thresh=0.99, predictor=predictor, **kw
    )
    assert len(ours) > 0
    assert_same_records(ours, ref)
    ours = segment_everything(
        image,
        predictor,
        method="efficientsam",
        points_per_side=4,
        points_per_batch=5,
        min_mask_region_area=20,
        box_nms_thresh=1.0,
        **kw,
    )
    # all 16 queries in one decoder call, as the notebook: float rounding of the decoder
    # differs slightly with the batch size (BLAS), so values agree to ~1e-6, not bitwise
    model = predictor.model
    ref = naive_efficientsam(image, model, 4, 0.2, 0.3, 0.25, 20, 1.0, predictor=predictor)
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref, strict=True):
        assert _mask_iou(a["segmentation"], b["segmentation"]) >= 0.999
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-4)
