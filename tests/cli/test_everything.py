"""``napari-esam everything``: real MobileSAM end to end, resume, bad inputs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_esam.cli import main
from napari_esam.core.runs import settings as B
from napari_esam.core.runs.outputs import RUN_ATTR, ZarrOutput
from napari_esam.core.runs.pipeline import run_batch
from tests.fakes import BlobModel, blob_stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mobilesam_ckpt(tmp_path_factory) -> Path:
    """Synthetic MobileSAM weights as a checkpoint file (official ones can't be downloaded)."""
    from napari_esam.models.synthetic import synthetic_state_dict

    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam_synthetic.pt"
    state = {k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()}
    torch.save(state, path)
    return path


@pytest.fixture
def small_tiff(tmp_path) -> Path:
    image, _ = blob_stack(2, size=48, seed=3)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, image, photometric="minisblack", metadata={"axes": "ZYX"})
    return path


@pytest.mark.slow
def test_cli_runs_real_mobilesam_on_a_small_tiff_to_a_tiff(tmp_path, small_tiff,
                                                            mobilesam_ckpt, capsys):
    """End to end with the real MobileSAM code (synthetic weights, a 3x3 grid, filters off)."""
    from napari_esam.core.io.label_files import read_labels

    out = tmp_path / "labels.tif"
    argv = ["everything", str(small_tiff), "-o", str(out), "--model", "mobilesam",
            "--device", "cpu", "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "3",
            "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 slices" in printed
    assert not Path(str(out) + ".partial.zarr").exists()  # the working store is removed
    data, meta = read_labels(out)
    labels = np.asarray(data)
    assert labels.shape == (2, 48, 48) and meta["axes"] == "zyx" and meta["napari_esam"]
    np.testing.assert_array_equal(tifffile.imread(out), labels)
    total = 0
    for i in range(2):  # the printed counts are the labels'; ids in the slice's range
        ids = set(np.unique(labels[i]).tolist()) - {0}
        assert f"slice {i}: {len(ids)} objects" in printed
        assert all(i * 100 < v < (i + 1) * 100 for v in ids)  # 3*3*3 masks -> stride 100
        total += len(ids)
    assert total > 0  # synthetic weights with the filters off do give masks


def test_cli_writes_a_readable_zarr_equal_to_its_tiff(tmp_path, mobilesam_ckpt,
                                                      blob_model_as_mobilesam, capsys):
    stack, counts = blob_stack(3)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, photometric="minisblack", metadata={"axes": "TYX"})
    common = ["--device", "cpu", "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "8"]
    assert main(["everything", str(src), "-o", str(tmp_path / "a.zarr"), *common]) == 0
    assert main(["everything", str(src), "-o", str(tmp_path / "a.tif"), *common]) == 0
    printed = capsys.readouterr().out
    for i, n in enumerate(counts):
        assert f"slice {i}: {n} objects" in printed
    z = zarr.open_group(tmp_path / "a.zarr", mode="r")
    assert z["0"].chunks[0] == 1 and z.attrs[RUN_ATTR]["complete"]
    assert z.attrs["napari-esam"]["axes"] == "tyx"  # the TIFF's axes carry over
    labels = z["0"][:]
    assert labels.dtype == np.uint16  # 8x8 points -> stride 1000, largest id 2999
    assert [len(np.unique(labels[i])) - 1 for i in range(3)] == counts
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), labels)
    import dask.array as da

    assert da.from_zarr(str(tmp_path / "a.zarr"), component="0").shape == (3, 64, 64)


@pytest.fixture
def blob_model_as_mobilesam(mobilesam_ckpt):
    """Put the fast blob model in the model cache under the CLI's key (no real model)."""
    spec = B.ModelSpec("mobilesam", str(mobilesam_ckpt.resolve()), "cpu", None)
    B._MODELS[spec.key()] = BlobModel().eval()
    yield
    B._MODELS.pop(spec.key(), None)


