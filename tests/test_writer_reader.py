"""npe2 writer/reader adapters, directly and through a headless napari viewer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_esam._reader import get_reader, read_labels_layer
from napari_esam._writer import write_labels_tiff, write_labels_zarr
from napari_esam.core.io.label_files import read_labels, write_labels


def sample_labels(shape=(3, 40, 50), max_label=12) -> np.ndarray:
    data = np.zeros(shape, dtype=np.int32)
    data[..., 5:15, 5:20] = 1
    data[..., 20:30, 25:45] = max_label
    return data


# ----------------------------------------------------------------- adapters, no viewer


def test_writer_adapters_use_layer_meta(tmp_path: Path) -> None:
    data = sample_labels()
    meta = {
        "name": "cells",
        "scale": np.array([2.0, 0.5, 0.25]),
        "translate": np.array([0.0, 1.0, 2.0]),
        "axis_labels": ("-3", "-2", "-1"),  # napari's default labels: not axis names
        "units": ("pixel", "pixel", "pixel"),
    }
    paths = write_labels_zarr(str(tmp_path / "cells.zarr"), data, meta)
    assert paths == [str(tmp_path / "cells.zarr")]
    array, read_meta = read_labels(paths[0])
    np.testing.assert_array_equal(array[...], data)
    assert read_meta["scale"] == [2.0, 0.5, 0.25]
    assert read_meta["translate"] == [0.0, 1.0, 2.0]
    assert read_meta["axes"] == "zyx"
    assert read_meta["name"] == "cells"
    assert read_meta["units"] == [None, None, None]

    (tif,) = write_labels_tiff(str(tmp_path / "cells.tif"), data, meta)
    with tifffile.TiffFile(tif) as t:
        assert t.is_imagej
        np.testing.assert_array_equal(t.asarray(), data)


def test_writer_adapter_axis_labels_units_and_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "movie.zarr"
    write_labels(target, np.ones((2, 2, 8, 8), np.uint8))  # napari already confirmed replacing
    meta = {
        "name": "movie",
        "scale": [10.0, 1.0, 0.5, 0.5],
        "translate": [0, 0, 0, 0],
        "axis_labels": ("t", "z", "y", "x"),
        "units": ("second", "micrometer", "micrometer", "micrometer"),
    }
    data = sample_labels((2, 2, 40, 50), 300)
    write_labels_zarr(str(target), data, meta)
    attrs = json.loads((target / "zarr.json").read_text())["attributes"]
    axes = attrs["ome"]["multiscales"][0]["axes"]
    assert [(a["name"], a["type"], a.get("unit")) for a in axes] == [
        ("t", "time", "second"),
        ("z", "space", "micrometer"),
        ("y", "space", "micrometer"),
        ("x", "space", "micrometer"),
    ]
    np.testing.assert_array_equal(read_labels(target)[0][...], data)


def test_get_reader_claims_only_our_exports(tmp_path: Path) -> None:
    data = sample_labels()
    ours_zarr = write_labels(tmp_path / "ours.zarr", data, scale=(3, 1, 1))
    ours_tif = write_labels(tmp_path / "ours.tif", data)
    tifffile.imwrite(tmp_path / "plain.tif", data.astype(np.uint16), photometric="minisblack")
    zarr.create_array(tmp_path / "plain.zarr", shape=(4, 4), dtype="uint8")
    zarr.open_group(tmp_path / "group.zarr", mode="w").attrs["ome"] = {"version": "0.5"}
    (tmp_path / "fake.tif").write_bytes(b"not a tiff")

    assert get_reader(str(ours_zarr)) is read_labels_layer
    assert get_reader(str(ours_tif)) is read_labels_layer
    assert get_reader([str(ours_zarr)]) is read_labels_layer
    for other in ["plain.tif", "plain.zarr", "group.zarr", "fake.tif", "missing.zarr"]:
        assert get_reader(str(tmp_path / other)) is None, other
    assert get_reader([str(ours_zarr), str(ours_tif)]) is None

    ((layer_data, kwargs, layer_type),) = read_labels_layer(str(ours_zarr))
    assert layer_type == "labels"
    assert isinstance(layer_data, zarr.Array) and layer_data.read_only
    assert kwargs["scale"] == (3.0, 1.0, 1.0)
    assert kwargs["translate"] == (0.0, 0.0, 0.0)
    assert kwargs["name"] == "ours"


# ---------------------------------------------------------------------- napari viewer


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_viewer_opens_export_as_labels(make_napari_viewer, tmp_path: Path, suffix: str) -> None:
    from napari.layers import Labels

    data = sample_labels(max_label=400)
    path = write_labels(
        tmp_path / f"seg{suffix}",
        data,
        scale=(2.0, 0.5, 0.5),
        translate=(1.0, 0.0, 0.0),
        units=(None, "micrometer", "micrometer"),
    )
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-esam")
    assert len(layers) == 1
    layer = layers[0]
    assert isinstance(layer, Labels)
    assert layer.name == "seg"
    np.testing.assert_allclose(layer.scale, [2.0, 0.5, 0.5])
    np.testing.assert_allclose(layer.translate, [1.0, 0.0, 0.0])
    assert str(layer.units[-1]) == "micrometer"
    np.testing.assert_array_equal(np.asarray(layer.data[...]), data)
    if suffix == ".zarr":
        assert isinstance(layer.data, zarr.Array)  # lazy, read-only: painting cannot corrupt it


@pytest.mark.parametrize(("suffix", "imagej"), [(".zarr", None), (".tif", True), (".tiff", True)])
def test_viewer_saves_labels_with_our_writer(
    make_napari_viewer, tmp_path: Path, suffix: str, imagej: bool | None
) -> None:
    viewer = make_napari_viewer()
    data = sample_labels(max_label=9)
    viewer.add_labels(data, name="mask", scale=(4.0, 1.5, 1.5), translate=(0.0, 3.0, 0.0))
    path = tmp_path / f"saved mask{suffix}"
    written = viewer.layers.save(str(path), selected=True, plugin="napari-esam")
    assert [Path(p) for p in written] == [path]
    array, meta = read_labels(path)
    np.testing.assert_array_equal(np.asarray(array[...]), data)
    assert np.dtype(array.dtype) == np.uint8
    assert meta["scale"] == [4.0, 1.5, 1.5]
    assert meta["translate"] == [0.0, 3.0, 0.0]
    assert meta["name"] == "mask"
    if imagej is not None:
        with tifffile.TiffFile(path) as tif:
            assert tif.is_imagej is imagej

    # saving again over the existing export (napari has asked the user) replaces it
    viewer.layers["mask"].data = data * 50
    viewer.layers.save(str(path), selected=True, plugin="napari-esam")
    np.testing.assert_array_equal(np.asarray(read_labels(path)[0][...]), data * 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    # and napari reopens it with our reader
    (layer,) = viewer.open(str(path), plugin="napari-esam")
    np.testing.assert_allclose(layer.scale, [4.0, 1.5, 1.5])
