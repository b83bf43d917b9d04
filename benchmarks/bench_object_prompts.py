"""Object-aware prompts vs the 32x32 grid: recall, number of prompts and end-to-end time, in
one run, on stardist's bundled 2-D nuclei and on a dense synthetic image.

The stardist image and its ground-truth labels (``stardist/data/images/img2d.tif`` and
``mask2d.tif``: 512x512, 125 nuclei, from the 2018 Data Science Bowl) are read with
tifffile, without importing stardist, from (first found):

* ``--stardist-dir``: a folder holding ``img2d.tif`` and ``mask2d.tif`` (or ``images/``,
  ``data/images/``, ``stardist/data/images/`` below it), a stardist wheel, or a folder with
  one (``pip download --no-deps stardist==0.9.2 -d DIR``);
* an installed ``stardist`` package (located with ``importlib.util.find_spec``, which does
  not import it).

The dense synthetic image is :func:`napari_esam._sample_data.synthetic_nuclei` with 400
nuclei asked for on 512x512 (about 280 placed, half the pixels in nuclei).

Prints, per image:

1. **Prompts**: for ``objects`` (:func:`~napari_esam.core.plane.object_prompts.
   detect_object_prompts`, default settings, and with diameters 16-40 px) and the 16x16
   and 32x32 grids: the number of prompts, the **recall** (true
   objects with at least one prompt inside / true objects), prompts on the background, and
   for the objects' boxes (``decoding="box"``) the true objects whose bounding box lies
   inside the box of a prompt inside them and the median IoU of the best such box with the
   object's bounding box.
2. **End to end** (:func:`~napari_esam.core.runs.pipeline.run_batch`: encoder, detection,
   decoding and labels; MobileSAM with synthetic weights, so times are real and masks are
   not): grid 32 vs objects with point and with box decoding (on the dense image also with
   diameters 16-40 px), decoder calls, prompts decoded, objects in the labels, and the
   speed-up over grid 32. Objects segmented with
   IoU >= 0.5 are not measured: the synthetic weights do not segment (the official weights
   cannot be downloaded here).

    .venv/bin/python benchmarks/bench_object_prompts.py --stardist-dir /tmp/sd [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

IMAGE, MASK = "img2d.tif", "mask2d.tif"
#: settings of the reference generator's timing in shared/benchmarks/reference_cpu.md
AMG_SETTINGS = dict(
    points_per_batch=64,
    pred_iou_thresh=0.8,
    stability_score_thresh=0.5,
    stability_score_offset=0.25,
    box_nms_thresh=0.999,
)
#: detector settings for this image (nuclei of 6-31 px equivalent diameter): the defaults
DETECTOR: dict = {}


def _from_wheel(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()

        def read(name: str) -> np.ndarray:
            member = next(n for n in names if n.endswith(f"data/images/{name}"))
            return tifffile.imread(io.BytesIO(zf.read(member)))

        return read(IMAGE), read(MASK)


def _from_dir(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    import tifffile

    for sub in ("", "images", "data/images", "stardist/data/images"):
        d = path / sub
        if (d / IMAGE).is_file() and (d / MASK).is_file():
            return tifffile.imread(d / IMAGE), tifffile.imread(d / MASK)
    wheels = sorted(path.glob("stardist-*.whl"))
    return _from_wheel(wheels[-1]) if wheels else None


def load_stardist_nuclei(stardist_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image uint16 (512, 512), labels) of stardist's ``test_image_nuclei_2d`` (module doc).

    Raises ``FileNotFoundError`` with instructions when it cannot be found.
    """
    if stardist_dir:
        p = Path(stardist_dir)
        found = _from_wheel(p) if p.suffix == ".whl" else _from_dir(p) if p.is_dir() else None
        if found is not None:
            return found
    spec = importlib.util.find_spec("stardist")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = _from_dir(Path(loc) / "data" / "images")
            if found is not None:
                return found
    raise FileNotFoundError(
        "stardist's img2d.tif / mask2d.tif not found: run "
        "'pip download --no-deps stardist==0.9.2 -d /tmp/sd' and pass --stardist-dir /tmp/sd"
    )


def grid_points(n: int, hw: tuple[int, int]) -> np.ndarray:
    """SAM's n x n grid of cell centres, (n*n, 2) (x, y) pixels."""
    c = (np.arange(n) + 0.5) / n
    return np.stack(np.meshgrid(c * hw[1], c * hw[0]), -1).reshape(-1, 2)


def coverage(points: np.ndarray, labels: np.ndarray) -> tuple[float, int, int]:
    """(fraction of labelled objects with >= 1 point inside, objects hit, points on 0)."""
    cols = np.clip(points[:, 0].astype(int), 0, labels.shape[1] - 1)
    rows = np.clip(points[:, 1].astype(int), 0, labels.shape[0] - 1)
    under = labels[rows, cols]
    hit = np.setdiff1d(np.unique(under), [0])
    n = len(np.unique(labels)) - (1 if (labels == 0).any() else 0)
    return len(hit) / n, len(hit), int((under == 0).sum())


