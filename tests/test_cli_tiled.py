"""``napari-esam everything --tile``: tiled mode from the command line (in this process).

The CLI's models are :class:`CountingBlobModel` s (``build_model`` is replaced, the
per-process model cache emptied), so the tests count encoder runs of whole CLI calls made
through ``main([...])``; the reference is :func:`segment_everything_tiled` called directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from napari_esam.cli import main
from napari_esam.core.runs import pipeline as B
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.merge import segment_everything_tiled
from napari_esam.core.tiling.store import EmbeddingStore, read_signature
from tests.batch_fakes import BlobModel
from tests.tiled_fakes import FAST_TILED, HALO, TILE, blob_image, blob_stack

N_TILES = TileGrid((600, 700), TILE, HALO).n_tiles  # 3 x 4


class CountingBlobModel(BlobModel):
    """The blob model, counting encoder runs over all instances."""

    encodes = 0

    def encode(self, x):
        CountingBlobModel.encodes += 1
        return super().encode(x)


@pytest.fixture
def models(monkeypatch):
    """Every model the CLI builds (``everything`` and ``embed``) is a CountingBlobModel."""
    monkeypatch.setattr(B, "_MODELS", {})
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
    details: dict = {}
    labels = segment_everything_tiled(str(image_file), BlobModel().eval(), tile=TILE,
                                      halo=HALO, details=details, **FAST_TILED)
    assert details["merged"] > 0 and details["objects"] > 10  # both seam rules at work
    return labels, details


def everything(src, out, *extra):
    return main(["everything", str(src), "-o", str(out), "--device", "cpu",
                 "--points-per-side", "8", "--no-progress", *map(str, extra)])


def stored(path):
    return zarr.open_array(path / "0", mode="r")[:]


def test_tiled_cli_gives_the_labels_of_segment_everything_tiled(tmp_path, image_file,
                                                                reference, models, capsys):
    ref, details = reference
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, "--tile", TILE, "--halo", HALO) == 0
    captured = capsys.readouterr()
    np.testing.assert_array_equal(stored(out), ref)
    assert models.encodes == N_TILES  # no store: every tile encoded once
    assert f"1 of 1 slices, {details['objects']} objects" in captured.out
    assert f"3x4 tiles of {TILE} px (halo {HALO})" in captured.err
    attrs = zarr.open_group(out, mode="r").attrs
    rec = attrs["napari-esam-tiled"]
    assert rec["complete"] and rec["slices"] == {"0": details["objects"]}
    assert rec["settings"]["tile"] == TILE and rec["settings"]["halo"] == HALO
    assert attrs["napari-esam"]["axes"] == "yx"  # an OME-Zarr labels group, like batch output

    # the same command again: the output is complete, nothing is recomputed
    models.encodes = 0
    assert everything(image_file, out, "--tile", TILE, "--halo", HALO) == 0
    assert "already complete" in capsys.readouterr().err and models.encodes == 0
    # other settings: refused, naming the difference; --overwrite recomputes
    assert everything(image_file, out, "--tile", TILE, "--halo", 32) == 2
    assert "halo: 64 in the output, 32 now" in capsys.readouterr().err
    assert everything(image_file, out, "--tile", TILE, "--halo", HALO, "--overwrite") == 0
    np.testing.assert_array_equal(stored(out), ref)
    # a TIFF output: computed in a working store, exported, the store removed
    tif = tmp_path / "labels.tif"
    assert everything(image_file, tif, "--tile", TILE, "--halo", HALO) == 0
    np.testing.assert_array_equal(tifffile.imread(tif), ref)
    assert not (tmp_path / "labels.tif.partial.zarr").exists()


def test_a_store_from_embed_is_reused_with_zero_encoder_calls(tmp_path, image_file, reference,
                                                              models, capsys):
    ref, _ = reference
    store = tmp_path / "slide.embeddings.zarr"
    assert main(["embed", str(image_file), "-o", str(store), "--tile", str(TILE), "--halo",
                 str(HALO), "--device", "cpu", "--no-progress"]) == 0
    assert models.encodes == N_TILES
    models.encodes = 0
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, "--tile", TILE, "--halo", HALO, "--embeddings",
                      store) == 0
    err = capsys.readouterr().err
    assert models.encodes == 0  # every tile's embedding came from the store
    assert "encoder runs 0" in err and f"embeddings from the store {N_TILES}" in err
    np.testing.assert_array_equal(stored(out), ref)


def test_a_missing_store_is_filled_for_the_next_run(tmp_path, image_file, reference, models):
    ref, _ = reference
    store = tmp_path / "new.zarr"
    assert everything(image_file, tmp_path / "a.zarr", "--tile", TILE, "--halo", HALO,
                      "--embeddings", store) == 0
    assert models.encodes == N_TILES
    assert EmbeddingStore.open(store, read_signature(store), mode="r").n_done == N_TILES
    models.encodes = 0
    assert everything(image_file, tmp_path / "b.zarr", "--tile", TILE, "--halo", HALO,
                      "--embeddings", store) == 0
    assert models.encodes == 0
    np.testing.assert_array_equal(stored(tmp_path / "b.zarr"), ref)


def test_a_store_for_another_grid_is_a_readable_error(tmp_path, image_file, models, capsys):
    store = tmp_path / "other.zarr"
    assert main(["embed", str(image_file), "-o", str(store), "--tile", "512", "--halo", "128",
                 "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, "--tile", TILE, "--halo", HALO, "--embeddings",
                      store) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-esam everything: error: the embedding store")
    assert "tile size: store has 512, this input has 256" in err and "halo" in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before any work
    # without --tile the store's grid is named
    assert everything(image_file, out, "--embeddings", store) == 2
    err = capsys.readouterr().err
    assert "--embeddings needs tiled mode" in err and "--tile 512 --halo 128" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tile", "256", "--crop-n-layers", "1"], "crops (--crop-n-layers) are not supported"),
        (["--tile", "256", "--channel", "0"], "--channel is not supported in tiled mode"),
        (["--tile", "256", "--axis", "0"], "--axis is not supported in tiled mode"),
        (["--tile", "256", "--halo", "200"], "--halo must be between 0 and tile/2 = 128"),
        (["--tile", "8"], "--tile must be at least 16"),
        (["--tile", "256", "--merge-iou", "0"], "--merge-iou must be in (0, 1]"),
        (["--halo", "64"], "--halo needs tiled mode: add --tile N"),
        (["--merge-iou", "0.3"], "--merge-iou needs tiled mode"),
    ],
)
def test_options_tiled_mode_does_not_take_are_refused(tmp_path, image_file, models, capsys,
                                                      extra, message):
    out = tmp_path / "labels.zarr"
    assert everything(image_file, out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and models.encodes == 0


def test_stacks_are_tiled_plane_by_plane(tmp_path, models):
    stack = blob_stack(2)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    ref = segment_everything_tiled(str(src), BlobModel().eval(), tile=TILE, halo=HALO,
                                   id_scope="slice", **FAST_TILED)
    out = tmp_path / "labels.zarr"
    assert everything(src, out, "--tile", TILE, "--ids", "slice") == 0  # default halo: 64
    labels = stored(out)
    np.testing.assert_array_equal(labels, ref)
    assert labels[0].max() > 0 and labels[1].max() > 0
    assert zarr.open_group(out, mode="r").attrs["napari-esam"]["axes"] == "zyx"
    assert models.encodes == 2 * TileGrid((300, 400), TILE, HALO).n_tiles


def test_large_planes_get_a_hint_without_a_change_of_behaviour(tmp_path, models, capsys):
    src = tmp_path / "wide.tif"
    ramp = np.broadcast_to(np.arange(2100, dtype=np.uint16), (120, 2100))  # tiles differ
    tifffile.imwrite(src, np.ascontiguousarray(ramp), photometric="minisblack")
    assert everything(src, tmp_path / "a.zarr") == 0
    err = capsys.readouterr().err
    assert "hint: the image planes are 120x2100 px" in err and "--tile 1024" in err
    assert models.encodes == 1  # still one (shrunk) image, not tiles
    assert everything(src, tmp_path / "b.zarr", "--tile", "1024", "--halo", "256") == 0
    assert "hint:" not in capsys.readouterr().err
    assert models.encodes == 1 + TileGrid((120, 2100), 1024, 256).n_tiles


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
        assert everything(image_file, out, "--tile", TILE, "--halo", HALO) == 1
    finally:
        models.encode = original
    assert models.encodes == 5
    capsys.readouterr()
    models.encodes = 0
    assert everything(image_file, out, "--tile", TILE, "--halo", HALO) == 0
    assert models.encodes == N_TILES - 5  # the 5 finished tiles were not recomputed
    np.testing.assert_array_equal(stored(out), ref)
    assert not (tmp_path / "labels.zarr.tiles.zarr").exists()