def test_cli_resumes_and_overwrite_starts_over(tmp_path, mobilesam_ckpt, blob_model_as_mobilesam,
                                               capsys):
    stack, counts = blob_stack(4)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    out = tmp_path / "out.zarr"
    args = ["everything", str(src), "-o", str(out), "--device", "cpu",
            "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "8", "--no-progress"]
    # an interrupted first run (two slices), made through the core with the CLI's settings
    settings = B.BatchSettings(
        B.ModelSpec("mobilesam", str(mobilesam_ckpt.resolve()), "cpu", None),
        B.EverythingParams(points_per_side=8),
    )
    done: list[int] = []
    run_batch(str(src), settings, out, progress=lambda e: e.kind == "slice" and done.append(1),
                cancel=lambda: len(done) >= 2)
    assert sorted(ZarrOutput(out).done()) == [0, 1]

    assert main(args) == 0
    captured = capsys.readouterr()
    assert "2 of 4 slices already done" in captured.err
    assert "tiles segmented 2 (already done: 2); encoder runs 2" in captured.err
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert rec["complete"] and [rec["slices"][str(i)] for i in range(4)] == counts

    # different settings: refused with a clear message and exit code 2
    assert main([*args[:-2], "6", "--no-progress"]) == 2
    assert "points_per_side" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "resuming" not in err and "tiles segmented 4 (already done: 0)" in err


@pytest.mark.parametrize("legacy", ["napari-esam-batch", "napari-esam-tiled"])
def test_cli_refuses_an_output_of_an_earlier_version_until_overwrite(
        tmp_path, mobilesam_ckpt, blob_model_as_mobilesam, capsys, legacy):
    """Outputs of the old batch/tiled pipelines cannot be resumed (other ids and dtype)."""
    stack, counts = blob_stack(2)
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    out = tmp_path / "old.zarr"
    group = zarr.open_group(out, mode="w", zarr_format=3)
    group.create_array("0", shape=stack.shape, dtype=np.uint32, chunks=(1, 64, 64))
    group.attrs[legacy] = {"slices": {"0": 3}, "complete": False}
    args = ["everything", str(src), "-o", str(out), "--device", "cpu",
            "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "8", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-esam everything: error:")
    assert "earlier napari-esam" in err and legacy in err and "--overwrite" in err
    assert zarr.open_group(out, mode="r").attrs[legacy]  # left as it was
    assert main([*args, "--overwrite"]) == 0
    attrs = zarr.open_group(out, mode="r").attrs
    assert legacy not in attrs and attrs[RUN_ATTR]["complete"]
    labels = zarr.open_array(out / "0", mode="r")[:]
    assert [len(np.unique(labels[i])) - 1 for i in range(2)] == counts


def test_cli_tiff_output_refuses_to_replace_a_finished_export(tmp_path, mobilesam_ckpt,
                                                             blob_model_as_mobilesam, capsys):
    stack, counts = blob_stack(2)
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    out = tmp_path / "s_labels.tiff"
    args = ["everything", str(src), "-o", str(out), "--device", "cpu",
            "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "8", "--no-progress"]
    assert main(args) == 0
    first = tifffile.imread(out)
    assert [len(np.unique(first[i])) - 1 for i in range(2)] == counts
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out), first)


