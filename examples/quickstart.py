"""Quick start, headless: a click, a box and segment-everything on the sample image, then a
3-slice stack through the ``napari-esam everything`` CLI, with labels exported to Zarr and TIFF.

Uses the official MobileSAM weights when they are in the cache (or downloadable), else the
deterministic synthetic weights (offline: the pipeline runs, but masks are not meaningful).

    .venv/bin/python examples/quickstart.py [--out out/quickstart] [--model mobilesam]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_esam import (
    CheckpointError,
    Predictor,
    build_model,
    masks_to_labels,
    segment_everything,
    synthetic_state_dict,
    write_labels,
)
from napari_esam._sample_data import synthetic_nuclei
from napari_esam.cli import main as cli


def load(model_name: str):
    try:
        return build_model(model_name), "official"
    except CheckpointError as exc:
        print(f"official weights unavailable ({str(exc).splitlines()[0][:90]}...)")
        return build_model(model_name, checkpoint=synthetic_state_dict(model_name)), "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quickstart")
    parser.add_argument("--model", default="mobilesam")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    image, truth = synthetic_nuclei()
    model, weights = load(args.model)
    print(f"model {args.model} ({weights} weights) on {model.device}")
    predictor = Predictor(model)
    t0 = time.perf_counter()
    predictor.set_image(image)
    print(f"image {image.shape} {image.dtype}: embedding in {time.perf_counter() - t0:.2f} s")

    ys, xs = np.nonzero(truth == 1)
    click = np.array([[xs.mean(), ys.mean()]])
    masks, scores, _ = predictor.predict(click, np.array([1]))
    best = int(np.argmax(scores))
    print(f"click at {click[0].round(1)}: best mask {best} score {scores[best]:.3f}, "
          f"{int(masks[best].sum())} px")
    box = np.array([xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3])
    masks, scores, _ = predictor.predict(box=box, multimask_output=False)
    print(f"box {box.round(1)}: {int(masks[0].sum())} px, score {scores[0]:.3f}")

    t0 = time.perf_counter()
    records = segment_everything(image, predictor, points_per_side=8,
                                 pred_iou_thresh=0.5, stability_score_thresh=0.5)
    labels = masks_to_labels(records, image.shape)
    print(f"segment everything (grid 8): {len(records)} masks in "
          f"{time.perf_counter() - t0:.2f} s -> {labels.max()} labels")
    for path in (out / "sample_labels.zarr", out / "sample_labels.tif"):
        write_labels(path, labels, scale=(0.5, 0.5), overwrite=True)
        print(f"wrote {path}")

    stack = np.stack([synthetic_nuclei(seed=s, n_nuclei=20)[0][:256, :256] for s in range(3)])
    tifffile.imwrite(out / "stack.tif", stack)
    args_cli = [
        "everything", str(out / "stack.tif"), "-o", str(out / "stack_labels.zarr"),
        "--model", args.model, "--points-per-side", "8", "--pred-iou-thresh", "0.5",
        "--stability-score-thresh", "0.5", "--overwrite",
    ]
    if weights == "synthetic":
        ckpt = out / f"{args.model}_synthetic.pt"
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in synthetic_state_dict(args.model).items()},
                   ckpt)
        args_cli += ["--checkpoint", str(ckpt)]
    print("napari-esam " + " ".join(args_cli))
    rc = cli(args_cli)
    if rc:
        raise SystemExit(rc)
    rc = cli(["export", str(out / "stack_labels.zarr"), "-o", str(out / "stack_labels.tif"),
              "--overwrite"])
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
