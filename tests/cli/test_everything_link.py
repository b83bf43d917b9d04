"""``napari-esam everything --link 3d|track``: per-slice segment-everything, then one id per
3-D object or track; resumable (SIGKILL included), with a tracks CSV."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_esam.cli import main
from napari_esam.core.io.label_files import read_labels
from napari_esam.core.runs import settings as B
from tests.fakes import BlobModel, blob_stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    from napari_esam.models.synthetic import synthetic_state_dict

    path = tmp_path / "mobile_sam_synthetic.pt"
    torch.save({k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()},
               path)
    return path


@pytest.fixture
def blob_model(ckpt):
    spec = B.ModelSpec("mobilesam", str(ckpt.resolve()), "cpu", None)
    B._MODELS[spec.key()] = BlobModel().eval()
    yield
    B._MODELS.pop(spec.key(), None)


@pytest.fixture
def stack_file(tmp_path) -> Path:
    stack, _ = blob_stack(5)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    return path


def argv(src, out, ckpt, *extra):
    return ["everything", str(src), "-o", str(out), "--device", "cpu", "--checkpoint",
            str(ckpt), "--points-per-side", "8", "--no-progress", *extra]


def test_link_3d_gives_one_id_per_object_through_the_slices(tmp_path, stack_file, ckpt,
                                                            blob_model, capsys):
    per_slice = tmp_path / "slices.zarr"
    assert main(argv(stack_file, per_slice, ckpt)) == 0
    out = tmp_path / "objects.zarr"
    assert main(argv(stack_file, out, ckpt, "--link", "3d")) == 0
    assert "3-D objects linked along axis 0" in capsys.readouterr().out
    assert not Path(str(out) + ".partial.zarr").exists()
    linked = np.asarray(read_labels(out)[0])
    slices = np.asarray(read_labels(per_slice)[0])
    assert linked.shape == slices.shape == (5, 64, 64)
    np.testing.assert_array_equal(linked > 0, slices > 0)  # the same pixels, other ids
    # the blob at the top-left corner is in every slice: one id through the stack
    assert len({int(linked[z, 16, 16]) for z in range(5)}) == 1 and linked[0, 16, 16] > 0
    # per slice it had a new id in every slice (stride ids)
    assert len({int(slices[z, 16, 16]) for z in range(5)}) == 5
    assert set(np.unique(linked)) == set(range(int(linked.max()) + 1))  # 1..n, consecutive


def test_link_track_writes_the_tracks_csv(tmp_path, stack_file, ckpt, blob_model):
    out = tmp_path / "tracks.tif"
    table = tmp_path / "tracks.csv"
    assert main(argv(stack_file, out, ckpt, "--link", "track", "--tracks-csv", str(table))) == 0
    rows = list(csv.DictReader(table.open()))
    assert set(rows[0]) == {"track_id", "t", "y", "x", "area"}
    linked = tifffile.imread(out)
    tracks = {int(r["track_id"]) for r in rows}
    assert tracks == set(np.unique(linked)) - {0}
    first = [r for r in rows if int(r["track_id"]) == int(linked[0, 16, 16])]
    assert [int(r["t"]) for r in first] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tracks-csv", "t.csv"], "--tracks-csv needs --link track"),
        (["--link", "3d", "--link-axis", "1"], "linking needs a stack"),
    ],
)
def test_bad_link_options_are_one_line_errors(tmp_path, stack_file, ckpt, blob_model, capsys,
                                              extra, message):
    assert main(argv(stack_file, tmp_path / "o.zarr", ckpt, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.zarr").exists()


def test_a_killed_linked_run_resumes_to_the_same_output(tmp_path, stack_file, ckpt, blob_model):
    reference = tmp_path / "reference.zarr"
    assert main(argv(stack_file, reference, ckpt, "--link", "3d")) == 0
    out = tmp_path / "killed.zarr"
    script = textwrap.dedent(
        f"""
        import os, signal
        from napari_esam.cli import main
        from napari_esam.core.runs import settings as B
        from tests.fakes import BlobModel

        class Killer(BlobModel):
            calls = 0
            def encode(self, x):
                Killer.calls += 1
                if Killer.calls == 3:  # while the third slice runs
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().encode(x)

        spec = B.ModelSpec("mobilesam", {str(ckpt.resolve())!r}, "cpu", None)
        B._MODELS[spec.key()] = Killer().eval()
        main({argv(stack_file, out, ckpt, "--link", "3d")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == -9
    assert not out.exists() and Path(str(out) + ".partial.zarr").exists()
    assert main(argv(stack_file, out, ckpt, "--link", "3d")) == 0
    np.testing.assert_array_equal(
        np.asarray(read_labels(out)[0]), np.asarray(read_labels(reference)[0])
    )
    assert main(argv(stack_file, out, ckpt, "--link", "3d")) == 2  # finished: not replaced