def box_fit(points: np.ndarray, radii: np.ndarray, labels: np.ndarray) -> tuple[int, int, float]:
    """How well ``decoding="box"`` boxes (``BOX_SCALE`` radii) fit the true objects:
    (objects whose bounding box lies inside the box of a prompt inside them, objects
    prompted, median over prompted objects of the best IoU of such a box with the object's
    bounding box)."""
    from scipy import ndimage as ndi

    from napari_esam.core.plane.object_prompts import object_boxes

    boxes = object_boxes(points, radii, labels.shape)
    cols = np.clip(points[:, 0].astype(int), 0, labels.shape[1] - 1)
    rows = np.clip(points[:, 1].astype(int), 0, labels.shape[0] - 1)
    under = labels[rows, cols]
    extents = ndi.find_objects(labels.astype(np.int64))
    inside: set[int] = set()
    best: dict[int, float] = {}
    for box, lab in zip(boxes, under, strict=True):
        if lab == 0:
            continue
        sl = extents[int(lab) - 1]
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if box[0] <= x0 and box[1] <= y0 and box[2] >= x1 and box[3] >= y1:
            inside.add(int(lab))
        iw = max(0.0, min(box[2], x1) - max(box[0], x0))
        ih = max(0.0, min(box[3], y1) - max(box[1], y0))
        union = (box[2] - box[0]) * (box[3] - box[1]) + (x1 - x0) * (y1 - y0) - iw * ih
        best[int(lab)] = max(best.get(int(lab), 0.0), iw * ih / union)
    median = float(np.median(list(best.values()))) if best else float("nan")
    return len(inside), len(best), median


#: a second detector setting: a larger smallest diameter (16 px), which suits the large,
#: textured synthetic nuclei (fewer prompts inside one nucleus) and misses stardist's small
#: ones (6-31 px): what choosing ``object_diameter`` does
MATCHED = {"min_diameter": 16.0, "max_diameter": 40.0}


def evaluate_prompts(image: np.ndarray, labels: np.ndarray,
                     matched: dict | None = None) -> list[dict]:
    """Rows: prompts, coverage (recall), background prompts, detection time and (objects)
    box fit per prompt set: object prompts with :data:`DETECTOR` (and with ``matched``
    detector settings when given), grids 16 and 32."""
    from napari_esam.core.plane.object_prompts import detect_object_prompts

    sets = []
    for name, kwargs in (("objects", DETECTOR), ("objects (16-40 px)", matched)):
        if kwargs is None:
            continue
        t0 = time.perf_counter()
        pts, found = detect_object_prompts(image, return_details=True, **kwargs)
        sets.append((name, pts, time.perf_counter() - t0, found["radius"]))
    sets += [("grid 16", grid_points(16, labels.shape), None, None),
             ("grid 32", grid_points(32, labels.shape), None, None)]
    rows = []
    for name, pts, secs, radii in sets:
        frac, hit, bg = coverage(pts, labels)
        rows.append({"prompts": name, "n": len(pts), "coverage": frac, "hit": hit,
                     "background": bg, "detect_s": secs,
                     "box_fit": box_fit(pts, radii, labels) if radii is not None else None})
    return rows


def _counting(model: Any) -> dict:
    """Count ``model.decode`` calls and the prompts they decode (instance attribute)."""
    counts = {"calls": 0, "prompts": 0}
    decode = model.decode

    def counted(embedding, coords, *args, **kwargs):
        counts["calls"] += 1
        counts["prompts"] += int(coords.shape[0])
        return decode(embedding, coords, *args, **kwargs)

    model.decode = counted
    return counts


#: the end-to-end runs: (name, EverythingParams keywords)
RUNS = (
    ("grid 32", {"points_per_side": 32}),
    ("objects, point", {"prompts": "objects", "object_decoding": "point"}),
    ("objects, box", {"prompts": "objects", "object_decoding": "box"}),
)
#: more runs on the dense synthetic image: object prompts with diameters 16-40 px
RUNS_16_40 = (
    ("objects (16-40 px), point", {"prompts": "objects", "object_decoding": "point",
                                   "object_diameter": (16.0, 40.0)}),
    ("objects (16-40 px), box", {"prompts": "objects", "object_decoding": "box",
                                 "object_diameter": (16.0, 40.0)}),
)


def time_runs(image: np.ndarray, model: Any, repeats: int = 1,
              runs: tuple = RUNS) -> dict[str, dict]:
    """End-to-end :func:`run_batch` (fresh embedding each run) per ``runs`` entry (the first
    is the reference, grid 32): median seconds, decoder calls, prompts decoded and objects
    in the labels."""
    from napari_esam.core.runs.pipeline import run_batch
    from napari_esam.core.runs.settings import BatchSettings, EverythingParams, ModelSpec

    counts = _counting(model)
    sync = (lambda: __import__("torch").cuda.synchronize()) if model.device.type == "cuda" \
        else (lambda: None)
    spec = ModelSpec("mobilesam", device=str(model.device))
    run_batch(image[:64, :64], BatchSettings(spec, EverythingParams(points_per_side=4)),
              model=model)  # warm-up
    out: dict[str, dict] = {}
    for name, params in runs:
        settings = BatchSettings(spec, EverythingParams(**AMG_SETTINGS, **params))
        times = []
        for _ in range(repeats):
            counts.update(calls=0, prompts=0)
            sync()
            t0 = time.perf_counter()
            res = run_batch(image, settings, model=model)
            sync()
            times.append(time.perf_counter() - t0)
        out[name] = {"s": float(np.median(times)), "calls": counts["calls"],
                     "prompts": counts["prompts"], "objects": res.counts[0]}
    return out


