"""Batch segment-everything over stacks: ids, Zarr output, cancel/crash/resume, executors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_esam.core.io.inputs import open_input
from napari_esam.core.runs import settings as B
from napari_esam.core.runs.executors import LocalExecutor
from napari_esam.core.runs.outputs import RUN_ATTR, ZarrOutput
from napari_esam.core.runs.pipeline import iter_batch, run_batch
from napari_esam.core.runs.settings import (
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
    max_objects_per_tile,
    output_dtype,
)
from napari_esam.core.runs.sources import StackSource
from napari_esam.core.runs.tasks import TileTask
from tests.fakes import FAST, BlobModel, blob_stack

ROOT = Path(__file__).resolve().parents[3]


def blob_settings(id_scope: str = "stack", tiling: TilingParams | None = None,
                  **params) -> BatchSettings:
    return BatchSettings(
        ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel"),
        EverythingParams(**{**FAST, **params}),
        id_scope,
        tiling or TilingParams(),
    )


@pytest.fixture(scope="module")
def stack():
    return blob_stack(5)


@pytest.fixture(scope="module")
def reference(stack):
    """An uninterrupted in-memory run over the 5-slice stack."""
    return run_batch(stack[0], blob_settings())


def slice_ids(labels: np.ndarray, i: int) -> set[int]:
    return set(np.unique(labels[i]).tolist()) - {0}


# ------------------------------------------------------------------------------ ids


def test_five_slices_have_labels_with_ids_unique_across_the_stack(stack, reference):
    image, expected = stack
    labels = np.asarray(reference.labels)
    assert labels.shape == image.shape and labels.dtype == np.uint16  # ids < 5 * 1000
    stride = blob_settings().id_stride(TilingParams().grid(image.shape[1:]))
    assert stride == 1000  # 8x8 points x 3 candidates = 192 masks at most
    seen: set[int] = set()
    for i in range(5):
        ids = slice_ids(labels, i)
        assert len(ids) == expected[i], f"slice {i}"
        assert all(i * stride < v < (i + 1) * stride for v in ids)
        assert not ids & seen
        seen |= ids
    assert reference.counts == dict(enumerate(expected))
    assert reference.complete and not reference.cancelled
    # each object is one bright blob
    assert np.all(image[labels > 0] == 4000)


def test_per_slice_ids_restart_at_one(stack, reference):
    res = run_batch(stack[0], blob_settings("slice"))
    labels = np.asarray(res.labels)
    for i, n in enumerate(stack[1]):
        assert slice_ids(labels, i) == set(range(1, n + 1))
    # same segmentation, only the numbering differs
    np.testing.assert_array_equal(labels > 0, np.asarray(reference.labels) > 0)


def test_id_stride_and_dtype_follow_the_settings():
    one = TilingParams().grid((5, 5))
    assert max_objects_per_tile(EverythingParams(points_per_side=32)) == 3 * 32 * 32
    assert BatchSettings(params=EverythingParams(points_per_side=32)).id_stride(one) == 10_000
    crops = EverythingParams(points_per_side=32, crop_n_layers=1, crop_n_points_downscale_factor=2)
    assert max_objects_per_tile(crops) == 3 * (32 * 32 + 4 * 16 * 16)
    # a plane of several tiles reserves ids for all of them: 12 tiles x 3072 -> 10^5
    twelve = TilingParams("on", 256, 64).grid((600, 700))
    assert twelve.n_tiles == 12
    assert BatchSettings(params=EverythingParams(points_per_side=32)).id_stride(twelve) == 10**5
    s = BatchSettings(params=EverythingParams(points_per_side=32))
    assert output_dtype(6, s, one) == np.uint16  # largest id 6 * 10^4 - 1
    assert output_dtype(7, s, one) == np.uint32
    assert output_dtype(400_000, s, one) == np.uint32  # 400k * 10^4 < 2^32
    assert output_dtype(500_000, s, one) == np.uint64
    assert output_dtype(500_000, BatchSettings(id_scope="slice"), one) == np.uint16


# ------------------------------------------------------------------- cancel / resume


def cancel_after(n_slices: int):
    """A (progress, cancel) pair that cancels once ``n_slices`` slices finished in this run."""
    seen: list[int] = []

    def progress(ev):
        if ev.kind == "slice":
            seen.append(ev.index)

    return progress, (lambda: len(seen) >= n_slices), seen


def test_cancel_after_two_slices_keeps_them_and_resume_matches(tmp_path, stack, reference):
    out = tmp_path / "labels.zarr"
    progress, cancel, seen = cancel_after(2)
    res = run_batch(stack[0], blob_settings(), out, progress=progress, cancel=cancel)
    assert res.cancelled and not res.complete
    assert seen == [0, 1] and sorted(res.counts) == [0, 1]

    arr = zarr.open_array(out / "0", mode="r")
    ref = np.asarray(reference.labels)
    np.testing.assert_array_equal(arr[0:2], ref[0:2])
    assert not arr[2:].any()  # nothing of the unfinished slices
    record = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert record["slices"] == {"0": stack[1][0], "1": stack[1][1]}
    assert record["complete"] is False

    events = []
    res2 = run_batch(stack[0], blob_settings(), out, progress=events.append)
    assert events[0].kind == "start" and events[0].done == 2 and events[0].skipped == 2
    assert [e.index for e in events if e.kind == "slice"] == [2, 3, 4]  # 0-1 skipped
    assert res2.complete and res2.counts == reference.counts
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[:], ref)
    assert zarr.open_group(out, mode="r").attrs[RUN_ATTR]["complete"] is True

    # a third run has nothing to do
    events = []
    run_batch(stack[0], blob_settings(), out, progress=events.append)
    assert [e.kind for e in events] == ["start"] and events[0].done == 5


class CrashingExecutor(LocalExecutor):
    """Dies (like a crashed worker) after ``n`` slices."""

    def __init__(self, n: int) -> None:
        self.n = n

    def map(self, task, indices, *, cancel, step=None):
        for k, res in enumerate(super().map(task, indices, cancel=cancel, step=step)):
            if k == self.n:
                raise RuntimeError("worker died")
            yield res


def test_a_crash_keeps_finished_slices_and_resume_completes(tmp_path, stack, reference):
    out = tmp_path / "crash.zarr"
    with pytest.raises(RuntimeError, match="worker died"):
        run_batch(stack[0], blob_settings(), out, executor=CrashingExecutor(2))
    assert sorted(ZarrOutput(out).done()) == [0, 1]
    res = run_batch(stack[0], blob_settings(), out)
    assert res.complete
    np.testing.assert_array_equal(np.asarray(res.labels), np.asarray(reference.labels))


def test_a_killed_process_keeps_finished_slices(tmp_path, stack, reference):
    """SIGKILL right after slice 1 was recorded: the store stays readable and resumable."""
    src = tmp_path / "stack.npy"
    np.save(src, stack[0])
    out = tmp_path / "killed.zarr"
    script = textwrap.dedent(
        f"""
        import os, signal
        from napari_esam.core.runs.pipeline import run_batch
        from napari_esam.core.runs.settings import BatchSettings, EverythingParams, ModelSpec
        s = BatchSettings(ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel"),
                          EverythingParams(points_per_side=8, points_per_batch=64))
        def progress(ev):
            if ev.kind == "slice" and ev.index == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        run_batch({str(src)!r}, s, {str(out)!r}, progress=progress)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == -9
    assert ZarrOutput(out).done() == {0: stack[1][0], 1: stack[1][1]}
    res = run_batch(str(src), blob_settings(), out)
    assert res.complete
    np.testing.assert_array_equal(np.asarray(res.labels), np.asarray(reference.labels))


