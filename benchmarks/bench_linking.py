"""Linking per-slice labels into 3-D objects / tracks: quality against the naive baseline,
and scaling to 1000 slices of 512² with bounded memory.

1. **Quality** (F1 at 3-D IoU 0.5 against the truth, and time per slice), our
   :func:`napari_esam.link_labels` beside the naive greedy stitching of ``tests/fakes.py``
   (each object takes the id of its best-IoU object in the previous slice when IoU >= 0.25):
   stardist's ``mask3d.tif`` (51 nuclei; the copy in ``tests/data/stardist``), touching ellipsoids
   and moving discs, each relabelled slice by slice with random ids, with and without 5 % of
   the 2-D objects deleted; three seeds for the synthetic data.
2. **Scaling**: 250, 500 and 1000 slices of 512² generated lazily (a Dask array: columns of
   stacked objects, random ids per slice; never all in memory), linked into a Zarr file. Each
   size runs in a fresh subprocess that prints its wall and CPU seconds, peak RSS and the
   peak of traced Python/NumPy allocations (tracemalloc).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_linking.py [--sizes 250 500 1000] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLANE = 512
CELL = 32  # one column of stacked objects per 32x32 cell: 256 columns


# ----------------------------------------------------------------------------- quality


def quality(seeds: int) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from napari_esam import link_labels
    from tests.fakes import (
        drop_objects,
        f1_at_iou,
        moving_discs,
        naive_stitch,
        relabel_per_slice,
        stardist_mask3d,
        touching_ellipsoids,
    )

    cases = []
    cases.append(("stardist mask3d (31x61x57)", stardist_mask3d(), "3d", 0))
    for seed in range(seeds):
        cases.append(("touching ellipsoids (24x96x96)", touching_ellipsoids(seed=seed), "3d",
                      seed))
        cases.append(("moving discs (30x192x192)", moving_discs(seed=seed), "track", seed))
    link_labels(relabel_per_slice(touching_ellipsoids(shape=(4, 32, 32))))  # warm-up: imports
    rows = []
    for name, truth, mode, seed in cases:
        for missing in (0.0, 0.05):
            stack = drop_objects(relabel_per_slice(truth, seed), missing, seed)
            t0 = time.perf_counter()
            ours = link_labels(stack, mode=mode).labels
            t1 = time.perf_counter()
            naive = naive_stitch(stack)
            t2 = time.perf_counter()
            rows.append({"data": name, "missing": missing, "seed": seed, "mode": mode,
                         "n_true": int(len(np.unique(truth)) - 1),
                         "f1_ours": f1_at_iou(truth, ours), "f1_naive": f1_at_iou(truth, naive),
                         "ms_ours": 1000 * (t1 - t0) / len(stack),
                         "ms_naive": 1000 * (t2 - t1) / len(stack)})
    return rows


# ----------------------------------------------------------------------------- scaling


def _columns(seed: int, n_slices: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per column: object start slices (with 0-2 empty slices between objects) and ends."""
    rng = np.random.default_rng(seed)
    starts, ends = [], []
    for _ in range((PLANE // CELL) ** 2):
        s, e, z = [], [], int(rng.integers(0, 8))
        while z < n_slices:
            length = int(rng.integers(8, 25))
            s.append(z)
            e.append(z + length)
            z += length + int(rng.integers(0, 3))
        starts.append(np.array(s))
        ends.append(np.array(e))
    return starts, ends


def synthetic_plane(z: int, starts, ends, seed: int) -> np.ndarray:
    """Slice ``z``: in each 32x32 cell, the disc of the object of that column at ``z`` (radius
    following an ellipsoid's profile, centre drifting), ids random in this slice."""
    n = (PLANE // CELL) ** 2
    k = np.array([np.searchsorted(s, z, side="right") - 1 for s in starts])
    present = np.array([kk >= 0 and z < e[kk] for kk, e in zip(k, ends, strict=True)])
    u = np.array([(z - s[kk] + 0.5) / (e[kk] - s[kk]) if ok else 0.5
                  for kk, s, e, ok in zip(k, starts, ends, present, strict=True)])
    obj_rng = np.random.default_rng([seed, 1])
    radius = obj_rng.uniform(9, 14, n) * np.sqrt(np.clip(1 - (2 * u - 1) ** 2, 0, 1)) * present
    drift = np.sin(z / 7.0 + np.arange(n)) * 1.5
    cy = CELL / 2 + drift
    cx = CELL / 2 - drift
    g = np.arange(CELL)
    side = PLANE // CELL
    dy = (g[None, :] - cy[:, None]) ** 2  # (n, 32)
    dx = (g[None, :] - cx[:, None]) ** 2
    inside = dy[:, :, None] + dx[:, None, :] <= radius[:, None, None] ** 2  # (n, 32, 32)
    ids = np.random.default_rng([seed, z]).choice(2**31, n, replace=False).astype(np.uint32) + 1
    cells = np.where(inside, ids[:, None, None], 0).reshape(side, side, CELL, CELL)
    return cells.transpose(0, 2, 1, 3).reshape(PLANE, PLANE)


def lazy_stack(n_slices: int, seed: int = 0):
    """A (n_slices, 512, 512) uint32 Dask array, one chunk per slice, made on demand."""
    import dask.array as da

    starts, ends = _columns(seed, n_slices)

    def block(block_info=None):
        z = block_info[None]["array-location"][0][0]
        return synthetic_plane(z, starts, ends, seed)[None]

    return da.map_blocks(block, chunks=((1,) * n_slices, (PLANE,), (PLANE,)), dtype=np.uint32,
                         meta=np.empty((0, 0, 0), np.uint32))


def scaling_worker(n_slices: int, out_dir: str) -> dict:
    """One scaling run (in its own process): link the lazy stack into a Zarr file."""
    import resource
    import tracemalloc

    from napari_esam import link_labels

    stack = lazy_stack(n_slices)
    tracemalloc.start()
    cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    t0 = time.perf_counter()
    result = link_labels(stack, output=Path(out_dir) / "linked.zarr")
    wall = time.perf_counter() - t0
    cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = sum(f.stat().st_size for f in (Path(out_dir) / "linked.zarr").rglob("*")
               if f.is_file())
    return {"slices": n_slices, "objects": result.n_objects, "nodes": len(result.nodes["id"]),
            "wall_s": wall, "cpu_s": cpu, "ms_per_slice": 1000 * wall / n_slices,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "traced_peak_mib": traced / 2**20, "output_mib": size / 2**20,
            "input_mib": n_slices * PLANE * PLANE * 4 / 2**20}


def scaling(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
            cmd = [sys.executable, __file__, "--scaling-worker", str(n), "--out", tmp]
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}" +
                   os.environ.get("PYTHONPATH", "")}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {n} slices: {rows[-1]['wall_s']:.1f} s", file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores (os.cpu_count), load average {load}; "
            f"Python {platform.python_version()}, NumPy {np.__version__}")


def report(q: list[dict], s: list[dict]) -> str:
    lines = [f"- machine: {machine()}", ""]
    if q:
        lines += ["## Quality: F1 at 3-D IoU 0.5 against the truth", "",
                  "| data | mode | 2-D objects deleted | seed | true objects | F1 ours | "
                  "F1 naive | ms/slice ours | ms/slice naive |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in q:
            lines.append(f"| {r['data']} | {r['mode']} | {100 * r['missing']:.0f} % | "
                         f"{r['seed']} | {r['n_true']} | **{r['f1_ours']:.3f}** | "
                         f"{r['f1_naive']:.3f} | {r['ms_ours']:.1f} | {r['ms_naive']:.1f} |")
        lines.append("")
    if s:
        lines += ["## Scaling: 512² slices generated lazily, linked into a Zarr file", "",
                  "| slices | input (uint32, never in memory) | 2-D objects | linked objects | "
                  "wall s | CPU s | ms/slice | peak RSS MiB | traced peak MiB | output MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s:
            lines.append(f"| {r['slices']} | {r['input_mib']:.0f} MiB | {r['nodes']} | "
                         f"{r['objects']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                         f"{r['ms_per_slice']:.1f} | {r['max_rss_mib']:.0f} | "
                         f"{r['traced_peak_mib']:.1f} | {r['output_mib']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[250, 500, 1000])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--scaling-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.scaling_worker is not None:
        print(json.dumps(scaling_worker(args.scaling_worker, args.out)))
        return
    q = [] if args.no_quality else quality(args.seeds)
    s = scaling(args.sizes) if args.sizes else []
    print(report(q, s))


if __name__ == "__main__":
    main()
