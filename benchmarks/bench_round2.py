"""Performance, round two (issue 17): one table of encoder efficiency, click latency, scale
and throughput, for the machine it runs on, with that machine and its load named.

Plain script, not a timed unit test. Each job runs in its own subprocess (so peak RSS, and
peak GPU memory on CUDA, are per job) and the parent prints one markdown table. Synthetic
weights (the conformance recipe): speeds are real, masks are not meaningful.

Parts on the CPU (``--parts``, default all six):

* ``peak``: a measured fp32 matrix-product peak (``torch.mm`` of ``--mm-size``², the same
  threads) timed interleaved with each encoder (A B A B ...); the encoder's FLOPs are counted
  with ``torch.utils.flop_counter.FlopCounterMode`` on one forward (convolutions, matrix
  products and attention), its time is the median of ``--repeats``; GFLOP/s and % of peak.
* ``latency``: per model (``--latency-models``), a prompt change as the user feels it: one
  point added to the prompt widget's points layer (``PromptController`` on a bare
  ``ViewerModel``, synchronous runner) until the preview array is painted, on a 1024² plane
  and on a tile of a 4096² image (tiled mode, tile already embedded); beside it the decoder
  alone (prompt encoder + mask decoder, low-res logits) and the widget's engine path without
  napari (decode, upsample, threshold, paint); the first click (model build from synthetic
  weights + encoder + decode + paint) and the first click on a new tile.
* ``everything``: exact segment-everything (MobileSAM, grid ``--amg-grid`` 32, the 1024²
  retina crop of the reference timings, encoder included) against ``segment_anything``'s
  unmodified ``SamAutomaticMaskGenerator`` in the same process (``--amg-repeats`` rounds,
  interleaved), records compared one by one; the conformance fixtures ``amg``/``amg_all``.
* ``objects``: object-aware everything (detector + one prompt per object, encoder
  included) against the same reference generator at grid 32 on stardist's 2-D nuclei image
  (``--stardist-dir``, see ``bench_object_prompts.py``), and the share of its nuclei prompted.
* ``scale``: tiled segment-everything (``run_batch``, tile 1024, halo 256, Zarr in and out)
  of 2048², 4096² and 8192² synthetic blob images, one subprocess per size: time per tile,
  growth against area, peak RSS.
* ``dask``: a small stack through ``run_batch`` on a local Dask cluster, 2 workers x 1 thread
  vs 1 worker x 2 threads (slices/s; model loading and cluster start not timed).

With ``--device cuda`` (item 6; ``benchmarks/gpu_round2.sh`` runs it on a GPU machine) the
default parts are ``peak`` (fp32 and bf16 matrix peaks), ``models`` (every model in float32,
float16 and bfloat16 autocast: encoder, decoder 1 and 64 prompts, segment-everything grid 32
on 1024², mask IoU against float32), ``stack`` (a 16-slice 1024² stack, slices/s through
``run_batch`` against a loop of ``segment_everything``) and ``latency`` (without napari the
engine path only). On a machine without CUDA it stops at once with a one-line message.
``models`` and ``stack`` also run on the CPU (float32 only) with small sizes, to test them.

    .venv/bin/python benchmarks/bench_round2.py [--parts peak,latency,everything,objects,...]
        [--stardist-dir DIR] [--amg-grid 32] [--amg-repeats 1]
        [--threads 2] [--repeats 3] [--clicks 5] [--models a,b] [--latency-models a,b]
        [--scale-sizes 2048,4096,8192] [--workdir DIR] [--json FILE] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = ("mobilesam", "efficientsam_ti", "efficientsam_s", "efficientvit_sam_l0",
          "efficientvit_sam_l1", "efficientvit_sam_l2", "efficientvit_sam_xl0",
          "efficientvit_sam_xl1")
LATENCY_MODELS = ("mobilesam", "efficientvit_sam_l0", "efficientsam_ti")
CPU_PARTS = ("peak", "latency", "everything", "objects", "scale", "dask")
CUDA_PARTS = ("peak", "models", "stack", "latency")
PARTS = ("peak", "latency", "everything", "objects", "scale", "dask", "models", "stack")
#: segment-everything settings that keep masks with synthetic weights (bench_suite's)
AMG_SETTINGS = dict(pred_iou_thresh=0.8, stability_score_thresh=0.5,
                    stability_score_offset=0.25, box_nms_thresh=0.999)

Row = dict[str, Any]


# ------------------------------------------------------------------- formatting, rows


def fmt(value: float | None, unit: str) -> str:
    """``value`` in ``unit`` as a short string (times in ms below one second)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        if value < 0.01:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "%":
        return f"{value:.0%}"
    if unit == "GFLOP/s":
        return f"{value:,.0f} GFLOP/s" if value >= 100 else f"{value:.1f} GFLOP/s"
    return f"{value:.3g} {unit}"


def row(part: str, model: str, what: str, value: float | None, unit: str = "s",
        beside: str = "", ratio: str = "", notes: str = "") -> Row:
    """One table row: ``value`` (ours) with ``beside`` it the figure of the same run it is
    read against, ``ratio`` between them, and ``notes``."""
    return {"part": part, "model": model, "what": what, "value": value, "unit": unit,
            "beside": beside, "ratio": ratio, "notes": notes}


def median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    return interleaved({"fn": fn}, repeats, sync)["fn"]


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                sync: Callable[[], None], warm: bool = True) -> dict[str, float]:
    """Median seconds per function, timed in rounds A, B, A, B... (drift on a busy machine
    then moves both alike); one untimed warm-up call of each first unless ``warm=False``."""
    if warm:
        for fn in fns.values():
            fn()
            sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def mask_iou(a: Any, b: Any) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    import numpy as np

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# ---------------------------------------------------------------- machine and its load


