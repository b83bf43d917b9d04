"""Tiled planes with one Dask task per tile on a LocalCluster (2 processes): the labels of
the in-process run, one task per tile, stop and resume, the CLI.

One cluster serves the module. The models are :class:`MarkingFactory` blob models that
leave a marker file per tile task (with the process id and a phase) and per model build,
so the tests count what ran where. The same pipeline in this process
(:class:`LocalExecutor` with the scratch group of a Zarr output) is tested at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

pytest.importorskip("distributed")

from napari_esam.core.runs.cluster import DaskExecutor  # noqa: E402
from napari_esam.core.runs.executors import LocalExecutor  # noqa: E402
from napari_esam.core.runs.outputs import RUN_ATTR, SCRATCH_SUFFIX, TileScratch  # noqa: E402
from napari_esam.core.runs.pipeline import run_batch  # noqa: E402
from napari_esam.core.runs.settings import (  # noqa: E402
    BatchSettings,
    EverythingParams,
    ModelSpec,
    TilingParams,
)
from napari_esam.core.runs.sources import StackSource  # noqa: E402
from napari_esam.core.runs.tasks import TileTask  # noqa: E402
from napari_esam.core.tiling.grid import TileGrid  # noqa: E402
from napari_esam.core.tiling.store import EmbeddingStore, read_signature  # noqa: E402
from tests.fakes import (  # noqa: E402
    FAST_TILED,
    HALO,
    TILE,
    BlobModel,  # noqa: E402
    blob_image,
)

SHAPE = (600, 700)
N_TILES = TileGrid(SHAPE, TILE, HALO).n_tiles  # 3 x 4 = 12


class MarkingBlobModel(BlobModel):
    """The blob model, leaving ``build-PID-*`` and, per encoded tile, ``run-PHASE-PID-*``
    files in ``folder`` (``PHASE``: the text of the file ``phase``, default 1)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = Path(folder)
        self._mark(f"build-{os.getpid()}")

    def _mark(self, prefix: str) -> None:
        (self.folder / f"{prefix}-{uuid.uuid4().hex}").touch()

    def encode(self, x):
        phase = self.folder / "phase"
        self._mark(f"run-{phase.read_text() if phase.exists() else 1}-{os.getpid()}")
        return super().encode(x)


@dataclasses.dataclass(frozen=True)
class MarkingFactory:
    """Picklable model factory; its repr (with the folder) keys the per-process cache."""

    folder: str

    def __call__(self) -> MarkingBlobModel:
        return MarkingBlobModel(self.folder)


