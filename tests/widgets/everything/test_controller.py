"""Tiled planes in the "Segment everything" controller (no Qt: a bare ``ViewerModel``) and in
:func:`~napari_esam.core.runs.pipeline.run_batch`, with the fast blob model.

The reference is :func:`run_batch` called directly on the same image with the same settings
(tiling on, 256/64 tiles); the controller's model comes from ``model_factory``
(:class:`CountingBlobModel` where encoder runs are counted; the per-process model cache is
emptied first). Tiled and untiled planes run the one pipeline (``iter_batch``); only a run
with a Zarr path is resumable (finished tiles kept in ``OUT.zarr.tiles.zarr``).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from napari.components import ViewerModel

from napari_esam.core.runs import settings as S
from napari_esam.core.runs.outputs import RUN_ATTR, SCRATCH_SUFFIX, TileScratch, ZarrOutput
from napari_esam.core.runs.pipeline import BatchProgress, BatchResult, run_batch
from napari_esam.core.runs.settings import (
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
    output_dtype,
)
from napari_esam.core.tiling.grid import TileGrid, use_tiling
from napari_esam.widgets.everything.controller import (
    EverythingController,
    EverythingForm,
    progress_text,
)
from napari_esam.widgets.workers import run_sync
from tests.fakes import FAST, FAST_TILED, HALO, TILE, BlobModel, blob_image, tiled_blob_stack
from tests.fakes import blob_stack as small_stack

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
    monkeypatch.setattr(S, "_MODELS", {})
    monkeypatch.setattr(CountingBlobModel, "encodes", 0)
    monkeypatch.setattr(CountingBlobModel, "on_encode", None)
    return CountingBlobModel


def tiled_settings(factory=BlobModel, **changes) -> BatchSettings:
    """Tiling on with the 256/64 grid, per-plane automatic contrast (as ``tiled_form()``)."""
    changes.setdefault("tiling", TilingParams("on", TILE, HALO))
    changes.setdefault("params", EverythingParams(**FAST_TILED))
    return BatchSettings(ModelSpec("blob", device="cpu", factory=factory), **changes)


@pytest.fixture(scope="module")
def reference():
    image = blob_image(SHAPE)
    result = run_batch(image, tiled_settings())
    assert result.complete and not result.cancelled
    details = {**result.details, "objects": result.counts[0]}
    assert details["grid"].n_tiles == N_TILES
    assert details["merged"] > 0 and details["objects"] > 10  # both seam rules at work
    return image, result.labels, details


def tiled_form(**changes) -> EverythingForm:
    """Tiled mode on, 256/64 tiles, each plane's own percentiles (as the reference)."""
    form = EverythingForm(device="cpu", layer_contrast=False, tiled="on", tile=TILE,
                          halo=HALO, params=EverythingParams(**FAST_TILED))
    for key, value in changes.items():
        setattr(form, key, value)
    return form


def make_controller(viewer, factory=CountingBlobModel):
    ctl = EverythingController(viewer, runner=run_sync, model_factory=factory)
    ctl.events, ctl.results, ctl.errors = [], [], []
    ctl.on_progress = ctl.events.append
    ctl.on_finished = ctl.results.append
    ctl.on_error = ctl.errors.append
    return ctl


