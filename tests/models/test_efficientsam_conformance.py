"""Conformance of our EfficientSAM (Ti, S) with the reference outputs on synthetic weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_esam.models.efficientsam import EfficientSAM, build_efficientsam
from tests._conformance import load_npz, manifest, manifest_state_dict

MODELS = ["efficientsam_ti", "efficientsam_s"]
CASES = [("points", "single"), ("points", "multi"), ("box", "box"), ("box", "box_point")]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request) -> tuple[str, EfficientSAM, torch.Tensor]:
    """(name, model with the synthetic weights, embedding of the fixture input)."""
    name = request.param
    sd = {k: torch.from_numpy(v) for k, v in manifest_state_dict(name).items()}
    model = build_efficientsam(name.rsplit("_", 1)[1]).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.from_numpy(load_npz("efficientsam_ti", "encoder")["input"])
    with torch.inference_mode():
        embedding = model.encode(x)
    return name, model, embedding


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_matches_manifest(name: str) -> None:
    model = build_efficientsam(name.rsplit("_", 1)[1])
    assert model.name == name
    entries = [(e["name"], tuple(e["shape"])) for e in manifest(name)]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == entries
    assert tuple(model.pixel_mean.shape) == tuple(model.pixel_std.shape) == (1, 3, 1, 1)


def test_preprocess_encoder_image() -> None:
    ref = load_npz("efficientsam_ti", "encoder")
    model = build_efficientsam("ti")
    x, input_size = model.preprocess(ref["image"])
    assert input_size == (1024, 1024)
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 3, 1024, 1024)
    np.testing.assert_allclose(x.numpy(), ref["input"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_preprocess_large(name: str) -> None:
    ref = load_npz(name, "preprocess_large")
    model = build_efficientsam(name.rsplit("_", 1)[1])
    x, _ = model.preprocess(ref["image"])
    sampled = x[0][:, ref["rows"]][:, :, ref["cols"]].numpy()
    np.testing.assert_allclose(sampled, ref["input_sampled"], atol=1e-5, rtol=0)


def test_embedding(loaded) -> None:
    name, _, embedding = loaded
    ref = load_npz(name, "encoder")["embedding"]
    np.testing.assert_allclose(embedding.numpy(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("file", "case"), CASES)
def test_decode(loaded, file: str, case: str) -> None:
    name, model, embedding = loaded
    ref = load_npz(name, file)
    image = load_npz(name, "encoder")["image"]
    size = image.shape[:2]
    coords = torch.from_numpy(ref[f"{case}__point_coords"])[None]
    labels = torch.from_numpy(ref[f"{case}__point_labels"])[None]
    with torch.inference_mode():
        low_res, iou = model.decode(embedding, coords, labels, size, multimask_output=True)
        logits = model.postprocess_masks(low_res, (1024, 1024), size)
    assert tuple(low_res.shape) == (1, 3, 256, 256) and tuple(iou.shape) == (1, 3)
    np.testing.assert_allclose(
        low_res[0].numpy(), ref[f"{case}__low_res_logits"], atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(iou[0].numpy(), ref[f"{case}__iou_predictions"], atol=1e-5, rtol=0)
    ref_logits = ref[f"{case}__logits"]
    np.testing.assert_allclose(logits[0].numpy(), ref_logits, atol=2e-4, rtol=0)

    order = torch.argsort(iou[0], descending=True).numpy()
    np.testing.assert_array_equal(order, ref[f"{case}__sorted_ids"])
    masks = model.threshold(logits[0][order]).numpy()
    certain = np.abs(ref_logits[order]) >= 1e-4
    np.testing.assert_array_equal(masks[certain], ref[f"{case}__masks"][certain])


def test_batched_decode_consistency(loaded) -> None:
    """Shared (1, ...) embedding == per-row embeddings == one prompt at a time, over several
    chunks; autograd mode (no in-place fast paths) gives the same result."""
    name, model, embedding = loaded
    ref = load_npz(name, "box")
    coords = torch.from_numpy(ref["box_point__point_coords"])
    labels = torch.from_numpy(ref["box_point__point_labels"])
    coords = torch.stack([coords, coords + 7.0, coords * 0.5])
    labels = torch.stack([labels, labels, torch.tensor([0, 2, 3])])
    size = (300, 451)
    decoder = model.mask_decoder
    chunk_size = decoder.chunk_size
    with torch.inference_mode():
        shared, iou_s = model.decode(embedding, coords, labels, size)
        rows = [
            model.decode(embedding, coords[i : i + 1], labels[i : i + 1], size) for i in range(3)
        ]
        try:
            decoder.chunk_size = 2  # two chunks, the last one partial
            chunked, iou_c = model.decode(embedding, coords, labels, size)
            tiled, iou_t = model.decode(embedding.expand(3, -1, -1, -1), coords, labels, size)
        finally:
            decoder.chunk_size = chunk_size
    np.testing.assert_allclose(shared[0].numpy(), ref["box_point__low_res_logits"], atol=1e-4)
    for other, other_iou in [
        (torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])),
        (chunked, iou_c),
        (tiled, iou_t),
    ]:
        torch.testing.assert_close(other, shared, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other_iou, iou_s, atol=1e-6, rtol=1e-6)
    grad, iou_g = model.decode(embedding.clone(), coords, labels, size)
    assert grad.requires_grad
    torch.testing.assert_close(grad.detach(), shared, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou_g.detach(), iou_s, atol=1e-6, rtol=1e-6)


def test_single_mask_output(loaded) -> None:
    """multimask_output=False is mask token 0; checked against the plain module path
    (all tokens, NCHW ConvTranspose2d / GroupNorm modules)."""
    name, model, embedding = loaded
    ref = load_npz(name, "points")
    coords = torch.from_numpy(ref["multi__point_coords"])[None].repeat(2, 1, 1)
    labels = torch.from_numpy(ref["multi__point_labels"])[None].repeat(2, 1)
    coords[1] += 11.0
    size = (300, 451)
    decoder = model.mask_decoder
    with torch.inference_mode():
        masks, iou = model.decode(embedding, coords, labels, size, multimask_output=False)
        c, lab = model.prepare_points(coords, labels, size)
        sparse = model.prompt_encoder(c, lab)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        tokens = torch.cat([tokens[None].expand(2, -1, -1), sparse], dim=1)
        hs, src = decoder.transformer(embedding, model.prompt_encoder.get_dense_pe(), tokens)
        up = src.transpose(1, 2).reshape(2, 256, 64, 64)
        for layer in decoder.final_output_upscaling_layers:
            up = layer(up)
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1])
        expected = torch.einsum("bc,bchw->bhw", hyper, up)[:, None]
        expected_iou = decoder.iou_prediction_head(hs[:, 0])[:, :1]
    assert tuple(masks.shape) == (2, 1, 256, 256) and tuple(iou.shape) == (2, 1)
    torch.testing.assert_close(masks, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, expected_iou, atol=1e-5, rtol=1e-5)


def test_point_padding_and_truncation() -> None:
    model = build_efficientsam("ti")
    coords = torch.tensor([[[10.0, 20.0], [-3.0, 5.0]]])
    labels = torch.tensor([[1, 0]])
    c, lab = model.prepare_points(coords, labels, (100, 200))
    assert tuple(c.shape) == (1, 6, 2) and lab.tolist() == [[1, 0, -1, -1, -1, -1]]
    assert c[0, 0].tolist() == pytest.approx([10.0 * 1024 / 200, 20.0 * 1024 / 100])
    assert c[0, 1].tolist() == pytest.approx([-1.0, 5.0 * 1024 / 100])
    assert (c[0, 2:] == -1).all()
    many = torch.arange(16, dtype=torch.float32).view(1, 8, 2)
    c, lab = model.prepare_points(many, torch.ones(1, 8, dtype=torch.int64), (1024, 1024))
    assert tuple(c.shape) == (1, 6, 2) and torch.equal(c, many[:, :6])
