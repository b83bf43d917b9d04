"""Tiled mode of the "Segment everything" controller (no Qt: a bare ``ViewerModel``) and
:func:`~napari_esam.core.runs.tiled_batch.run_tiled_batch`, with the fast blob model.

The reference is :func:`segment_everything_tiled` called directly on the same image; the
controller's model comes from ``model_factory`` (:class:`CountingBlobModel` where encoder
runs are counted; the per-process model cache is emptied first).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from napari.components import ViewerModel

from napari_esam.core.runs import pipeline as B
from napari_esam.core.runs.pipeline import BatchResult, BatchSettings, EverythingParams, ModelSpec
from napari_esam.core.runs.tiled_batch import (
    TILED_ATTR,
    TiledBatchResult,
    TiledOutputError,
    TiledProgress,
    run_tiled_batch,
)
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.merge import TileScratch, segment_everything_tiled
from napari_esam.widgets.everything.controller import (
    EverythingController,
    EverythingForm,
    progress_text,
    use_tiling,
)
from napari_esam.widgets.workers import run_sync
from tests.batch_fakes import FAST, BlobModel
from tests.batch_fakes import blob_stack as small_stack
from tests.tiled_fakes import FAST_TILED, HALO, TILE, blob_image, blob_stack

SHAPE = (600, 700)
N_TILES = TileGrid(SHAPE, TILE, HALO).n_tiles  # 3 x 4


class CountingBlobModel(BlobModel):
    """The blob model, counting encoder runs; ``on_encode(n)`` runs in the worker thread."""

    encodes = 0
    on_encode = None

    def encode(self, x):
        CountingBlobModel.encodes += 1
        if CountingBlobModel.on_encode is not None:
            CountingBlobModel.on_encode(CountingBlobModel.encodes)
        return super().encode(x)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(B, "_MODELS", {})
    monkeypatch.setattr(CountingBlobModel, "encodes", 0)
    monkeypatch.setattr(CountingBlobModel, "on_encode", None)
    return CountingBlobModel


@pytest.fixture(scope="module")
def reference():
    image = blob_image(SHAPE)
    details: dict = {}
    labels = segment_everything_tiled(image, BlobModel().eval(), tile=TILE, halo=HALO,
                                      details=details, **FAST_TILED)
    assert details["merged"] > 0 and details["objects"] > 10  # both seam rules at work
    return image, labels, details


def tiled_form(**changes) -> EverythingForm:
    """Tiled mode on, 256/64 tiles, the global contrast rule (as the reference)."""
    form = EverythingForm(device="cpu", layer_contrast=False, tiled="on", tile=TILE,
                          halo=HALO, params=EverythingParams(**FAST_TILED))
    for key, value in changes.items():
        setattr(form, key, value)
    return form


def make_controller(viewer, tmp_path, factory=CountingBlobModel):
    ctl = EverythingController(viewer, runner=run_sync, model_factory=factory,
                               workdir=tmp_path / "work")
    ctl.events, ctl.results, ctl.errors = [], [], []
    ctl.on_progress = ctl.events.append
    ctl.on_finished = ctl.results.append
    ctl.on_error = ctl.errors.append
    return ctl


def test_tiled_controller_gives_the_labels_of_segment_everything_tiled(tmp_path, reference,
                                                                       counting):
    image, ref, details = reference
    viewer = ViewerModel()
    viewer.add_image(image, name="slide", scale=(0.5, 0.5))
    ctl = make_controller(viewer, tmp_path)
    ctl.start("slide", tiled_form())  # a Labels layer only: a working store in workdir
    assert ctl.errors == []
    result = ctl.results[-1]
    assert isinstance(result, TiledBatchResult) and not result.cancelled and result.complete
    assert result.counts == {0: details["objects"]}
    assert result.tiles_done == result.tiles_total == N_TILES
    assert counting.encodes == N_TILES  # every tile encoded once

    layer = viewer.layers["slide everything"]
    assert isinstance(layer.data, zarr.Array) and layer.data.read_only  # lazy, read-only
    np.testing.assert_array_equal(np.asarray(layer.data), ref)
    assert list(layer.scale) == [0.5, 0.5]
    meta = layer.metadata["napari-esam"]
    assert meta["counts"] == {0: details["objects"]} and meta["complete"]
    assert meta["tiled"]["tile"] == TILE and meta["tiled"]["halo"] == HALO
    assert meta["tiled"]["store"].startswith(str(tmp_path / "work"))
    assert ctl.summary(result).startswith(f"Done: 1 / 1 slices, {details['objects']} objects")

    # progress counts tiles: start, every tile segmented, then every tile merged
    assert all(isinstance(ev, TiledProgress) for ev in ctl.events)
    assert ctl.events[0].kind == "start" and ctl.events[0].done == 0
    tiles = [ev.done for ev in ctl.events if ev.kind == "tile"]
    merges = [ev.done for ev in ctl.events if ev.kind == "merge"]
    assert tiles == list(range(1, N_TILES + 1)) and merges == list(range(1, N_TILES + 1))
    assert progress_text(ctl.events[1]).startswith(f"1 / {N_TILES} tiles · ")
    assert progress_text(ctl.events[-1]) == f"merging seams · {N_TILES} / {N_TILES} tiles"

    # the same run again reuses the finished working store: no encoder call
    counting.encodes = 0
    ctl.start("slide", tiled_form())
    again = ctl.results[-1]
    assert again.already_complete and counting.encodes == 0
    np.testing.assert_array_equal(np.asarray(viewer.layers["slide everything [1]"].data), ref)


def test_auto_mode_tiles_planes_longer_than_2048_px(tmp_path):
    assert EverythingForm().tiled == "auto"
    assert (EverythingForm().tile, EverythingForm().halo) == (1024, 256)
    assert use_tiling("auto", (2049, 100)) and use_tiling("auto", (4, 100, 3000))
    assert use_tiling("auto", (100, 2049, 3), rgb=True)
    assert not use_tiling("auto", (2048, 2048))
    assert not use_tiling("auto", (2048, 2048, 3), rgb=True)  # the colour axis is no side
    assert use_tiling("on", (64, 64)) and not use_tiling("off", (9000, 9000))
    with pytest.raises(ValueError, match="tiled mode must be one of"):
        use_tiling("maybe", (64, 64))

    # per layer, without reading pixels: a lazy 3000 x 2500 plane, a multiscale layer
    # (judged by level 0, 4096 px, not by level 1, 2048 px) and a small image
    viewer = ViewerModel()
    viewer.add_image(da.zeros((3000, 2500), dtype=np.uint16, chunks=1024), name="big",
                     contrast_limits=(0, 1))
    viewer.add_image([da.zeros((4096, 4096), dtype=np.uint8, chunks=1024),
                      da.zeros((2048, 2048), dtype=np.uint8, chunks=1024)],
                     multiscale=True, name="pyramid", contrast_limits=(0, 1))
    stack, counts = small_stack(2)
    viewer.add_image(stack, name="small")
    ctl = make_controller(viewer, tmp_path, factory=BlobModel)
    assert ctl.is_tiled("big", "auto") and ctl.is_tiled("pyramid", "auto")
    assert not ctl.is_tiled("small", "auto") and ctl.is_tiled("small", "on")
    assert not ctl.is_tiled("big", "off") and not ctl.is_tiled("", "on")

    # auto on a small stack: the per-slice batch path, as before
    ctl.start("small", EverythingForm(device="cpu", params=EverythingParams(**FAST)))
    result = ctl.results[-1]
    assert type(result) is BatchResult and list(result.counts.values()) == counts


def test_a_cancelled_tiled_run_keeps_its_tiles_and_a_rerun_resumes(tmp_path, reference,
                                                                   counting):
    image, ref, details = reference
    viewer = ViewerModel()
    viewer.add_image(image, name="slide")
    ctl = make_controller(viewer, tmp_path)
    out = tmp_path / "slide_labels.zarr"
    form = tiled_form(zarr_path=str(out))
    # cancel from the worker thread while the 5th tile is encoded
    counting.on_encode = lambda n: ctl.cancel() if n == 5 else None
    ctl.start("slide", form)
    assert ctl.errors == []
    stopped = ctl.results[-1]
    assert stopped.cancelled and not stopped.complete and stopped.counts == {}
    finished = TileScratch(str(out) + ".tiles.zarr").done()
    assert 1 <= len(finished) <= 5 and stopped.tiles_done == len(finished)
    assert ctl.summary(stopped).startswith(f"Cancelled: {len(finished)} / {N_TILES} tiles")
    assert not zarr.open_group(out, mode="r").attrs[TILED_ATTR]["complete"]

    counting.on_encode = None
    counting.encodes = 0
    ctl.start("slide", form)
    result = ctl.results[-1]
    assert not result.cancelled and result.counts == {0: details["objects"]}
    assert counting.encodes == N_TILES - len(finished)  # finished tiles were not recomputed
    assert result.details["skipped"] == len(finished)
    starts = [ev for ev in ctl.events if ev.kind == "start"]
    assert starts[-1].done == starts[-1].skipped == len(finished)
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[:], ref)
    np.testing.assert_array_equal(np.asarray(viewer.layers["slide everything [1]"].data), ref)
    rec = zarr.open_group(out, mode="r").attrs[TILED_ATTR]
    assert rec["complete"] and rec["slices"] == {"0": details["objects"]}
    assert not (tmp_path / "slide_labels.zarr.tiles.zarr").exists()


def test_tiled_controller_refuses_what_tiled_mode_cannot_do(tmp_path, counting):
    viewer = ViewerModel()
    stack = blob_stack(2)
    viewer.add_image(stack, name="stack")
    ctl = make_controller(viewer, tmp_path)
    with pytest.raises(ValueError, match="the halo must be between 0 and tile/2 = 128"):
        ctl.start("stack", tiled_form(halo=200))
    with pytest.raises(ValueError, match="crops"):
        ctl.start("stack", tiled_form(params=EverythingParams(crop_n_layers=1)))
    with pytest.raises(ValueError, match="tiles the last two axes.*stack axis 'auto'"):
        ctl.start("stack", tiled_form(stack_axis=2))
    with pytest.raises(ValueError, match=r"must be a \.zarr folder"):
        ctl.start("stack", tiled_form(embeddings=str(tmp_path / "emb.npy")))
    assert ctl.state is None and counting.encodes == 0
    assert [layer.name for layer in viewer.layers] == ["stack"]


def test_run_tiled_batch_on_a_stack_resumes_and_refuses_other_settings(tmp_path, counting):
    stack = blob_stack(2)
    ref = segment_everything_tiled(stack, BlobModel().eval(), tile=TILE, halo=HALO,
                                   id_scope="slice", **FAST_TILED)
    settings = BatchSettings(ModelSpec("blob", device="cpu", factory=CountingBlobModel),
                             EverythingParams(**FAST_TILED), id_scope="slice")
    out = tmp_path / "stack.zarr"
    events: list = []
    result = run_tiled_batch(stack, settings, out, tile=TILE, halo=HALO,
                             progress=events.append)
    labels = result.labels[:]
    np.testing.assert_array_equal(labels, ref)
    assert result.counts == {0: int(ref[0].max()), 1: int(ref[1].max())}
    assert result.counts[0] > 0 and result.counts[1] > 0
    n_tiles = 2 * TileGrid(stack.shape[1:], TILE, HALO).n_tiles
    assert counting.encodes == n_tiles and events[-1].kind == "merge"
    assert zarr.open_group(out, mode="r").attrs["napari-esam"]["axes"] == "zyx"
    # complete: returned at once; other settings: refused, naming the difference
    again = run_tiled_batch(stack, settings, out, tile=TILE, halo=HALO)
    assert again.already_complete and again.counts == result.counts
    assert counting.encodes == n_tiles
    with pytest.raises(TiledOutputError, match="halo: 64 in the output, 32 now") as info:
        run_tiled_batch(stack, settings, out, tile=TILE, halo=32)
    assert info.value.reason == "mismatch"
    redone = run_tiled_batch(stack, settings, out, tile=TILE, halo=32, overwrite=True)
    assert redone.complete and not redone.already_complete
