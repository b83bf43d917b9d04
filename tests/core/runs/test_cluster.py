"""Batch segment-everything on a Dask LocalCluster (2 worker processes): same labels as the
in-process run, a worker killed mid-task, stop and resume, the CLI and the widget options.

One cluster serves the whole module (starting one costs seconds). Every run's model is a
:class:`RecordingFactory` whose blob model leaves marker files: one per model build and
one per slice execution (with the process id), so the tests count what ran where.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

pytest.importorskip("distributed")

from napari_esam.core.runs import cluster as C  # noqa: E402
from napari_esam.core.runs.cluster import DaskExecutor, worker_gpu  # noqa: E402
from napari_esam.core.runs.outputs import RUN_ATTR, ZarrOutput  # noqa: E402
from napari_esam.core.runs.pipeline import run_batch  # noqa: E402
from napari_esam.core.runs.settings import (  # noqa: E402
    BatchSettings,
    EverythingParams,
    ModelSpec,
)
from napari_esam.core.runs.sources import StackSource  # noqa: E402
from napari_esam.core.runs.tasks import TileTask  # noqa: E402
from tests.fakes import FAST, BlobModel, blob_stack  # noqa: E402

N_SLICES = 6


class RecordingBlobModel(BlobModel):
    """The blob model, leaving ``build-PID-*`` and ``run-PHASE-PID-*`` files in ``folder``.

    ``die_after``: the first encode that finds this many runs recorded kills its process
    (``os._exit``), once (a ``died`` file marks it). ``PHASE`` is the text of the file
    ``phase`` (default 1), so a test tells the runs of a second job from the first's.
    """

    def __init__(self, folder: str, die_after: int | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.die_after = die_after
        self._mark(f"build-{os.getpid()}")

    def _mark(self, prefix: str) -> None:
        (self.folder / f"{prefix}-{uuid.uuid4().hex}").touch()

    def encode(self, x):
        runs = list(self.folder.glob("run-*"))
        if self.die_after is not None and len(runs) >= self.die_after:
            try:
                (self.folder / "died").open("x").close()
            except FileExistsError:
                pass
            else:
                (self.folder / "died").write_text(str(os.getpid()))
                os._exit(1)  # the worker process dies mid-task
        phase = self.folder / "phase"
        self._mark(f"run-{phase.read_text() if phase.exists() else 1}-{os.getpid()}")
        return super().encode(x)


@dataclasses.dataclass(frozen=True)
class RecordingFactory:
    """Picklable model factory; its repr (with the folder) keys the per-process cache."""

    folder: str
    die_after: int | None = None

    def __call__(self) -> RecordingBlobModel:
        return RecordingBlobModel(self.folder, self.die_after)


def markers(folder: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{prefix}-*"))


def pids(names: list[str]) -> list[int]:
    return [int(n.split("-")[-2]) for n in names]


def settings(factory=None) -> BatchSettings:
    spec = ModelSpec("blob", device="cpu", factory=factory or "tests.fakes:BlobModel")
    return BatchSettings(spec, EverythingParams(**FAST))


@pytest.fixture(scope="module")
def cluster():
    with DaskExecutor(workers=2, allowed_failures=3) as executor:
        executor.start()
        yield executor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The 6-slice blob stack as a TIFF (read by the workers) and its in-process labels."""
    stack, counts = blob_stack(N_SLICES)
    path = tmp_path_factory.mktemp("input") / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    reference = run_batch(str(path), settings())
    assert reference.complete
    return path, np.asarray(reference.labels), counts


@pytest.fixture
def recorder(tmp_path) -> tuple[Path, RecordingFactory]:
    folder = tmp_path / "markers"
    folder.mkdir()
    return folder, RecordingFactory(str(folder))


def stored(out: Path) -> np.ndarray:
    return zarr.open_array(out / "0", mode="r")[:]


# ----------------------------------------------------------------------------- runs