def test_resume_refuses_other_settings_and_overwrite_starts_over(tmp_path, stack):
    out = tmp_path / "o.zarr"
    progress, cancel, _ = cancel_after(1)
    run_batch(stack[0], blob_settings(), out, progress=progress, cancel=cancel)
    with pytest.raises(ValueError, match="points_per_side"):
        run_batch(stack[0], blob_settings(points_per_side=6), out)
    with pytest.raises(ValueError, match="shape"):
        run_batch(stack[0][:3], blob_settings(), out)
    # device and batch size do not change results: resuming with them is allowed
    events = []
    run_batch(stack[0], blob_settings(points_per_batch=16), out, progress=events.append)
    assert events[0].skipped == 1
    events = []
    res = run_batch(stack[0], blob_settings(points_per_side=6), out, overwrite=True,
                    progress=events.append)
    assert events[0].skipped == 0 and res.complete
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert rec["settings"]["params"]["points_per_side"] == 6


def test_existing_foreign_outputs_are_not_clobbered(tmp_path, stack):
    foreign = tmp_path / "foreign.zarr"
    zarr.create_array(foreign, shape=(2, 2), dtype="uint8")
    with pytest.raises(FileExistsError, match="not an output of napari-esam everything"):
        run_batch(stack[0], blob_settings(), foreign)
    # overwrite replaces only our own outputs: not another Zarr, nor any other folder
    with pytest.raises(FileExistsError, match="it is not an output of napari-esam"):
        run_batch(stack[0], blob_settings(), foreign, overwrite=True)
    assert zarr.open_array(foreign, mode="r").shape == (2, 2)
    folder = tmp_path / "folder.zarr"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="it is not an output of napari-esam"):
        run_batch(stack[0], blob_settings(), folder, overwrite=True)
    assert (folder / "precious.txt").exists()
    src = tmp_path / "in.zarr"
    zarr.save_array(src, stack[0])
    with pytest.raises(ValueError, match="must not be the input"):
        run_batch(str(src), blob_settings(), src, overwrite=True)
    # an output group that holds the input array: an overwrite would delete it
    group = zarr.open_group(tmp_path / "p.zarr", mode="w")
    group.create_array("raw", data=stack[0])
    with pytest.raises(ValueError, match="nor hold it"):
        run_batch(str(tmp_path / "p.zarr" / "raw"), blob_settings(), tmp_path / "p.zarr",
                  overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "p.zarr" / "raw")[:], stack[0])