def time_everything(image: np.ndarray, threads: int = 2, device: str = "cpu") -> dict:
    """End-to-end segment-everything (fresh predictor: encoder included) with object prompts
    and with the 32x32 grid, MobileSAM synthetic weights, reference timing settings (the
    ``objects`` part of ``bench_suite.py``)."""
    import torch

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.object_prompts import segment_everything_objects
    from napari_esam.core.plane.predictor import Predictor

    torch.set_num_threads(threads)
    model = synthetic_mobilesam(device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    class Counting(Predictor):
        calls = 0

        def decode_torch(self, *a, **k):
            Counting.calls += 1
            return super().decode_torch(*a, **k)

    out = {}
    Predictor(model).set_image(image)  # warm-up (allocator, first-call costs)
    for name in ("objects", "grid 32"):
        Counting.calls = 0
        pred = Counting(model)
        sync()
        t0 = time.perf_counter()
        if name == "objects":
            recs = segment_everything_objects(image, pred, **DETECTOR, **AMG_SETTINGS)
        else:
            recs = segment_everything(image, pred, points_per_side=32, **AMG_SETTINGS)
        sync()
        out[name] = {"s": time.perf_counter() - t0, "calls": Counting.calls, "masks": len(recs)}
    return out


def synthetic_mobilesam(device: str = "cpu") -> Any:
    """MobileSAM with the synthetic conformance weights (real code, meaningless masks)."""
    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    return build_model("mobilesam", checkpoint=synthetic_state_dict("mobilesam"), device=device)


def dense_synthetic() -> tuple[np.ndarray, np.ndarray]:
    """The dense synthetic image (module doc) and its labels."""
    from napari_esam._sample_data import synthetic_nuclei

    return synthetic_nuclei((512, 512), n_nuclei=400, seed=3)


def machine() -> str:
    """CPU model, cores, torch and its threads, and the load averages now."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load averages (1/5/15 min) {load}")


def print_prompts(name: str, image: np.ndarray, labels: np.ndarray) -> None:
    n = len(np.unique(labels)) - 1
    print(f"\n### {name}: {image.shape} {image.dtype}, {n} true objects\n")
    print("| prompts | number | recall (objects prompted) | on background | detection | "
          "object inside its box | box IoU (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in evaluate_prompts(image, labels, MATCHED):
        det = f"{r['detect_s'] * 1e3:.0f} ms" if r["detect_s"] is not None else "-"
        fit, biou = "-", "-"
        if r["box_fit"] is not None:
            fit, biou = f"{r['box_fit'][0]}/{r['box_fit'][1]}", f"{r['box_fit'][2]:.2f}"
        print(f"| {r['prompts']} | {r['n']} | {r['coverage']:.1%} ({r['hit']}/{n}) | "
              f"{r['background']} | {det} | {fit} | {biou} |")


def print_times(name: str, image: np.ndarray, model: Any, repeats: int,
                runs: tuple = RUNS) -> None:
    t = time_runs(image, model, repeats, runs)
    g = t["grid 32"]["s"]
    print(f"\n{name}, end to end (run_batch, MobileSAM synthetic weights, {model.device}; "
          f"median of {repeats}):\n")
    print("| prompts | time | vs grid 32 | decoder calls | prompts decoded | objects |")
    print("|---|---|---|---|---|---|")
    for run, r in t.items():
        print(f"| {run} | {r['s']:.2f} s | {g / r['s']:.2f}x | {r['calls']} | {r['prompts']} | "
              f"{r['objects']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stardist-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median)")
    ap.add_argument("--no-timing", action="store_true", help="prompts and recall only")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    images = {"stardist img2d": load_stardist_nuclei(args.stardist_dir),
              "dense synthetic": dense_synthetic()}
    print("## Object prompts vs grid 32\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"- machine: {machine()}")
    from napari_esam.core.plane.object_prompts import BOX_SCALE

    print(f"- detector: defaults (object_diameter 8-40 px, threshold 0.05, bright), and "
          f"16-40 px; box decoding: point +- {BOX_SCALE} radii; timing: the defaults, "
          f"thresholds {AMG_SETTINGS} (box decoding has none)")
    for name, (image, labels) in images.items():
        print_prompts(name, image, labels)
    if not args.no_timing:
        model = synthetic_mobilesam(args.device)
        for name, (image, _) in images.items():
            runs = RUNS + RUNS_16_40 if name == "dense synthetic" else RUNS
            print_times(name, image, model, args.repeats, runs)
        print("\nObjects segmented with IoU >= 0.5: not measured (synthetic weights give "
              "meaningless masks; the official weights cannot be downloaded here).")
    print(f"\n- load averages at the end: {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
