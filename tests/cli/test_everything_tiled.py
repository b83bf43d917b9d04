"""``napari-esam everything --tiled``: tiled planes from the command line (in this process).

The CLI's models are :class:`CountingBlobModel` s (``build_model`` is replaced, the
per-process model cache emptied), so the tests count encoder runs of whole CLI calls made
through ``main([...])``; the reference is :func:`run_batch` called directly (in memory).
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from napari_esam.cli import main
from napari_esam.core.runs import settings as S
from napari_esam.core.runs.outputs import RUN_ATTR
from napari_esam.core.runs.pipeline import run_batch
from napari_esam.core.runs.settings import (
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
)
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.store import EmbeddingStore, read_signature
from tests.fakes import FAST_TILED, HALO, TILE, BlobModel, blob_image, tiled_blob_stack
from tests.fakes import blob_stack as small_stack

N_TILES = TileGrid((600, 700), TILE, HALO).n_tiles  # 3 x 4
#: planes cut into two tiles (1 x 2) by the TILE/HALO grid
TWO_TILE_SHAPE = (250, 400)
TILED = ("--tiled", "on", "--tile", TILE, "--halo", HALO)


class CountingBlobModel(BlobModel):
    """The blob model, counting encoder runs over all instances."""

    encodes = 0

    def encode(self, x):
        CountingBlobModel.encodes += 1
        return super().encode(x)


def blob_settings(id_scope: str = "stack", tiling: TilingParams | None = None,
                  **params) -> BatchSettings:
    """The CLI's settings for ``TILED`` (and ``--points-per-side 8``), with the blob model."""
    return BatchSettings(
        ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel"),
        EverythingParams(**{**FAST_TILED, **params}),
        id_scope,
        tiling or TilingParams("on", TILE, HALO),
    )


@pytest.fixture
def models(monkeypatch):
    """Every model the CLI builds (``everything`` and ``embed``) is a CountingBlobModel."""
    monkeypatch.setattr(S, "_MODELS", {})
    monkeypatch.setattr("napari_esam.models.loading.build_model",
                        lambda *a, **k: CountingBlobModel().eval())
    CountingBlobModel.encodes = 0
    return CountingBlobModel


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "slide.tif"
    tifffile.imwrite(path, blob_image(), tile=(128, 128), photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def reference(image_file):
    res = run_batch(str(image_file), blob_settings())
    assert res.complete and res.details["grid"].n_tiles == N_TILES
    assert res.details["merged"] > 0 and res.counts[0] > 10  # both seam rules at work
    return np.asarray(res.labels), res.counts[0]


def two_tile_stack() -> np.ndarray:
    """2 planes of blobs that the 8 x 8 points find in both tiles' cores."""
    return np.stack([blob_image(TWO_TILE_SHAPE, seed=s, n_small=12) for s in (0, 2)])


@pytest.fixture(scope="module")
def two_tile_file(tmp_path_factory):
    """A 2-plane stack whose planes are cut into 1 x 2 tiles."""
    stack = two_tile_stack()
    assert TileGrid(TWO_TILE_SHAPE, TILE, HALO).n_tiles == 2
    path = tmp_path_factory.mktemp("input2") / "two.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    return path


def everything(src, out, *extra):
    return main(["everything", str(src), "-o", str(out), "--device", "cpu",
                 "--points-per-side", "8", "--no-progress", *map(str, extra)])


def stored(path):
    return zarr.open_array(path / "0", mode="r")[:]


def plane_ids(labels, i) -> set[int]:
    return set(np.unique(labels[i]).tolist()) - {0}


@pytest.mark.slow
def test_tiled_cli_gives_the_labels_of_run_batch(tmp_path, image_file, reference, models,
                                                 capsys):
    ref, n_objects = reference
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, *TILED) == 0
    captured = capsys.readouterr()
    labels = stored(out)
    np.testing.assert_array_equal(labels, ref)
    # one plane of 12 tiles: ids 1..n in the plane's stride range, the smallest dtype
    grid = TileGrid((600, 700), TILE, HALO)
    stride = blob_settings().id_stride(grid)
    assert stride == 10_000  # 12 tiles x 8 x 8 points x 3 candidates = 2304 masks at most
    assert labels.dtype == ref.dtype == np.uint16
    assert plane_ids(labels[None], 0) == set(range(1, n_objects + 1))
    assert models.encodes == N_TILES  # no store: every tile encoded once
    assert f"1 of 1 slices, {n_objects} objects" in captured.out
    assert f"tiled: 3x4 tiles of {TILE} px (halo {HALO}) per plane, {N_TILES} in all" in (
        captured.err)
    assert f"tiles segmented {N_TILES} (already done: 0); encoder runs {N_TILES}" in captured.err
    assert "seam merges" in captured.err
    attrs = zarr.open_group(out, mode="r").attrs
    rec = attrs[RUN_ATTR]
    assert rec["complete"] and rec["slices"] == {"0": n_objects}
    tiling = rec["settings"]["tiling"]
    assert tiling["tile"] == TILE and tiling["halo"] == HALO
    assert rec["settings"]["id_stride"] == stride
    assert attrs["napari-esam"]["axes"] == "yx"  # an OME-Zarr labels group
    assert not (tmp_path / "labels.zarr.tiles.zarr").exists()  # scratch removed when done

    # the same command again: the output is complete, nothing is recomputed
    models.encodes = 0
    assert everything(image_file, out, *TILED) == 0
    err = capsys.readouterr().err
    assert "1 of 1 slices already done" in err and models.encodes == 0
    assert f"tiles segmented 0 (already done: {N_TILES})" in err
    # other settings: refused, naming the difference; --overwrite recomputes
    assert everything(image_file, out, "--tiled", "on", "--tile", TILE, "--halo", 32) == 2
    assert "halo: 64 in the output, 32 now" in capsys.readouterr().err
    assert everything(image_file, out, *TILED, "--overwrite") == 0
    np.testing.assert_array_equal(stored(out), ref)
    # a TIFF output: computed in a working store, exported, the store (and scratch) removed
    tif = tmp_path / "labels.tif"
    assert everything(image_file, tif, *TILED) == 0
    np.testing.assert_array_equal(tifffile.imread(tif), ref)
    assert not list(tmp_path.glob("labels.tif.partial.zarr*"))


