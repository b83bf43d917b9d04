"""Batch segment-everything throughput on a local Dask cluster: slices/s for 1 and 2 workers.

MobileSAM with synthetic weights (the conformance recipe) on the CPU, a small point grid
(default 4x4, one point batch, filters off so masks are kept), on a synthetic stack of
512x512 16-bit "cells" written as a TIFF that the workers read themselves; each run writes
its own Zarr store. Per configuration: the cluster is started and every worker loads the
model first (not timed), then the whole stack is timed (median of ``--repeats`` runs, each
into a fresh store). Configurations: in-process (the default executor), Dask with 1 worker
(all cores for PyTorch) and 2 workers (the cores shared out), plus 1 worker on 1 thread
for the per-core scaling. Prints one table, the scaling ratio and the machine's load
(the figures mean little on a machine others are using).

    .venv/bin/python benchmarks/bench_cluster.py [--slices 8] [--points-per-side 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_stack(path: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` slices of bright disks on a noisy background (uint16), as a TIFF."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    stack = rng.integers(100, 400, (n, size, size)).astype(np.uint16)
    for i in range(n):
        for _ in range(12):
            cy, cx, r = rng.integers(40, size - 40, 2).tolist() + [int(rng.integers(10, 30))]
            stack[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(2000, 4000)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})


def save_checkpoint(path: Path) -> None:
    import torch

    from napari_esam.models.synthetic import synthetic_state_dict

    state = {k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()}
    torch.save(state, path)


def _warm(spec) -> int:
    """Import and build the model in a worker (before timing)."""
    from napari_esam.core.runs.settings import get_model

    get_model(spec)
    return os.getpid()


def time_runs(src: Path, settings, workdir: Path, tag: str, repeats: int,
              executor=None) -> tuple[float, np.ndarray]:
    """Median seconds of ``repeats`` whole-stack runs, and the labels of the last one."""
    from napari_esam.core.runs.pipeline import run_batch

    times = []
    labels = None
    for r in range(repeats):
        out = workdir / f"{tag}-{r}.zarr"
        t0 = time.perf_counter()
        res = run_batch(str(src), settings, out, executor=executor)
        times.append(time.perf_counter() - t0)
        assert res.complete, f"{tag}: incomplete run"
        labels = np.asarray(res.labels[:])
        shutil.rmtree(out)
    return statistics.median(times), labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="slice height and width")
    p.add_argument("--points-per-side", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: temp)")
    args = p.parse_args()

    import torch

    from napari_esam.core.runs.cluster import DaskExecutor
    from napari_esam.core.runs.settings import (
        BatchSettings,
        EverythingParams,
        ModelSpec,
        get_model,
    )

    cores = os.cpu_count() or 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    src, ckpt = workdir / "stack.tif", workdir / "mobile_sam_synthetic.pt"
    make_stack(src, args.slices, args.size)
    save_checkpoint(ckpt)
    spec = ModelSpec("mobilesam", str(ckpt), "cpu")
    params = EverythingParams(points_per_side=args.points_per_side, points_per_batch=64,
                              pred_iou_thresh=0.0, stability_score_thresh=0.0)
    settings = BatchSettings(spec, params)
    load_before = os.getloadavg()

    rows = []
    differ: list[str] = []
    torch.set_num_threads(cores)
    get_model(spec)
    secs, reference = time_runs(src, settings, workdir, "inprocess", args.repeats)
    rows.append(("in-process", 0, cores, secs))
    configs = [(1, cores), (2, max(1, cores // 2)), (1, 1)]
    for workers, threads in configs:
        with DaskExecutor(workers=workers, torch_threads=threads) as ex:
            ex.client.run(_warm, spec)
            secs, labels = time_runs(src, settings, workdir, f"dask{workers}x{threads}",
                                     args.repeats, ex)
        if not np.array_equal(labels, reference):
            differ.append(f"{workers}x{threads}")
        rows.append(("Dask LocalCluster", workers, threads, secs))
    load_after = os.getloadavg()

    rate = {(r[1], r[2]): args.slices / r[3] for r in rows}
    print(f"\nbatch segment-everything, MobileSAM (synthetic weights), {args.slices} slices of "
          f"{args.size}x{args.size}, {args.points_per_side}x{args.points_per_side} points, "
          f"CPU float32; {platform.processor() or platform.machine()}, {cores} cores, "
          f"torch {torch.__version__}; median of {args.repeats} run(s), model loading and "
          "cluster start not timed\n")
    print("| executor | workers | torch threads / worker | wall (s) | slices/s |")
    print("|---|---|---|---|---|")
    for name, workers, threads, secs in rows:
        print(f"| {name} | {workers or '-'} | {threads} | {secs:.1f} | "
              f"{args.slices / secs:.3f} |")
    one, two = rate[(1, cores)], rate[(2, max(1, cores // 2))]
    print(f"\nscaling ratio, 2 workers / 1 worker (both using all {cores} cores): "
          f"{two / one:.2f}x")
    print(f"per-core scaling, 2 workers x {max(1, cores // 2)} thread(s) / 1 worker x 1 thread: "
          f"{two / rate[(1, 1)]:.2f}x")
    print(f"Dask 1 worker / in-process: {one / rate[(0, cores)]:.2f}x")
    same = "identical in every configuration" if not differ else (
        f"DIFFERENT from the in-process run for {', '.join(differ)} (workers x threads)")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
          f"(on {cores} cores); labels {same}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