def machine_info(device: str, threads: int | None) -> dict[str, Any]:
    """The CPU (lscpu's model name, cores, vector extensions), PyTorch and its threads, the
    GPU when ``device`` is CUDA."""
    import torch

    name = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                     if ln.startswith("Model name")), "")
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("flags"):
                flags = set(ln.split(":", 1)[1].split())
                if not name:
                    name = "?"
                break
    info = {
        "cpu": name or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "isa": "+".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                        if f in flags) or "-",
        "torch": torch.__version__,
        "threads": threads if threads else torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_counters(self_too: bool = False) -> dict[str, float]:
    """Seconds of CPU time since boot from ``/proc/stat`` (busy, total, steal; all cores
    together) and this process's children's CPU seconds (waited-for jobs; with
    ``self_too`` this process's own as well)."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {"busy": 0.0, "total": 0.0, "steal": 0.0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        f = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = f
        out = {"busy": (user + nice + system + irq + softirq) / hz,
               "total": sum(f) / hz, "steal": steal / hz}
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["ours"] = ru.ru_utime + ru.ru_stime
    if self_too:
        me = resource.getrusage(resource.RUSAGE_SELF)
        out["ours"] += me.ru_utime + me.ru_stime
    out["wall"] = time.monotonic()
    return out


def others_load(before: dict[str, float], after: dict[str, float]) -> str:
    """CPU used by other processes between two :func:`cpu_counters` readings, in cores, and
    the hypervisor's steal ("" without ``/proc/stat``)."""
    wall = after["wall"] - before["wall"]
    total = after["total"] - before["total"]
    if wall <= 0 or total <= 0:
        return ""
    others = max(0.0, (after["busy"] - before["busy"]) - (after["ours"] - before["ours"]))
    steal = after["steal"] - before["steal"]
    text = f"{others / wall:.1f} cores"
    return text + (f", steal {steal / wall:.1f}" if steal / wall >= 0.05 else "")


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# ------------------------------------------------------------------------ test images


def nuclei_image(size: int, seed: int = 0) -> tuple[Any, Any]:
    """A (size, size) uint16 image of synthetic nuclei and their labels (the sample data's
    generator, about 60 nuclei per 1024²)."""
    from napari_esam._sample_data import synthetic_nuclei

    n = max(4, round(60 * size * size / 1024**2))
    return synthetic_nuclei((size, size), n_nuclei=n, seed=seed)


def centres(labels: Any, n: int) -> Any:
    """Up to ``n`` (row, col) centres of labelled objects, spread over the label ids."""
    import numpy as np
    from scipy import ndimage

    ids = np.unique(labels)
    ids = ids[ids > 0]
    ids = ids[np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int)]
    return np.array(ndimage.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)


def tile_points(labels: Any, n: int, margin: int = 64) -> Any:
    """Up to ``n`` (row, col) object centres inside the core of the middle tile of the
    default grid (tile 1024, halo 256) of the plane of ``labels``, ``margin`` px inside it."""
    from scipy import ndimage

    from napari_esam.core.tiling.grid import HALO, TILE, TileGrid

    grid = TileGrid(labels.shape, TILE, HALO)
    core = grid.tile_at(grid.n_y // 2, grid.n_x // 2).core
    y0, x0 = core.y0 + margin, core.x0 + margin
    crop = labels[y0 : core.y1 - margin, x0 : core.x1 - margin] > 0
    objects, _ = ndimage.label(crop)
    return centres(objects, n) + [y0, x0]


def write_blob_zarr(path: Path, size: int, chunk: int = 1024) -> None:
    """A (size, size) uint16 Zarr of synthetic nuclei, chunk by chunk (one 1024² image,
    shifted per chunk); kept when it exists."""
    import numpy as np
    import zarr

    if (path / "zarr.json").exists():
        return
    base, _ = nuclei_image(chunk, seed=1)
    arr = zarr.create_array(store=str(path), shape=(size, size), chunks=(chunk, chunk),
                            dtype="uint16", fill_value=0, overwrite=True)
    for i, y in enumerate(range(0, size, chunk)):
        for j, x in enumerate(range(0, size, chunk)):
            arr[y : y + chunk, x : x + chunk] = np.roll(base, (97 * i, 131 * j), axis=(0, 1))


# ------------------------------------------------------------------------------ models


@functools.lru_cache(maxsize=2)
def synthetic_weights(name: str) -> Any:
    """The model's synthetic state dict (the conformance recipe), made once per process."""
    from napari_esam.models.synthetic import synthetic_state_dict

    return synthetic_state_dict(name)


def synthetic_model(name: str, device: str, dtype: str | None = None) -> Any:
    from napari_esam.models.loading import build_model

    return build_model(name, checkpoint=synthetic_weights(name), device=device, dtype=dtype)


def model_input(model: Any, image: Any) -> Any:
    """The model's input tensor for a grey or RGB image (as the predictor converts it)."""
    from napari_esam.core.plane.image import to_model_rgb

    return model.preprocess(to_model_rgb(image))[0]


def sync_for(device: Any) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def autocast_for(model: Any) -> contextlib.AbstractContextManager:
    """The model's own autocast (float16/bfloat16 on CUDA), else nothing."""
    import torch

    dt = getattr(model, "compute_dtype", None)
    return torch.autocast(model.device.type, dtype=dt) if dt is not None else (
        contextlib.nullcontext())


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """FLOPs of ``scaled_dot_product_attention`` (QK^T and the product with V): the flop
    counter has no formula for the CPU's fused kernel, which it would count as zero."""
    lead = math.prod(query[:-2])
    return 2 * lead * query[-2] * key[-2] * (query[-1] + value[-1])


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of one call of ``fn`` (matrix products, convolutions, attention) and its result."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    fused = {op: _sdpa_flops for op in (aten.scaled_dot_product_attention,
                                          aten._scaled_dot_product_flash_attention_for_cpu)}
    counter = FlopCounterMode(display=False, custom_mapping=fused)
    with counter:
        out = fn()
    return int(counter.get_total_flops()), out