def test_a_store_from_embed_is_reused_with_zero_encoder_calls(tmp_path, image_file, reference,
                                                              models, capsys):
    ref, _ = reference
    store = tmp_path / "slide.embeddings.zarr"
    assert main(["embed", str(image_file), "-o", str(store), "--tiled", "on", "--tile",
                 str(TILE), "--halo", str(HALO), "--device", "cpu", "--no-progress"]) == 0
    assert models.encodes == N_TILES
    models.encodes = 0
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, *TILED, "--embeddings", store) == 0
    err = capsys.readouterr().err
    assert models.encodes == 0  # every tile's embedding came from the store
    assert "encoder runs 0" in err and f"embeddings from the store {N_TILES}" in err
    np.testing.assert_array_equal(stored(out), ref)


@pytest.mark.slow
def test_a_missing_store_is_filled_for_the_next_run(tmp_path, image_file, reference, models):
    ref, _ = reference
    store = tmp_path / "new.zarr"
    assert everything(image_file, tmp_path / "a.zarr", *TILED, "--embeddings", store) == 0
    assert models.encodes == N_TILES
    assert EmbeddingStore.open(store, read_signature(store), mode="r").n_done == N_TILES
    models.encodes = 0
    assert everything(image_file, tmp_path / "b.zarr", *TILED, "--embeddings", store) == 0
    assert models.encodes == 0
    np.testing.assert_array_equal(stored(tmp_path / "b.zarr"), ref)


