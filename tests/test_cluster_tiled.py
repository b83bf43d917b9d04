"""Tiled segment-everything with one Dask task per tile on a LocalCluster (2 processes):
the labels of the in-process run, one task per tile, stop and resume, the CLI.

One cluster serves the module. The models are :class:`MarkingFactory` blob models that
leave a marker file per tile task (with the process id and a phase) and per model build,
so the tests count what ran where. The in-process map/merge path without a cluster
(:class:`LocalTileExecutor`) is tested at the end.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

pytest.importorskip("distributed")

from napari_esam.core.plane.everything import Cancelled  # noqa: E402
from napari_esam.core.runs.cluster import DaskExecutor  # noqa: E402
from napari_esam.core.runs.pipeline import ModelSpec  # noqa: E402
from napari_esam.core.tiling.grid import TileGrid  # noqa: E402
from napari_esam.core.tiling.merge import (  # noqa: E402
    LocalTileExecutor,
    TileScratch,
    segment_everything_tiled,
)
from napari_esam.core.tiling.store import EmbeddingStore, read_signature  # noqa: E402
from tests.batch_fakes import BlobModel  # noqa: E402
from tests.tiled_fakes import FAST_TILED, HALO, TILE, blob_image  # noqa: E402

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
    """The 600 x 700 blob image as a TIFF (read by the workers) and its in-process labels."""
    path = tmp_path_factory.mktemp("input") / "slide.tif"
    tifffile.imwrite(path, blob_image(SHAPE), tile=(128, 128), photometric="minisblack")
    details: dict = {}
    labels = segment_everything_tiled(str(path), BlobModel().eval(), tile=TILE, halo=HALO,
                                      details=details, **FAST_TILED)
    assert details["merged"] > 0 and details["objects"] > 10
    return path, labels, details


def run(src, spec, out, executor, **kw):
    return segment_everything_tiled(str(src), spec, out, tile=TILE, halo=HALO,
                                    executor=executor, **FAST_TILED, **kw)


# ------------------------------------------------------------------------------ cluster


def test_one_task_per_tile_gives_exactly_the_in_process_labels(cluster, data, recorder,
                                                               tmp_path):
    src, ref, ref_details = data
    folder, spec = recorder
    assert len(cluster.client.scheduler_info()["workers"]) == 2
    out = tmp_path / "labels.zarr"
    details: dict = {}
    progress: list[tuple[int, int]] = []
    labels = run(src, spec, out, cluster, details=details,
                 progress=lambda d, t: progress.append((d, t)))

    np.testing.assert_array_equal(np.asarray(labels[:]), ref)
    np.testing.assert_array_equal(zarr.open_array(out, mode="r")[:], ref)
    for key in ("objects", "owned", "piece", "dropped", "merged", "tiles"):
        assert details[key] == ref_details[key], key
    # one task per tile, each run once, in the worker processes; one model per worker
    assert details["tasks"] == N_TILES and details["skipped"] == 0
    runs, builds = markers(folder, "run"), markers(folder, "build")
    assert len(runs) == N_TILES
    assert os.getpid() not in pids(runs)
    worker_pids = set(pids(runs))
    assert set(pids(markers(folder, "build"))) >= worker_pids
    assert all(pids(builds).count(p) == 1 for p in worker_pids)
    assert progress == [(i, N_TILES) for i in range(1, N_TILES + 1)]
    assert not Path(str(out) + ".tiles.zarr").exists()  # the scratch group is deleted


def test_a_stopped_run_resumes_and_recomputes_only_the_missing_tiles(cluster, data, recorder,
                                                                     tmp_path):
    src, ref, _ = data
    folder, spec = recorder
    out = tmp_path / "labels.zarr"
    seen: list[int] = []
    with pytest.raises(Cancelled, match="run again to resume"):
        run(src, spec, out, cluster, progress=lambda d, t: seen.append(d),
            cancel=lambda: len(seen) >= 4)
    scratch = TileScratch(str(out) + ".tiles.zarr")
    finished = scratch.done()
    assert len(finished) == len(seen) >= 4 and len(finished) < N_TILES
    first_runs = len(markers(folder, "run-1"))
    assert first_runs >= len(finished)  # (a task running at the stop may have finished)

    (folder / "phase").write_text("2")
    details: dict = {}
    labels = run(src, spec, out, cluster, details=details)
    np.testing.assert_array_equal(np.asarray(labels[:]), ref)
    # the rerun ran exactly the tiles not recorded as finished
    assert details["skipped"] == len(finished)
    assert details["tasks"] == len(markers(folder, "run-2")) == N_TILES - len(finished)
    assert not Path(scratch.path).exists()


def test_the_cli_runs_tiles_on_the_cluster_and_fills_the_store(cluster, data, tmp_path,
                                                               monkeypatch, capsys):
    """``--tile 256 --workers 2`` (the module's cluster stands in for the local one; the
    blob model replaces MobileSAM); ``--embeddings``: the workers write the embeddings, the
    client records them, and an in-process run then encodes nothing."""
    from napari_esam.cli import everything as cli_everything
    from napari_esam.cli import main
    from napari_esam.core.runs import cluster as C
    src, ref, ref_details = data
    made = []

    def fake_executor(**kwargs):
        made.append(kwargs)
        return DaskExecutor(client=cluster.client)

    monkeypatch.setattr(C, "DaskExecutor", fake_executor)
    spec = ModelSpec("blob", device="cpu", factory="tests.batch_fakes:BlobModel")
    real = cli_everything.settings_from_args
    monkeypatch.setattr(cli_everything, "settings_from_args",
                        lambda args: dataclasses.replace(real(args), model=spec))
    out, store = tmp_path / "labels.tif", tmp_path / "emb.zarr"
    assert main(["everything", str(src), "-o", str(out), "--tile", str(TILE), "--halo",
                 str(HALO), "--points-per-side", "8", "--embeddings", str(store),
                 "--workers", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert made == [{"workers": 2, "scheduler": None, "retries": 2}]
    assert "running on a Dask cluster, 2 workers" in captured.err
    assert f"tile tasks {N_TILES} (already done: 0)" in captured.err
    assert f"1 of 1 slices, {ref_details['objects']} objects" in captured.out
    np.testing.assert_array_equal(tifffile.imread(out), ref)
    assert not list(tmp_path.glob("*.partial.zarr*"))  # working store and scratch removed

    assert EmbeddingStore.open(store, read_signature(store), mode="r").n_done == N_TILES
    details: dict = {}
    again = segment_everything_tiled(str(src), BlobModel().eval(), tile=TILE, halo=HALO,
                                     embedding_store=store, details=details, **FAST_TILED)
    assert details["encoder_calls"] == 0 and details["store_hits"] == N_TILES
    np.testing.assert_array_equal(again, ref)


def test_a_distributed_run_needs_a_file_and_a_model_spec(cluster, data, tmp_path):
    src, _, _ = data
    spec = ModelSpec("blob", device="cpu", factory="tests.batch_fakes:BlobModel")
    with pytest.raises(ValueError, match="from a file every worker can open"):
        segment_everything_tiled(blob_image(SHAPE), spec, tmp_path / "a.zarr",
                                 executor=cluster)
    with pytest.raises(TypeError, match="ModelSpec"):
        segment_everything_tiled(str(src), BlobModel(), tmp_path / "a.zarr", executor=cluster)
    with pytest.raises(ValueError, match="give scratch="):
        segment_everything_tiled(str(src), spec, None, executor=cluster)


# ------------------------------------------------------- map / merge without a cluster


def test_local_tile_executor_scratch_round_trip_and_resume(data, tmp_path):
    src, ref, _ = data
    spec = ModelSpec("blob", device="cpu", factory="tests.batch_fakes:BlobModel")
    scratch = tmp_path / "scratch.zarr"
    out = np.zeros(SHAPE, np.uint32)
    n = []
    with pytest.raises(Cancelled):
        run(src, spec, out, LocalTileExecutor(), scratch=scratch,
            progress=lambda d, t: n.append(d), cancel=lambda: len(n) >= 5)
    assert TileScratch(scratch).done() == set(range(5))  # in order, in this process
    details: dict = {}
    labels = run(src, spec, out, LocalTileExecutor(), scratch=scratch, details=details,
                 keep_scratch=True)
    assert labels is out
    np.testing.assert_array_equal(out, ref)
    assert details["tasks"] == N_TILES - 5 and details["skipped"] == 5
    # the kept scratch group holds every tile; its masks are the rule-1 crops
    sc = TileScratch(scratch)
    assert sc.done() == set(range(N_TILES))
    grid = TileGrid(SHAPE, TILE, HALO)
    kept = sc.read(5, (), grid)
    assert (kept.iy, kept.ix) == (1, 1)
    areas = [int(m.sum()) for m in kept.masks]
    assert areas == sorted(areas, reverse=True) and all(a > 0 for a in areas)
    for (y0, x0, y1, x1), m in zip(kept.boxes.tolist(), kept.masks, strict=True):
        assert m.shape == (y1 - y0, x1 - x0) and m[0].any() and m[:, -1].any()
    # another run's settings do not reuse the tiles
    with pytest.raises(ValueError, match="holds the tiles of another run"):
        segment_everything_tiled(str(src), spec, out, tile=TILE, halo=HALO, scratch=scratch,
                                 executor=LocalTileExecutor(), points_per_side=4)
