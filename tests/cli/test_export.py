"""``napari-esam export``: round trips and errors through ``napari_esam.cli.main``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_esam.cli import main
from napari_esam.core.io.label_files import read_labels, write_labels


def sample_labels() -> np.ndarray:
    data = np.zeros((4, 30, 40), dtype=np.uint16)
    data[1:3, 5:15, 5:20] = 7
    data[2:, 18:28, 22:38] = 300
    return data


def test_export_zarr_to_tiff_and_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = sample_labels()
    source = write_labels(tmp_path / "in put.zarr", data, scale=(2, 0.5, 0.5), translate=(1, 0, 0))
    out = tmp_path / "out" / "ñuclei.tif"  # the output folder is created

    assert main(["export", str(source), "-o", str(out)]) == 0
    assert f"wrote (4, 30, 40) labels to {out}" in capsys.readouterr().out
    array, meta = read_labels(out)
    np.testing.assert_array_equal(array, data)
    assert meta["scale"] == [2.0, 0.5, 0.5]
    assert meta["translate"] == [1.0, 0.0, 0.0]
    assert meta["name"] == "in put"

    back = tmp_path / "back.zarr"
    assert main(["export", str(out), "-o", str(back), "--scale", "3", "1", "1"]) == 0
    array, meta = read_labels(back)
    np.testing.assert_array_equal(array[...], data)
    assert meta["scale"] == [3.0, 1.0, 1.0]


def test_export_plain_tiff_with_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = sample_labels()
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data.astype(np.int32), photometric="minisblack")
    out = tmp_path / "plain.zarr"
    argv = ["export", str(plain), "-o", str(out), "--compression", "none", "--axes", "zyx"]
    assert main([*argv, "--name", "nuclei"]) == 0
    array, meta = read_labels(out)
    np.testing.assert_array_equal(array[...], data)
    assert array.dtype == np.uint16
    assert not array.compressors
    assert meta["name"] == "nuclei"


def test_missing_input_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.zarr"
    assert main(["export", str(missing), "-o", str(tmp_path / "x.tif")]) != 0
    err = capsys.readouterr().err
    assert "export: error:" in err and "does not exist" in err and "nope.zarr" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = sample_labels()
    source = write_labels(tmp_path / "a.tif", data)
    out = write_labels(tmp_path / "b.zarr", np.ones((2, 2), np.uint8))
    assert main(["export", str(source), "-o", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    np.testing.assert_array_equal(read_labels(out)[0][...], np.ones((2, 2)))

    assert main(["export", str(source), "-o", str(out), "--overwrite"]) == 0
    np.testing.assert_array_equal(read_labels(out)[0][...], data)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scale", "1", "2"], "scale has 2 values"),
        (["--axes", "xy"], "axes 'xy'"),
    ],
)
def test_bad_options_fail(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    source = write_labels(tmp_path / "a.zarr", sample_labels())
    assert main(["export", str(source), "-o", str(tmp_path / "b.tif"), *extra]) != 0
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


def test_bad_output_extension_and_float_input(tmp_path: Path, capsys) -> None:
    source = write_labels(tmp_path / "a.zarr", sample_labels())
    assert main(["export", str(source), "-o", str(tmp_path / "b.png")]) != 0
    assert ".zarr, .tif or .tiff" in capsys.readouterr().err

    floats = tmp_path / "float.tif"
    tifffile.imwrite(floats, np.ones((5, 5), np.float32))
    assert main(["export", str(floats), "-o", str(tmp_path / "c.zarr")]) != 0
    assert "integer" in capsys.readouterr().err