def test_local_cluster_gives_exactly_the_in_process_labels(cluster, data, recorder, tmp_path):
    src, ref, counts = data
    folder, factory = recorder
    info = cluster.client.scheduler_info()["workers"]
    assert len(info) == 2  # two worker processes
    out = tmp_path / "out.zarr"
    events = []
    res = run_batch(str(src), settings(factory), out, executor=cluster, progress=events.append)

    assert res.complete and not res.cancelled
    np.testing.assert_array_equal(stored(out), ref)
    assert res.counts == dict(enumerate(counts))
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert rec["complete"] and rec["slices"] == {str(i): n for i, n in enumerate(counts)}
    # progress: slices done / total, one report per slice, in any order
    slices = [e for e in events if e.kind == "slice"]
    assert sorted(e.index for e in slices) == list(range(N_SLICES))
    assert [e.done for e in slices] == list(range(1, N_SLICES + 1))
    assert all(e.total == N_SLICES for e in events)
    # every slice ran once, in worker processes; each process built its model once
    runs, builds = markers(folder, "run"), markers(folder, "build")
    assert len(runs) == N_SLICES
    assert os.getpid() not in pids(runs)
    assert sorted(pids(builds)) == sorted(set(pids(runs)))


def test_a_worker_killed_mid_task_is_rerun_and_the_output_is_identical(cluster, data, tmp_path):
    src, ref, counts = data
    folder = tmp_path / "markers"
    folder.mkdir()
    out = tmp_path / "killed.zarr"
    res = run_batch(str(src), settings(RecordingFactory(str(folder), die_after=2)), out,
                    executor=cluster)

    dead = int((folder / "died").read_text())  # a worker really died, after 2 slices began
    assert dead != os.getpid()
    assert res.complete and res.counts == dict(enumerate(counts))
    np.testing.assert_array_equal(stored(out), ref)
    # every slice ran to its end at least once (the killed attempt left no run marker; a
    # result still held by the dead worker is recomputed, so a few may have run twice)
    assert len(markers(folder, "run")) >= N_SLICES
    # the nanny replaced the dead process: two live workers again, none of them the dead one
    cluster.client.wait_for_workers(2, timeout=60)
    assert dead not in cluster.client.run(os.getpid).values()


def test_a_stopped_job_resumes_without_recomputing_finished_slices(cluster, data, recorder,
                                                                   tmp_path):
    src, ref, counts = data
    folder, factory = recorder
    out = tmp_path / "resume.zarr"
    seen: list[int] = []

    def progress(ev):
        if ev.kind == "slice":
            seen.append(ev.index)

    first = run_batch(str(src), settings(factory), out, executor=cluster, progress=progress,
                      cancel=lambda: len(seen) >= 2)
    assert first.cancelled and not first.complete
    finished = ZarrOutput(out).done()
    assert sorted(finished) == sorted(seen) and len(finished) == 2
    chunk_times = {i: (out / "0" / "c" / str(i) / "0" / "0").stat().st_mtime_ns
                   for i in finished}

    (folder / "phase").write_text("2")
    events = []
    second = run_batch(str(src), settings(factory), out, executor=cluster,
                       progress=events.append)
    assert events[0].kind == "start" and events[0].skipped == 2
    assert second.complete and second.counts == dict(enumerate(counts))
    np.testing.assert_array_equal(stored(out), ref)
    # the rerun executed exactly the unfinished slices; finished chunks were not rewritten
    assert len(markers(folder, "run-2")) == N_SLICES - 2
    assert sorted(e.index for e in events if e.kind == "slice") == sorted(
        set(range(N_SLICES)) - set(finished))
    for i, t in chunk_times.items():
        assert (out / "0" / "c" / str(i) / "0" / "0").stat().st_mtime_ns == t


def test_a_cluster_needs_a_file_input_and_a_zarr_output(cluster, data, tmp_path):
    src, _, _ = data
    stack = tifffile.imread(src)
    with pytest.raises(ValueError, match="from a file every worker can open"):
        run_batch(stack, settings(), tmp_path / "a.zarr", executor=cluster)
    with pytest.raises(ValueError, match="Zarr store"):
        run_batch(str(src), settings(), None, executor=cluster)


# ----------------------------------------------------------------------- worker side


def test_worker_gpu_follows_the_worker_name():
    assert worker_gpu(0, 0) is None and worker_gpu("x", 0) is None
    assert [worker_gpu(i, 2) for i in range(4)] == [0, 1, 0, 1]
    assert worker_gpu("SLURMCluster-4-1", 4) == 1 and worker_gpu("tcp://h:1-3", 2) == 1
    assert worker_gpu("gpu-worker", 4) == 0 and worker_gpu(5, 1) == 0