def markers(folder: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{prefix}-*"))


def pids(names: list[str]) -> list[int]:
    return [int(n.split("-")[-2]) for n in names]


@pytest.fixture
def recorder(tmp_path) -> tuple[Path, ModelSpec]:
    folder = tmp_path / "markers"
    folder.mkdir()
    return folder, ModelSpec("blob", device="cpu", factory=MarkingFactory(str(folder)))


@pytest.fixture(scope="module")
def cluster():
    with DaskExecutor(workers=2) as executor:
        executor.start()
        yield executor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The 600 x 700 blob image as a TIFF (read by the workers) and its in-process result."""
    path = tmp_path_factory.mktemp("input") / "slide.tif"
    tifffile.imwrite(path, blob_image(SHAPE), tile=(128, 128), photometric="minisblack")
    ref = run_batch(str(path), settings())
    assert ref.complete and ref.details["grid"].n_tiles == N_TILES
    assert ref.details["merged"] > 0 and ref.counts[0] > 10  # both seam rules at work
    return path, np.asarray(ref.labels), ref


def settings(spec: ModelSpec | None = None, **params) -> BatchSettings:
    """Tiles of TILE px with a HALO px overlap (even for this 600 x 700 plane)."""
    spec = spec or ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel")
    return BatchSettings(spec, EverythingParams(**{**FAST_TILED, **params}),
                         tiling=TilingParams("on", TILE, HALO))


def stored(out: Path) -> np.ndarray:
    return zarr.open_array(out / "0", mode="r")[:]


# ------------------------------------------------------------------------------ cluster


def test_one_task_per_tile_gives_exactly_the_in_process_labels(cluster, data, recorder,
                                                               tmp_path):
    src, ref, reference = data
    folder, spec = recorder
    assert len(cluster.client.scheduler_info()["workers"]) == 2
    out = tmp_path / "labels.zarr"
    events = []
    res = run_batch(str(src), settings(spec), out, executor=cluster, progress=events.append)

    assert res.complete and not res.cancelled and res.counts == reference.counts
    np.testing.assert_array_equal(np.asarray(res.labels[:]), ref)
    np.testing.assert_array_equal(stored(out), ref)
    assert stored(out).dtype == ref.dtype == np.uint16
    for key in ("merged", "tiles", "skipped"):
        assert res.details[key] == reference.details[key], key
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]
    assert rec["complete"] and rec["slices"] == {"0": reference.counts[0]}
    # one task per tile, each run once, in the worker processes; one model per worker
    assert res.details["tiles"] == N_TILES and res.details["skipped"] == 0
    assert res.details["encoder_calls"] == N_TILES
    runs, builds = markers(folder, "run"), markers(folder, "build")
    assert len(runs) == N_TILES
    assert os.getpid() not in pids(runs)
    worker_pids = set(pids(runs))
    assert set(pids(builds)) >= worker_pids
    assert all(pids(builds).count(p) == 1 for p in worker_pids)
    # progress: every tile, then the plane (merged when its last tile is done)
    tiles = [e for e in events if e.kind == "tile"]
    assert [e.tiles_done for e in tiles] == list(range(1, N_TILES + 1))
    assert all(e.tiles_total == N_TILES and e.total == 1 for e in events)
    assert [(e.kind, e.done) for e in events if e.kind in ("start", "slice")] == [
        ("start", 0), ("slice", 1)]
    assert events[-1].kind == "slice" and events[-1].n_objects == reference.counts[0]
    assert not Path(str(out) + SCRATCH_SUFFIX).exists()  # the scratch group is deleted


def test_a_stopped_run_resumes_and_recomputes_only_the_missing_tiles(cluster, data, recorder,
                                                                     tmp_path):
    src, ref, _ = data
    folder, spec = recorder
    out = tmp_path / "labels.zarr"
    seen: list[int] = []

    def progress(ev):
        if ev.kind == "tile":
            seen.append(ev.tiles_done)

    first = run_batch(str(src), settings(spec), out, executor=cluster, progress=progress,
                      cancel=lambda: len(seen) >= 4)
    assert first.cancelled and not first.complete and first.counts == {}
    scratch = TileScratch(str(out) + SCRATCH_SUFFIX)
    finished = scratch.done()
    assert len(finished) == len(seen) >= 4 and len(finished) < N_TILES
    first_runs = len(markers(folder, "run-1"))
    assert first_runs >= len(finished)  # (a task running at the stop may have finished)
    assert not stored(out).any()  # the plane is written only when all its tiles are done

    (folder / "phase").write_text("2")
    events = []
    second = run_batch(str(src), settings(spec), out, executor=cluster,
                       progress=events.append)
    assert second.complete
    np.testing.assert_array_equal(stored(out), ref)
    assert events[0].kind == "start" and events[0].tiles_done == len(finished)
    # the rerun ran exactly the tiles not recorded as finished
    assert second.details["skipped"] == len(finished)
    assert second.details["tiles"] == len(markers(folder, "run-2")) == N_TILES - len(finished)
    assert not Path(scratch.path).exists()


def test_the_cli_runs_tiles_on_the_cluster_and_fills_the_store(cluster, data, tmp_path,
                                                               monkeypatch, capsys):
    """``--tiled on --tile 256 --workers 2`` (the module's cluster stands in for the local
    one; the blob model replaces MobileSAM); ``--embeddings``: the workers write the
    embeddings, the client records them, and an in-process run then encodes nothing."""
    from napari_esam.cli import everything as cli_everything
    from napari_esam.cli import main
    from napari_esam.core.runs import cluster as C
    src, ref, reference = data
    made = []

    def fake_executor(**kwargs):
        made.append(kwargs)
        return DaskExecutor(client=cluster.client)

    monkeypatch.setattr(C, "DaskExecutor", fake_executor)
    spec = ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel")
    real = cli_everything.settings_from_args
    monkeypatch.setattr(cli_everything, "settings_from_args",
                        lambda args: dataclasses.replace(real(args), model=spec))
    out, store = tmp_path / "labels.tif", tmp_path / "emb.zarr"
    assert main(["everything", str(src), "-o", str(out), "--tiled", "on", "--tile", str(TILE),
                 "--halo", str(HALO), "--points-per-side", "8", "--embeddings", str(store),
                 "--workers", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert made == [{"workers": 2, "scheduler": None, "retries": 2}]
    assert "running on a Dask cluster, 2 workers" in captured.err
    assert f"tiles segmented {N_TILES} (already done: 0)" in captured.err
    assert f"1 of 1 slices, {reference.counts[0]} objects" in captured.out
    np.testing.assert_array_equal(tifffile.imread(out), ref)
    assert not list(tmp_path.glob("*.partial.zarr*"))  # working store and scratch removed

    assert EmbeddingStore.open(store, read_signature(store), mode="r").n_done == N_TILES
    again = run_batch(str(src), settings(), embeddings=store, model=BlobModel().eval())
    assert again.details["encoder_calls"] == 0 and again.details["store_hits"] == N_TILES
    np.testing.assert_array_equal(np.asarray(again.labels), ref)


@pytest.mark.parametrize("decoding", ["point", "box"])
def test_object_prompts_on_the_cluster_give_the_in_process_labels(cluster, data, tmp_path,
                                                                  monkeypatch, capsys,
                                                                  decoding):
    """``napari-esam everything --prompts objects --workers 2`` (the module's cluster; the
    blob model): each worker detects the objects of its tiles; the labels are those of the
    in-process run."""
    from napari_esam.cli import everything as cli_everything
    from napari_esam.cli import main
    from napari_esam.core.runs import cluster as C

    src, _, _ = data
    monkeypatch.setattr(C, "DaskExecutor", lambda **kw: DaskExecutor(client=cluster.client))
    spec = ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel")
    real = cli_everything.settings_from_args
    monkeypatch.setattr(cli_everything, "settings_from_args",
                        lambda args: dataclasses.replace(real(args), model=spec))
    objects = {"prompts": "objects", "object_diameter": (12.0, 48.0),
               "object_decoding": decoding}
    ref = run_batch(str(src), settings(**objects))
    assert ref.counts[0] > 10 and ref.details["merged"] > 0  # seams at work
    out = tmp_path / "labels.zarr"
    assert main(["everything", str(src), "-o", str(out), "--tiled", "on", "--tile", str(TILE),
                 "--halo", str(HALO), "--prompts", "objects", "--object-diameter", "12", "48",
                 "--object-decoding", decoding, "--workers", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "running on a Dask cluster" in captured.err
    assert f"1 of 1 slices, {ref.counts[0]} objects" in captured.out
    np.testing.assert_array_equal(stored(out), np.asarray(ref.labels))
    rec = zarr.open_group(out, mode="r").attrs[RUN_ATTR]["settings"]["params"]
    assert rec["objects"]["object_decoding"] == decoding


def test_a_distributed_run_needs_a_file_input_and_a_zarr_output(cluster, data, tmp_path):
    src, _, _ = data
    with pytest.raises(ValueError, match="from a file every worker can open"):
        run_batch(blob_image(SHAPE), settings(), tmp_path / "a.zarr", executor=cluster)
    with pytest.raises(ValueError, match="Zarr store"):
        run_batch(str(src), settings(), None, executor=cluster)


def test_a_refused_distributed_run_leaves_no_output(cluster, tmp_path):
    out = tmp_path / "a.zarr"
    with pytest.raises(ValueError, match="from a file every worker can open"):
        run_batch(blob_image(SHAPE), settings(), out, executor=cluster)
    assert not out.exists() and not Path(str(out) + SCRATCH_SUFFIX).exists()


# ------------------------------------------------------- the same tiles in this process


def test_local_executor_scratch_round_trip_and_resume(data, tmp_path):
    src, ref, _ = data
    out = tmp_path / "labels.zarr"
    scratch = TileScratch(str(out) + SCRATCH_SUFFIX)
    n = []

    def progress(ev):
        if ev.kind == "tile":
            n.append(ev.tiles_done)

    first = run_batch(str(src), settings(), out, executor=LocalExecutor(), progress=progress,
                      cancel=lambda: len(n) >= 5)
    assert first.cancelled
    assert scratch.done() == set(range(5))  # in order, in this process
    # a scratch tile reads back as the task's own masks, in paint order, tightly cropped
    grid = TileGrid(SHAPE, TILE, HALO)
    kept = scratch.read(1, (), *divmod(1, grid.n_x))
    assert (kept.iy, kept.ix) == (0, 1) and len(kept) > 0
    direct = TileTask(StackSource.create(str(src)), settings())(1).masks
    np.testing.assert_array_equal(kept.boxes, direct.boxes)
    np.testing.assert_array_equal(kept.scores, direct.scores)
    np.testing.assert_array_equal(kept.order, direct.order)
    assert kept.stats == direct.stats
    for a, b in zip(kept.masks, direct.masks, strict=True):
        np.testing.assert_array_equal(a, b)
    areas = [int(m.sum()) for m in kept.masks]
    assert areas == sorted(areas, reverse=True) and all(a > 0 for a in areas)
    for (y0, x0, y1, x1), m in zip(kept.boxes.tolist(), kept.masks, strict=True):
        assert m.shape == (y1 - y0, x1 - x0)
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()

    second = run_batch(str(src), settings(), out, executor=LocalExecutor())
    assert second.complete
    np.testing.assert_array_equal(stored(out), ref)
    assert second.details["tiles"] == N_TILES - 5 and second.details["skipped"] == 5
    assert not Path(scratch.path).exists()


def test_a_new_output_does_not_reuse_a_left_over_scratch_group(data, tmp_path):
    """The scratch group belongs to its output: when the output is gone (deleted, or
    replaced with --overwrite), a run starts a new scratch group, whatever the old held."""
    src, ref, _ = data
    out = tmp_path / "labels.zarr"
    n = []
    run_batch(str(src), settings(), out, cancel=lambda: len(n) >= 2,
              progress=lambda ev: ev.kind == "tile" and n.append(1))
    scratch = Path(str(out) + SCRATCH_SUFFIX)
    assert TileScratch(scratch).done() == {0, 1}
    shutil.rmtree(out)  # the output is gone, its scratch group is not
    res = run_batch(str(src), settings(), out)
    assert res.complete and res.details["skipped"] == 0 and res.details["tiles"] == N_TILES
    np.testing.assert_array_equal(stored(out), ref)
    assert not scratch.exists()