# ------------------------------------------------------------------- zarr layout


def test_zarr_output_layout_is_chunked_per_slice_and_readable(tmp_path, stack, reference):
    from napari_esam.core.io.label_files import read_labels

    out = tmp_path / "lay.zarr"
    res = run_batch(stack[0], blob_settings(), out, scale=(2.0, 0.5, 0.5), name="cells")
    arr = zarr.open_array(out / "0", mode="r")
    assert arr.chunks[0] == 1 and arr.shape == (5, 64, 64)
    assert isinstance(res.labels, zarr.Array) and res.labels.read_only
    data, meta = read_labels(out)
    np.testing.assert_array_equal(np.asarray(data), np.asarray(reference.labels))
    assert meta["napari_esam"] and meta["axes"] == "zyx" and meta["scale"] == [2.0, 0.5, 0.5]
    import dask.array as da

    assert da.from_zarr(str(out), component="0").sum().compute() == np.asarray(
        reference.labels, dtype=np.int64
    ).sum()
    record = json.loads((out / "zarr.json").read_text())["attributes"][RUN_ATTR]
    assert record["settings"]["id_stride"] == 1000 and record["source"]["shape"] == [5, 64, 64]


# ---------------------------------------------------------------- order independence


class ReverseExecutor:
    """Runs the slices last-first (as a cluster may finish them)."""

    def map(self, task, indices, *, cancel, step=None):
        for i in reversed(list(indices)):
            yield task(i)