def matmul_peak_fn(n: int, device: Any, dtype: Any) -> tuple[Callable[[], Any], float]:
    """A ``torch.mm`` of two n x n matrices (into a preallocated output) and its FLOPs."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=c)), 2.0 * n**3


def peaks(device: Any) -> dict[str, float]:
    import torch

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


# -------------------------------------------------------------------------- job: peak


def job_peak(args: argparse.Namespace, name: str) -> dict:
    """One encoder's GFLOP/s against the matrix peak, timed interleaved."""
    import torch

    model = synthetic_model(name, args.device)
    dev = model.device
    sync = sync_for(dev)
    image, _ = nuclei_image(1024)
    x = model_input(model, image)
    mm32, mm_flops = matmul_peak_fn(args.mm_size, dev, torch.float32)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 peak
    with torch.inference_mode():
        t0 = time.perf_counter()
        flops, _ = count_flops(lambda: model.encode(x))  # also the warm-up
        sync()
        counted_s = time.perf_counter() - t0
        t = interleaved({"mm": mm32, "enc": lambda: model.encode(x)}, args.repeats, sync)
    peak = mm_flops / t["mm"] / 1e9
    achieved = flops / t["enc"] / 1e9
    side = int(model.img_size)
    rows = [row("peak", name, f"encoder {side}² fp32 GFLOP/s", achieved, "GFLOP/s",
                beside=f"peak {fmt(peak, 'GFLOP/s')}", ratio=f"{achieved / peak:.0%} of peak",
                notes=f"{flops / 1e9:.1f} GFLOP in {fmt(t['enc'], 's')} (median of "
                      f"{args.repeats}; counted forward {fmt(counted_s, 's')})")]
    extra = {"mm_gflops": peak}
    if dev.type == "cuda":
        mm16, _ = matmul_peak_fn(args.mm_size, dev, torch.bfloat16)

        def enc_bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model.encode(x)

        with torch.inference_mode():
            tb = interleaved({"mm": mm16, "enc": enc_bf16}, args.repeats, sync)
        pb, ab = mm_flops / tb["mm"] / 1e9, flops / tb["enc"] / 1e9
        rows.append(row("peak", name, f"encoder {side}² bf16 autocast GFLOP/s", ab, "GFLOP/s",
                        beside=f"bf16 peak {fmt(pb, 'GFLOP/s')}", ratio=f"{ab / pb:.0%} of peak",
                        notes=f"{fmt(tb['enc'], 's')} (fp32 FLOP count)"))
        extra["mm_bf16_gflops"] = pb
    return {"rows": rows, **extra, **peaks(dev)}


# ----------------------------------------------------------------------- job: latency


def _engine_click(engine: Any, embedding: Any, rc: Sequence[float]) -> Any:
    """The widget's decode without napari: decode, upsample, threshold, paint the best mask."""
    import numpy as np

    coords = np.array([[[rc[1], rc[0]]]], dtype=np.float64)
    objs = engine.predict_windowed(embedding, coords, np.ones((1, 1), np.int64), None)
    obj = objs[0]
    mask = np.asarray(obj.masks[int(np.argmax(obj.scores))], dtype=bool)
    preview = np.zeros(mask.shape, dtype=np.uint8)
    preview[mask] = 1
    return preview


def _decode_only(model: Any, image: Any, rc: Sequence[float], repeats: int) -> float:
    """Median seconds of the model's decoder alone (1 point, low-res logits)."""
    import torch

    sync = sync_for(model.device)
    x = model_input(model, image)
    h, w = image.shape[:2]
    s = int(model.img_size) / max(h, w)
    coords = torch.tensor([[[rc[1] * s, rc[0] * s]]], dtype=torch.float32, device=model.device)
    labels = torch.ones(1, 1, dtype=torch.int64, device=model.device)
    with torch.inference_mode(), autocast_for(model):
        emb = model.encode(x)
        return median_time(lambda: model.decode(emb, coords, labels, (h, w)), repeats, sync)


class _Viewer:
    """A prompt controller on a bare ``ViewerModel`` (synchronous runner) and its clicks."""

    def __init__(self, image: Any, name: str, factory: Callable[..., Any], device: str,
                 tiled: bool):
        from napari.components import ViewerModel

        from napari_esam.widgets.prompt.controller import PromptController

        self.viewer = ViewerModel()
        self.ctrl = PromptController(self.viewer, model_factory=factory, notify=False)
        self.ctrl.set_model(name, device=device)
        self.ctrl.set_tiling("on" if tiled else "off")
        layer = self.viewer.add_image(image)
        self.ctrl.image_layer = layer
        self.ctrl.ensure_prompt_layers()

    def click(self, rc: Sequence[float]) -> tuple[float, int]:
        """Seconds from adding a positive point until the preview is painted (the previous
        object's prompts cleared first, untimed), and the encoder runs it caused."""
        import numpy as np

        ctrl = self.ctrl
        ctrl.clear_prompts()
        ctrl.set_polarity("positive")
        pts = ctrl.points_layer
        where = pts.world_to_data(np.asarray(rc, float))
        calls = ctrl.encoder_calls
        t0 = time.perf_counter()
        pts.add(where)
        elapsed = time.perf_counter() - t0
        if ctrl.preview_mask() is None:
            raise RuntimeError(f"no preview after a click at {rc}: {ctrl.status}")
        return elapsed, ctrl.encoder_calls - calls


def split_clicks(clicks: list[tuple[float, int]]) -> tuple[float, str]:
    """Median seconds of the clicks that ran no encoder, and a note on the others."""
    plain = [t for t, calls in clicks if calls == 0] or [t for t, _ in clicks]
    other = [t for t, calls in clicks if calls > 0]
    note = f"median of {len(plain)} clicks (min {fmt(min(plain), 's')})"
    if other:
        note += (f"; {len(other)} more click(s) ran the encoder on a new window (a synthetic "
                 "mask reached the tile's edge, so the object was decoded again on a window "
                 f"around it): median {fmt(statistics.median(other), 's')}")
    return statistics.median(plain), note


