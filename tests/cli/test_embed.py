"""``napari-esam embed``: precompute a store from TIFF/Zarr/PNG, resume, refuse stale stores."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_esam import cli
from napari_esam.core.runs import settings as S
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.predictor import TiledPredictor
from napari_esam.core.tiling.store import read_signature
from tests.fakes import FakeModel


@pytest.fixture
def fake_models(monkeypatch):
    """Every model the CLI builds is a FakeModel (fast); the built ones are recorded."""
    built = []

    def build(name, checkpoint=None, device="auto", dtype=None):
        built.append(FakeModel().eval())
        return built[-1]

    monkeypatch.setattr("napari_esam.models.loading.build_model", build)
    monkeypatch.setattr(S, "_MODELS", {})
    return built


def image(shape=(2100, 2300), seed=0):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


@pytest.fixture
def tiff(tmp_path):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image(), tile=(256, 256), photometric="minisblack")
    return path


def embed(*args):
    """One CLI call with a model of its own (as in a new process: the per-process model
    cache is emptied), so each call's encoder runs are counted alone."""
    S.clear_model_cache()
    return cli.main(["embed", *map(str, args), "--no-progress"])


def test_embed_a_tiff_then_reuse_and_resume(tmp_path, tiff, fake_models, capsys):
    store = tmp_path / "emb.zarr"
    assert embed(tiff, "-o", store, "--tile", 1024, "--halo", 256) == 0
    n = TileGrid((2100, 2300), 1024, 256).n_tiles
    assert f"computed {n} tile embeddings" in capsys.readouterr().err
    assert fake_models[-1].encode_calls == n
    sig = read_signature(store)
    assert (sig.tile, sig.halo, sig.image_shape, sig.model) == (1024, 256, (2100, 2300), "fake")
    # running again skips every stored tile
    assert embed(tiff, "-o", store) == 0
    assert "computed 0 tile embeddings" in capsys.readouterr().err
    assert fake_models[-1].encode_calls == 0
    # the widget's predictor reuses it: no encoder call for a click
    tp = TiledPredictor(FakeModel().eval(), store=store)
    tp.set_image(tifffile.imread(tiff))
    tp.predict(np.array([[1000.0, 1000.0]]), np.array([1]))
    assert tp.encoder_calls == 0 and tp.store_hits == 1


def test_interrupted_embedding_resumes(tmp_path, tiff, fake_models, monkeypatch, capsys):
    store = tmp_path / "emb.zarr"
    original = TiledPredictor._encode_window
    calls = []

    def flaky(self, window, *args, **kwargs):
        calls.append(window)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, window, *args, **kwargs)

    monkeypatch.setattr(TiledPredictor, "_encode_window", flaky)
    assert embed(tiff, "-o", store) == 1
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(TiledPredictor, "_encode_window", original)
    n = TileGrid((2100, 2300), 1024, 256).n_tiles
    assert embed(tiff, "-o", store) == 0
    assert f"computed {n - 2} tile embeddings" in capsys.readouterr().err


def test_stale_store_and_bad_arguments_are_user_errors(tmp_path, tiff, fake_models, capsys):
    store = tmp_path / "emb.zarr"
    assert embed(tiff, "-o", store, "--tile", 512, "--halo", 128) == 0
    capsys.readouterr()
    assert embed(tiff, "-o", store, "--tile", 512, "--halo", 64) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "halo" in err and "Traceback" not in err
    assert embed(tiff, "-o", store, "--tile", 512, "--halo", 64, "--overwrite") == 0
    assert read_signature(store).halo == 64
    capsys.readouterr()
    assert embed(tmp_path / "missing.tif", "-o", tmp_path / "x.zarr") == 2
    assert "no such file" in capsys.readouterr().err
    assert embed(tiff, "-o", tmp_path / "x.h5") == 2
    assert ".zarr" in capsys.readouterr().err
    assert embed(tiff, "-o", tmp_path / "x.zarr", "--halo", 600) == 2
    assert "--halo" in capsys.readouterr().err
    assert embed(tiff, "-o", tmp_path / "nodir" / "x.zarr") == 2


