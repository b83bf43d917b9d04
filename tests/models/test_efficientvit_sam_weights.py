"""EfficientViT-SAM in the registry and the checkpoint machinery (Hugging Face SHA-256)."""

from __future__ import annotations

import functools
import re
from dataclasses import replace

import pytest
import torch

from napari_esam.models import weights
from napari_esam.models.loading import build_model
from napari_esam.models.registry import (
    MODEL_DESCRIPTIONS,
    MODEL_NAMES,
    create_model,
    model_description,
)
from napari_esam.models.synthetic import synthetic_state_dict
from napari_esam.models.weights import CheckpointError

NAMES = [f"efficientvit_sam_{v}" for v in ("l0", "l1", "l2", "xl0", "xl1")]


@functools.cache
def _l0_tensors() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in synthetic_state_dict(NAMES[0]).items()}


def _serve(monkeypatch, model: str, url: str, digest: str) -> None:
    spec = weights.CHECKPOINTS[model]
    monkeypatch.setitem(
        weights.CHECKPOINTS, model, replace(spec, url=f"{url}/{spec.filename}", sha256=digest)
    )


def test_registered_with_descriptions():
    assert set(NAMES) <= set(MODEL_NAMES)
    assert set(MODEL_DESCRIPTIONS) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        assert "—" in model_description(name)
    assert "fast" in model_description("efficientvit_sam_l0")
    assert "best quality" in model_description("efficientvit_sam_xl1")
    assert "slow on CPU" in model_description("efficientvit_sam_xl1")
    with pytest.raises(ValueError, match="unknown model"):
        model_description("efficientvit_sam_xl2")


def test_create_model_flags():
    model = create_model("efficientvit_sam_l0")
    assert model.name == "efficientvit_sam_l0" and not model.training
    assert model.has_negative_point_embedding and model.supports_mask_input
    assert model.img_size == 512


@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_specs(name):
    spec = weights.CHECKPOINTS[name]
    assert spec.model == name and spec.filename == f"{name}.pt"
    assert spec.url == (
        f"https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/{name}.pt"
    )
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert spec.git_blob_sha1 is None and spec.zip_member is None


def test_spec_needs_an_identity():
    with pytest.raises(ValueError, match="git blob id or a SHA-256"):
        weights.CheckpointSpec("x", "http://x/y.pt", "y.pt")


def test_download_verify_cache_and_load(server, cache, monkeypatch):
    root, url, requests = server
    name = NAMES[0]
    path = root / weights.CHECKPOINTS[name].filename
    torch.save(_l0_tensors(), path)  # the official format: a plain state dict
    _serve(monkeypatch, name, url, weights.sha256(path))

    net = build_model(name, device="cpu")
    cached = cache / path.name
    assert cached.is_file() and weights.sha256(cached) == weights.sha256(path)
    assert len(requests) == 1
    for key, value in net.state_dict().items():
        assert torch.equal(value, _l0_tensors()[key]), key
    build_model(name, device="cpu")  # the verified cache: no second download
    assert len(requests) == 1


def test_corrupt_download_is_rejected(server, cache, monkeypatch):
    root, url, _ = server
    name = NAMES[0]
    path = root / weights.CHECKPOINTS[name].filename
    path.write_bytes(b"0123456789" * 1000)
    _serve(monkeypatch, name, url, "0" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated \\(SHA-256"):
        weights.checkpoint_path(name, progressbar=False)
    assert list(cache.iterdir()) == []


def test_offline_error_names_the_file(cache, monkeypatch):
    name = NAMES[4]
    _serve(monkeypatch, name, "http://127.0.0.1:9", "0" * 64)
    with pytest.raises(CheckpointError, match="could not download") as info:
        weights.checkpoint_path(name, progressbar=False)
    assert str(cache / f"{name}.pt") in str(info.value)


def test_local_file_and_state_dict_wrapper(tmp_path):
    path = tmp_path / "l0.pt"
    torch.save({"state_dict": _l0_tensors()}, path)
    net = build_model(NAMES[0], checkpoint=path, device="cpu")
    key = "image_encoder.norm.weight"
    assert torch.equal(net.state_dict()[key], _l0_tensors()[key])


def test_wrong_variant_is_refused_naming_the_model():
    with pytest.raises(CheckpointError, match="does not fit model 'efficientvit_sam_l1'"):
        build_model("efficientvit_sam_l1", checkpoint=_l0_tensors(), device="cpu")
    mobilesam = synthetic_state_dict("mobilesam")
    with pytest.raises(CheckpointError, match="does not fit model 'efficientvit_sam_l0'"):
        build_model("efficientvit_sam_l0", checkpoint=mobilesam, device="cpu")


def test_strict_key_set():
    extra = dict(_l0_tensors())
    extra["image_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 unexpected keys"):
        build_model(NAMES[0], checkpoint=extra, device="cpu")
    missing = dict(_l0_tensors())
    del missing["mask_decoder.iou_token.weight"]
    with pytest.raises(CheckpointError, match="1 missing keys"):
        build_model(NAMES[0], checkpoint=missing, device="cpu")
