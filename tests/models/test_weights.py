"""Checkpoint download, verification, cache and safe loading, against a local HTTP server."""

from __future__ import annotations

import functools
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from napari_esam.models import weights
from napari_esam.models.loading import build_model
from napari_esam.models.synthetic import synthetic_state_dict
from napari_esam.models.weights import CheckpointError, git_blob_sha1


@functools.cache
def _tensors(model: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in synthetic_state_dict(model).items()}


def write_official_format(model: str, folder: Path) -> Path:
    """Write a synthetic checkpoint in the official file format of ``model``."""
    spec = weights.CHECKPOINTS[model]
    path = folder / spec.filename
    if model == "mobilesam":
        torch.save(_tensors(model), path)
    elif model == "efficientsam_ti":
        torch.save({"model": _tensors(model)}, path)
    else:
        inner = folder / spec.zip_member
        torch.save({"model": _tensors(model)}, inner)
        with zipfile.ZipFile(path, "w") as zf:
            zf.write(inner, spec.zip_member)
        inner.unlink()
    return path


def serve(monkeypatch, model: str, url: str, blob: str) -> None:
    spec = weights.CHECKPOINTS[model]
    monkeypatch.setitem(
        weights.CHECKPOINTS, model, replace(spec, url=f"{url}/{spec.filename}", git_blob_sha1=blob)
    )


@pytest.mark.parametrize("model", ["efficientsam_ti", "efficientsam_s", "mobilesam"])
def test_download_verify_cache_and_load(model, server, cache, monkeypatch):
    root, url, requests = server
    path = write_official_format(model, root)
    serve(monkeypatch, model, url, git_blob_sha1(path))

    net = build_model(model, device="cpu")
    cached = cache / weights.CHECKPOINTS[model].filename
    assert cached.is_file() and git_blob_sha1(cached) == git_blob_sha1(path)
    assert len(requests) == 1
    for key, value in net.state_dict().items():
        if key in _tensors(model):
            assert torch.equal(value, _tensors(model)[key]), key
    # a second build uses the verified cache and never downloads again
    build_model(model, device="cpu")
    assert len(requests) == 1
    assert [p.name for p in cache.iterdir()] == [cached.name]


def test_corrupt_download_is_rejected_and_not_cached(server, cache, monkeypatch):
    root, url, _ = server
    path = write_official_format("mobilesam", root)
    blob = git_blob_sha1(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated on the server
    serve(monkeypatch, "mobilesam", url, blob)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        weights.checkpoint_path("mobilesam", progressbar=False)
    assert list(cache.iterdir()) == []  # nothing left behind, not even a temp folder


def test_corrupt_cached_file_is_replaced(server, cache, monkeypatch):
    root, url, requests = server
    path = write_official_format("mobilesam", root)
    serve(monkeypatch, "mobilesam", url, git_blob_sha1(path))
    cache.mkdir(parents=True)
    (cache / "mobile_sam.pt").write_bytes(b"garbage")
    got = weights.checkpoint_path("mobilesam", progressbar=False)
    assert git_blob_sha1(got) == git_blob_sha1(path) and len(requests) == 1


def test_offline_error_says_where_to_put_the_file(cache, monkeypatch):
    serve(monkeypatch, "mobilesam", "http://127.0.0.1:9", "0" * 40)  # nothing listens on port 9
    with pytest.raises(CheckpointError, match="could not download") as info:
        weights.checkpoint_path("mobilesam", progressbar=False)
    assert str(cache / "mobile_sam.pt") in str(info.value)
    assert "checkpoint=PATH" in str(info.value)


def test_no_download_mode_explains(cache):
    with pytest.raises(CheckpointError, match="not in the cache"):
        weights.checkpoint_path("efficientsam_ti", download=False)


def test_local_path_and_in_memory_state_dict(tmp_path):
    path = write_official_format("efficientsam_ti", tmp_path)
    a = build_model("efficientsam_ti", checkpoint=path, device="cpu")
    b = build_model("efficientsam_ti", checkpoint=synthetic_state_dict("efficientsam_ti"))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_in_memory_numpy_state_dict_with_0d_entries():
    """MobileSAM's num_batches_tracked are 0-d int64: they must stay 0-d."""
    state = synthetic_state_dict("mobilesam")
    assert state["image_encoder.patch_embed.seq.0.bn.num_batches_tracked"].shape == ()
    frozen = {k: v.copy() for k, v in state.items()}
    for v in frozen.values():
        v.flags.writeable = False
    net = build_model("mobilesam", checkpoint=frozen, device="cpu")
    assert net.state_dict()["image_encoder.patch_embed.seq.0.bn.num_batches_tracked"].shape == ()


def test_truncated_local_file(tmp_path):
    path = write_official_format("mobilesam", tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        build_model("mobilesam", checkpoint=path, device="cpu")


def test_wrong_format_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as err:
        build_model("mobilesam", checkpoint=path, device="cpu")
    assert "weights_only" not in str(err.value)  # no advice to load it unsafely


def test_missing_local_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_model("mobilesam", checkpoint=tmp_path / "nope.pt", device="cpu")


def test_zip_without_checkpoint(tmp_path):
    path = tmp_path / "weights.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="exactly one .pt file"):
        build_model("efficientsam_s", checkpoint=path, device="cpu")


def test_wrong_model_checkpoint(tmp_path):
    path = write_official_format("mobilesam", tmp_path)
    with pytest.raises(CheckpointError, match="does not fit model 'efficientsam_ti'"):
        build_model("efficientsam_ti", checkpoint=path, device="cpu")


class Payload:
    """An object a weights-only load must refuse to unpickle."""


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        build_model("mobilesam", checkpoint=path, device="cpu")


def test_non_tensor_entries_are_rejected():
    with pytest.raises(CheckpointError, match="not a tensor"):
        build_model("mobilesam", checkpoint={"a": "b"}, device="cpu")


def test_unknown_model_and_device_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("sam_huge", checkpoint={})
    with pytest.raises(ValueError, match="unknown device"):
        build_model("mobilesam", checkpoint={}, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        build_model("mobilesam", checkpoint={}, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU half-precision error")
def test_half_precision_is_cuda_only():
    with pytest.raises(ValueError, match="only supported on CUDA"):
        build_model("mobilesam", checkpoint={}, device="cpu", dtype="float16")


def test_git_blob_sha1_matches_git(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello\n")
    # `printf 'hello\n' | git hash-object --stdin`
    assert git_blob_sha1(path) == "ce013625030ba8dba906f756967f9e9ca394464a"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused(tmp_path, bad):
    state = {k: torch.from_numpy(v.copy()) for k, v in synthetic_state_dict("mobilesam").items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[key][0, 0] = bad
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=f"{key}.*NaN or infinite"):
        build_model("mobilesam", checkpoint=path, device="cpu")
