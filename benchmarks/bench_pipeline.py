"""Before/after the one-pipeline refactor: untiled everything and batch throughput, same run.

The issue asks that merging the tiled and untiled segment-everything pipelines leaves
"untiled everything and batch throughput not slower". This script times the code before the
refactor (``--baseline``: a worktree of commit a2b4f42, ``napari_esam.core.batch``) and the
current code (``napari_esam.core.runs``) on the same machine in the same run:

* every measurement is a fresh subprocess whose ``PYTHONPATH`` holds either the baseline
  tree or a snapshot of this repository's ``napari_esam`` (copied once at the start, so
  edits made to the working tree during the run do not mix in), never both;
* baseline and new alternate, ``--repeats`` rounds; the median of each side is reported;
* both sides build the model through the same factory (``ModelSpec(factory=
  "_synthetic_mobilesam:build")``: MobileSAM, synthetic weights, CPU float32), once per
  process before timing, plus one small untimed warm-up run; ``torch.set_num_threads``
  (``--threads``, default 2); only the ``run_batch`` call is timed (wall and CPU seconds).

Measurements:

* **untiled everything**: ``run_batch`` on ONE 1024x1024 uint16 plane (``synthetic_nuclei``),
  ``points_per_side=16``, into memory;
* **batch throughput**: ``run_batch`` over a 5-slice 512x512 uint16 stack
  (``synthetic_nuclei`` seeds 0-4), ``points_per_side=16``, into a new Zarr store; slices/s.

Thresholds are the reference-timing settings of ``bench_suite.py`` (predicted IoU > 0.8,
stability >= 0.5, offset 0.25, box NMS 0.999) so that synthetic weights keep masks and the
labels comparison means something. Both sides' labels are compared by value (the refactor
keeps untiled ids; the dtype may differ: uint32 before, uint16 now). Prints the machine
(CPU model, cores, torch threads and version), the date and the load averages before and
after, and a Markdown table; a full run (default sizes, ``--repeats`` >= 3) is also saved
as ``benchmarks/results/pipeline_before_after.md``.

    git -C . worktree add /work/wt-baseline a2b4f42
    .venv/bin/python benchmarks/bench_pipeline.py --baseline /work/wt-baseline [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "pipeline_before_after.md"
FACTORY = "_synthetic_mobilesam:build"
#: bench_suite.py's AMG_SETTINGS (the reference timings) minus the grid
THRESHOLDS = dict(pred_iou_thresh=0.8, stability_score_thresh=0.5,
                  stability_score_offset=0.25, box_nms_thresh=0.999)
MEASUREMENTS = ("untiled", "batch")
TITLES = {"untiled": "untiled everything", "batch": "batch throughput"}
DEFAULTS = dict(size=1024, slices=5, slice_size=512, points_per_side=16, threads=2)


# ------------------------------------------------------------------------------ worker


def _api():
    """``(BatchSettings, EverythingParams, ModelSpec, get_model, run_batch, name)`` of the
    napari-esam tree on ``sys.path``: the new ``core.runs`` or the old ``core.batch``."""
    try:
        from napari_esam.core.runs.pipeline import run_batch
        from napari_esam.core.runs.settings import (
            BatchSettings,
            EverythingParams,
            ModelSpec,
            get_model,
        )

        return BatchSettings, EverythingParams, ModelSpec, get_model, run_batch, "core.runs"
    except ImportError:
        from napari_esam.core.batch import (
            BatchSettings,
            EverythingParams,
            ModelSpec,
            get_model,
            run_batch,
        )

        return BatchSettings, EverythingParams, ModelSpec, get_model, run_batch, "core.batch"


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    import napari_esam

    tree = Path(args.tree).resolve()
    where = Path(napari_esam.__file__).resolve()
    if tree not in where.parents:
        raise SystemExit(f"napari_esam imported from {where}, not from {tree}")
    BatchSettings, EverythingParams, ModelSpec, get_model, run_batch, api = _api()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(name="mobilesam", device="cpu", factory=FACTORY)
    params = EverythingParams(points_per_side=args.points_per_side, points_per_batch=64,
                              **THRESHOLDS)
    settings = BatchSettings(model=spec, params=params)
    get_model(spec)  # built and cached in this process, not timed
    data = np.load(args.input)
    first = data if data.ndim == 2 else data[0]
    warm = BatchSettings(model=spec, params=EverythingParams(points_per_side=4, **THRESHOLDS))
    run_batch(np.ascontiguousarray(first[:256, :256]), warm)  # warm-up, not timed
    out = None if args.worker == "untiled" else str(Path(args.workdir) / "labels.zarr")
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    res = run_batch(data, settings, out)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    if not res.complete:
        raise SystemExit("incomplete run")
    labels = np.asarray(res.labels[:])
    if args.labels:
        np.save(args.labels, labels)
    return {"wall_s": wall, "cpu_s": cpu, "api": api, "module": str(where.parent),
            "n_objects": int(sum(res.counts.values())), "dtype": str(labels.dtype),
            "planes": int(data.shape[0]) if data.ndim == 3 else 1,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git(tree: Path, *cmd: str) -> str:
    """A read-only git query (empty when git fails)."""
    proc = subprocess.run(["git", "-C", str(tree), *cmd], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def snapshot(dest: Path) -> str:
    """Copy this repository's ``napari_esam`` package to ``dest``; the content hash."""
    shutil.copytree(REPO / "napari_esam", dest / "napari_esam",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    h = hashlib.sha256()
    for f in sorted((dest / "napari_esam").rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(dest)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def make_inputs(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    import numpy as np

    from napari_esam._sample_data import synthetic_nuclei

    plane, _ = synthetic_nuclei((args.size, args.size),
                                n_nuclei=max(1, round(60 * (args.size / 512) ** 2)))
    side = (args.slice_size, args.slice_size)
    stack = np.stack([synthetic_nuclei(side, seed=s)[0] for s in range(args.slices)])
    paths = {"untiled": work / "plane.npy", "batch": work / "stack.npy"}
    np.save(paths["untiled"], plane)
    np.save(paths["batch"], stack)
    return paths


def run_worker(kind: str, tree: Path, inp: Path, work: Path, args: argparse.Namespace,
               labels: Path | None) -> dict:
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(HERE)]),
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--tree",
           str(tree), "--input", str(inp), "--workdir", str(work), "--threads",
           str(args.threads), "--points-per-side", str(args.points_per_side),
           "--baseline", str(args.baseline)]
    if labels is not None:
        cmd += ["--labels", str(labels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(work))
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker in {tree} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> tuple[bool, str]:
    import numpy as np

    x, y = np.load(a), np.load(b)
    if x.shape != y.shape:
        return False, f"shapes differ {x.shape} vs {y.shape}"
    same = bool(np.array_equal(x.astype(np.int64), y.astype(np.int64)))
    diff = int(np.count_nonzero(x.astype(np.int64) != y.astype(np.int64)))
    n = len(np.unique(x)) - (1 if (x == 0).any() else 0)
    what = (f"identical values ({n} objects; dtype {x.dtype} before, {y.dtype} now)" if same
            else f"DIFFERENT: {diff} of {x.size} pixels differ (dtype {x.dtype} vs {y.dtype})")
    return same, what


def fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


def report(args: argparse.Namespace, runs: dict, checks: dict, info: dict,
           kinds: list[str]) -> str:
    med = {(k, s): statistics.median(r["wall_s"] for r in runs[k, s]) for k, s in runs}
    cpu = {(k, s): statistics.median(r["cpu_s"] for r in runs[k, s]) for k, s in runs}
    lines = [
        "# Pipeline before/after the one-pipeline refactor (same run, same machine)",
        "",
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}, {info['cores']} cores (os.cpu_count); "
        f"torch {info['torch']}, {info['torch_threads']} torch threads per run; "
        f"python {platform.python_version()}",
        f"- load averages (1/5/15 min): before {fmt_load(info['load_before'])}, after "
        f"{fmt_load(info['load_after'])} (on {info['cores']} cores shared with other work: "
        "wall times are noisy, CPU seconds less so)",
        f"- baseline: `{info['baseline']}` at {info['baseline_commit']} "
        f"({info['baseline_api']}); new: {info['new_commit']}{info['new_dirty']} "
        f"({info['new_api']}), snapshot of napari_esam/ sha256 {info['snapshot']}",
        f"- command: `{info['command']}`",
        f"- {args.repeats} round(s), baseline and new alternating (each run a fresh process; "
        "model built and one small warm-up run before timing; only `run_batch` timed); "
        "MobileSAM synthetic weights, CPU float32, points_per_side "
        f"{args.points_per_side}, thresholds {THRESHOLDS}",
        "",
        "| measurement | input | baseline a2b4f42 (median) | new (median) | new vs baseline "
        "(>1: new faster) | CPU s, baseline / new (median) | labels |",
        "|---|---|---|---|---|---|---|",
    ]
    inputs = {"untiled": f"1 plane {args.size}² uint16, into memory",
              "batch": f"{args.slices} slices {args.slice_size}² uint16, into Zarr"}
    for k in kinds:
        b, n = med[k, "baseline"], med[k, "new"]
        if k == "batch":
            shown = (f"{args.slices / b:.3f} slices/s ({b:.2f} s)",
                     f"{args.slices / n:.3f} slices/s ({n:.2f} s)")
        else:
            shown = (f"{b:.2f} s", f"{n:.2f} s")
        lines.append(f"| {TITLES[k]} | {inputs[k]} | {shown[0]} | {shown[1]} | "
                     f"{b / n:.2f}x | {cpu[k, 'baseline']:.1f} / {cpu[k, 'new']:.1f} | "
                     f"{checks[k][1]} |")
    lines += ["", "Every run, wall seconds (CPU seconds), in the order they ran:", ""]
    for k in kinds:
        for s in ("baseline", "new"):
            each = ", ".join(f"{r['wall_s']:.2f} ({r['cpu_s']:.1f})" for r in runs[k, s])
            lines.append(f"- {TITLES[k]}, {s}: {each}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True,
                   help="a worktree of a2b4f42 (git worktree add PATH a2b4f42)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="untiled plane side")
    p.add_argument("--slices", type=int, default=DEFAULTS["slices"])
    p.add_argument("--slice-size", type=int, default=DEFAULTS["slice_size"])
    p.add_argument("--points-per-side", type=int, default=DEFAULTS["points_per_side"])
    p.add_argument("--only", choices=MEASUREMENTS, default=None, help="one measurement only")
    p.add_argument("--no-save", action="store_true", help="do not write the results file")
    p.add_argument("--worker", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--labels", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    baseline = Path(args.baseline).resolve()
    if not (baseline / "napari_esam" / "core" / "batch.py").is_file():
        p.error(f"{baseline} is not a pre-refactor tree (no napari_esam/core/batch.py); "
                "create it with: git worktree add PATH a2b4f42")
    kinds = [args.only] if args.only else list(MEASUREMENTS)
    full = (args.only is None and args.repeats >= 3
            and all(getattr(args, k) == v for k, v in DEFAULTS.items()))
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "baseline": str(baseline),
        "baseline_commit": git(baseline, "rev-parse", "--short", "HEAD") or "?",
        "new_commit": git(REPO, "rev-parse", "--short", "HEAD") or "?",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
    dirty = git(REPO, "status", "--porcelain", "--", "napari_esam").splitlines()
    info["new_dirty"] = (f" + {len(dirty)} uncommitted change(s) under napari_esam/"
                         if dirty else "")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        info["snapshot"] = snapshot(work / "new")
        trees = {"baseline": baseline, "new": work / "new"}
        inputs = make_inputs(work, args)
        runs: dict[tuple[str, str], list[dict]] = {(k, s): [] for k in kinds for s in trees}
        info["load_before"] = os.getloadavg()
        t0 = time.perf_counter()
        n = 0
        for r in range(args.repeats):
            for k in kinds:
                for side, tree in trees.items():
                    n += 1
                    labels = work / f"labels-{k}-{side}.npy" if r == 0 else None
                    row = run_worker(k, tree, inputs[k], work / f"run-{n}", args, labels)
                    runs[k, side].append(row)
                    print(f"[{time.perf_counter() - t0:6.0f} s] round {r + 1}/{args.repeats} "
                          f"{TITLES[k]}, {side} ({row['api']}): {row['wall_s']:.2f} s wall, "
                          f"{row['cpu_s']:.1f} s CPU, {row['n_objects']} objects, "
                          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        info["load_after"] = os.getloadavg()
        checks = {k: compare(work / f"labels-{k}-baseline.npy", work / f"labels-{k}-new.npy")
                  for k in kinds}
    first = runs[kinds[0], "new"][0]
    info.update(torch=first["torch"], torch_threads=first["torch_threads"],
                baseline_api=runs[kinds[0], "baseline"][0]["api"], new_api=first["api"])
    text = report(args, runs, checks, info, kinds)
    print(text)
    for k in kinds:
        print(f"labels, {TITLES[k]}: {'identical' if checks[k][0] else 'DIFFERENT'}")
    if full and not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"saved {RESULTS.relative_to(REPO)}")
    elif not args.no_save:
        print("not saved: only a full run (default sizes, --repeats >= 3) writes "
              f"{RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