def test_tiled_controller_gives_the_labels_of_run_batch(tmp_path, reference, counting):
    image, ref, details = reference
    viewer = ViewerModel()
    viewer.add_image(image, name="slide", scale=(0.5, 0.5))
    ctl = make_controller(viewer)
    ctl.start("slide", tiled_form())  # a Labels layer only: in memory, nothing on disk
    assert ctl.errors == []
    result = ctl.results[-1]
    assert isinstance(result, BatchResult) and not result.cancelled and result.complete
    assert result.counts == {0: details["objects"]}
    assert result.details["tiles_done"] == result.details["tiles"] == N_TILES
    assert result.details["skipped"] == 0 and result.details["merged"] == details["merged"]
    assert counting.encodes == N_TILES  # every tile encoded once
    assert list(tmp_path.iterdir()) == []  # no hidden working store

    layer = viewer.layers["slide everything"]
    assert isinstance(layer.data, np.ndarray)
    np.testing.assert_array_equal(np.asarray(layer.data), ref)
    assert layer.data.dtype == ref.dtype
    assert list(layer.scale) == [0.5, 0.5]
    meta = layer.metadata["napari-esam"]
    assert meta["counts"] == {0: details["objects"]} and meta["complete"]
    assert meta["tiled"] == {"tile": TILE, "halo": HALO}
    assert ctl.summary(result).startswith(f"Done: 1 / 1 slices, {details['objects']} objects")

    # progress counts tiles: start, every tile, then the plane
    assert all(isinstance(ev, BatchProgress) for ev in ctl.events)
    assert ctl.events[0].kind == "start" and ctl.events[0].tiles_done == 0
    assert all(ev.tiles_total == N_TILES and ev.total == 1 for ev in ctl.events)
    tiles = [ev.tiles_done for ev in ctl.events if ev.kind == "tile"]
    assert tiles == list(range(1, N_TILES + 1))
    assert [ev.kind for ev in ctl.events if ev.kind in ("tile", "slice")][-1] == "slice"
    assert ctl.events[-1].kind == "slice" and ctl.events[-1].done == 1
    first_tile = next(ev for ev in ctl.events if ev.kind == "tile")
    assert progress_text(first_tile).startswith(f"1 / {N_TILES} tiles · ")
    assert progress_text(ctl.events[0]) == f"0 / {N_TILES} tiles · starting"
    assert progress_text(ctl.events[-1]).startswith(f"{N_TILES} / {N_TILES} tiles · ")

    # without a Zarr path a run is not resumable: the same run again computes every tile
    counting.encodes = 0
    ctl.start("slide", tiled_form())
    again = ctl.results[-1]
    assert again.complete and again.details["skipped"] == 0 and counting.encodes == N_TILES
    np.testing.assert_array_equal(np.asarray(viewer.layers["slide everything [1]"].data), ref)


@pytest.mark.parametrize("decoding", ["point", "box"])
def test_object_prompts_on_tiled_planes_give_the_labels_of_run_batch(tmp_path, counting,
                                                                     decoding):
    image = blob_image(SHAPE)
    params = EverythingParams(prompts="objects", object_diameter=(12.0, 48.0),
                              object_decoding=decoding)
    ref = run_batch(image, tiled_settings(params=params))
    assert ref.counts[0] > 10 and ref.details["merged"] > 0
    viewer = ViewerModel()
    viewer.add_image(image, name="slide")
    ctl = make_controller(viewer)
    out = tmp_path / "labels.zarr"
    ctl.start("slide", tiled_form(params=params, zarr_path=str(out)))
    assert ctl.errors == [] and ctl.results[-1].counts == ref.counts
    np.testing.assert_array_equal(np.asarray(viewer.layers["slide everything"].data),
                                  np.asarray(ref.labels))
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]["settings"]["params"]
    assert rec["prompts"] == "objects" and rec["objects"]["object_decoding"] == decoding


def test_tiled_controller_with_a_zarr_path_gives_exactly_the_labels_of_run_batch(
    tmp_path, reference, counting
):
    image, ref, details = reference
    viewer = ViewerModel()
    viewer.add_image(image, name="slide")
    ctl = make_controller(viewer)
    out = tmp_path / "slide_labels.zarr"
    form = tiled_form(zarr_path=str(out))
    # the controller builds the reference's settings (but for the model's name and factory)
    settings = ctl.settings(form, viewer.layers["slide"])
    assert (settings.params, settings.tiling, settings.id_scope) == (
        tiled_settings().params, tiled_settings().tiling, tiled_settings().id_scope)
    ctl.start("slide", form)
    assert ctl.errors == []
    result = ctl.results[-1]
    assert result.complete and result.counts == {0: details["objects"]}
    assert counting.encodes == N_TILES

    # the same settings into a Zarr path by run_batch directly
    direct = run_batch(image, tiled_settings(), tmp_path / "direct.zarr")
    assert direct.complete and direct.counts == result.counts
    mine = zarr.open_array(out / "0", mode="r")
    theirs = zarr.open_array(tmp_path / "direct.zarr" / "0", mode="r")
    assert mine.dtype == theirs.dtype == ref.dtype
    assert mine.dtype == output_dtype(1, settings, details["grid"])
    np.testing.assert_array_equal(mine[:], theirs[:])
    np.testing.assert_array_equal(mine[:], ref)  # and the in-memory run's labels

    # the layer was added at the start, lazily on the store, and shows the result
    layer = viewer.layers["slide everything"]
    assert isinstance(layer.data, zarr.Array) and layer.data.read_only
    np.testing.assert_array_equal(np.asarray(layer.data), ref)
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert rec["complete"] and rec["slices"] == {"0": details["objects"]}
    assert rec["settings"]["tiling"] == {"tile": TILE, "halo": HALO, "merge_iou": 0.5}
    assert not (tmp_path / ("slide_labels.zarr" + SCRATCH_SUFFIX)).exists()