def _write_bad(tmp_path: Path, kind: str) -> list[str]:
    from PIL import Image

    if kind == "missing":
        return [str(tmp_path / "nope.tif")]
    if kind == "unreadable":
        (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
        return [str(tmp_path / "bad.tif")]
    if kind == "format":
        (tmp_path / "notes.txt").write_text("x")
        return [str(tmp_path / "notes.txt")]
    if kind == "one-pixel":
        Image.fromarray(np.zeros((1, 40), np.uint8)).save(tmp_path / "line.png")
        return [str(tmp_path / "line.png")]
    if kind == "axis":
        z = np.zeros((3, 16, 16), np.uint8)
        tifffile.imwrite(tmp_path / "z.tif", z, photometric="minisblack")
        return [str(tmp_path / "z.tif"), "--axis", "3"]
    if kind == "channel":
        tifffile.imwrite(tmp_path / "c.tif", np.zeros((3, 2, 16, 16), np.uint8))
        return [str(tmp_path / "c.tif"), "--channel-axis", "1"]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("unreadable", "cannot read"),
        ("format", "unsupported input format"),
        ("one-pixel", "too small"),
        ("axis", "out of range"),
        ("channel", "choose one"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, kind, message):
    argv = ["everything", *_write_bad(tmp_path, kind), "-o", str(tmp_path / "o.zarr")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-esam everything: error:") and message in err
    assert not (tmp_path / "o.zarr").exists()


def test_cli_bad_output_and_checkpoint(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((2, 16, 16), np.uint8))
    assert main(["everything", str(tmp_path / "z.tif"), "-o", str(tmp_path / "o.png")]) == 2
    assert ".zarr, .tif or .tiff" in capsys.readouterr().err
    assert main(["everything", str(tmp_path / "z.tif"), "-o", str(tmp_path / "o.zarr"),
                 "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["everything", str(tmp_path / "z.tif"), "-o", str(tmp_path / "o.zarr"),
                 "--checkpoint", str(bad), "--device", "cpu"]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["everything", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--points-per-side", "--pred-iou-thresh", "--axis", "--checkpoint",
                 "--overwrite", "--model", "--device", "--min-mask-region-area", "--ids"):
        assert flag in out


def test_console_script_is_installed():
    exe = shutil.which("napari-esam", path=str(ROOT / ".venv" / "bin"))
    if exe is None:
        pytest.skip("the console script is not installed in .venv")
    proc = subprocess.run([exe, "everything", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "segment everything" in proc.stdout


class InterruptingBlobModel(BlobModel):
    """Raises KeyboardInterrupt (as Ctrl-C does) while encoding the third slice."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def encode(self, x):
        self.images += 1
        if self.images == 3:
            raise KeyboardInterrupt
        return super().encode(x)


def test_cli_ctrl_c_exits_1_and_keeps_finished_slices(tmp_path, mobilesam_ckpt, capsys):
    stack, counts = blob_stack(4)
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    spec = B.ModelSpec("mobilesam", str(mobilesam_ckpt.resolve()), "cpu", None)
    B._MODELS[spec.key()] = InterruptingBlobModel().eval()
    try:
        out = tmp_path / "s_labels.tif"
        args = ["everything", str(src), "-o", str(out), "--device", "cpu",
                "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "8", "--no-progress"]
        assert main(args) == 1
        assert "2 finished slices were kept in" in capsys.readouterr().err
        work = Path(str(out) + ".partial.zarr")
        assert ZarrOutput(work).done() == {0: counts[0], 1: counts[1]} and not out.exists()
        B._MODELS[spec.key()] = BlobModel().eval()
        assert main(args) == 0
        assert "2 of 4 slices already done" in capsys.readouterr().err
        labels = tifffile.imread(out)
        assert [len(np.unique(labels[i])) - 1 for i in range(4)] == counts
        assert not work.exists()
    finally:
        B._MODELS.pop(spec.key(), None)


def test_cli_reads_png_and_zarr_inputs(tmp_path, mobilesam_ckpt, blob_model_as_mobilesam):
    from PIL import Image

    stack, counts = blob_stack(3)
    common = ["--device", "cpu", "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "8",
              "--no-progress"]
    gray = (stack[2] > 1000).astype(np.uint8) * 255
    Image.fromarray(np.repeat(gray[..., None], 3, -1)).save(tmp_path / "rgb.png")
    assert main(["everything", str(tmp_path / "rgb.png"), "-o", str(tmp_path / "p.zarr"),
                 *common]) == 0
    labels = zarr.open_array(tmp_path / "p.zarr" / "0", mode="r")[:]
    assert labels.shape == (64, 64) and len(np.unique(labels)) - 1 == counts[2]
    zarr.save_array(tmp_path / "in.zarr", stack)
    assert main(["everything", str(tmp_path / "in.zarr"), "-o", str(tmp_path / "z.zarr"),
                 *common]) == 0
    labels = zarr.open_array(tmp_path / "z.zarr" / "0", mode="r")[:]
    assert [len(np.unique(labels[i])) - 1 for i in range(3)] == counts
