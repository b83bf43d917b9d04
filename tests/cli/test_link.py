"""``napari-esam link``: formats, tracks CSV and one-line errors through
``napari_esam.cli.main``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_esam import link_labels, read_labels, write_labels
from napari_esam.cli import main
from tests.fakes import moving_discs, relabel_per_slice, touching_ellipsoids


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    return relabel_per_slice(touching_ellipsoids(shape=(10, 48, 48)), seed=1)


def test_tiff_in_zarr_out_keeps_the_metadata(stack, tmp_path: Path, capsys) -> None:
    source = write_labels(tmp_path / "per slice.tif", stack, scale=(2.0, 0.5, 0.5))
    out = tmp_path / "linked" / "nuclei.zarr"  # the folder is created
    assert main(["link", str(source), "-o", str(out), "--no-progress"]) == 0
    ref = link_labels(stack)
    assert f"{ref.n_objects} objects in (10, 48, 48) labels, wrote {out}" in \
        capsys.readouterr().out
    data, meta = read_labels(out)
    np.testing.assert_array_equal(data[...], ref.labels)
    assert meta["scale"] == [2.0, 0.5, 0.5] and meta["napari_esam"]


def test_npy_and_plain_tiff_inputs(stack, tmp_path: Path) -> None:
    ref = link_labels(stack, gap=0, iou_threshold=0.3).labels
    np.save(tmp_path / "in.npy", stack)
    tifffile.imwrite(tmp_path / "plain.tif", stack, photometric="minisblack")
    for name in ("in.npy", "plain.tif"):
        out = tmp_path / f"{name}.tif"
        argv = ["link", str(tmp_path / name), "-o", str(out), "--gap", "0",
                "--iou-threshold", "0.3", "--no-progress"]
        assert main(argv) == 0
        np.testing.assert_array_equal(read_labels(out)[0], ref)


def test_track_mode_writes_the_tracks_csv(tmp_path: Path) -> None:
    stack = relabel_per_slice(moving_discs(frames=6, size=96, seed=3), seed=3)
    np.save(tmp_path / "movie.npy", stack)
    out, table = tmp_path / "tracks.tif", tmp_path / "tracks.csv"
    argv = ["link", str(tmp_path / "movie.npy"), "-o", str(out), "--mode", "track",
            "--tracks-csv", str(table), "--no-progress"]
    assert main(argv) == 0
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["track_id", "t", "y", "x", "area"]
    ids = np.unique(read_labels(out)[0])[1:]
    assert sorted({int(r["track_id"]) for r in rows}) == ids.tolist()


def test_ctrl_c_exits_1_and_keeps_the_old_output(stack, tmp_path: Path, capsys,
                                                 monkeypatch) -> None:
    from napari_esam.core.linking import stack as stack_module

    np.save(tmp_path / "in.npy", stack)
    out = write_labels(tmp_path / "out.zarr", np.ones((2, 4, 4), np.uint8))
    real = stack_module.relabel_plane
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # Ctrl-C while the output is being written
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stack_module, "relabel_plane", interrupted)
    argv = ["link", str(tmp_path / "in.npy"), "-o", str(out), "--overwrite", "--no-progress"]
    assert main(argv) == 1
    assert "interrupted" in capsys.readouterr().err
    np.testing.assert_array_equal(read_labels(out)[0][...], np.ones((2, 4, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.zarr"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("napari-esam link: error:"), err
    return err


@pytest.mark.parametrize(("make", "extra", "message"), [
    (lambda d: np.save(d / "in.npy", np.zeros((3, 8, 8), np.float32)), [], "integers"),
    (lambda d: np.save(d / "in.npy", np.zeros((8, 8), np.uint16)), [], "3-D or more"),
    (lambda d: np.save(d / "in.npy", np.zeros((3, 8, 8), np.uint16)), ["--axis", "1"],
     "--axis"),
    (lambda d: None, [], "does not exist"),
    (lambda d: np.save(d / "in.npy", np.zeros((3, 8, 8), np.uint16)),
     ["--tracks-csv", "t.csv"], "needs --mode track"),
    (lambda d: np.save(d / "in.npy", np.zeros((3, 8, 8), np.uint16)),
     ["--iou-threshold", "0"], "--iou-threshold"),
    (lambda d: np.save(d / "in.npy", np.zeros((3, 8, 8), np.uint16)),
     ["--split-ratio", "2"], "--split-ratio"),
])
def test_bad_input_is_a_one_line_error(tmp_path: Path, capsys, make, extra, message) -> None:
    make(tmp_path)
    argv = ["link", str(tmp_path / "in.npy"), "-o", str(tmp_path / "out.tif"), *extra]
    assert main(argv) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out.tif").exists()


def test_an_existing_output_or_the_input_itself_is_refused(stack, tmp_path: Path,
                                                          capsys) -> None:
    source = write_labels(tmp_path / "in.tif", stack)
    out = write_labels(tmp_path / "out.tif", np.ones((2, 4, 4), np.uint8))
    assert main(["link", str(source), "-o", str(out)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert main(["link", str(source), "-o", str(tmp_path / "." / "in.tif"), "--overwrite"]) == 2
    assert "the output is the input" in one_line_error(capsys)
    np.testing.assert_array_equal(read_labels(out)[0], np.ones((2, 4, 4), np.uint8))
    np.testing.assert_array_equal(read_labels(source)[0], stack)