class ProcessExecutor:
    """Runs each slice in a spawned process; the task writes its slice to Zarr there."""

    def map(self, task, indices, *, cancel, step=None):
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(task, i) for i in reversed(list(indices))]
            for f in futures:
                yield f.result()


def test_result_does_not_depend_on_the_order_slices_finish(tmp_path, stack, reference):
    events = []
    res = run_batch(stack[0], blob_settings(), executor=ReverseExecutor(),
                    progress=events.append)
    assert [e.index for e in events if e.kind == "slice"] == [4, 3, 2, 1, 0]
    np.testing.assert_array_equal(res.labels, np.asarray(reference.labels))


def test_slices_run_in_another_process_write_the_same_zarr(tmp_path, stack, reference):
    src = tmp_path / "stack.tif"
    import tifffile

    tifffile.imwrite(src, stack[0])
    out = tmp_path / "proc.zarr"
    res = run_batch(str(src), blob_settings(), out, executor=ProcessExecutor(),
                    indices=[1, 3])
    assert sorted(res.counts) == [1, 3] and not res.cancelled
    arr = zarr.open_array(out / "0", mode="r")
    np.testing.assert_array_equal(arr[[1, 3]], np.asarray(reference.labels)[[1, 3]])
    # the in-process run finishes the rest: all identical to the reference
    res = run_batch(str(src), blob_settings(), out)
    np.testing.assert_array_equal(np.asarray(res.labels), np.asarray(reference.labels))


def test_a_task_is_a_pure_function_of_its_arguments(stack, reference):
    source = StackSource.create(stack[0])
    s = blob_settings()
    a = TileTask(source, s)(3)
    assert a.plane == 3 and a.n_objects == stack[1][3]
    np.testing.assert_array_equal(a.labels, np.asarray(reference.labels)[3])
    B.clear_model_cache()  # a fresh model (as in a new process) gives the same
    np.testing.assert_array_equal(TileTask(source, s)(3).labels, a.labels)


# --------------------------------------------------------------------- progress


def test_progress_reports_slices_steps_and_time_left(stack):
    events = []
    run_batch(stack[0], blob_settings(), progress=events.append)
    assert events[0].kind == "start" and events[0].total == 5 and events[0].eta is None
    slices = [e for e in events if e.kind == "slice"]
    assert [e.done for e in slices] == [1, 2, 3, 4, 5]
    assert all(e.eta is not None and e.eta >= 0 for e in slices) and slices[-1].eta == 0
    steps = [e for e in events if e.kind == "step"]
    assert steps and all(e.steps >= 1 and 0 < e.step <= e.steps for e in steps)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_iter_batch_yields_progress_and_returns_the_result(stack, reference):
    gen = iter_batch(stack[0], blob_settings())
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert [e.kind for e in events if e.kind != "step"] == ["start"] + ["slice"] * 5
    np.testing.assert_array_equal(result.labels, np.asarray(reference.labels))


def test_closing_iter_batch_cancels_the_run(tmp_path, stack):
    out = tmp_path / "closed.zarr"
    gen = iter_batch(stack[0], blob_settings(), out)
    for ev in gen:
        if ev.kind == "slice":
            break
    gen.close()  # joins the helper thread
    done = ZarrOutput(out).done()
    assert 1 <= len(done) < 5


def test_mid_slice_cancel_stores_nothing_of_that_slice(tmp_path, stack):
    out = tmp_path / "mid.zarr"
    state = {"steps": 0}

    def progress(ev):
        if ev.kind == "step":
            state["steps"] += 1

    res = run_batch(stack[0], blob_settings(points_per_batch=8), out, progress=progress,
                    cancel=lambda: state["steps"] >= 3)  # inside slice 0 (8 batches)
    assert res.cancelled and res.counts == {}
    assert not zarr.open_array(out / "0", mode="r")[:].any()


# -------------------------------------------------------------------- inputs