def test_zarr_stack_and_png_inputs(tmp_path, fake_models):
    from PIL import Image

    z = zarr.create_array(str(tmp_path / "stack.zarr"), shape=(2, 1100, 1200),
                          chunks=(1, 512, 512), dtype="uint16")
    z[:] = np.stack([image((1100, 1200), s) for s in range(2)])
    # planes of 1100 x 1200 are not tiled unless asked (--tiled auto tiles sides > 2048)
    assert embed(tmp_path / "stack.zarr", "-o", tmp_path / "s.zarr", "--tiled", "on",
                 "--tile", 1024) == 0
    sig = read_signature(tmp_path / "s.zarr")
    assert sig.image_shape == (2, 1100, 1200) and (sig.tile, sig.halo) == (1024, 256)
    assert fake_models[-1].encode_calls == 2 * TileGrid((1100, 1200)).n_tiles
    assert embed(tmp_path / "stack.zarr", "-o", tmp_path / "u.zarr", "--tile", 1024) == 0
    sig = read_signature(tmp_path / "u.zarr")
    assert (sig.tile, sig.halo) == (1200, 0)  # auto: each plane is one tile
    assert fake_models[-1].encode_calls == 2
    rgb = np.random.default_rng(0).integers(0, 255, (300, 400, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "small.png")
    assert embed(tmp_path / "small.png", "-o", tmp_path / "p.zarr") == 0
    sig = read_signature(tmp_path / "p.zarr")
    assert sig.rgb and sig.contrast_limits is None and fake_models[-1].encode_calls == 1
    assert (sig.tile, sig.halo) == (400, 0)
    # --tiled on cuts even a small image: 2 x 2 tiles of 256 px with a 64 px halo
    assert embed(tmp_path / "small.png", "-o", tmp_path / "t.zarr", "--tiled", "on",
                 "--tile", 256, "--halo", 64) == 0
    sig = read_signature(tmp_path / "t.zarr")
    assert (sig.tile, sig.halo) == (256, 64)
    assert fake_models[-1].encode_calls == TileGrid((300, 400), 256, 64).n_tiles == 4


def test_the_subcommand_is_registered(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["embed", "in.tif", "-o", "out.zarr", "--model", "mobilesam",
                              "--tile", "1024", "--halo", "256", "--device", "cpu"])
    assert args.command == "embed" and args.tile == 1024 and args.halo == 256
    assert args.tiled == "auto" and args.channel_axis == "auto"
    # the model, stack and tiling options of ``everything``
    args = parser.parse_args(["embed", "in.tif", "-o", "out.zarr", "--tiled", "on",
                              "--merge-iou", "0.3", "--axis", "0", "--channel-axis", "none",
                              "--channel", "1", "--contrast-limits", "0", "100"])
    assert (args.tiled, args.merge_iou, args.axis, args.channel_axis, args.channel) == (
        "on", 0.3, [0], "none", 1)
    assert args.contrast_limits == [0.0, 100.0]
    with pytest.raises(SystemExit):  # gone: the channel axis says it
        parser.parse_args(["embed", "in.tif", "-o", "out.zarr", "--rgb"])
    assert "unrecognized arguments: --rgb" in capsys.readouterr().err


def test_embed_and_everything_options_are_the_same():
    """One definition of the shared options (cli/options.py) for both subcommands."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices

    def flags(name):
        return {s for a in sub[name]._actions for s in a.option_strings}

    shared = {"--model", "--device", "--dtype", "--checkpoint", "--axis", "--channel-axis",
              "--channel", "--contrast-limits", "--tiled", "--tile", "--halo", "--merge-iou"}
    assert shared <= flags("embed") and shared <= flags("everything")


def test_embed_with_the_real_mobilesam_classes(tmp_path, capsys):
    from napari_esam.models.synthetic import synthetic_state_dict

    ckpt = tmp_path / "synthetic_mobilesam.pt"
    synth = synthetic_state_dict("mobilesam")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in synth.items()}, ckpt)
    tif = tmp_path / "img.tif"
    tifffile.imwrite(tif, image((900, 1000)))
    store = tmp_path / "emb.zarr"
    rc = embed(tif, "-o", store, "--model", "mobilesam", "--checkpoint", ckpt, "--device", "cpu")
    assert rc == 0, capsys.readouterr().err
    sig = read_signature(store)
    assert sig.model == "mobilesam" and sig.image_shape == (900, 1000)
    emb = zarr.open_group(str(store), mode="r")["embeddings"]
    assert emb.shape == (1, 1, 256, 64, 64) and np.abs(np.asarray(emb[0, 0])).sum() > 0


def test_rgba_is_read_as_everything_reads_it_and_the_store_serves_everything(
        tmp_path, fake_models, capsys):
    """An RGBA TIFF is one RGB plane for embed as for everything (its first three channels),
    so the store embed makes is the one everything uses (no encoder run)."""
    rgba = np.random.default_rng(3).integers(0, 255, (128, 160, 4)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert embed(tmp_path / "rgba.tif", "-o", tmp_path / "e.zarr") == 0
    sig = read_signature(tmp_path / "e.zarr")
    assert sig.rgb and sig.image_shape == (128, 160, 4) and (sig.tile, sig.halo) == (160, 0)
    assert fake_models[-1].encode_calls == 1
    S.clear_model_cache()
    assert cli.main(["everything", str(tmp_path / "rgba.tif"), "-o", str(tmp_path / "l.zarr"),
                     "--embeddings", str(tmp_path / "e.zarr"), "--points-per-side", "2",
                     "--no-progress"]) == 0
    assert "encoder runs 0; embeddings from the store 1" in capsys.readouterr().err
