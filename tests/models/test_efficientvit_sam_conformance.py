"""Conformance of our EfficientViT-SAM L0/L1/L2/XL0/XL1 with the reference outputs.

Synthetic weights (recipe of ``shared/conformance/README.md`` section 1), fixtures and
tolerances of section 6 (6.4): embedding 5e-5, low-res logits 3e-5, IoU 1e-5, logits at the
original size 1e-4, masks equal wherever |reference logit| >= 1e-4, preprocessed input 1e-6.
Each model is built and its image encoded once per module (the XL encoders take seconds).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from napari_esam.core.plane.everything import segment_everything
from napari_esam.core.plane.predictor import Predictor
from napari_esam.models.common import LayerNorm2d
from napari_esam.models.efficientvit_sam import EfficientViTSAM, build_efficientvit_sam
from napari_esam.models.synthetic import synth_state_dict_from_shapes
from tests._conformance import assert_amg_records, load_npz, manifest

VARIANTS = ("l0", "l1", "l2", "xl0", "xl1")
#: README section 1: SHA-256 of the synthesized tensors, concatenated in manifest order
SHA256 = {
    "l0": "69916c3813432a3bd04995de9e07426040357d4dac529998b204824e9bbb6896",
    "l1": "edbb0723f2bcee803f81a95b88f22d1893c49f4a120410efae1654fdc678ea89",
    "l2": "8a868a871fb8ba188b32c7050e5daf4fc4d89d11b95b5031f485cc724da0aa6e",
    "xl0": "56344228788f6fc947888837297269370a570302713dddb4117d1ff4a802b7b9",
    "xl1": "7333b3597c827e6692944897e328bef814372a481c4aec2eb89a40db18cc9945",
}
ENTRIES = {"l0": 409, "l1": 515, "l2": 645, "xl0": 455, "xl1": 701}
BATCHES_TRACKED = {"l0": 36, "l1": 50, "l2": 68, "xl0": 44, "xl1": 78}
CASES = [("points", "single"), ("points", "multi"), ("box", "box"), ("box", "box_point")]

ATOL_EMBEDDING = 5e-5
ATOL_LOW_RES = 3e-5
ATOL_IOU = 1e-5
ATOL_LOGITS = 1e-4
ATOL_INPUT = 1e-6


def _name(variant: str) -> str:
    return f"efficientvit_sam_{variant}"


def _family_input_source(variant: str) -> str:
    """``input`` is stored only in ``_l0`` (L family) and ``_xl0`` (XL family)."""
    return "l0" if variant.startswith("l") else "xl0"


def synthetic_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The recipe's weights for the manifest, checked against the README's SHA-256."""
    entries = manifest(_name(variant))
    sd = synth_state_dict_from_shapes({e["name"]: e["shape"] for e in entries})
    digest = hashlib.sha256()
    for arr in sd.values():
        digest.update(np.ascontiguousarray(arr).tobytes())
    assert digest.hexdigest() == SHA256[variant], "synthetic weight recipe mismatch"
    return {k: torch.from_numpy(v) for k, v in sd.items()}


class Loaded:
    """A model with the synthetic weights, and its own embedding of the main image."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.model = build_efficientvit_sam(variant).eval()
        self.model.load_state_dict(synthetic_state_dict(variant), strict=True)
        self.encoder = load_npz(_name(variant), "encoder")
        with torch.inference_mode():
            x, self.input_size = self.model.preprocess(self.encoder["image"])
            self.embedding = self.model.encode(x)


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request) -> Loaded:
    return Loaded(request.param)


def _prompt(ref: dict[str, np.ndarray], case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, N, 2) coords and (1, N) labels: points first, then the box corners (2, 3)."""
    coords: list[np.ndarray] = []
    labels: list[int] = []
    if f"{case}__point_coords" in ref:
        coords += list(ref[f"{case}__point_coords"])
        labels += [int(v) for v in ref[f"{case}__point_labels"]]
    if f"{case}__box" in ref:
        box = ref[f"{case}__box"]
        coords += [box[:2], box[2:]]
        labels += [2, 3]
    c = torch.from_numpy(np.asarray(coords, dtype=np.float32))[None]
    return c, torch.tensor(labels, dtype=torch.int64)[None]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_manifest(variant: str) -> None:
    m = build_efficientvit_sam(variant)
    assert m.name == _name(variant) and m.img_size == (512 if variant.startswith("l") else 1024)
    assert m.has_negative_point_embedding and m.supports_mask_input
    assert not m.mask_threshold_inclusive and m.max_points is None
    entries = [(e["name"], tuple(e["shape"])) for e in manifest(_name(variant))]
    assert len(entries) == ENTRIES[variant]
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == entries
    tracked = [k for k in m.state_dict() if k.endswith("num_batches_tracked")]
    assert len(tracked) == BATCHES_TRACKED[variant]
    # no non-persistent buffers: normalisation is part of preprocessing
    assert {name for name, _ in m.named_buffers()} <= set(m.state_dict())
    # every norm of the model uses eps 1e-6, the decoder's transformer included
    norm_types = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, LayerNorm2d)
    norms = [mod for mod in m.modules() if isinstance(mod, norm_types)]
    assert len(norms) > 9 and {mod.eps for mod in norms} == {1e-6}


