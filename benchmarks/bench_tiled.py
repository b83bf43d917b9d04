"""Tiled segment-everything on uint16 Zarr images of growing size: time, tiles/s, peak RSS.

Each run is a fresh subprocess (so peak RSS is per run): MobileSAM with synthetic weights
(the conformance recipe), CPU float32, ``points_per_side=8`` per tile (64 points, one decoder
batch), tile 1024 / halo 256 (``run_batch`` with ``TilingParams("on", tile, halo)``), labels
written to a Zarr array. By default the quality filters are off (``pred_iou_thresh=0``,
``stability_score_thresh=0``) so that every candidate mask is upsampled, scored and NMS'd:
the worst case for time and memory (synthetic weights give meaningless masks anyway). A last
pair of runs fills an embedding store and then reuses it, showing that the second run never
calls the encoder. Prints one table.

    .venv/bin/python benchmarks/bench_tiled.py [--sizes 2048 4096 8192] [--threads 2]
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


def make_input(path: Path, size: int, chunk: int = 1024) -> None:
    """A (size, size) uint16 Zarr of smooth random blobs, written chunk by chunk."""
    import numpy as np
    import zarr
    from scipy import ndimage

    if (path / "zarr.json").exists():
        return
    arr = zarr.create_array(
        store=str(path), shape=(size, size), chunks=(chunk, chunk), dtype="uint16",
        fill_value=0, overwrite=True,
    )
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            rng = np.random.default_rng([size, y, x])
            block = ndimage.gaussian_filter(rng.standard_normal((chunk, chunk)), 12)
            block = (block - block.min()) / max(float(np.ptp(block)), 1e-9)
            arr[y : y + chunk, x : x + chunk] = (1000 + block * 40000).astype(np.uint16)


def rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def cpu_seconds() -> float:
    """User + system CPU time of this process (robust to other jobs on shared cores)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss() -> int:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def worker(args: argparse.Namespace) -> dict:
    import gc

    import numpy as np
    import torch
    import zarr

    from napari_esam.core.runs.pipeline import run_batch
    from napari_esam.core.runs.settings import (
        BatchSettings,
        EverythingParams,
        ModelSpec,
        TilingParams,
    )
    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    src = work / f"input_{args.size}.zarr"
    make_input(src, args.size)
    # torch tensors, not NumPy: the loader turns 0-d arrays into 1-d ones
    synth = synthetic_state_dict(args.model)
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in synth.items()}
    del synth
    model = build_model(args.model, checkpoint=state, device=args.device)
    del state
    gc.collect()
    rss_model = rss_now()
    data = zarr.open_array(str(src), mode="r")
    settings = BatchSettings(
        ModelSpec(args.model, device=args.device),
        EverythingParams(
            points_per_side=args.points_per_side, points_per_batch=64,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
        ),
        tiling=TilingParams("on", args.tile, args.halo),
    )
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    last = [t0]

    def progress(p) -> None:  # BatchProgress
        if p.kind not in ("tile", "slice"):
            return
        now = time.perf_counter()
        if now - last[0] > 30 or p.tiles_done == p.tiles_total:
            last[0] = now
            print(f"  {args.size}²: {p.tiles_done}/{p.tiles_total} tiles, {now - t0:.0f} s",
                  file=sys.stderr)

    store = str(work / args.store) if args.store else None
    result = run_batch(
        data, settings, str(work / f"labels_{args.size}.zarr"), overwrite=True,
        model=model, embeddings=store, progress=progress,
    )
    assert result.complete, "incomplete run"
    details = result.details
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    peak = peak_rss()
    tiles = details["tiles"]
    return {
        "size": args.size,
        "tiles": tiles,
        "time_s": elapsed,
        "tiles_per_s": tiles / elapsed,
        "s_per_mpx": elapsed / (args.size**2 / 1e6),
        "cpu_s": cpu,
        "rss_model": rss_model,
        "peak_rss": peak,
        "above_model": peak - rss_model,
        "encoder_calls": details["encoder_calls"],
        "store_hits": details["store_hits"],
        "merged": details["merged"],
        "objects": sum(result.counts.values()),
        "store": args.store,
    }


def run_one(args: argparse.Namespace, size: int, store: str | None = None) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", "--size", str(size), "--workdir", args.workdir,
        "--threads", str(args.threads), "--model", args.model, "--device", args.device,
        "--tile", str(args.tile), "--halo", str(args.halo),
        "--points-per-side", str(args.points_per_side),
        "--pred-iou-thresh", str(args.pred_iou_thresh),
        "--stability-score-thresh", str(args.stability_score_thresh),
    ]
    if store:
        cmd += ["--store", store]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def gb(x: float) -> str:
    return f"{x / 2**30:.2f}"


def table(rows: list[dict], store_rows: list[dict]) -> str:
    lines = [
        "| image | tiles | seam merges | time (s) | tiles/s | s per Mpx | CPU s per tile | "
        "peak RSS (GB) | RSS after model (GB) | peak above model (GB) | growth vs previous: "
        "area / tiles / time / CPU time / peak above model |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    prev = None
    for r in rows:
        growth = "—"
        if prev is not None:
            growth = (
                f"×{(r['size'] / prev['size']) ** 2:.1f} / ×{r['tiles'] / prev['tiles']:.2f} / "
                f"×{r['time_s'] / prev['time_s']:.2f} / ×{r['cpu_s'] / prev['cpu_s']:.2f} / "
                f"×{r['above_model'] / max(prev['above_model'], 1):.2f}"
            )
        lines.append(
            f"| {r['size']}² | {r['tiles']} | {r['merged']} | {r['time_s']:.1f} | "
            f"{r['tiles_per_s']:.3f} | {r['s_per_mpx']:.2f} | {r['cpu_s'] / r['tiles']:.1f} | "
            f"{gb(r['peak_rss'])} | "
            f"{gb(r['rss_model'])} | {gb(r['above_model'])} | {growth} |"
        )
        prev = r
    if store_rows:
        lines += [
            "",
            "| run with embedding store | image | tiles | encoder calls | store hits | time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in zip(("1st (fills the store)", "2nd (reuses it)"), store_rows, strict=False):
            lines.append(
                f"| {name} | {r['size']}² | {r['tiles']} | {r['encoder_calls']} | "
                f"{r['store_hits']} | {r['time_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--store-size", type=int, default=2048,
                   help="image size of the fill-then-reuse embedding store pair (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="mobilesam")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--halo", type=int, default=256)
    p.add_argument("--points-per-side", type=int, default=8)
    p.add_argument("--pred-iou-thresh", type=float, default=0.0)
    p.add_argument("--stability-score-thresh", type=float, default=0.0)
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_tiled_")
        args.workdir = tmp.name
    os.makedirs(args.workdir, exist_ok=True)
    import torch

    print(
        f"# tiled everything: {args.model} (synthetic weights), {args.device}, "
        f"{args.threads} threads, tile {args.tile}, halo {args.halo}, "
        f"points_per_side {args.points_per_side}, pred_iou_thresh {args.pred_iou_thresh}, "
        f"stability_score_thresh {args.stability_score_thresh}; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = [run_one(args, s) for s in sorted(args.sizes)]
    store_rows = []
    if args.store_size:
        name = f"embeddings_{args.store_size}.zarr"
        store_path = Path(args.workdir) / name
        if store_path.exists():
            import shutil

            shutil.rmtree(store_path)
        store_rows = [run_one(args, args.store_size, name) for _ in range(2)]
    print(table(rows, store_rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "store_rows": store_rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