def test_tasks_pin_their_model_to_the_workers_gpu(monkeypatch):
    """Without a GPU here: CUDA is faked, the device choice and set_device are checked."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(C._distributed(), "get_worker",
                        lambda: type("W", (), {"name": "job-3"})())
    auto = dataclasses.replace(settings().model, device="auto")
    pinned = C._pinned_spec(auto, C.WorkerOptions())
    assert pinned.device == "cuda:1" and calls == [1]
    assert C._pinned_spec(auto, C.WorkerOptions(pin_gpus=False)) is auto
    cpu = settings().model  # device "cpu" stays on the CPU
    assert C._pinned_spec(cpu, C.WorkerOptions()) is cpu
    # run_task runs the task with the pinned model (a probe task: no model is built)

    @dataclasses.dataclass(frozen=True)
    class Probe:
        settings: BatchSettings

        def __call__(self, index, cancel=None):
            return index, self.settings.model.device

    s = dataclasses.replace(settings(), model=auto)
    assert C.run_task(4, Probe(s), C.WorkerOptions(), None) == (4, "cuda:1")
    assert C.run_task(4, Probe(settings()), C.WorkerOptions(), None) == (4, "cpu")


def test_run_task_stops_before_work_when_the_run_was_cancelled(monkeypatch, data):
    src, ref, _ = data
    task = TileTask(StackSource.create(str(src)), settings())
    monkeypatch.setattr(C._CancelEvent, "__call__", lambda self: True)
    assert C.run_task(1, task, C.WorkerOptions(), "some-event") is None
    monkeypatch.undo()
    res = C.run_task(1, task, C.WorkerOptions(), None)
    assert res.index == res.plane == 1 and res.n_objects == len(np.unique(ref[1])) - 1
    np.testing.assert_array_equal(res.labels, ref[1])  # one-tile plane, no output: returned
    assert res.labels.dtype == ref.dtype


def test_bad_executor_arguments():
    with pytest.raises(ValueError, match="give one of"):
        DaskExecutor()
    with pytest.raises(ValueError, match="give one of"):
        DaskExecutor(workers=2, scheduler="tcp://x:1")
    with pytest.raises(ValueError, match=">= 1"):
        DaskExecutor(workers=0)


def test_missing_distributed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"napari-esam\[cluster\]"):
        DaskExecutor(workers=1)


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def mobilesam_ckpt(tmp_path_factory) -> Path:
    """Synthetic MobileSAM weights as a checkpoint file (official ones can't be downloaded)."""
    import torch

    from napari_esam.models.synthetic import synthetic_state_dict

    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam_synthetic.pt"
    torch.save({k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()},
               path)
    return path


@pytest.fixture
def one_torch_thread():
    """In-process runs on one PyTorch thread, like the workers: identical float sums."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_cli_on_a_scheduler_matches_in_process(cluster, mobilesam_ckpt, tmp_path, capsys,
                                               one_torch_thread):
    """Real MobileSAM code (synthetic weights, 3x3 points, filters off) in a worker; one
    slice, as its encoder takes seconds on a CPU thread."""
    from napari_esam.cli import main

    stack, _ = blob_stack(1, size=48, seed=3)
    src = tmp_path / "cells.tif"
    tifffile.imwrite(src, stack, photometric="minisblack")
    common = ["--device", "cpu", "--checkpoint", str(mobilesam_ckpt), "--points-per-side", "3",
              "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--no-progress"]
    assert main(["everything", str(src), "-o", str(tmp_path / "a.zarr"), *common]) == 0
    capsys.readouterr()
    address = cluster.client.scheduler.address
    assert main(["everything", str(src), "-o", str(tmp_path / "b.zarr"), *common,
                 "--scheduler", address]) == 0
    assert f"running on a Dask cluster, 2 workers at {address}" in capsys.readouterr().err
    a = stored(tmp_path / "a.zarr")
    assert a.any()  # synthetic weights with the filters off do find objects
    np.testing.assert_array_equal(stored(tmp_path / "b.zarr"), a)
    assert cluster.client.status == "running"  # the CLI leaves a remote cluster running


def test_cli_workers_option_runs_a_local_cluster_into_a_tiff(cluster, data, tmp_path, capsys,
                                                             monkeypatch):
    """``--workers N`` asks for a local cluster of N processes (the module's cluster stands
    in); the blob model replaces MobileSAM through the CLI's settings."""
    from napari_esam.cli import everything as cli_everything
    from napari_esam.cli import main

    src, ref, counts = data
    made = []

    def fake_executor(**kwargs):
        made.append(kwargs)
        return DaskExecutor(client=cluster.client)

    monkeypatch.setattr(C, "DaskExecutor", fake_executor)
    real = cli_everything.settings_from_args
    monkeypatch.setattr(cli_everything, "settings_from_args",
                        lambda args: dataclasses.replace(real(args), model=settings().model))
    out = tmp_path / "labels.tif"
    assert main(["everything", str(src), "-o", str(out), "--points-per-side", "8",
                 "--workers", "3", "--retries", "1", "--no-progress"]) == 0
    assert made == [{"workers": 3, "scheduler": None, "retries": 1}]
    printed = capsys.readouterr().out
    assert "6 of 6 slices" in printed and f"slice 5: {counts[5]} objects" in printed
    np.testing.assert_array_equal(tifffile.imread(out), ref)
    assert not Path(str(out) + ".partial.zarr").exists()


def test_cli_cluster_option_errors(tmp_path, capsys, monkeypatch):
    from napari_esam.cli import main

    tifffile.imwrite(tmp_path / "z.tif", np.zeros((2, 16, 16), np.uint8))
    base = ["everything", str(tmp_path / "z.tif"), "-o", str(tmp_path / "o.zarr")]
    assert main([*base, "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not both
        main([*base, "--workers", "2", "--scheduler", "tcp://x:1"])
    assert "not allowed with" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main([*base, "--workers", "2"]) == 2
    assert "napari-esam[cluster]" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


# --------------------------------------------------------------------------- widget


def test_widget_runs_a_file_layer_on_a_dask_scheduler(make_napari_viewer, qtbot, cluster, data,
                                                      tmp_path):
    from napari.layers._source import layer_source

    from tests.fakes import make_widget, run_and_wait

    src, ref, counts = data
    viewer = make_napari_viewer()
    with layer_source(path=str(src)):
        viewer.add_image(tifffile.imread(src), name="cells")
    widget = make_widget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.layer_contrast.setChecked(False)  # per-slice contrast, as the reference run
    widget.executor_combo.setCurrentIndex(widget.executor_combo.findData("scheduler"))
    assert widget.scheduler_edit.isVisibleTo(widget) and not widget.workers_spin.isVisibleTo(widget)
    widget.scheduler_edit.setText(cluster.client.scheduler.address)
    out = tmp_path / "w.zarr"
    widget.zarr_edit.setText(str(out))
    slices = []
    widget.controller.on_progress = lambda ev: (slices.append(ev.index) if ev.kind == "slice"
                                                else None, widget._on_progress(ev))

    run_and_wait(qtbot, widget)
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=10_000)
    assert widget.status.text().startswith(f"Done: 6 / 6 slices, {sum(counts)} objects")
    assert sorted(slices) == list(range(N_SLICES))
    assert widget.progress.format() == "6 / 6 slices"
    np.testing.assert_array_equal(stored(out), ref)
    np.testing.assert_array_equal(np.asarray(viewer.layers["cells everything"].data), ref)
    assert cluster.client.status == "running"  # a remote cluster is left running


def test_widget_dask_choices_and_their_errors(make_napari_viewer, data, tmp_path):
    from tests.fakes import make_widget

    src, _, _ = data
    viewer = make_napari_viewer()
    viewer.add_image(tifffile.imread(src), name="memory")  # no file behind it
    widget = make_widget(viewer)
    widget.executor_combo.setCurrentIndex(widget.executor_combo.findData("local-cluster"))
    assert widget.workers_spin.isVisibleTo(widget) and not widget.scheduler_edit.isVisibleTo(widget)
    widget.workers_spin.setValue(3)
    assert widget.run() is None and "writes into a Zarr store" in widget.status.text()
    widget.zarr_edit.setText(str(tmp_path / "x.zarr"))
    executor = widget.controller.executor(widget.form())
    assert isinstance(executor, DaskExecutor) and executor.workers == 3
    assert widget.run() is None and "has none: open the image from a TIFF" in widget.status.text()
    assert not (tmp_path / "x.zarr").exists()
    widget.executor_combo.setCurrentIndex(widget.executor_combo.findData("scheduler"))
    assert widget.run() is None and "scheduler's address" in widget.status.text()