def job_latency(args: argparse.Namespace, name: str, dtype: str | None = None) -> dict:
    """Click latency of one model (and dtype) on a 1024² plane and a tile of a 4096² image."""
    import numpy as np

    from napari_esam.core.tiling.predictor import PromptEngine
    from napari_esam.models.loading import build_model

    dev_name = args.device
    state = synthetic_weights(name)  # stands in for the checkpoint file: not timed
    built: dict[str, Any] = {"decodes": 0}

    def factory(model_name: str, checkpoint: Any, device: str) -> Any:
        if model_name != name:
            raise ValueError(f"the controller asked for {model_name!r}, not {name!r}")
        if "model" not in built:
            t0 = time.perf_counter()
            built["model"] = build_model(name, checkpoint=state, device=dev_name, dtype=dtype)
            sync_for(built["model"].device)()
            built["build_s"] = time.perf_counter() - t0
            decode = built["model"].decode

            def counted(*a: Any, **k: Any) -> Any:  # decoder calls per click
                built["decodes"] += 1
                return decode(*a, **k)

            built["model"].decode = counted
        return built["model"]

    def clicks_on(viewer: _Viewer, points: Any) -> tuple[list[tuple[float, int]], str]:
        """Clicks at ``points`` and a note on the decoder calls each one made."""
        out, decodes = [], []
        for p in points:
            d0 = built["decodes"]
            out.append(viewer.click(p))
            decodes.append(built["decodes"] - d0)
        lo, hi = min(decodes), max(decodes)
        note = f"decoder calls per click {lo}" + (f"–{hi}" if hi > lo else "")
        if hi > 1:
            note += (" (a mask reaching the window's inner edge is decoded again on a window "
                     "around it)")
        return out, note

    try:
        import napari.components  # noqa: F401

        with_napari = True
    except ImportError:
        with_napari = False
    side, big = args.size, args.tiled_size
    image, labels = nuclei_image(side)
    pts = centres(labels, args.clicks + 1)
    tag = f" {dtype}" if dtype else ""
    if with_napari:
        plane = _Viewer(image, name, factory, dev_name, tiled=False)
        first, _ = plane.click(pts[0])
        model = built["model"]
        clicks, decodes_note = clicks_on(plane, pts[1:])
    else:
        t0 = time.perf_counter()
        model = factory(name, None, dev_name)
        eng = PromptEngine(model, tile=max(image.shape), halo=0)
        _engine_click(eng, eng.embed(image), pts[0])
        sync_for(model.device)()
        first = time.perf_counter() - t0
    sync = sync_for(model.device)
    decode = _decode_only(model, image, pts[0], args.repeats)
    eng = PromptEngine(model, tile=max(image.shape), halo=0)
    emb = eng.embed(image)
    engine_s = interleaved({f"{i}": (lambda p=p: _engine_click(eng, emb, p))
                            for i, p in enumerate(pts[1:])}, 1, sync)
    engine_med = statistics.median(engine_s.values())
    rows = [row("latency", name, f"first click{tag}: build + encoder + decode + paint", first,
                beside=f"build {fmt(built['build_s'], 's')}",
                notes="model from synthetic weights in memory" + (
                    "" if with_napari else "; engine path (no napari here)"))]
    if with_napari:
        med, note = split_clicks(clicks)
        rows.append(row("latency", name, f"click → preview{tag}, {side}² plane", med,
                        beside=f"decode only {fmt(decode, 's')}", ratio=f"{med / decode:.1f}x",
                        notes=f"{note}; {decodes_note}; engine path without napari "
                              f"{fmt(engine_med, 's')}; target ≤ 50 ms, decode ≤ 30 ms"))
    else:
        rows.append(row("latency", name, f"click → preview{tag}, {side}² plane, engine path",
                        engine_med, beside=f"decode only {fmt(decode, 's')}",
                        ratio=f"{engine_med / decode:.1f}x",
                        notes=f"median of {len(engine_s)} clicks; napari not installed: "
                              "decode, upsample, threshold, paint without the layers"))
    # a tile of a large image: the prompt widget's tiled mode
    reps = -(-big // side)
    large = np.tile(image, (reps, reps))[:big, :big]
    tpts = tile_points(np.tile(labels, (reps, reps))[:big, :big], args.clicks + 1)
    if with_napari:
        tiled = _Viewer(large, name, factory, dev_name, tiled=True)
        tfirst, _ = tiled.click(tpts[0])
        tclicks, decodes_note = clicks_on(tiled, tpts[1:])
        tmed, note = split_clicks(tclicks)
        note = f"{note}; {decodes_note}"
        what = f"click → preview{tag}, tile of a {big}² image (tile embedded)"
    else:
        teng = PromptEngine(model)
        temb = teng.embed(large)

        def tclick(p: Sequence[float]) -> tuple[float, int]:
            calls = teng.encoder_calls
            t0 = time.perf_counter()
            teng.prefetch(temb, np.array([[[p[1], p[0]]]], float), np.ones((1, 1), np.int64),
                          None)
            _engine_click(teng, temb, p)
            sync()
            return time.perf_counter() - t0, teng.encoder_calls - calls

        tfirst, _ = tclick(tpts[0])
        tmed, note = split_clicks([tclick(p) for p in tpts[1:]])
        what = f"click → preview{tag}, tile of a {big}² image (tile embedded), engine path"
    rows.append(row("latency", name, what, tmed, beside=f"decode only {fmt(decode, 's')}",
                    ratio=f"{tmed / decode:.1f}x",
                    notes=f"{note}; first click on the tile {fmt(tfirst, 's')} (opens the "
                          "image, encodes the tile)"))
    return {"rows": rows, **peaks(model.device)}


# ------------------------------------------------------------------------- job: scale


def job_scale(args: argparse.Namespace, size: int) -> dict:
    """Tiled segment-everything of one size²; peak RSS is this process's."""
    import gc

    import zarr

    from napari_esam.core.runs.pipeline import run_batch
    from napari_esam.core.runs.settings import (
        BatchSettings,
        EverythingParams,
        ModelSpec,
        TilingParams,
    )

    work = Path(args.workdir)
    src = work / f"blobs_{size}.zarr"
    write_blob_zarr(src, size)
    model = synthetic_model("mobilesam", args.device)
    gc.collect()
    rss_model = _rss()
    settings = BatchSettings(
        ModelSpec("mobilesam", device=args.device),
        EverythingParams(points_per_side=args.scale_points, points_per_batch=64,
                         pred_iou_thresh=0.0, stability_score_thresh=0.0),
        tiling=TilingParams("on", 1024, 256),
    )
    out = work / f"labels_{size}.zarr"
    sync = sync_for(model.device)
    t0 = time.perf_counter()
    res = run_batch(zarr.open_array(str(src), mode="r"), settings, str(out), overwrite=True,
                    model=model)
    sync()
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if not res.complete:
        raise RuntimeError("incomplete run")
    tiles = int(res.details["tiles"])
    p = peaks(model.device)
    return {"size": size, "tiles": tiles, "time_s": elapsed, "rss_model_gb": rss_model / 1e9,
            "objects": sum(res.counts.values()), **p, "rows": []}


def _rss() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def scale_rows(results: list[dict], points: int) -> list[Row]:
    """Rows of the scale part: time per tile, growth against the smallest size's area."""
    rows = []
    ok = [r for r in results if "time_s" in r]
    base = min(ok, key=lambda r: r["size"]) if ok else None
    for r in ok:
        area = (r["size"] / base["size"]) ** 2
        growth = r["time_s"] / base["time_s"]
        more = r["tiles"] / base["tiles"]
        rows.append(row(
            "scale", "mobilesam", f"tiled everything {r['size']}² ({r['tiles']} tiles)",
            r["time_s"] / r["tiles"], unit="s", beside=f"total {fmt(r['time_s'], 's')}",
            ratio=f"time x{growth:.1f}, tiles x{more:.1f}, area x{area:.0f}",
            notes=f"per tile; grid {points} per tile, filters off, tile 1024 halo 256, Zarr in "
                  f"and out; RSS after model {r['rss_model_gb']:.2f} GB; {r['objects']} "
                  "objects"))
        r["job_rss"] = r.get("peak_rss_gb")
    return rows


# -------------------------------------------------------------------------- job: dask


def _warm(spec: Any) -> int:
    """Build the model in a Dask worker before timing."""
    from napari_esam.core.runs.settings import get_model

    get_model(spec)
    return os.getpid()


def job_dask(args: argparse.Namespace) -> dict:
    """Slices/s of a small stack on a local Dask cluster: 2 workers x 1 thread vs 1 x 2."""
    import numpy as np
    import tifffile
    import torch

    from napari_esam.core.runs.cluster import DaskExecutor
    from napari_esam.core.runs.pipeline import run_batch
    from napari_esam.core.runs.settings import BatchSettings, EverythingParams, ModelSpec
    from napari_esam.models.synthetic import synthetic_state_dict

    work = Path(args.workdir)
    n, side = args.dask_slices, args.dask_size
    src, ckpt = work / f"stack_{n}x{side}.tif", work / "mobilesam_synthetic.pt"
    if not src.exists():
        stack = np.stack([nuclei_image(side, seed=s)[0] for s in range(n)])
        tifffile.imwrite(src, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    if not ckpt.exists():
        torch.save({k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()},
                   ckpt)
    spec = ModelSpec("mobilesam", str(ckpt), "cpu")
    settings = BatchSettings(spec, EverythingParams(
        points_per_side=args.dask_points, points_per_batch=64, **AMG_SETTINGS))
    cores = os.cpu_count() or 1
    rates, labels = {}, {}
    for workers in (1, 2):
        threads = max(1, cores // workers)
        with DaskExecutor(workers=workers, torch_threads=threads) as ex:
            ex.client.run(_warm, spec)
            out = work / f"dask{workers}.zarr"
            t0 = time.perf_counter()
            res = run_batch(str(src), settings, out, executor=ex, overwrite=True)
            rates[workers] = n / (time.perf_counter() - t0)
            labels[workers] = np.asarray(res.labels[:])
            shutil.rmtree(out, ignore_errors=True)
    same = np.array_equal(labels[1], labels[2])
    rows = [row("dask", "mobilesam", f"{n} slices {side}², local cluster, 2 workers x "
                f"{max(1, cores // 2)} thread", rates[2], unit="sl/s",
                beside=f"1 worker x {cores} threads {fmt(rates[1], 'sl/s')}",
                ratio=f"{rates[2] / rates[1]:.2f}x",
                notes=f"grid {args.dask_points}; model loading and cluster start not timed; "
                      f"labels {'identical' if same else 'DIFFER'}")]
    return {"rows": rows, **peaks(torch.device("cpu"))}


# ----------------------------------------------------- jobs: everything and objects


def _reference_generator(model: Any, grid: int, **settings: float) -> Any:
    """``segment_anything``'s unmodified ``SamAutomaticMaskGenerator`` at ``grid`` points
    per side with ``settings`` (default: those of the reference timings, ``AMG_SETTINGS``),
    on ``model``'s weights (its encoder is ours: that only favours the reference). Needs
    ``segment-anything==1.0`` (the testing extra); torchvision is replaced by
    ``bench_suite``'s small shim."""
    sys.path.insert(0, str(HERE))
    import bench_suite

    bench_suite._torchvision_shim()
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(
        bench_suite._reference_sam(model), points_per_side=grid, crop_n_layers=0,
        min_mask_region_area=0, output_mode="binary_mask", points_per_batch=64,
        **(settings or AMG_SETTINGS))


def job_everything(args: argparse.Namespace) -> dict:
    """Exact segment-everything, grid ``--amg-grid`` on the 1024² retina crop of the reference
    timings (encoder included), against the reference generator in the same process, timed
    interleaved (``--amg-repeats`` rounds); records compared one by one; then the
    conformance fixtures ``amg`` and ``amg_all`` (records against the reference's)."""
    sys.path.insert(0, str(HERE))
    import bench_suite
    import torch

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    model = synthetic_model("mobilesam", "cpu")
    image = bench_suite._retina_1024()
    grid = args.amg_grid
    try:
        reference = _reference_generator(model, grid)
    except ImportError as exc:
        return {"rows": [row("everything", "mobilesam", f"grid {grid}", None,
                             notes=f"skipped: segment_anything not importable ({exc})")]}
    out: dict[str, list] = {}

    def ours() -> None:
        out["ours"] = segment_everything(image, Predictor(model), points_per_side=grid,
                                         points_per_batch=64, **AMG_SETTINGS)

    def ref() -> None:
        with torch.inference_mode():
            out["ref"] = reference.generate(image)

    with torch.inference_mode():
        model.encode(model_input(model, image))  # warm-up: first-call costs, not timed
    t = interleaved({"ours": ours, "ref": ref}, args.amg_repeats, lambda: None, warm=False)
    same = bench_suite._compare_records(out["ours"], out["ref"])
    rows = [row("everything", "mobilesam", f"exact everything, grid {grid}, 1024² (incl. "
                "encoder)", t["ours"], beside=f"reference {fmt(t['ref'], 's')}",
                ratio=f"{t['ref'] / t['ours']:.1f}x",
                notes=f"segment_anything's SamAutomaticMaskGenerator in the same process, "
                      f"median of {args.amg_repeats} interleaved; records: {same}")]
    for fixture, what, secs, check in bench_suite.conformance_everything(model):
        rows.append(row("everything", "mobilesam", f"conformance fixture {fixture}{what}", secs,
                        notes=check))
    return {"rows": rows, **peaks(model.device)}


def job_objects(args: argparse.Namespace) -> dict:
    """Object-aware everything (``prompts="objects"``: detector + one prompt per object,
    encoder included) against the reference generator at grid ``--amg-grid`` on stardist's
    2-D nuclei image, in the same process; the share of annotated nuclei that get a prompt."""
    sys.path.insert(0, str(HERE))
    import bench_object_prompts as bop
    import numpy as np
    import torch

    from napari_esam.core.plane.image import to_model_rgb
    from napari_esam.core.plane.object_prompts import (
        detect_object_prompts,
        segment_everything_objects,
    )
    from napari_esam.core.plane.predictor import Predictor

    try:
        image, labels = bop.load_stardist_nuclei(args.stardist_dir)
    except FileNotFoundError as exc:
        return {"rows": [row("objects", "mobilesam", "stardist nuclei", None,
                             notes=f"skipped: {exc}")]}
    model = synthetic_model("mobilesam", "cpu")
    try:
        reference = _reference_generator(model, args.amg_grid)
    except ImportError as exc:
        return {"rows": [row("objects", "mobilesam", "object prompts", None,
                             notes=f"skipped: segment_anything not importable ({exc})")]}
    rgb = to_model_rgb(image)
    points = detect_object_prompts(image, **bop.DETECTOR)
    recall, hit, background = bop.coverage(points, labels)
    n_true = len(np.unique(labels)) - 1
    out: dict[str, list] = {}

    def ours() -> None:
        out["ours"] = segment_everything_objects(image, Predictor(model), points_per_batch=64,
                                                 **bop.DETECTOR, **AMG_SETTINGS)

    def ref() -> None:
        with torch.inference_mode():
            out["ref"] = reference.generate(rgb)

    with torch.inference_mode():
        model.encode(model_input(model, rgb))  # warm-up
    t = interleaved({"ours": ours, "ref": ref}, args.amg_repeats, lambda: None, warm=False)
    h, w = image.shape
    rows = [
        row("objects", "-", f"nuclei prompted, object prompts ({h}x{w} stardist)", recall,
            unit="%", beside=f"{hit}/{n_true} nuclei",
            notes=f"{len(points)} prompts, {background} on background; detector defaults"),
        row("objects", "mobilesam", "object-aware everything (incl. encoder, detection)",
            t["ours"], beside=f"reference grid {args.amg_grid} {fmt(t['ref'], 's')}",
            ratio=f"{t['ref'] / t['ours']:.1f}x",
            notes=f"{len(points)} vs {args.amg_grid ** 2} prompts, masks {len(out['ours'])} vs "
                  f"{len(out['ref'])}; reference: segment_anything's generator in the same "
                  f"process on the same RGB image; median of {args.amg_repeats} interleaved"),
    ]
    return {"rows": rows, **peaks(model.device)}


# ------------------------------------------------------------------ job: models (GPU)


def _dtypes(device: str) -> list[str | None]:
    return [None, "float16", "bfloat16"] if device == "cuda" else [None]


def job_models(args: argparse.Namespace, name: str) -> dict:
    """One model in float32 and (CUDA) float16/bfloat16 autocast: encoder, decoder 1 and 64
    prompts, segment-everything grid 32 on 1024², mask IoU against float32."""
    import numpy as np
    import torch

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    image, labels = nuclei_image(args.size)
    prompts = centres(labels, 16)
    res: dict[str | None, dict[str, Any]] = {}
    base_masks: list[Any] = []
    for dt in _dtypes(args.device):
        model = synthetic_model(name, args.device, dt)
        dev, sync = model.device, sync_for(model.device)
        x = model_input(model, image)
        rng = np.random.default_rng(0)
        s = int(model.img_size)
        out: dict[str, Any] = {"side": s}
        with torch.inference_mode(), autocast_for(model):
            emb = model.encode(x)
            out["enc"] = median_time(lambda m=model, x=x: m.encode(x), args.repeats, sync)
            for q in (1, 64):
                c = torch.from_numpy(rng.uniform(0, s, (q, 1, 2)).astype(np.float32)).to(dev)
                lb = torch.ones(q, 1, dtype=torch.int64, device=dev)
                out[f"dec{q}"] = median_time(
                    lambda m=model, e=emb, c=c, lb=lb: m.decode(e, c, lb, image.shape[:2]),
                    args.repeats, sync)
        pred = Predictor(model)
        recs: list[Any] = []

        def everything(p=pred, recs=recs):
            recs[:] = segment_everything(image, p, points_per_side=args.grid,
                                         points_per_batch=None, **AMG_SETTINGS)

        out["amg"] = median_time(everything, max(1, args.repeats // 2), sync)
        out["masks"] = len(recs)
        pred.set_image(image)
        masks = [pred.predict(np.array([[c, r]]), np.array([1]))[0] for r, c in prompts]
        if dt is None:
            base_masks = masks
            out["iou"] = None
        else:
            ious = [mask_iou(a[k], b[k]) for a, b in zip(base_masks, masks, strict=True)
                    for k in range(len(a))]
            out["iou"] = (min(ious), statistics.median(ious), len(ious))
        res[dt] = out
        p = peaks(dev)
        del model, pred
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    f32 = res[None]
    low = [d for d in res if d]

    def beside(key: str) -> str:
        return " / ".join(f"{d} {fmt(res[d][key], 's')}" for d in low) or "float32 only (CPU)"

    def ratio(key: str) -> str:
        return " / ".join(f"{f32[key] / res[d][key]:.2f}x" for d in low)

    iou = "; ".join(f"{d}: min mask IoU vs fp32 {res[d]['iou'][0]:.4f} (median "
                    f"{res[d]['iou'][1]:.4f}, {res[d]['iou'][2]} masks)"
                    f"{'' if res[d]['iou'][0] >= 0.99 else ' BELOW 0.99'}" for d in low)
    rows = [
        row("models", name, f"encoder {f32['side']}² fp32 (beside: autocast)", f32["enc"],
            beside=beside("enc"), ratio=ratio("enc"), notes=iou),
        row("models", name, "decoder 1 prompt", f32["dec1"], beside=beside("dec1"),
            ratio=ratio("dec1")),
        row("models", name, "decoder 64 prompts", f32["dec64"], beside=beside("dec64"),
            ratio=ratio("dec64")),
        row("models", name, f"everything grid {args.grid}, {args.size}², incl. encoder",
            f32["amg"], beside=beside("amg"), ratio=ratio("amg"),
            notes="masks kept: " + ", ".join(f"{d or 'float32'} {res[d]['masks']}"
                                              for d in res)),
    ]
    return {"rows": rows, **p}


def job_stack(args: argparse.Namespace) -> dict:
    """Slices/s of a stack through ``run_batch`` against a loop of ``segment_everything``."""
    import numpy as np

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.labels import masks_to_labels
    from napari_esam.core.plane.predictor import Predictor
    from napari_esam.core.runs.pipeline import run_batch
    from napari_esam.core.runs.settings import BatchSettings, EverythingParams, ModelSpec

    stack = np.stack([nuclei_image(args.size, seed=s)[0] for s in range(args.stack_slices)])
    kw = dict(AMG_SETTINGS, points_per_side=args.grid)
    rows = []
    for dt in _dtypes(args.device)[:2]:
        model = synthetic_model("mobilesam", args.device, dt)
        sync = sync_for(model.device)
        settings = BatchSettings(ModelSpec("mobilesam", device=args.device, dtype=dt),
                                 EverythingParams(points_per_batch=None, **kw), id_scope="slice")
        run_batch(stack[:1], settings, model=model)  # warm-up
        sync()
        t0 = time.perf_counter()
        res = run_batch(stack, settings, model=model)
        sync()
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = np.stack([masks_to_labels(segment_everything(
            sl, Predictor(model), points_per_batch=64, **kw), sl.shape) for sl in stack])
        sync()
        base = time.perf_counter() - t0
        same = np.array_equal(np.asarray(res.labels), plain)
        n = len(stack)
        rows.append(row("stack", "mobilesam", f"{n} slices {args.size}², grid {args.grid}, "
                        f"{dt or 'float32'}", n / ours, unit="sl/s",
                        beside=f"loop of segment_everything {fmt(n / base, 'sl/s')}",
                        ratio=f"{base / ours:.2f}x",
                        notes=f"labels {'identical' if same else 'DIFFER'}; target ≥ 10 sl/s "
                              "on a GPU"))
        p = peaks(model.device)
    return {"rows": rows, **p}


# ------------------------------------------------------------------------ the parent


def jobs_for(part: str, args: argparse.Namespace) -> list[str]:
    if part == "peak":
        return [f"peak:{m}" for m in args.models]
    if part == "models":
        return [f"models:{m}" for m in args.models]
    if part == "latency":
        dts = [d for d in _dtypes(args.device) if d] if args.device == "cuda" else []
        return [f"latency:{m}" for m in args.latency_models] + [
            f"latency:{m}:{d}" for m in args.latency_models[:1] for d in dts]
    if part == "scale":
        return [f"scale:{s}" for s in args.scale_sizes]
    return [part]


def run_job(job: str, args: argparse.Namespace) -> dict:
    kind, _, rest = job.partition(":")
    if kind == "peak":
        return job_peak(args, rest)
    if kind == "models":
        return job_models(args, rest)
    if kind == "latency":
        name, _, dt = rest.partition(":")
        return job_latency(args, name, dt or None)
    if kind == "scale":
        return job_scale(args, int(rest))
    return {"dask": job_dask, "stack": job_stack, "everything": job_everything,
            "objects": job_objects}[kind](args)


def spawn(job: str, argv: Sequence[str], timeout: float | None) -> dict:
    """Run one job in a fresh process; its result, wall time and the others' CPU load."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", job, *argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    before = cpu_counters()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        failed = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
    except subprocess.TimeoutExpired:
        proc, failed = None, f"timed out after {timeout:.0f} s"
    after = cpu_counters()
    if failed is not None:
        tail = " / ".join(failed.splitlines()[-2:])
        out = {"rows": [row(job.split(":")[0], job.partition(":")[2] or "-", job, None,
                            notes=f"FAILED: {tail}")]}
    else:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = after["wall"] - before["wall"]
    out["others"] = others_load(before, after)
    return out


def run_here(job: str, args: argparse.Namespace) -> dict:
    """Run one job in this process (``--in-process``: no interpreter and CUDA start per job;
    peak RSS is then the process's so far, peak GPU memory the job's own)."""
    import torch

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = cpu_counters(self_too=True)
    try:
        out = run_job(job, args)
    except Exception as exc:  # noqa: BLE001 - one failed job is a row, the others still run
        out = {"rows": [row(job.split(":")[0], job.partition(":")[2] or "-", job, None,
                            notes=f"FAILED: {type(exc).__name__}: {exc}")]}
    after = cpu_counters(self_too=True)
    out["wall_s"] = after["wall"] - before["wall"]
    out["others"] = others_load(before, after)
    return out


def print_table(rows: list[Row], info: dict[str, Any], args: argparse.Namespace,
                load: tuple[str, str], others: str, wall: float) -> None:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    print(f"\n**Machine**: {info['cpu']}, {info['cores']} cores ({info['isa']}){gpu}; "
          f"torch {info['torch']}, {info['threads']} threads, Python {info['python']}, "
          f"device {args.device}.  ")
    print(f"**Load**: /proc/loadavg {load[0]} before, {load[1]} after; other processes used "
          f"{others or '?'} on average during the {wall / 60:.1f} min run (per job: column "
          "*others*).  ")
    print(f"Times: median of {args.repeats} after a warm-up (clicks: median of {args.clicks}); "
          "*beside* is the figure of the same run the value is read against.\n")
    head = "| part | model | measurement | value | beside it | ratio | peak RSS | others | notes |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        mem = f"{r['rss']:.2f} GB" if r.get("rss") else "-"
        if r.get("gpu_mem"):
            mem += f" (GPU {r['gpu_mem']:.2f} GB)"
        print(f"| {r['part']} | {r['model']} | {r['what']} | {fmt(r['value'], r['unit'])} | "
              f"{r['beside'] or '-'} | {r['ratio'] or '-'} | {mem} | {r.get('others') or '-'} | "
              f"{r['notes']} |")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=None,
                    help=f"comma-separated from {', '.join(PARTS)} (default: "
                         f"{','.join(CPU_PARTS)}; on CUDA {','.join(CUDA_PARTS)})")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=None,
                    help="PyTorch threads (default 2 on the CPU, PyTorch's own on CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--latency-models", default=",".join(LATENCY_MODELS))
    ap.add_argument("--mm-size", type=int, default=None,
                    help="matrix side of the peak (default 2048 CPU, 8192 CUDA)")
    ap.add_argument("--size", type=int, default=1024, help="plane side (latency, models, stack)")
    ap.add_argument("--tiled-size", type=int, default=4096, help="the large image of latency")
    ap.add_argument("--grid", type=int, default=32, help="points per side (models, stack)")
    ap.add_argument("--stack-slices", type=int, default=16)
    ap.add_argument("--scale-sizes", default="2048,4096,8192")
    ap.add_argument("--scale-points", type=int, default=4, help="points per side per tile")
    ap.add_argument("--amg-grid", type=int, default=32,
                    help="points per side of exact everything against the reference")
    ap.add_argument("--amg-repeats", type=int, default=1,
                    help="interleaved rounds of everything/objects against the reference")
    ap.add_argument("--stardist-dir", default=None,
                    help="stardist's img2d.tif/mask2d.tif (see bench_object_prompts.py)")
    ap.add_argument("--dask-slices", type=int, default=4)
    ap.add_argument("--dask-size", type=int, default=512)
    ap.add_argument("--dask-points", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="inputs (kept) and outputs (removed)")
    ap.add_argument("--job-timeout", type=float, default=None, help="seconds per job")
    ap.add_argument("--in-process", action="store_true",
                    help="run the jobs in this process (saves the start of each; GPU sessions)")
    ap.add_argument("--json", default=None, help="also write rows and jobs to this file")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.latency_models = [m for m in args.latency_models.split(",") if m]
    args.scale_sizes = [int(s) for s in args.scale_sizes.split(",") if s]
    args.parts = args.parts.split(",") if args.parts else list(
        CUDA_PARTS if args.device == "cuda" else CPU_PARTS)
    bad = sorted(set(args.parts) - set(PARTS)) + sorted(
        set(args.models + args.latency_models) - set(MODELS))
    if bad:
        ap.error(f"unknown parts or models {bad}; parts: {', '.join(PARTS)}; models: "
                 f"{', '.join(MODELS)}")
    if args.mm_size is None:
        args.mm_size = 8192 if args.device == "cuda" else 2048
    if args.workdir is None:
        args.workdir = str(Path(tempfile.gettempdir()) / f"napari-esam-round2-{os.getuid()}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_round2: --device cuda needs a CUDA GPU and none is visible here "
              "(torch.cuda.is_available() is False); nothing was run. Run "
              "benchmarks/gpu_round2.sh on a GPU machine, or use --device cpu.",
              file=sys.stderr)
        return 2
    if args.threads is None and args.device == "cpu":
        args.threads = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.job:
        out = run_job(args.job, args)
        print(json.dumps(out))
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads and "--threads" not in argv:
        argv += ["--threads", str(args.threads)]
    info = machine_info(args.device, args.threads)
    load0, start, t0 = loadavg(), cpu_counters(True), time.perf_counter()
    rows: list[Row] = []
    jobs: dict[str, dict] = {}
    for part in args.parts:
        results = []
        for job in jobs_for(part, args):
            print(f"[{time.perf_counter() - t0:6.0f} s] {job} (load {loadavg()}) ...",
                  file=sys.stderr, flush=True)
            out = run_here(job, args) if args.in_process else spawn(job, argv,
                                                                     args.job_timeout)
            jobs[job] = out
            results.append(out)
            for r in out["rows"]:
                r.update(rss=out.get("peak_rss_gb"), gpu_mem=out.get("peak_gpu_gb"),
                         others=out["others"], job=job)
                rows.append(r)
                print(f"    {r['what']}: {fmt(r['value'], r['unit'])} | {r['beside']} | "
                      f"{r['ratio']} | {r['notes']}", file=sys.stderr, flush=True)
        if part == "peak":
            peaks_seen = [o["mm_gflops"] for o in results if "mm_gflops" in o]
            if peaks_seen:
                rows.insert(len(rows) - sum(len(o["rows"]) for o in results), row(
                    "peak", "-", f"fp32 matmul peak, torch.mm {args.mm_size}²",
                    statistics.median(peaks_seen), "GFLOP/s",
                    beside=f"max {fmt(max(peaks_seen), 'GFLOP/s')}",
                    notes=f"median over the {len(peaks_seen)} encoder jobs, each timed "
                          "interleaved with its encoder"))
        if part == "scale":
            for r, o in zip(scale_rows(results, args.scale_points), [
                    o for o in results if "time_s" in o], strict=True):
                r.update(rss=o.get("peak_rss_gb"), gpu_mem=o.get("peak_gpu_gb"),
                         others=o["others"], job=f"scale:{o['size']}")
                rows.append(r)
    end = cpu_counters(True)
    print(f"[{time.perf_counter() - t0:6.0f} s] done", file=sys.stderr)
    print_table(rows, info, args, (load0, loadavg()), others_load(start, end),
                time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows, "jobs": jobs},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