def test_a_store_for_another_grid_is_a_readable_error(tmp_path, image_file, models, capsys):
    store = tmp_path / "other.zarr"
    assert main(["embed", str(image_file), "-o", str(store), "--tiled", "on", "--tile", "512",
                 "--halo", "128", "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, *TILED, "--embeddings", store) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("napari-esam everything: error: the embedding store")
    assert "tile size: store has 512, this input has 256" in err and "halo" in err
    assert "--tiled, --tile, --halo" in err  # says which options must match
    assert "Traceback" not in err
    assert not out.exists()  # refused before any work
    # untiled (the default for this plane): the whole plane is one tile, not the store's grid
    assert everything(image_file, out, "--embeddings", store) == 2
    err = capsys.readouterr().err
    assert "tile size: store has 512, this input has 700" in err
    assert "halo: store has 128, this input has 0" in err
    # no encoder call but the embed run's
    assert not out.exists() and models.encodes == TileGrid((600, 700), 512, 128).n_tiles


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tiled", "on", "--tile", "256", "--halo", "200"],
         "--halo must be between 0 and tile/2 = 128, got 200"),
        (["--tile", "256", "--halo", "200"], "--halo must be between 0 and tile/2 = 128"),
        (["--tiled", "on", "--tile", "8"], "--tile must be at least 16"),
        (["--tiled", "on", "--tile", "256", "--merge-iou", "0"], "--merge-iou must be in (0, 1]"),
        (["--tiled", "on", "--tile", "256", "--merge-iou", "1.5"],
         "--merge-iou must be in (0, 1]"),
    ],
)
def test_bad_tiling_options_are_refused(tmp_path, image_file, models, capsys, extra, message):
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-esam everything: error:") and message in err
    assert not out.exists() and models.encodes == 0


def test_tiled_choices_are_checked_by_argparse(tmp_path, image_file, capsys):
    with pytest.raises(SystemExit) as exc:
        everything(image_file, tmp_path / "o.zarr", "--tiled", "yes")
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_stacks_are_tiled_plane_by_plane(tmp_path, models):
    stack = tiled_blob_stack(2)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    ref = run_batch(str(src), blob_settings("slice"))
    out = tmp_path / "labels.zarr"
    # default halo for a 256 px tile: 64
    assert everything(src, out, "--tiled", "on", "--tile", TILE, "--ids", "slice") == 0
    labels = stored(out)
    np.testing.assert_array_equal(labels, np.asarray(ref.labels))
    assert labels[0].max() > 0 and labels[1].max() > 0
    for i in range(2):  # --ids slice: 1..n in every plane
        assert plane_ids(labels, i) == set(range(1, ref.counts[i] + 1))
    assert labels.dtype == np.uint16
    assert zarr.open_group(out, mode="r").attrs["napari-esam"]["axes"] == "zyx"
    assert models.encodes == 2 * TileGrid((300, 400), TILE, HALO).n_tiles


def test_auto_tiles_large_planes_and_off_does_not(tmp_path, models, capsys):
    """``--tiled auto`` (the default) tiles planes with a side over 2048 px with the
    default grid (1024 px, halo 256); ``--tiled off`` segments them as one shrunk image."""
    src = tmp_path / "wide.tif"
    ramp = np.broadcast_to(np.arange(2100, dtype=np.uint16), (120, 2100))  # tiles differ
    tifffile.imwrite(src, np.ascontiguousarray(ramp), photometric="minisblack")
    n = TileGrid((120, 2100), 1024, 256).n_tiles
    assert n == 3
    assert everything(src, tmp_path / "a.zarr") == 0
    err = capsys.readouterr().err
    assert f"tiled: 1x3 tiles of 1024 px (halo 256) per plane, {n} in all" in err
    assert models.encodes == n
    assert zarr.open_group(tmp_path / "a.zarr", mode="r").attrs[RUN_ATTR]["settings"][
        "tiling"]["tile"] == 1024
    assert everything(src, tmp_path / "b.zarr", "--tiled", "off") == 0
    err = capsys.readouterr().err
    assert "tiled:" not in err and "seam merges" not in err
    assert models.encodes == n + 1  # one (shrunk) image, not tiles
    rec = zarr.open_group(tmp_path / "b.zarr", mode="r").attrs[RUN_ATTR]["settings"]
    assert rec["tiling"] == {"tile": 2100, "halo": 0, "merge_iou": None}