def test_auto_mode_tiles_planes_longer_than_2048_px():
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
    ctl = make_controller(viewer, factory=BlobModel)
    assert ctl.is_tiled("big", "auto") and ctl.is_tiled("pyramid", "auto")
    assert not ctl.is_tiled("small", "auto") and ctl.is_tiled("small", "on")
    assert not ctl.is_tiled("big", "off") and not ctl.is_tiled("", "on")
    # judged on the planes the stack axis gives (planes of any axes are tiled now)
    viewer.add_image(da.zeros((3000, 64, 100), dtype=np.uint16, chunks=1024), name="tall",
                     contrast_limits=(0, 1))
    assert not ctl.is_tiled("tall", "auto") and not ctl.is_tiled("tall", "auto", 0)
    assert ctl.is_tiled("tall", "auto", 2) and ctl.is_tiled("tall", "auto", 1)
    form = EverythingForm(stack_axis=2)
    assert ctl.source(form, viewer.layers["tall"]).plane_shape == (3000, 64)

    # auto on a small stack: every plane is one tile (the same pipeline)
    ctl.start("small", EverythingForm(device="cpu", params=EverythingParams(**FAST)))
    result = ctl.results[-1]
    assert type(result) is BatchResult and list(result.counts.values()) == counts
    assert result.details["grid"].n_tiles == 1 and result.details["merged"] == 0
    slices = [ev for ev in ctl.events if ev.kind == "slice"]
    assert [ev.tiles_done for ev in slices] == [1, 2]
    assert not any(ev.kind == "tile" for ev in ctl.events)  # tiles are planes here
    assert progress_text(slices[-1]).startswith("2 / 2 slices · ")


def test_a_cancelled_tiled_run_keeps_its_tiles_and_a_rerun_resumes(tmp_path, reference,
                                                                   counting):
    image, ref, details = reference
    viewer = ViewerModel()
    viewer.add_image(image, name="slide")
    ctl = make_controller(viewer)
    out = tmp_path / "slide_labels.zarr"
    form = tiled_form(zarr_path=str(out))
    # cancel from the worker thread while the 5th tile is encoded
    counting.on_encode = lambda n: ctl.cancel() if n == 5 else None
    ctl.start("slide", form)
    assert ctl.errors == []
    stopped = ctl.results[-1]
    assert stopped.cancelled and not stopped.complete and stopped.counts == {}
    finished = TileScratch(str(out) + SCRATCH_SUFFIX).done()
    assert 1 <= len(finished) <= 5 and stopped.details["tiles_done"] == len(finished)
    assert ctl.summary(stopped).startswith(
        f"Cancelled: 0 / 1 slices ({len(finished)} / {N_TILES} tiles), 0 objects")
    assert not zarr.open_group(out, mode="r").attrs[RUN_ATTR]["complete"]
    assert ZarrOutput(out).done() == {}

    counting.on_encode = None
    counting.encodes = 0
    ctl.start("slide", form)
    result = ctl.results[-1]
    assert not result.cancelled and result.counts == {0: details["objects"]}
    assert counting.encodes == N_TILES - len(finished)  # finished tiles were not recomputed
    assert result.details["skipped"] == len(finished)
    assert result.details["tiles"] == N_TILES - len(finished)
    starts = [ev for ev in ctl.events if ev.kind == "start"]
    assert starts[-1].tiles_done == len(finished) and starts[-1].tiles_total == N_TILES
    assert starts[-1].done == starts[-1].skipped == 0  # no plane was finished
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[:], ref)
    np.testing.assert_array_equal(np.asarray(viewer.layers["slide everything [1]"].data), ref)
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert rec["complete"] and rec["slices"] == {"0": details["objects"]}
    assert not (tmp_path / ("slide_labels.zarr" + SCRATCH_SUFFIX)).exists()


