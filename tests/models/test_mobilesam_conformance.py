"""Conformance of our MobileSAM with the reference outputs on synthetic weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_esam.models.mobilesam import MobileSAM, build_mobilesam
from napari_esam.models.tiny_vit import WindowAttention
from tests._conformance import load_npz, manifest, manifest_state_dict

NAME = "mobilesam"
CASES = [("points", "single"), ("points", "multi"), ("box", "box"), ("box", "box_point")]


def _state_dict() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in manifest_state_dict(NAME).items()}


@pytest.fixture(scope="module")
def model() -> MobileSAM:
    """MobileSAM with the synthetic weights, loaded strictly, in eval mode."""
    m = build_mobilesam().eval()
    m.load_state_dict(_state_dict(), strict=True)
    return m


@pytest.fixture(scope="module")
def encoder_ref() -> dict[str, np.ndarray]:
    return load_npz(NAME, "encoder")


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


def test_state_dict_matches_manifest() -> None:
    m = build_mobilesam()
    assert m.name == NAME and not m.mask_threshold_inclusive and m.max_points is None
    entries = [(e["name"], tuple(e["shape"])) for e in manifest(NAME)]
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == entries
    assert tuple(m.pixel_mean.shape) == tuple(m.pixel_std.shape) == (3, 1, 1)
    attns = [mod for mod in m.modules() if isinstance(mod, WindowAttention)]
    assert len(attns) == 10
    assert {tuple(a.attention_bias_idxs.shape) for a in attns} == {(49, 49), (196, 196)}


def test_bias_table_is_refreshed_after_loading() -> None:
    """``ab`` follows the loaded ``attention_biases`` even when eval() came first."""
    m = build_mobilesam().eval()  # the reference's order: eval, then load
    m.load_state_dict(_state_dict(), strict=True)
    sd = manifest_state_dict(NAME)
    for name, mod in m.named_modules():
        if isinstance(mod, WindowAttention):
            loaded = torch.from_numpy(sd[f"{name}.attention_biases"])
            expected = loaded[:, mod.attention_bias_idxs]
            assert mod.ab.abs().max() > 0
            torch.testing.assert_close(mod.ab, expected, rtol=0, atol=0)
            # the offset index: |dy| * window + |dx|, 0 on the diagonal, symmetric
            idx = mod.attention_bias_idxs
            assert int(idx.max()) + 1 == loaded.shape[1]
            assert bool((idx.diagonal() == 0).all()) and bool((idx == idx.T).all())
    # an in-place change followed by eval() is picked up as well
    attn = next(mod for mod in m.modules() if isinstance(mod, WindowAttention))
    with torch.no_grad():
        attn.attention_biases.add_(1.0)
    m.eval()
    torch.testing.assert_close(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])


@pytest.mark.parametrize("fixture", ["encoder", "preprocess_large"])
def test_preprocess(model: MobileSAM, fixture: str) -> None:
    ref = load_npz(NAME, fixture)
    np.testing.assert_array_equal(model.resize(ref["image"]), ref["resized"])
    x, input_size = model.preprocess(ref["image"])
    assert input_size == tuple(int(v) for v in ref["input_size"])
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 3, 1024, 1024)
    np.testing.assert_allclose(x.numpy(), ref["input"], atol=1e-5, rtol=0)


def test_embedding(model: MobileSAM, encoder_ref: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        embedding = model.encode(torch.from_numpy(encoder_ref["input"]))
    assert tuple(embedding.shape) == (1, 256, 64, 64)
    np.testing.assert_allclose(embedding.numpy(), encoder_ref["embedding"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("fixture", "case"), CASES)
def test_decode(
    model: MobileSAM, encoder_ref: dict[str, np.ndarray], fixture: str, case: str
) -> None:
    ref = load_npz(NAME, fixture)
    coords, labels = _prompt(ref, case)
    image = encoder_ref["image"]
    original_size = image.shape[:2]
    input_size = tuple(int(v) for v in encoder_ref["input_size"])
    embedding = torch.from_numpy(encoder_ref["embedding"])
    with torch.inference_mode():
        low_res, iou = model.decode(embedding, coords, labels, original_size)
        logits = model.postprocess_masks(low_res, input_size, original_size)
        masks = model.threshold(logits)
    assert tuple(low_res.shape) == (1, 3, 256, 256) and tuple(iou.shape) == (1, 3)
    assert tuple(logits.shape) == (1, 3, *original_size)
    np.testing.assert_allclose(
        low_res[0].numpy(), ref[f"{case}__low_res_logits"], atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(iou[0].numpy(), ref[f"{case}__iou_predictions"], atol=1e-5, rtol=0)
    ref_logits = ref[f"{case}__logits"]
    np.testing.assert_allclose(logits[0].numpy(), ref_logits, atol=2e-4, rtol=0)
    differ = masks[0].numpy() != ref[f"{case}__masks"]
    assert not differ[np.abs(ref_logits) >= 1e-4].any()


def test_batched_decode_matches_rows(model: MobileSAM, encoder_ref: dict[str, np.ndarray]) -> None:
    """Rows on a shared (1, ...) embedding, on a per-row (B, ...) embedding and one by one
    agree (several chunks, the last of one row, and padding labels inside rows)."""
    original_size = encoder_ref["image"].shape[:2]
    embedding = torch.from_numpy(encoder_ref["embedding"])
    coords = torch.tensor(
        [
            [[230, 140], [300, 110]],
            [[60, 250], [0, 0]],
            [[400, 20], [10, 290]],
            [[5, 5], [450, 299]],
            [[100, 100], [50, 60]],
        ],
        dtype=torch.float32,
    )
    labels = torch.tensor([[1, 1], [1, -1], [0, 1], [1, 0], [-1, 1]])
    b = len(coords)
    assert b % model.mask_decoder.rows_per_chunk == 1
    with torch.inference_mode():
        shared = model.decode(embedding, coords, labels, original_size)
        per_row = model.decode(embedding.expand(b, -1, -1, -1), coords, labels, original_size)
        single = [
            model.decode(embedding, coords[i : i + 1], labels[i : i + 1], original_size)
            for i in range(b)
        ]
        one = model.decode(embedding, coords, labels, original_size, multimask_output=False)
    for out in (per_row, tuple(torch.cat(t) for t in zip(*single, strict=True))):
        torch.testing.assert_close(out[0], shared[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1], shared[1], atol=1e-5, rtol=0)
    assert tuple(one[0].shape) == (b, 1, 256, 256) and tuple(one[1].shape) == (b, 1)


def test_decode_rejects_bad_prompts(model: MobileSAM) -> None:
    embedding = torch.zeros(1, 256, 64, 64)
    coords = torch.zeros(2, 1, 2)
    with pytest.raises(ValueError):
        model.decode(embedding, coords, torch.tensor([[1], [4]]), (100, 100))
    with pytest.raises(ValueError):
        model.decode(embedding, coords, torch.ones(2, 2, dtype=torch.long), (100, 100))
    with pytest.raises(ValueError):
        model.decode(torch.zeros(3, 256, 64, 64), coords, torch.ones(2, 1), (100, 100))