def test_open_input_reads_every_format_lazily(tmp_path, stack):
    import dask.array as da
    import tifffile
    from PIL import Image

    img = stack[0]
    tifffile.imwrite(tmp_path / "s.tif", img)
    t = open_input(tmp_path / "s.tif")
    assert isinstance(t, np.memmap)  # uncompressed: memory-mapped, not read into memory
    np.testing.assert_array_equal(t[2], img[2])
    tifffile.imwrite(tmp_path / "z.tif", img, compression="zlib")
    t = open_input(tmp_path / "z.tif")
    assert isinstance(t, zarr.Array)  # compressed: lazily through tifffile's Zarr store
    np.testing.assert_array_equal(t[2], img[2])
    zarr.save_array(tmp_path / "s.zarr", img)
    np.testing.assert_array_equal(open_input(tmp_path / "s.zarr")[4], img[4])
    np.save(tmp_path / "s.npy", img)
    assert isinstance(open_input(tmp_path / "s.npy"), np.memmap)
    d = da.from_array(img, chunks=(1, 64, 64))
    assert open_input(d) is d
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    assert open_input(tmp_path / "c.png").shape == (20, 30, 3)
    assert abs(int(open_input(tmp_path / "c.jpg")[5, 5, 1]) - 200) < 5
    src = StackSource.create(str(tmp_path / "c.png"))
    assert src.channel_axis == 2 and src.n_slices == 1 and src.out_shape == (20, 30)
    assert src.read_slice(0).shape == (20, 30, 3)


