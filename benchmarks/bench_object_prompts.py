"""Object-aware prompts vs point grids on stardist's bundled 2-D nuclei image.

The image and its ground-truth labels (``stardist/data/images/img2d.tif`` and
``mask2d.tif``: 512x512, 125 nuclei, from the 2018 Data Science Bowl) are read with
tifffile, without importing stardist, from (first found):

* ``--stardist-dir``: a folder holding ``img2d.tif`` and ``mask2d.tif`` (or ``images/``,
  ``data/images/``, ``stardist/data/images/`` below it), a stardist wheel, or a folder with
  one (``pip download --no-deps stardist==0.9.2 -d DIR``);
* an installed ``stardist`` package (located with ``importlib.util.find_spec``, which does
  not import it).

Prints, for ``objects`` (:func:`napari_esam.core.plane.object_prompts.detect_object_prompts`)
and the 16x16 and 32x32 grids of segment-everything: the number of prompts, the fraction of
ground-truth nuclei with at least one prompt inside, prompts on the background, and with
``--everything`` the end-to-end segment-everything time (MobileSAM, synthetic weights:
masks are not meaningful, times are; encoder and detection included).

    .venv/bin/python benchmarks/bench_object_prompts.py --stardist-dir /tmp/sd [--everything]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import time
import zipfile
from pathlib import Path

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


def evaluate_prompts(image: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Rows: prompts, coverage, background prompts and detection time per prompt set."""
    from napari_esam.core.plane.object_prompts import detect_object_prompts

    t0 = time.perf_counter()
    objects = detect_object_prompts(image, **DETECTOR)
    detect_s = time.perf_counter() - t0
    rows = []
    for name, pts, secs in (
        ("objects", objects, detect_s),
        ("grid 16", grid_points(16, labels.shape), None),
        ("grid 32", grid_points(32, labels.shape), None),
    ):
        frac, hit, bg = coverage(pts, labels)
        rows.append({"prompts": name, "n": len(pts), "coverage": frac, "hit": hit,
                     "background": bg, "detect_s": secs})
    return rows


def time_everything(image: np.ndarray, threads: int = 2, device: str = "cpu") -> dict:
    """End-to-end segment-everything (fresh predictor: encoder included) with object prompts
    and with the 32x32 grid, MobileSAM synthetic weights, reference timing settings."""
    import torch

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.object_prompts import segment_everything_objects
    from napari_esam.core.plane.predictor import Predictor
    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    torch.set_num_threads(threads)
    model = build_model("mobilesam", checkpoint=synthetic_state_dict("mobilesam"), device=device)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stardist-dir", default=None)
    ap.add_argument("--everything", action="store_true", help="also time segment-everything")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    image, labels = load_stardist_nuclei(args.stardist_dir)
    n = len(np.unique(labels)) - 1
    print(f"stardist img2d.tif {image.shape} {image.dtype}, {n} ground-truth nuclei")
    print("| prompts | number | nuclei prompted | on background | detection |")
    print("|---|---|---|---|---|")
    for r in evaluate_prompts(image, labels):
        det = f"{r['detect_s'] * 1e3:.0f} ms" if r["detect_s"] is not None else "-"
        print(f"| {r['prompts']} | {r['n']} | {r['coverage']:.1%} ({r['hit']}/{n}) | "
              f"{r['background']} | {det} |")
    if args.everything:
        t = time_everything(image, args.threads, args.device)
        o, g = t["objects"], t["grid 32"]
        print("\n| everything mode (MobileSAM, synthetic weights) | time | decoder calls | masks |")
        print("|---|---|---|---|")
        for name in ("objects", "grid 32"):
            r = t[name]
            print(f"| {name} | {r['s']:.2f} s | {r['calls']} | {r['masks']} |")
        print(f"speed-up of objects over grid 32: {g['s'] / o['s']:.2f}x (same run)")


if __name__ == "__main__":
    main()