@pytest.mark.parametrize("fixture", ["encoder", "preprocess_large"])
def test_preprocess(loaded: Loaded, fixture: str) -> None:
    model, variant = loaded.model, loaded.variant
    ref = load_npz(_name(variant), fixture)
    s = model.img_size
    assert int(ref["encoder_size"]) == s
    np.testing.assert_array_equal(model.resize(ref["image"]), ref["resized"])
    x, input_size = model.preprocess(ref["image"])
    assert input_size == tuple(int(v) for v in ref["input_size"])  # the 1024 frame
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 3, s, s)
    expected = ref.get("input")
    if expected is None:  # stored once per family, bit-identical within it
        expected = load_npz(_name(_family_input_source(variant)), fixture)["input"]
    np.testing.assert_allclose(x.numpy(), expected, atol=ATOL_INPUT, rtol=0)


def test_embedding(loaded: Loaded) -> None:
    assert loaded.input_size == tuple(int(v) for v in loaded.encoder["input_size"])
    assert tuple(loaded.embedding.shape) == (1, 256, 64, 64)
    np.testing.assert_allclose(
        loaded.embedding.numpy(), loaded.encoder["embedding"], atol=ATOL_EMBEDDING, rtol=0
    )


def _check_case(
    model: EfficientViTSAM,
    embedding: torch.Tensor,
    encoder_ref: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    case: str,
) -> None:
    coords, labels = _prompt(ref, case)
    original_size = encoder_ref["image"].shape[:2]
    input_size = tuple(int(v) for v in encoder_ref["input_size"])
    with torch.inference_mode():
        low_res, iou = model.decode(embedding, coords, labels, original_size)
        logits = model.postprocess_masks(low_res, input_size, original_size)
        masks = model.threshold(logits)
    assert tuple(low_res.shape) == (1, 3, 256, 256) and tuple(iou.shape) == (1, 3)
    assert tuple(logits.shape) == (1, 3, *original_size)
    np.testing.assert_allclose(
        low_res[0].numpy(), ref[f"{case}__low_res_logits"], atol=ATOL_LOW_RES, rtol=0
    )
    np.testing.assert_allclose(
        iou[0].numpy(), ref[f"{case}__iou_predictions"], atol=ATOL_IOU, rtol=0
    )
    ref_logits = ref.get(f"{case}__logits")
    if ref_logits is not None:
        np.testing.assert_allclose(logits[0].numpy(), ref_logits, atol=ATOL_LOGITS, rtol=0)
        differ = masks[0].numpy() != ref[f"{case}__masks"]
        assert not differ[np.abs(ref_logits) >= 1e-4].any()
    else:  # no stored logits: at most 0.01 % of the mask pixels may differ
        differ = masks[0].numpy() != ref[f"{case}__masks"]
        assert differ.sum() <= 1e-4 * differ.size


@pytest.mark.parametrize(("fixture", "case"), CASES)
def test_decode_reference_embedding(loaded: Loaded, fixture: str, case: str) -> None:
    """The decoder alone, on the reference's own embedding."""
    ref = load_npz(_name(loaded.variant), fixture)
    embedding = torch.from_numpy(loaded.encoder["embedding"])
    _check_case(loaded.model, embedding, loaded.encoder, ref, case)


@pytest.mark.parametrize(("fixture", "case"), CASES)
def test_end_to_end(loaded: Loaded, fixture: str, case: str) -> None:
    """Image -> our preprocessing, encoder and decoder -> the reference outputs."""
    ref = load_npz(_name(loaded.variant), fixture)
    _check_case(loaded.model, loaded.embedding, loaded.encoder, ref, case)


