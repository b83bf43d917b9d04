"""``napari-esam everything --prompts objects``: object prompts from the command line on a
stack and on tiled planes (an object across the seam is one label), resume, bad values.

The CLI's models are blob models (``build_model`` is replaced, the per-process model cache
emptied); the reference is :func:`run_batch` with the settings the options stand for.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from skimage.draw import disk

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
from tests.fakes import HALO, TILE, BlobModel, blob_image, blob_stack

OBJECTS = ("--prompts", "objects", "--object-diameter", "8", "24")
SEAM_SHAPE = (250, 400)  # 1 x 2 tiles of TILE px, the cores meet at x = 200


class CountingBlobModel(BlobModel):
    encodes = 0

    def encode(self, x):
        CountingBlobModel.encodes += 1
        return super().encode(x)


@pytest.fixture
def models(monkeypatch):
    """Every model the CLI builds is a CountingBlobModel."""
    monkeypatch.setattr(S, "_MODELS", {})
    monkeypatch.setattr("napari_esam.models.loading.build_model",
                        lambda *a, **k: CountingBlobModel().eval())
    CountingBlobModel.encodes = 0
    return CountingBlobModel


def everything(src, out, *extra):
    return main(["everything", str(src), "-o", str(out), "--device", "cpu", "--no-progress",
                 *map(str, extra)])


def settings(tiling: TilingParams | None = None, **params) -> BatchSettings:
    """The settings of ``OBJECTS`` (and ``params``) with the blob model."""
    params = {"prompts": "objects", "object_diameter": (8.0, 24.0), **params}
    return BatchSettings(ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel"),
                         EverythingParams(**params), "stack", tiling or TilingParams())


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    stack, counts = blob_stack(3)
    path = tmp_path_factory.mktemp("input") / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    return path, counts


@pytest.fixture(scope="module")
def seam_file(tmp_path_factory):
    """Two planes of blobs, each with a blob of 40 px on the seam of its two tiles."""
    planes = []
    for seed in (0, 2):
        plane = blob_image(SEAM_SHAPE, seed=seed, n_small=6)
        plane[:, 170:230] = plane[:, 170:230].clip(0, 300)  # nothing else near the seam
        plane[disk((125, 200), 20)] = 4000
        planes.append(plane)
    assert TileGrid(SEAM_SHAPE, TILE, HALO).tile_at(0, 0).core.x1 == 200
    path = tmp_path_factory.mktemp("seam") / "seam.tif"
    tifffile.imwrite(path, np.stack(planes), photometric="minisblack",
                     metadata={"axes": "ZYX"})
    return path


@pytest.mark.parametrize("decoding", ["point", "box"])
def test_object_prompts_on_a_stack(tmp_path, stack_file, models, capsys, decoding):
    src, counts = stack_file
    out = tmp_path / "labels.zarr"
    assert everything(src, out, *OBJECTS, "--object-decoding", decoding) == 0
    printed = capsys.readouterr().out
    labels = zarr.open_array(out / "0", mode="r")[:]
    ref = run_batch(str(src), settings(object_decoding=decoding))
    np.testing.assert_array_equal(labels, np.asarray(ref.labels))
    for i, n in enumerate(counts):
        assert f"slice {i}: {n} objects" in printed
        assert len(np.unique(labels[i])) - 1 == n
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]["settings"]["params"]
    assert rec["prompts"] == "objects" and rec["objects"]["object_decoding"] == decoding
    assert models.encodes == 3


@pytest.mark.parametrize("decoding", ["point", "box"])
def test_a_blob_on_the_seam_of_tiled_planes_is_one_label(tmp_path, seam_file, models,
                                                         capsys, decoding):
    out = tmp_path / "labels.zarr"
    tiled = ("--tiled", "on", "--tile", TILE, "--halo", HALO)
    assert everything(seam_file, out, *OBJECTS, "--object-diameter", 8, 48, *tiled,
                      "--object-decoding", decoding) == 0
    assert "tiled: 1x2 tiles" in capsys.readouterr().err
    labels = zarr.open_array(out / "0", mode="r")[:]
    tiling = TilingParams("on", TILE, HALO)
    ref = run_batch(str(seam_file), settings(tiling, object_diameter=(8.0, 48.0),
                                             object_decoding=decoding))
    np.testing.assert_array_equal(labels, np.asarray(ref.labels))
    assert models.encodes == 4
    blob = np.zeros(SEAM_SHAPE, bool)
    blob[disk((125, 200), 16)] = True  # inside the blob (the blob model is 4 px coarse)
    for i in range(2):
        ids = np.unique(labels[i][blob])
        assert len(ids) == 1 and ids[0] > 0, ids  # one label, across the seam
        assert labels[i][:, :200].any() and labels[i][:, 200:].any()


def test_resume_refuses_other_prompt_options(tmp_path, stack_file, models, capsys):
    src, _ = stack_file
    out = tmp_path / "labels.zarr"
    assert everything(src, out, *OBJECTS) == 0
    capsys.readouterr()
    for extra, what in [(("--object-decoding", "box"), "objects.object_decoding"),
                        (("--object-diameter", "8", "30"), "objects.object_diameter"),
                        (("--object-polarity", "dark"), "objects.object_polarity"),
                        (("--object-threshold", "0.2"), "objects.object_threshold")]:
        assert everything(src, out, *OBJECTS, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("napari-esam everything: error:") and what in err
        assert err.count("\n") == 1
    assert everything(src, out, "--points-per-side", 8) == 2  # the grid
    assert "params.prompts: 'objects' in the output" in capsys.readouterr().err
    assert everything(src, out, *OBJECTS) == 0  # the same options resume (all done)
    assert "3 of 3 slices already done" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--object-diameter", "1", "40"), "object_diameter must be (min, max) pixels with "
                                           "2 <= min <= max, got (1.0, 40.0)"),
        (("--object-diameter", "40", "8"), "2 <= min <= max, got (40.0, 8.0)"),
        (("--object-diameter", "8", "inf"), "2 <= min <= max"),
        (("--object-threshold", "0"), "object_threshold must be > 0"),
        (("--object-threshold", "nan"), "object_threshold must be > 0"),
        (("--crop-n-layers", "1"), "object prompts do not support crops"),
    ],
)
def test_bad_object_options_exit_2_with_one_line(tmp_path, stack_file, models, capsys, extra,
                                                 message):
    src, _ = stack_file
    out = tmp_path / "labels.zarr"
    assert everything(src, out, *OBJECTS, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-esam everything: error:") and message in err
    assert err.count("\n") == 1
    assert not out.exists() and models.encodes == 0


@pytest.mark.parametrize("extra", [("--prompts", "blobs"), ("--object-decoding", "mask"),
                                   ("--object-polarity", "up"), ("--object-threshold", "x")])
def test_bad_choices_are_refused_by_argparse(tmp_path, stack_file, capsys, extra):
    src, _ = stack_file
    with pytest.raises(SystemExit) as exc:
        everything(src, tmp_path / "o.zarr", *extra)
    assert exc.value.code == 2 and "invalid" in capsys.readouterr().err


def test_help_lists_the_prompt_options(capsys):
    with pytest.raises(SystemExit):
        main(["everything", "--help"])
    out = capsys.readouterr().out
    for flag in ("--prompts {grid,objects}", "--object-diameter MIN MAX", "--object-threshold",
                 "--object-polarity {bright,dark}", "--object-decoding {point,box}"):
        assert flag in out
