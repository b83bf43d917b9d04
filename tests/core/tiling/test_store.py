"""The on-disk embedding store: reuse, staleness, resumability, per-tile verification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_esam.core.tiling.predictor import TiledPredictor
from napari_esam.core.tiling.store import (
    ATTR,
    FORMAT_VERSION,
    EmbeddingStore,
    StaleEmbeddingStoreError,
    StoreSignature,
    model_fingerprint,
    read_signature,
)
from tests.fakes import FakeModel


def image(shape=(2500, 2300), seed=0):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


@pytest.fixture(scope="module")
def img():
    return image()


def click(tp, x=1200.0, y=1300.0):
    return tp.predict(np.array([[x, y]]), np.array([1]))


def test_second_session_uses_the_store_and_skips_the_encoder(tmp_path, img):
    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(img)
    m1, s1, l1 = click(tp)
    assert tp.encoder_calls == 1 and tp.store.n_done == 1
    again = TiledPredictor(FakeModel().eval(), store=path)
    again.set_image(img.copy())
    m2, s2, l2 = click(again)
    assert again.encoder_calls == 0 and again.model.encode_calls == 0 and again.store_hits == 1
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(l1, l2)
    assert read_signature(path) == tp.signature


def test_read_only_store_is_not_written(tmp_path, img):
    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(img)
    click(tp)
    ro = TiledPredictor(FakeModel().eval(), store=path, store_mode="r")
    ro.set_image(img)
    click(ro, 100.0, 100.0)  # not stored: computed, kept in memory only
    assert ro.encoder_calls == 1 and ro.store.n_done == 1
    with pytest.raises(FileNotFoundError):
        TiledPredictor(FakeModel(), store=tmp_path / "missing.zarr", store_mode="r").set_image(img)


@pytest.mark.parametrize(
    "change,message",
    [
        ("content", "image content"),
        ("halo", "halo"),
        ("tile", "tile size"),
        ("weights", "model weights"),
        ("contrast", "contrast limits"),
        ("shape", "image shape"),
    ],
)
def test_stale_store_is_rejected_with_the_reason(tmp_path, img, change, message):
    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(img)
    data, kwargs, model, limits = img, {}, FakeModel().eval(), None
    if change == "content":
        data = img.copy()
        data[::7, ::7] += 1  # touches the global sample
    elif change == "halo":
        kwargs = {"halo": 128}
    elif change == "tile":
        kwargs = {"tile": 512, "halo": 128}
    elif change == "weights":
        with torch.no_grad():
            model.dummy += 1
    elif change == "contrast":
        limits = (0.0, 100.0)
    elif change == "shape":
        data = img[:2400]
    other = TiledPredictor(model, store=path, **kwargs)
    with pytest.raises(StaleEmbeddingStoreError, match=message) as info:
        other.set_image(data, limits)
    assert "delete it" in str(info.value)
    with pytest.raises(StaleEmbeddingStoreError):  # no half-set state after the error
        other.set_image(data, limits)
    assert not other.is_image_set


def test_overwrite_mode_recreates_a_stale_store(tmp_path, img):
    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(img)
    click(tp)
    fresh = TiledPredictor(FakeModel().eval(), halo=128, store=path, store_mode="w")
    fresh.set_image(img)
    assert fresh.store.n_done == 0 and read_signature(path).halo == 128


def test_signature_is_format_2_and_none_means_per_plane_automatic_contrast(tmp_path, img):
    auto = TiledPredictor(FakeModel().eval(), store=tmp_path / "auto.zarr")
    auto.set_image(img)
    sig = read_signature(tmp_path / "auto.zarr")
    assert sig.format == FORMAT_VERSION == 2
    assert sig.contrast_limits is None  # each plane's own limits, computed when encoding
    given = TiledPredictor(FakeModel().eval(), store=tmp_path / "given.zarr")
    given.set_image(img, (0, 4000))
    assert read_signature(tmp_path / "given.zarr").contrast_limits == (0.0, 4000.0)


def test_a_version_1_store_is_stale_and_overwrite_recreates_it(tmp_path, img):
    import zarr

    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(img)
    click(tp)
    group = zarr.open_group(str(path), mode="r+")  # as written by an earlier version
    group.attrs[ATTR] = {**dict(group.attrs[ATTR]), "format": 1}
    other = TiledPredictor(FakeModel().eval(), store=path)
    with pytest.raises(StaleEmbeddingStoreError, match="store format: store has 1, this input "
                                                       "has 2"):
        other.set_image(img)
    fresh = TiledPredictor(FakeModel().eval(), store=path, store_mode="w")
    fresh.set_image(img)
    assert fresh.store.n_done == 0 and read_signature(path).format == 2


def test_embedding_is_resumable(tmp_path, img):
    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(img)
    total = tp.grid.n_tiles

    def stop_after_two(done, n):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tp.embed_all(progress=stop_after_two)
    assert tp.store.n_done == 2
    again = TiledPredictor(FakeModel().eval(), store=path)
    again.set_image(img)
    assert again.embed_all() == total - 2
    assert again.store.n_done == total and again.store.done_mask().all()
    assert again.embed_all() == 0


def test_verify_tiles_recomputes_edited_tiles(tmp_path):
    img = image((2500, 2300))
    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(img)
    tp.embed_all()
    edited = img.copy()
    edited[1301, 1203] += 1  # not in the strided sample: same content hash
    assert TiledPredictor(FakeModel().eval(), store=path).set_image(edited) is None
    trusting = TiledPredictor(FakeModel().eval(), store=path)
    trusting.set_image(edited)
    click(trusting)
    assert trusting.encoder_calls == 0
    checking = TiledPredictor(FakeModel().eval(), store=path, verify_tiles=True)
    checking.set_image(edited)
    click(checking)
    assert checking.encoder_calls == 1
    click(checking, 100.0, 100.0)  # an unedited tile passes the check
    assert checking.encoder_calls == 1 and checking.store_hits == 1


def test_stack_store_keeps_planes_apart(tmp_path):
    stack = np.stack([image((2100, 2200), seed=s) for s in range(2)])
    path = tmp_path / "emb.zarr"
    tp = TiledPredictor(FakeModel().eval(), store=path)
    tp.set_image(stack, index=(1,))
    click(tp)
    store = tp.store
    assert store.done_mask((1,)).sum() == 1 and store.done_mask((0,)).sum() == 0
    assert store.grid.shape == (2100, 2200) and store.lead == (2,)
    tp.set_index((0,))
    click(tp)
    assert store.n_done == 2 and tp.encoder_calls == 2
    a, _ = store.load((0,), *tp.grid.tile_of(1300, 1200).key)
    b, _ = store.load((1,), *tp.grid.tile_of(1300, 1200).key)
    assert not np.array_equal(a, b)


def test_store_api_errors(tmp_path, img):
    sig = StoreSignature.for_image(img, FakeModel(), tile=1024, halo=256)
    store = EmbeddingStore.open(tmp_path / "s.zarr", sig)
    with pytest.raises(KeyError):
        store.load((), 0, 0)
    with pytest.raises(IndexError):
        store.has((0,), 0, 0)
    store.save((), 0, 1, np.ones((256, 64, 64)), (1024, 1024), "00" * 16)
    ro = EmbeddingStore.open(tmp_path / "s.zarr", sig, mode="r")
    feats, size = ro.load((), 0, 1)
    assert feats.shape == (256, 64, 64) and feats.dtype == np.float32 and size == (1024, 1024)
    with pytest.raises(OSError, match="read-only"):
        ro.save((), 0, 0, feats, size, "00" * 16)
    import zarr

    zarr.create_array(str(tmp_path / "other.zarr"), shape=(4,), dtype="uint8")
    with pytest.raises(ValueError, match="not a napari-esam embedding store"):
        EmbeddingStore.open(tmp_path / "other.zarr", sig, mode="w")
    with pytest.raises(ValueError, match="mode"):
        EmbeddingStore.open(tmp_path / "x.zarr", sig, mode="x")


def test_model_fingerprint_follows_the_weights():
    a, b = FakeModel(), FakeModel()
    assert model_fingerprint(a) == model_fingerprint(b)
    c = FakeModel()
    with torch.no_grad():
        c.dummy += 0.5
    assert model_fingerprint(c) != model_fingerprint(a)


def test_model_fingerprint_cache_sees_in_place_changes():
    m = FakeModel()
    before = model_fingerprint(m)
    with torch.no_grad():
        m.dummy.add_(1.0)
    assert model_fingerprint(m) != before
    m.load_state_dict({"dummy": torch.zeros(1)})
    assert model_fingerprint(m) == before