def test_mask_input(loaded: Loaded) -> None:
    """SAM's mask prompt (refinement): rows with their own masks decode as one by one, the
    mask changes the result, and bad shapes are refused."""
    model = loaded.model
    original_size = loaded.encoder["image"].shape[:2]
    coords = torch.tensor([[[230.0, 140.0]], [[300.0, 110.0]]])
    labels = torch.ones(2, 1, dtype=torch.int64)
    with torch.inference_mode():
        low_res, _ = model.decode(loaded.embedding, coords, labels, original_size)
        masks = low_res[:, :1]
        refined, iou = model.decode(
            loaded.embedding, coords, labels, original_size, mask_input=masks
        )
        rows = [
            model.decode(
                loaded.embedding,
                coords[i : i + 1],
                labels[i : i + 1],
                original_size,
                mask_input=masks[i : i + 1],
            )
            for i in range(2)
        ]
    assert tuple(refined.shape) == (2, 3, 256, 256) and tuple(iou.shape) == (2, 3)
    assert (refined - low_res).abs().max() > 1e-3
    torch.testing.assert_close(torch.cat([r[0] for r in rows]), refined, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r[1] for r in rows]), iou, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mask_input"):
        model.decode(
            loaded.embedding, coords, labels, original_size, mask_input=torch.zeros(2, 256, 256)
        )
    with pytest.raises(ValueError, match="mask_input batch"):
        model.decode(
            loaded.embedding,
            coords,
            labels,
            original_size,
            mask_input=torch.zeros(3, 1, 256, 256),
        )


# ------------------------------------------------------------ segment everything (L0)


class CachingPredictor(Predictor):
    """Memoises decoder calls: ``amg`` and ``amg_all`` share the image and the grid."""

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


@pytest.fixture(scope="module")
def l0_predictor() -> Predictor:
    model = build_efficientvit_sam("l0").eval()
    model.load_state_dict(synthetic_state_dict("l0"), strict=True)
    return CachingPredictor(model)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "expected"), [("amg", 1), ("amg_all", 115)])
def test_l0_automatic_mask_generator(l0_predictor: Predictor, fixture: str, expected: int):
    """``EfficientViTSamAutomaticMaskGenerator`` records through our segment-everything
    (the image is 512 x 512: not resized for L models; grid points in the 1024 frame)."""
    ref = load_npz(_name("l0"), fixture)
    settings = json.loads(str(ref["settings_json"]))
    assert settings.pop("output_mode") == "binary_mask"
    records = segment_everything(ref["image"], l0_predictor, **settings)

    assert_amg_records(records, ref, expected)
    n_px = ref["image"].shape[0] * ref["image"].shape[1]
    exact = 0
    for i, r in enumerate(records):
        seg, want = r["segmentation"], ref["segmentation"][i]
        assert seg.dtype == bool and seg.shape == want.shape
        assert _mask_iou(seg, want) >= 0.999
        flipped = int((seg != want).sum())
        assert flipped <= 1e-4 * n_px
        assert r["area"] == int(seg.sum())
        assert abs(r["area"] - int(ref["area"][i])) <= flipped
        exact += flipped == 0
    assert exact >= 0.8 * len(records)


def test_l0_through_the_predictor(l0_predictor: Predictor) -> None:
    """``Predictor.set_image`` / ``predict`` (SAM's API) give the reference outputs: the
    predictor keeps the 1024-frame ``input_size`` that ``preprocess`` returns."""
    predictor = Predictor(l0_predictor.model)
    encoder_ref = load_npz(_name("l0"), "encoder")
    predictor.set_image(encoder_ref["image"])
    assert predictor.input_size == tuple(int(v) for v in encoder_ref["input_size"])
    ref = load_npz(_name("l0"), "box")
    masks, scores, low_res = predictor.predict(
        point_coords=ref["box_point__point_coords"],
        point_labels=ref["box_point__point_labels"],
        box=ref["box_point__box"],
        return_logits=True,
    )
    np.testing.assert_allclose(low_res, ref["box_point__low_res_logits"], atol=ATOL_LOW_RES, rtol=0)
    np.testing.assert_allclose(scores, ref["box_point__iou_predictions"], atol=ATOL_IOU, rtol=0)
    np.testing.assert_allclose(masks, ref["box_point__logits"], atol=ATOL_LOGITS, rtol=0)
