"""Core label export/import: formats, metadata, validation and crash safety (no Qt)."""

from __future__ import annotations

import errno
import json
import os
import threading
import tracemalloc
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_esam.core.io import label_files as labels_io
from napari_esam.core.io.label_files import (
    MAX_COLORS,
    needs_bigtiff,
    read_labels,
    smallest_label_dtype,
    write_labels,
)


def make_labels(shape: tuple[int, ...], max_label: int, seed: int = 0) -> np.ndarray:
    """Blocky labels 0..max_label (the largest value is always present)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, max_label + 1, size=shape, dtype=np.int64)
    data[(0,) * len(shape)] = max_label
    data[(-1,) * len(shape)] = 0
    return data


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def zarr_attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text(encoding="utf-8"))["attributes"]


# ------------------------------------------------------------------ pure decisions


@pytest.mark.parametrize(
    ("max_label", "dtype"),
    [(0, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.uint32),
     (2**32 - 1, np.uint32), (2**32, np.uint64)],
)  # fmt: skip
def test_smallest_label_dtype(max_label: int, dtype: type) -> None:
    assert smallest_label_dtype(max_label) == np.dtype(dtype)


def test_smallest_label_dtype_rejects_negative() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        smallest_label_dtype(-1)


def test_needs_bigtiff() -> None:
    # 20 x 16384 x 16384 uint8 = 5.4 GB: must be BigTIFF; the same in uint16 too
    assert needs_bigtiff((20, 16384, 16384), np.uint8)
    assert needs_bigtiff((20, 16384, 16384), "uint16")
    assert not needs_bigtiff((14, 16384, 16384), np.uint8)  # 3.8 GB fits a classic TIFF
    assert not needs_bigtiff((4, 1024, 1024), np.uint32)
    # the same element count flips with the item size
    assert needs_bigtiff((1, 40000, 40000), np.uint32)
    assert not needs_bigtiff((1, 40000, 40000), np.uint16)


# ------------------------------------------------------------------------ round trips

ROUND_TRIPS = [
    ((40, 50), 7, np.uint8),
    ((3, 600, 530), 255, np.uint8),  # more than one 512x512 tile in YX
    ((5, 30, 20), 300, np.uint16),
    ((2, 3, 40, 30), 70000, np.uint32),
]


@pytest.mark.parametrize(("shape", "max_label", "dtype"), ROUND_TRIPS)
def test_zarr_round_trip(tmp_path: Path, shape, max_label, dtype) -> None:
    data = make_labels(shape, max_label)
    ndim = len(shape)
    scale = [0.5 + i for i in range(ndim)]
    translate = [float(i) * 3 for i in range(ndim)]
    out = write_labels(tmp_path / "labels.zarr", data, scale=scale, translate=translate)
    assert out == tmp_path / "labels.zarr"
    assert listing(tmp_path) == ["labels.zarr"]

    array, meta = read_labels(out)
    assert isinstance(array, zarr.Array)  # lazy
    assert array.read_only
    assert array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(array[...], data)
    assert meta["scale"] == scale
    assert meta["translate"] == translate
    assert meta["axes"] == {2: "yx", 3: "zyx", 4: "tzyx"}[ndim]
    assert meta["name"] == "labels"
    assert meta["napari_esam"] is True
    # chunked (at most 512x512 tiles, 1 along the first leading axes) and compressed
    assert array.chunks[-2] <= 512 and array.chunks[-1] <= 512
    assert all(c == 1 for c in array.chunks[:-3])
    assert array.compressors


def test_zarr_ngff_metadata(tmp_path: Path) -> None:
    data = np.zeros((4, 600, 600), dtype=np.uint16)
    data[1, 10:20, 10:20] = 3
    data[2, 530:540, 5:9] = 17
    out = write_labels(
        tmp_path / "cells.ome.zarr",
        data,
        scale=(2.0, 0.25, 0.25),
        translate=(0, 5, 0),
        units=(None, "micrometer", "micrometer"),
        name="nuclei",
    )
    attrs = zarr_attrs(out)
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert multiscale["name"] == "nuclei"
    assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" for a in multiscale["axes"])
    assert multiscale["axes"][2]["unit"] == "micrometer"
    assert "unit" not in multiscale["axes"][0]
    (dataset,) = multiscale["datasets"]
    assert dataset["path"] == "0"
    assert dataset["coordinateTransformations"] == [
        {"type": "scale", "scale": [2.0, 0.25, 0.25]},
        {"type": "translation", "translation": [0.0, 5.0, 0.0]},
    ]
    colors = ome["image-label"]["colors"]
    assert [c["label-value"] for c in colors] == [3, 17]
    assert all(len(c["rgba"]) == 4 and all(0 <= v <= 255 for v in c["rgba"]) for c in colors)
    assert attrs["napari-esam"]["kind"] == "labels"
    # the label array itself is zarr v3 with named dimensions; smallest dtype holding 17
    array = zarr.open_group(out, mode="r")["0"]
    assert array.metadata.zarr_format == 3
    assert array.metadata.dimension_names == ("z", "y", "x")
    assert array.dtype == np.uint8
    assert array.chunks == (1, 512, 512)
    # all-background chunks are not written at all
    assert array.nchunks_initialized == 2


def test_zarr_chunks_grow_along_z_for_small_planes() -> None:
    assert labels_io._zarr_chunks((1000, 64, 64)) == (64, 64, 64)
    assert labels_io._zarr_chunks((3, 2, 5000, 100)) == (1, 2, 512, 100)
    assert labels_io._zarr_chunks((300, 200)) == (300, 200)


def test_zarr_colors_bounded_for_many_labels(tmp_path: Path) -> None:
    data = np.arange(1, MAX_COLORS + 101, dtype=np.uint32).reshape(1, -1)
    data = np.repeat(data, 2, axis=0)
    out = write_labels(tmp_path / "many.zarr", data)
    assert "colors" not in zarr_attrs(out)["ome"]["image-label"]
    np.testing.assert_array_equal(read_labels(out)[0][...], data)


@pytest.mark.parametrize(("shape", "max_label", "dtype"), ROUND_TRIPS)
def test_tiff_round_trip(tmp_path: Path, shape, max_label, dtype) -> None:
    data = make_labels(shape, max_label)
    ndim = len(shape)
    scale = [0.5 + i for i in range(ndim)]
    translate = [float(i) for i in range(ndim)]
    out = write_labels(tmp_path / "labels.tif", data, scale=scale, translate=translate)
    assert listing(tmp_path) == ["labels.tif"]
    array, meta = read_labels(out)
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(array, data)
    assert meta["scale"] == scale
    assert meta["translate"] == translate
    assert meta["napari_esam"] is True
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert not tif.is_bigtiff
        # ImageJ only holds uint8/uint16; larger labels become OME-TIFF
        assert tif.is_imagej == (np.dtype(dtype).itemsize <= 2)
        assert tif.is_ome == (np.dtype(dtype).itemsize > 2)


@pytest.mark.parametrize(("max_label", "dtype"), [(200, np.uint8), (4000, np.uint16)])
def test_tiff_stack_is_imagej(tmp_path: Path, max_label: int, dtype: type) -> None:
    data = make_labels((6, 40, 30), max_label)
    units = (None, "micrometer", "micrometer")
    out = write_labels(tmp_path / "stack.tif", data, scale=(3.0, 0.5, 0.25), units=units)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "ZYX"
        assert tif.series[0].dtype == np.dtype(dtype)
        assert tif.imagej_metadata["spacing"] == pytest.approx(3.0)
        assert tif.imagej_metadata["unit"] == "micron"
        xres = tif.pages.first.tags["XResolution"].value
        yres = tif.pages.first.tags["YResolution"].value
        assert xres[0] / xres[1] == pytest.approx(4.0)  # pixels per unit = 1 / 0.25
        assert yres[0] / yres[1] == pytest.approx(2.0)
        np.testing.assert_array_equal(tif.asarray(), data)


def test_tiff_4d_imagej_axes(tmp_path: Path) -> None:
    data = make_labels((2, 3, 20, 10), 9)
    out = write_labels(tmp_path / "movie.tiff", data, scale=(5, 2, 1, 1))
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "TZYX"
        assert tif.imagej_metadata["finterval"] == pytest.approx(5.0)


def test_tiff_zstd_is_ome(tmp_path: Path) -> None:
    pytest.importorskip("imagecodecs")
    data = make_labels((3, 20, 20), 9)
    out = write_labels(tmp_path / "z.tif", data, compression="zstd")
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.compression == tifffile.COMPRESSION.ZSTD
        assert not tif.is_imagej  # ImageJ cannot decode zstd
        np.testing.assert_array_equal(tif.asarray(), data)


@pytest.mark.parametrize(
    ("compression", "codec"), [("zlib", "gzip"), ("zstd", "blosc"), (None, None)]
)
def test_zarr_compression_choice(tmp_path: Path, compression, codec) -> None:
    out = write_labels(tmp_path / "c.zarr", make_labels((30, 30), 5), compression=compression)
    codecs = json.loads((out / "0" / "zarr.json").read_text())["codecs"]
    names = [c["name"] for c in codecs if c["name"] != "bytes"]
    assert names == ([codec] if codec else [])


def test_tiff_uncompressed(tmp_path: Path) -> None:
    out = write_labels(tmp_path / "u.tif", make_labels((30, 30), 5), compression="none")
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.compression == tifffile.COMPRESSION.NONE


def test_bool_and_signed_inputs(tmp_path: Path) -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:7] = True
    array, _ = read_labels(write_labels(tmp_path / "mask.zarr", mask))
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array[...], mask.astype(np.uint8))

    signed = make_labels((10, 12), 1000).astype(np.int64)
    array, _ = read_labels(write_labels(tmp_path / "signed.tif", signed))
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, signed)


def test_multiscale_list_exports_level_zero(tmp_path: Path) -> None:
    full = make_labels((40, 40), 12)
    array, _ = read_labels(write_labels(tmp_path / "ms.zarr", [full, full[::2, ::2]]))
    np.testing.assert_array_equal(array[...], full)


def test_zarr_input_to_tiff_and_back(tmp_path: Path) -> None:
    data = make_labels((3, 70, 60), 40)
    source = zarr.create_array(tmp_path / "plain.zarr", shape=data.shape, dtype="int32",
                               chunks=(1, 32, 32))  # fmt: skip
    source[...] = data
    array, meta = read_labels(tmp_path / "plain.zarr")
    assert meta["napari_esam"] is False and meta["scale"] == [1.0, 1.0, 1.0]
    out = write_labels(tmp_path / "from zarr.tif", array, scale=(1, 2, 2))
    back, meta = read_labels(out)
    np.testing.assert_array_equal(back, data)
    assert back.dtype == np.uint8
    assert meta["scale"] == [1.0, 2.0, 2.0]


def test_reads_ngff_04_group(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=2)
    group.create_array("0", shape=(5, 6), dtype="uint16", fill_value=0)[...] = 4
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [3, 4]}]}
            ],
        }
    ]
    array, meta = read_labels(tmp_path / "old.zarr")
    assert meta["scale"] == [3.0, 4.0]
    assert meta["axes"] == "yx"
    assert int(array[0, 0]) == 4


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_path_with_spaces_and_non_ascii(tmp_path: Path, suffix: str) -> None:
    folder = tmp_path / "my labels"
    folder.mkdir()
    data = make_labels((2, 20, 20), 300)
    out = write_labels(folder / f"ñuclei ü{suffix}", data, scale=(1, 0.5, 0.5))
    assert listing(folder) == [f"ñuclei ü{suffix}"]
    array, meta = read_labels(str(out))
    np.testing.assert_array_equal(np.asarray(array[...]), data)
    assert meta["name"] == "ñuclei ü"
    assert labels_io.is_labels_export(out)


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_rejects_float_labels(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ValueError, match=r"integer \(or bool\).*float32"):
        write_labels(tmp_path / f"f{suffix}", np.ones((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="integer"):
        write_labels(tmp_path / f"g{suffix}", da.ones((4, 4), dtype=float, chunks=2))
    assert listing(tmp_path) == []


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_rejects_negative_labels(tmp_path: Path, suffix: str) -> None:
    data = make_labels((8, 8), 5).astype(np.int16)
    data[3, 4] = -2
    with pytest.raises(ValueError, match="non-negative, found -2"):
        write_labels(tmp_path / f"n{suffix}", data)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_negative_in_late_dask_chunk_found_while_writing(tmp_path: Path, suffix: str) -> None:
    """With a forced dtype there is no pre-pass: the check happens chunk by chunk mid-write."""
    data = np.ones((6, 64, 64), dtype=np.int32)
    data[5, 63, 63] = -1
    lazy = da.from_array(data, chunks=(1, 64, 64))
    with pytest.raises(ValueError, match="non-negative, found -1"):
        write_labels(tmp_path / f"late{suffix}", lazy, dtype="uint8")
    assert listing(tmp_path) == []


def test_forced_dtype_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit the output dtype uint8"):
        write_labels(tmp_path / "small.zarr", np.full((4, 4), 300), dtype=np.uint8)
    with pytest.raises(ValueError, match="unsigned"):
        write_labels(tmp_path / "signed.zarr", np.ones((4, 4), int), dtype=np.int16)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": (1, 2)}, "scale has 2 values but the labels have 3"),
        ({"scale": (1, 0, 1)}, "positive"),
        ({"translate": (0, float("nan"), 0)}, "finite"),
        ({"axes": "xyz"}, "axes 'xyz'"),
        ({"axes": "zy"}, "axes 'zy'"),
        ({"compression": "lzma"}, "unknown compression"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_labels(tmp_path / "bad.zarr", np.ones((2, 4, 4), np.uint8), **kwargs)
    assert listing(tmp_path) == []


def test_rejects_bad_paths_and_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.zarr, \.tif or \.tiff"):
        write_labels(tmp_path / "labels.png", np.ones((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_labels(tmp_path / "missing" / "labels.zarr", np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="2 to 5 dimensions"):
        write_labels(tmp_path / "one.zarr", np.ones(4, np.uint8))
    with pytest.raises(ValueError, match="empty"):
        write_labels(tmp_path / "empty.zarr", np.ones((0, 4), np.uint8))
    with pytest.raises(FileNotFoundError):
        read_labels(tmp_path / "nothing.zarr")


# ---------------------------------------------------------------------------- safety


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_existing_target_needs_overwrite(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"labels{suffix}"
    old = make_labels((20, 20), 3, seed=1)
    new = make_labels((20, 20), 9, seed=2)
    write_labels(target, old)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_labels(target, new)
    np.testing.assert_array_equal(np.asarray(read_labels(target)[0][...]), old)
    write_labels(target, new, overwrite=True)
    np.testing.assert_array_equal(np.asarray(read_labels(target)[0][...]), new)
    assert listing(tmp_path) == [target.name]


class Boom(Exception):
    pass


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), Boom("crash")],
    ids=["ENOSPC", "KeyboardInterrupt", "exception"],
)
def test_failure_mid_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, error: BaseException
) -> None:
    target = tmp_path / f"labels{suffix}"
    old = make_labels((8, 520, 520), 20, seed=1)
    write_labels(target, old)

    calls = 0
    lock = threading.Lock()
    real = labels_io._convert_block

    def failing(block, dtype):
        nonlocal calls
        with lock:
            calls += 1
            n = calls
        if n > 3:  # three blocks/pages were written before the failure
            raise error
        return real(block, dtype)

    monkeypatch.setattr(labels_io, "_convert_block", failing)
    with pytest.raises(type(error)):
        write_labels(target, make_labels((8, 520, 520), 300, seed=2), overwrite=True)
    assert calls > 3
    assert listing(tmp_path) == [target.name]  # no temporary or backup left behind
    monkeypatch.undo()
    array, _ = read_labels(target)
    np.testing.assert_array_equal(np.asarray(array[...]), old)


def test_progress_reports_and_can_cancel(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    write_labels(
        tmp_path / "p.tif", make_labels((5, 16, 16), 3), progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(i, 5) for i in range(1, 6)]

    seen.clear()
    write_labels(
        tmp_path / "p.zarr", make_labels((3, 600, 600), 3), progress=lambda *a: seen.append(a)
    )
    assert len(seen) == 3 * 4 and seen[-1] == (12, 12)  # 2x2 tiles per plane

    def cancel(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_labels(tmp_path / "c.zarr", make_labels((3, 600, 600), 3), progress=cancel)
    assert listing(tmp_path) == ["p.tif", "p.zarr"]


def test_failed_swap_restores_old_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "labels.zarr"
    old = make_labels((10, 10), 3)
    write_labels(target, old)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".labels.zarr.tmp-"):
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_labels(target, make_labels((10, 10), 9), overwrite=True)
    monkeypatch.undo()
    assert listing(tmp_path) == ["labels.zarr"]
    np.testing.assert_array_equal(read_labels(target)[0][...], old)


# ------------------------------------------------------------- larger-than-budget Dask


def counting_labels(shape, chunks, counter: list[int]) -> da.Array:
    """A lazy uint16 label volume whose chunks are generated on demand (and counted)."""
    lock = threading.Lock()

    def block(block_info=None):
        info = block_info[None]
        with lock:
            counter[0] += 1
        (z0, _), (y0, _), (x0, _) = info["array-location"]
        out = np.zeros(info["chunk-shape"], dtype=np.uint16)
        out[:, 8:-8, 8:-8] = 1 + (z0 * 37 + y0 // 8 + x0) % 1000
        return out

    return da.map_blocks(
        block,
        chunks=da.core.normalize_chunks(chunks, shape),
        dtype=np.uint16,
        meta=np.empty((0, 0, 0), "u2"),
    )


@pytest.mark.parametrize(
    ("suffix", "shape", "fraction"),
    [
        (".zarr", (16, 2048, 2048), 16),  # 128 MiB in 512x512 chunks; budget 8 MiB
        (".tif", (32, 1024, 1024), 4),  # 64 MiB written page by page (2 MiB); budget 16 MiB
    ],
)
def test_dask_larger_than_budget_is_streamed(tmp_path: Path, suffix, shape, fraction) -> None:
    counter = [0]
    lazy = counting_labels(shape, (1, 512, 512), counter)
    nbytes = lazy.nbytes
    budget = nbytes // fraction
    # warm up (lazy imports, codec set-up) so that only the streaming itself is measured
    write_labels(tmp_path / f"warm-up{suffix}", lazy[:1, :600, :600], scale=(2, 1, 1))
    counter[0] = 0
    tracemalloc.start()
    try:
        out = write_labels(tmp_path / f"big{suffix}", lazy, scale=(2, 1, 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB for a {nbytes / 2**20:.0f} MiB array"
    # each chunk computed once for the min/max pre-pass and once for writing, never more
    assert counter[0] == 2 * lazy.npartitions
    array, meta = read_labels(out)
    assert array.dtype == np.uint16 and meta["scale"] == [2.0, 1.0, 1.0]
    for z, y, x in [(0, 0, 0), (5, 700, 900), (15, shape[1] - 1, 100)]:
        y0, x0 = y // 512 * 512, x // 512 * 512
        zs = np.s_[z, y0 : y0 + 512, x0 : x0 + 512]
        np.testing.assert_array_equal(np.asarray(array[zs]), lazy[zs].compute())


def test_dask_with_forced_dtype_is_single_pass(tmp_path: Path) -> None:
    counter = [0]
    lazy = counting_labels((4, 1024, 512), (1, 512, 512), counter)
    out = write_labels(tmp_path / "one pass.zarr", lazy, dtype="uint16")
    assert counter[0] == lazy.npartitions
    np.testing.assert_array_equal(read_labels(out)[0][...], lazy.compute())


def test_large_tiff_is_read_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_labels((4, 30, 20), 1000)
    out = write_labels(tmp_path / "lazy.tif", data, scale=(2, 1, 1))
    monkeypatch.setattr(labels_io, "EAGER_TIFF_BYTES", 0)
    array, meta = read_labels(out)
    assert not isinstance(array, np.ndarray)
    assert array.shape == data.shape and array.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(array[1:3]), data[1:3])
    assert meta["scale"] == [2.0, 1.0, 1.0]


def test_read_rejects_non_label_files(tmp_path: Path) -> None:
    (tmp_path / "empty.zarr").mkdir()
    (tmp_path / "text.tif").write_text("hello")
    with pytest.raises(ValueError, match="not a Zarr array or group"):
        read_labels(tmp_path / "empty.zarr")
    with pytest.raises(ValueError, match="not a TIFF"):
        read_labels(tmp_path / "text.tif")
    assert not labels_io.is_labels_export(tmp_path / "empty.zarr")
    assert not labels_io.is_labels_export(tmp_path / "text.tif")


@pytest.mark.parametrize("suffix", [".zarr", ".tif"])
def test_reexport_onto_its_own_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    """Saving a layer opened lazily from an export back onto the same path is safe."""
    monkeypatch.setattr(labels_io, "EAGER_TIFF_BYTES", 0)  # lazy TIFF too
    data = make_labels((3, 600, 550), 300)
    target = write_labels(tmp_path / f"same{suffix}", data, scale=(1, 2, 2))
    array, meta = read_labels(target)
    assert not isinstance(array, np.ndarray)
    write_labels(target, array, scale=(5, 2, 2), overwrite=True)
    back, meta = read_labels(target)
    np.testing.assert_array_equal(np.asarray(back[...]), data)
    assert meta["scale"] == [5.0, 2.0, 2.0]
    assert listing(tmp_path) == [target.name]