def test_an_interrupted_run_resumes_with_the_tiles_it_finished(tmp_path, image_file,
                                                               reference, models, capsys):
    """In this process too, finished tiles are kept in the scratch group: after Ctrl+C
    (exit code 1) the same command encodes only the tiles that were not finished."""
    ref, _ = reference
    out = tmp_path / "labels.zarr"
    original = models.encode

    def encode_then_interrupt(self, x):
        if models.encodes == 5:
            raise KeyboardInterrupt
        return original(self, x)

    models.encode = encode_then_interrupt
    try:
        assert everything(image_file, out, *TILED) == 1
    finally:
        models.encode = original
    assert models.encodes == 5
    assert "0 finished slices and 5 finished tiles were kept in" in capsys.readouterr().err
    assert (tmp_path / "labels.zarr.tiles.zarr").exists()  # the finished tiles are kept
    models.encodes = 0
    assert everything(image_file, out, *TILED) == 0
    assert f"tiles segmented {N_TILES - 5} (already done: 5)" in capsys.readouterr().err
    assert models.encodes == N_TILES - 5  # the 5 finished tiles were not recomputed
    np.testing.assert_array_equal(stored(out), ref)
    assert not (tmp_path / "labels.zarr.tiles.zarr").exists()


# ----------------------------------------------------------- the one-pipeline rules


def test_untiled_and_a_tile_as_large_as_the_plane_give_identical_labels(tmp_path, models,
                                                                        capsys):
    """(a) ``--tiled off`` and ``--tiled on --tile 1024`` on 64 px planes: both one tile."""
    stack, counts = small_stack(3)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    assert everything(src, tmp_path / "off.zarr", "--tiled", "off") == 0
    assert everything(src, tmp_path / "on.zarr", "--tiled", "on", "--tile", 1024) == 0
    assert "tiled:" not in capsys.readouterr().err  # one tile per plane both times
    off, on = stored(tmp_path / "off.zarr"), stored(tmp_path / "on.zarr")
    assert off.dtype == on.dtype == np.uint16  # 3 planes x stride 1000
    np.testing.assert_array_equal(on, off)
    stride = blob_settings().id_stride(TilingParams("off").grid((64, 64)))
    assert stride == 1000
    for i, n in enumerate(counts):
        assert plane_ids(off, i) == plane_ids(on, i) == set(range(i * stride + 1,
                                                                  i * stride + n + 1))
    assert models.encodes == 2 * 3
    # the same one-tile grid, so the same record: either command resumes the other's output
    rec = [zarr.open_group(tmp_path / f"{m}.zarr", mode="r").attrs[RUN_ATTR]["settings"]
           for m in ("off", "on")]
    assert rec[0] == rec[1] and rec[0]["tiling"] == {"tile": 64, "halo": 0, "merge_iou": None}
    assert everything(src, tmp_path / "off.zarr", "--tiled", "on", "--tile", 1024) == 0
    assert "3 of 3 slices already done" in capsys.readouterr().err
    assert models.encodes == 2 * 3


def test_stack_ids_of_tiled_planes_use_the_plane_stride(tmp_path, two_tile_file, models,
                                                        capsys):
    """(b) planes of two tiles under ``--ids stack``: plane i has ids i*S+1 ... i*S+n_i."""
    out = tmp_path / "labels.zarr"
    assert everything(two_tile_file, out, *TILED, "--ids", "stack") == 0
    err = capsys.readouterr().err
    assert f"tiled: 1x2 tiles of {TILE} px (halo {HALO}) per plane, 4 in all" in err
    assert models.encodes == 4
    labels = stored(out)
    grid = TileGrid(TWO_TILE_SHAPE, TILE, HALO)
    stride = blob_settings().id_stride(grid)
    assert stride == 1000  # 2 tiles x 192 masks at most
    assert labels.dtype == np.uint16
    counts = zarr.open_group(out, mode="r").attrs[RUN_ATTR]["slices"]
    for i in range(2):
        n = counts[str(i)]
        assert n > 0 and plane_ids(labels, i) == set(range(i * stride + 1, i * stride + n + 1))
    assert min(plane_ids(labels, 1)) > stride  # the second plane starts above S
    # objects in both tiles' cores (the cores meet at x = 200)
    assert grid.tile_at(0, 0).core.x1 == 200
    assert all(labels[i, :, :200].any() and labels[i, :, 200:].any() for i in range(2))
    ref = run_batch(str(two_tile_file), blob_settings())
    np.testing.assert_array_equal(labels, np.asarray(ref.labels))


