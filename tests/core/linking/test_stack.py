"""``link_labels``: quality against the naive baseline on data with a 3-D truth, consistent
ids, lazy inputs, outputs (arrays, files, atomic), errors."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_esam import link_labels, read_labels, write_labels
from napari_esam.core.linking.stack import LinkCancelled
from tests.fakes import (
    drop_objects,
    f1_at_iou,
    moving_discs,
    naive_stitch,
    relabel_per_slice,
    stardist_mask3d,
    touching_ellipsoids,
)

#: our linker must beat the naive baseline and reach at least this F1 (IoU 0.5)
MIN_F1 = 0.8


def assert_beats_naive(truth: np.ndarray, stack: np.ndarray, mode: str) -> None:
    ours = f1_at_iou(truth, link_labels(stack, mode=mode).labels)
    naive = f1_at_iou(truth, naive_stitch(stack))
    assert ours > naive, (ours, naive)
    assert ours >= MIN_F1, (ours, naive)


def test_stardist_nuclei_beat_the_naive_baseline() -> None:
    truth = stardist_mask3d()
    assert_beats_naive(truth, relabel_per_slice(truth), "3d")
    assert_beats_naive(truth, drop_objects(relabel_per_slice(truth), 0.05), "3d")


@pytest.mark.parametrize("missing", [0.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_touching_ellipsoids_beat_the_naive_baseline(missing: float, seed: int) -> None:
    truth = touching_ellipsoids(seed=seed)
    assert_beats_naive(truth, drop_objects(relabel_per_slice(truth, seed), missing, seed), "3d")


@pytest.mark.parametrize(("seed", "missing"), [(0, 0.0), (1, 0.0), (0, 0.05)])
def test_moving_discs_beat_the_naive_baseline(seed: int, missing: float) -> None:
    truth = moving_discs(seed=seed)
    assert_beats_naive(truth, drop_objects(relabel_per_slice(truth, seed), missing, seed),
                       "track")


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    return relabel_per_slice(touching_ellipsoids(shape=(12, 64, 64)), seed=3)


def test_ids_are_consistent_and_in_order_of_first_appearance(stack: np.ndarray) -> None:
    result = link_labels(stack)
    out = result.labels
    assert out.dtype == np.uint16 and result.dtype == np.uint16
    assert (out > 0).tolist() == (stack > 0).tolist()
    # each 2-D input object gets one id
    for z in range(len(stack)):
        for v in np.unique(stack[z])[1:]:
            assert len(np.unique(out[z][stack[z] == v])) == 1
    # ids 1..n, numbered in order of first appearance (C order)
    ids, first = np.unique(out.ravel(), return_index=True)
    assert ids.tolist() == list(range(result.n_objects + 1))
    assert np.all(np.diff(first[1:]) > 0)
    # input ids do not matter: the same objects with other ids link the same way
    other = relabel_per_slice(touching_ellipsoids(shape=(12, 64, 64)), seed=4)
    np.testing.assert_array_equal(link_labels(other).labels, out)


def test_other_axes_and_leading_stacks(stack: np.ndarray) -> None:
    ref = link_labels(stack).labels
    four = np.stack([stack, stack[::-1]], axis=1)  # (z, n, y, x): link along z, per n
    result = link_labels(four, axis=0)
    out = result.labels
    n0 = int(ref.max())
    np.testing.assert_array_equal(out[:, 0] > 0, stack > 0)
    assert result.n_objects == 2 * n0
    # each stack is linked on its own (ids are unique over the whole array)
    assert set(np.unique(out[:, 0])) & set(np.unique(out[:, 1])) == {0}
    np.testing.assert_array_equal(
        np.unique(out[:, 0], return_inverse=True)[1], np.unique(ref, return_inverse=True)[1])
    transposed = link_labels(np.moveaxis(four, 0, 1), axis=-3).labels
    np.testing.assert_array_equal(np.moveaxis(transposed, 1, 0), out)


class CountingArray:
    """A lazy array recording the leading-axis extent of every read."""

    def __init__(self, array) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.chunks = array.chunks
        self.reads: list[int] = []

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(int(np.prod(out.shape[:-2])))
        return out


def test_zarr_input_is_read_a_chunk_at_a_time(stack: np.ndarray, tmp_path: Path) -> None:
    z = zarr.open_array(tmp_path / "in.zarr", mode="w", shape=stack.shape, dtype=stack.dtype,
                        chunks=(3, 64, 64))
    z[...] = stack
    lazy = CountingArray(z)
    out = link_labels(lazy).labels
    np.testing.assert_array_equal(out, link_labels(stack).labels)
    assert max(lazy.reads) == 3  # one chunk of slices
    assert sum(lazy.reads) == 2 * len(stack)  # two passes, each slice read once per pass


def test_dask_input_and_zarr_array_output(stack: np.ndarray, tmp_path: Path) -> None:
    ref = link_labels(stack).labels
    lazy = da.from_array(stack, chunks=(5, 32, 64))
    out = zarr.open_array(tmp_path / "out.zarr", mode="w", shape=stack.shape, dtype=np.uint32,
                          chunks=(1, 64, 64))
    result = link_labels(lazy, output=out)
    assert result.labels is out and result.dtype == np.uint32
    np.testing.assert_array_equal(out[...], ref)
    written = link_labels(lazy, output=tmp_path / "linked.tif").labels
    np.testing.assert_array_equal(read_labels(written)[0], ref)


@pytest.mark.parametrize("name", ["linked.tif", "linked.zarr"])
def test_file_output_in_our_export_formats(stack: np.ndarray, tmp_path: Path,
                                           name: str) -> None:
    ref = link_labels(stack).labels
    seen: list[tuple[int, int]] = []
    result = link_labels(stack, output=tmp_path / name, progress=lambda d, t: seen.append((d, t)),
                         write_options={"scale": (2.0, 0.5, 0.5)})
    data, meta = read_labels(result.labels)
    np.testing.assert_array_equal(np.asarray(data[...]), ref)
    assert data.dtype == np.uint16 and meta["napari_esam"] and meta["scale"] == [2.0, 0.5, 0.5]
    assert seen[-1] == (2 * len(stack), 2 * len(stack))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(FileExistsError, match="overwrite"):
        link_labels(stack, output=tmp_path / name)


@pytest.mark.parametrize("name", ["old.tif", "old.zarr"])
def test_a_cancelled_link_leaves_the_old_file_intact(stack: np.ndarray, tmp_path: Path,
                                                     name: str) -> None:
    old = np.ones((2, 5, 5), np.uint8)
    target = write_labels(tmp_path / name, old)
    calls = {"n": 0}

    def cancel() -> bool:  # cancels in pass 2, while the file is being written
        calls["n"] += 1
        return calls["n"] > len(stack) + 2

    with pytest.raises(LinkCancelled):
        link_labels(stack, output=target, overwrite=True, cancel=cancel)
    np.testing.assert_array_equal(np.asarray(read_labels(target)[0][...]), old)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary left


def test_the_output_dtype_grows_with_the_number_of_objects() -> None:
    # one-pixel objects on a grid shifted in every slice: nothing overlaps, 128² per slice
    stack = np.zeros((4, 256, 256), np.uint32)
    for z, (dy, dx) in enumerate([(0, 0), (1, 1), (0, 1), (1, 0)]):
        stack[z, dy::2, dx::2] = np.arange(1, 128 * 128 + 1).reshape(128, 128)
    three = link_labels(stack[:3])
    assert three.n_objects == 3 * 128**2 and three.labels.dtype == np.uint16
    four = link_labels(stack)
    assert four.n_objects == 2**16 and four.labels.dtype == np.uint32


@pytest.mark.parametrize(("labels", "kw", "error", "message"), [
    (np.zeros((3, 8, 8), np.float32), {}, ValueError, "integer"),
    (np.zeros((8, 8), np.uint8), {}, ValueError, "3-D or more"),
    (np.zeros((3, 8, 8), np.uint8), {"axis": 1}, ValueError, "plane axis"),
    (np.zeros((3, 8, 8), np.uint8), {"axis": 3}, ValueError, "axis"),
    (np.zeros((3, 8, 8), np.uint8), {"mode": "2d"}, ValueError, "mode"),
    (np.zeros((3, 8, 8), np.uint8), {"output": np.zeros((3, 8, 9), np.uint16)}, ValueError,
     "shape"),
    (np.zeros((3, 8, 8), np.uint8), {"output": "out.png"}, ValueError, "format"),
    (np.zeros((3, 0, 8), np.uint8), {}, ValueError, "empty"),
])
def test_bad_input_is_refused(labels, kw, error, message) -> None:
    with pytest.raises(error, match=message):
        link_labels(labels, **kw)


def test_a_path_input_and_the_output_is_the_input(stack: np.ndarray, tmp_path: Path) -> None:
    source = write_labels(tmp_path / "in.zarr", stack)
    np.testing.assert_array_equal(link_labels(source).labels, link_labels(stack).labels)
    with pytest.raises(ValueError, match="the output is the input"):
        link_labels(str(source), output=tmp_path / "." / "in.zarr", overwrite=True)
    with pytest.raises(FileNotFoundError):
        link_labels(tmp_path / "missing.tif")
    np.testing.assert_array_equal(read_labels(source)[0][...], stack)


def test_labels_that_change_between_the_passes_are_an_error(stack: np.ndarray) -> None:
    class Changing:  # the second read of each slice differs from the first
        shape, dtype, chunks = stack.shape, stack.dtype, (1, 64, 64)

        def __init__(self) -> None:
            self.reads = 0

        def __getitem__(self, key):
            self.reads += 1
            block = stack[key]
            return block if self.reads <= len(stack) else block + 1

    with pytest.raises(ValueError, match="changed while they were being linked"):
        link_labels(Changing())


def test_an_output_array_too_small_for_the_ids_is_refused() -> None:
    stack = np.zeros((2, 40, 40), np.uint16)
    stack[0, ::2, ::2] = np.arange(1, 401).reshape(20, 20)
    out = np.zeros(stack.shape, np.uint8)
    with pytest.raises(ValueError, match="do not fit the output dtype uint8"):
        link_labels(stack, output=out)
    assert not out.any()