def test_open_input_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_input(tmp_path / "missing.tif")
    (tmp_path / "bad.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(ValueError, match="bad.tif' is not a readable TIFF"):
        open_input(tmp_path / "bad.tif")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported input format"):
        open_input(tmp_path / "x.txt")


def test_stack_geometry_axes_and_channels():
    tz = np.arange(2 * 3 * 8 * 9).reshape(2, 3, 8, 9).astype(np.uint16)
    s = StackSource.create(tz)
    assert s.stack_axes == (0, 1) and s.n_slices == 6 and s.coords(4) == (1, 1)
    np.testing.assert_array_equal(s.read_slice(4), tz[1, 1])
    assert s.out_region(4) == (1, 1, slice(None), slice(None))
    # a chosen axis: slices along Y (XZ planes)
    s = StackSource.create(tz[0], axis=1)
    assert s.n_slices == 8 and s.plane_shape == (3, 9)
    np.testing.assert_array_equal(s.read_slice(5), tz[0][:, 5, :])
    # channel axis: one channel, or RGB from the first three
    zc = np.random.default_rng(0).integers(0, 99, (4, 2, 8, 9)).astype(np.uint8)
    s = StackSource.create(zc, channel_axis=1, channel=1)
    assert s.out_shape == (4, 8, 9) and s.out_stack_axes == (0,)
    np.testing.assert_array_equal(s.read_slice(2), zc[2, 1])
    zrgb = np.random.default_rng(1).integers(0, 99, (4, 3, 8, 9)).astype(np.uint8)
    s = StackSource.create(zrgb, channel_axis=1)
    np.testing.assert_array_equal(s.read_slice(3), np.moveaxis(zrgb[3], 0, -1))
    rgb_stack = np.zeros((4, 8, 9, 3), np.uint8)
    assert StackSource.create(rgb_stack).channel_axis == 3  # auto RGB


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((3, 8, 9), {"axis": 3}, "out of range"),
        ((2, 3, 8, 9), {"axis": 0}, "leave 3 image axes"),
        ((4, 2, 8, 9), {"channel_axis": 1}, "choose one"),
        ((4, 3, 8, 9), {"channel_axis": 1, "axis": 1}, "channel axis"),
        ((3, 1, 9), {}, "too small"),
        ((9,), {}, "at least 2 dimensions"),
        ((4, 8, 9), {"channel": 0}, "no channel axis"),
    ],
)
def test_bad_stack_geometry_raises_value_error(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        StackSource.create(np.zeros(shape, np.uint8), **kwargs)


def test_rgb_and_lazy_tiff_inputs_give_the_same_labels(tmp_path, stack, reference):
    import tifffile

    tifffile.imwrite(tmp_path / "in.tif", stack[0][:2], photometric="minisblack")
    res = run_batch(str(tmp_path / "in.tif"), blob_settings())
    np.testing.assert_array_equal(res.labels, np.asarray(reference.labels)[:2])
    gray = (stack[0][2:4] > 1000).astype(np.uint8) * 255
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    a = run_batch(rgb, blob_settings(contrast_limits=(0, 255)))
    b = run_batch(gray, blob_settings(contrast_limits=(0, 255)))
    assert a.labels.shape == (2, 64, 64) and list(a.counts.values()) == stack[1][2:4]
    np.testing.assert_array_equal(a.labels, b.labels)


def test_bad_settings_are_rejected(stack, tmp_path):
    for params, match in [
        ({"points_per_side": 0}, "points_per_side"),
        ({"method": "magic"}, "method"),
        ({"min_size": 10, "max_size": 5}, "max_size"),
        ({"crop_n_layers": 1, "method": "efficientsam"}, "crops"),
        ({"contrast_limits": (5000, 100)}, "low < high"),
        ({"contrast_limits": (10, 10)}, "low < high"),
        ({"pred_iou_thresh": float("nan")}, "pred_iou_thresh must be a number in"),
        ({"box_nms_thresh": 5.0}, "box_nms_thresh must be a number in"),
        ({"stability_score_offset": -1.0}, "stability_score_offset"),
        ({"crop_overlap_ratio": 1.5}, "crop_overlap_ratio"),
        ({"min_mask_region_area": -1}, "min_mask_region_area"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_batch(stack[0], blob_settings(**params))
    with pytest.raises(ValueError, match="id_scope"):
        run_batch(stack[0], blob_settings("volume"))
    # refused before anything is created: no output is left behind
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        run_batch(stack[0], blob_settings(pred_iou_thresh=float("nan")), tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()
    with pytest.raises(ValueError, match="unknown model"):
        run_batch(stack[0], BatchSettings(ModelSpec("sam-huge")))


def test_blob_model_is_cached_per_spec():
    B.clear_model_cache()
    spec = ModelSpec("blob", device="cpu", factory=BlobModel)
    assert B.get_model(spec) is B.get_model(spec)
    assert B.get_model(spec) is not B.get_model(ModelSpec("blob2", device="cpu", factory=BlobModel))


def test_the_next_slice_is_read_while_the_current_one_is_segmented(stack, reference,
                                                                   monkeypatch):
    """Read-ahead: slice i + 1 is read in a background thread during slice i's model work
    (checked by events, not timing); labels are unchanged."""
    import threading

    source = StackSource.create(stack[0])
    read_done = {i: threading.Event() for i in range(5)}
    readers: dict[int, str] = {}
    seen_during: dict[int, bool] = {}
    original_read = StackSource.read
    original_call = TileTask.__call__

    def read(self, index, window=None):
        readers[index] = threading.current_thread().name
        out = original_read(self, index, window)
        read_done[index].set()
        return out

    def call(self, index, **kwargs):
        if index + 1 < 5:  # wait (bounded) for the next slice to be read meanwhile
            seen_during[index] = read_done[index + 1].wait(timeout=20)
        return original_call(self, index, **kwargs)

    monkeypatch.setattr(StackSource, "read", read)
    monkeypatch.setattr(TileTask, "__call__", call)
    result = run_batch(source, blob_settings())
    np.testing.assert_array_equal(result.labels, reference.labels)
    assert seen_during == {0: True, 1: True, 2: True, 3: True}
    assert all(name.startswith("napari-esam-read") for name in readers.values())
    assert sorted(readers) == [0, 1, 2, 3, 4]  # each slice read once

    # without read-ahead no slice is read in the background
    readers.clear()
    monkeypatch.setattr(TileTask, "__call__", original_call)
    out = run_batch(source, blob_settings(), executor=LocalExecutor(read_ahead=False))
    np.testing.assert_array_equal(out.labels, reference.labels)
    assert not any(name.startswith("napari-esam-read") for name in readers.values())


# ------------------------------------------------------------- one pipeline, one rule


def test_a_tile_as_large_as_the_plane_is_the_untiled_run(stack, reference):
    on = run_batch(stack[0], blob_settings(tiling=TilingParams("on", 1024)))
    np.testing.assert_array_equal(on.labels, reference.labels)
    assert on.labels.dtype == reference.labels.dtype
    assert on.details["grid"].n_tiles == 1


def test_masks_to_labels_paints_like_a_one_tile_run(stack, reference):
    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.labels import masks_to_labels
    from napari_esam.core.plane.predictor import Predictor

    records = segment_everything(stack[0][4], Predictor(BlobModel()), **FAST)
    labels = masks_to_labels(records, stack[0][4].shape)
    ref = np.asarray(reference.labels)[4].astype(np.int64)
    np.testing.assert_array_equal(np.where(ref > 0, ref - 4 * 1000, 0), labels)


def test_outputs_of_earlier_versions_are_refused_with_what_to_do(tmp_path, stack):
    for attr in ("napari-esam-batch", "napari-esam-tiled"):
        old = tmp_path / f"{attr}.zarr"
        group = zarr.open_group(old, mode="w", zarr_format=3)
        group.create_array("0", shape=stack[0].shape, dtype="uint32")
        group.attrs[attr] = {"format": 1, "slices": {"0": 3}}
        with pytest.raises(ValueError, match="earlier napari-esam.*overwrite"):
            run_batch(stack[0], blob_settings(), old)
        assert zarr.open_group(old, mode="r").attrs[attr]["slices"] == {"0": 3}  # untouched
        res = run_batch(stack[0], blob_settings(), old, overwrite=True)
        assert res.complete


def test_the_embedding_store_serves_an_untiled_run(tmp_path, stack, reference, monkeypatch):
    store = tmp_path / "emb.zarr"
    first = run_batch(stack[0], blob_settings(), embeddings=store)
    assert first.details["encoder_calls"] == 5 and first.details["store_hits"] == 0
    second = run_batch(stack[0], blob_settings(), embeddings=store)
    assert second.details["encoder_calls"] == 0 and second.details["store_hits"] == 5
    np.testing.assert_array_equal(second.labels, reference.labels)


def test_resume_refuses_another_image_or_other_weights(tmp_path, stack):
    out = tmp_path / "mixed.zarr"
    progress, cancel, _ = cancel_after(1)
    run_batch(stack[0], blob_settings(), out, progress=progress, cancel=cancel)
    other = stack[0].copy()
    other[0] = other[0][::-1]  # same shape and dtype, other pixels
    with pytest.raises(ValueError, match="content_hash"):
        run_batch(other, blob_settings(), out)
    a, b = tmp_path / "a.pt", tmp_path / "w" / "a.pt"
    b.parent.mkdir()
    a.write_bytes(b"weights one")
    b.write_bytes(b"weights two")  # same file name, other weights
    settings_a = BatchSettings(dataclasses.replace(blob_settings().model, checkpoint=str(a)),
                               blob_settings().params)
    settings_b = BatchSettings(dataclasses.replace(blob_settings().model, checkpoint=str(b)),
                               blob_settings().params)
    out2 = tmp_path / "weights.zarr"
    run_batch(stack[0], settings_a, out2, indices=[0])
    with pytest.raises(ValueError, match="checkpoint.digest"):
        run_batch(stack[0], settings_b, out2)