def test_tiled_controller_refuses_bad_tiling_choices(tmp_path, counting):
    viewer = ViewerModel()
    stack = tiled_blob_stack(2)
    viewer.add_image(stack, name="stack")
    ctl = make_controller(viewer)
    with pytest.raises(ValueError, match="the halo must be between 0 and tile/2 = 128"):
        ctl.start("stack", tiled_form(halo=200))
    with pytest.raises(ValueError, match=r"must be a \.zarr folder"):
        ctl.start("stack", tiled_form(embeddings=str(tmp_path / "emb.npy")))
    assert ctl.state is None and counting.encodes == 0
    assert [layer.name for layer in viewer.layers] == ["stack"]
    # what tiled mode could not do before is accepted now: crops (per tile) and another
    # stack axis (planes of other axes are tiled too)
    layer = viewer.layers["stack"]
    ctl.settings(tiled_form(params=EverythingParams(**FAST_TILED, crop_n_layers=1)), layer)
    source = ctl.source(tiled_form(stack_axis=2), layer)
    assert source.n_slices == stack.shape[2] and source.plane_shape == stack.shape[:2]


def test_run_batch_with_tiled_planes_on_a_stack_resumes_and_refuses_other_settings(
    tmp_path, counting
):
    stack = tiled_blob_stack(2)
    settings = tiled_settings(factory=CountingBlobModel, id_scope="slice")
    grid = settings.tiling.grid(stack.shape[1:])
    n_tiles = 2 * grid.n_tiles
    ref = run_batch(stack, settings).labels  # in memory
    assert counting.encodes == n_tiles
    counting.encodes = 0
    out = tmp_path / "stack.zarr"
    events: list = []
    result = run_batch(stack, settings, out, progress=events.append)
    labels = result.labels[:]
    np.testing.assert_array_equal(labels, ref)
    assert result.counts == {0: int(ref[0].max()), 1: int(ref[1].max())}
    assert result.counts[0] > 0 and result.counts[1] > 0
    assert labels.dtype == output_dtype(2, settings, grid) == np.uint16
    assert counting.encodes == n_tiles and events[-1].kind == "slice"
    assert [ev.index for ev in events if ev.kind == "slice"] == [0, 1]
    assert zarr.open_group(out, mode="r").attrs["napari-esam"]["axes"] == "zyx"
    # complete: returned at once; other settings: refused, naming the difference
    again = run_batch(stack, settings, out)
    assert again.complete and again.counts == result.counts
    assert again.details["tiles"] == 0 and again.details["skipped"] == n_tiles
    assert counting.encodes == n_tiles
    halo32 = tiled_settings(factory=CountingBlobModel, id_scope="slice",
                            tiling=TilingParams("on", TILE, 32))
    with pytest.raises(ValueError, match="halo: 64 in the output, 32 now"):
        run_batch(stack, halo32, out)
    redone = run_batch(stack, halo32, out, overwrite=True)
    assert redone.complete and redone.details["tiles"] == n_tiles


@pytest.mark.parametrize("mode", ["3d", "track"])
def test_a_linked_run_adds_3d_objects_or_tracks(counting, mode):
    from napari_esam.core.linking.stack import link_labels

    stack, _ = small_stack(5)
    viewer = ViewerModel()
    viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5))
    ctl = make_controller(viewer)
    form = EverythingForm(params=EverythingParams(**FAST), tiled="off", link=mode)
    ctl.start("stack", form)
    assert ctl.errors == []
    per_slice = np.asarray(viewer.layers["stack everything"].data)
    name = "stack 3-D objects" if mode == "3d" else "stack tracks"
    linked = viewer.layers[name]
    np.testing.assert_array_equal(linked.data, link_labels(per_slice, mode=mode).labels)
    assert list(linked.scale) == [2.0, 0.5, 0.5]
    # the top-left blob is in every slice: one id through the stack (per slice: 5 ids)
    assert len({int(linked.data[z, 16, 16]) for z in range(5)}) == 1
    assert len({int(per_slice[z, 16, 16]) for z in range(5)}) == 5
    if mode == "track":
        tracks = viewer.layers["stack tracks (centroids)"]
        ids = set(np.unique(tracks.data[:, 0]).astype(int))
        assert ids == set(np.unique(linked.data)) - {0}
        assert list(tracks.scale) == [2.0, 0.5, 0.5]
    else:
        assert "stack tracks (centroids)" not in viewer.layers


def test_linking_a_single_plane_is_refused_before_the_run(counting):
    viewer = ViewerModel()
    viewer.add_image(small_stack(1)[0][0], name="plane")
    ctl = make_controller(viewer)
    with pytest.raises(ValueError, match="linking needs a stack"):
        ctl.start("plane", EverythingForm(params=EverythingParams(**FAST), link="3d"))
    assert counting.encodes == 0 and len(viewer.layers) == 1