def test_an_untiled_run_reuses_its_embedding_store(tmp_path, models, capsys):
    """(c) ``--embeddings`` on small, untiled planes (one tile each): the second run with the
    same store makes no encoder call and gives the same labels."""
    stack, counts = small_stack(2)
    src = tmp_path / "small.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    store, out = tmp_path / "emb.zarr", tmp_path / "labels.zarr"
    assert everything(src, out, "--embeddings", store) == 0
    err = capsys.readouterr().err
    assert models.encodes == 2 and "encoder runs 2; embeddings from the store 0" in err
    sig = read_signature(store)
    assert (sig.tile, sig.halo) == (64, 0)  # the one-tile grid of a 64 x 64 plane
    first = stored(out)
    assert [len(plane_ids(first, i)) for i in range(2)] == counts
    models.encodes = 0
    assert everything(src, out, "--embeddings", store, "--overwrite") == 0
    err = capsys.readouterr().err
    assert models.encodes == 0 and "encoder runs 0; embeddings from the store 2" in err
    np.testing.assert_array_equal(stored(out), first)
    # a store made by ``embed`` (untiled by default too) is the same store
    store2 = tmp_path / "emb2.zarr"
    assert main(["embed", str(src), "-o", str(store2), "--device", "cpu",
                 "--no-progress"]) == 0
    assert models.encodes == 2
    models.encodes = 0
    assert everything(src, tmp_path / "b.zarr", "--embeddings", store2) == 0
    assert models.encodes == 0
    np.testing.assert_array_equal(stored(tmp_path / "b.zarr"), first)


@pytest.mark.slow
def test_crops_run_per_tile(tmp_path, two_tile_file, models, capsys):
    """(d) ``--crop-n-layers 1`` with planes of two tiles: accepted, every tile cropped."""
    out = tmp_path / "labels.zarr"
    assert everything(two_tile_file, out, *TILED, "--crop-n-layers", 1) == 0
    err = capsys.readouterr().err
    assert "tiled: 1x2 tiles" in err
    # each tile: its own embedding plus one per layer-1 crop (4 crops)
    assert models.encodes == 4 * (1 + 4)
    labels = stored(out)
    counts = zarr.open_group(out, mode="r").attrs[RUN_ATTR]["slices"]
    stride = blob_settings(crop_n_layers=1).id_stride(TileGrid(TWO_TILE_SHAPE, TILE, HALO))
    for i in range(2):
        n = counts[str(i)]
        assert n > 0 and plane_ids(labels, i) == set(range(i * stride + 1, i * stride + n + 1))
    ref = run_batch(str(two_tile_file), blob_settings(crop_n_layers=1))
    np.testing.assert_array_equal(labels, np.asarray(ref.labels))


def test_channel_and_axis_options_work_with_tiled_planes(tmp_path, models):
    """``--channel`` and ``--axis`` choose the planes; each plane is then tiled."""
    stack = two_tile_stack()
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, stack, photometric="minisblack")
    ref = np.asarray(run_batch(str(plain), blob_settings()).labels)
    # channel 1 of a (C=2, Z=2, Y, X) stack whose channel 0 is noise
    noise = np.random.default_rng(1).integers(50, 300, stack.shape).astype(stack.dtype)
    two = tmp_path / "channels.tif"
    tifffile.imwrite(two, np.stack([noise, stack]), photometric="minisblack")
    out = tmp_path / "c.zarr"
    assert everything(two, out, *TILED, "--channel-axis", 0, "--channel", 1) == 0
    np.testing.assert_array_equal(stored(out), ref)
    # the stack axis in the middle: (Y, Z, X) with --axis 1
    moved = tmp_path / "moved.tif"
    tifffile.imwrite(moved, np.ascontiguousarray(np.moveaxis(stack, 0, 1)),
                     photometric="minisblack")
    out = tmp_path / "a.zarr"
    assert everything(moved, out, *TILED, "--axis", 1) == 0
    labels = stored(out)
    assert labels.shape == (TWO_TILE_SHAPE[0], 2, TWO_TILE_SHAPE[1])
    np.testing.assert_array_equal(np.moveaxis(labels, 1, 0), ref)
    assert models.encodes == 2 * 2 * 2  # two runs of 2 planes x 2 tiles
