"""Batch segment-everything over a small synthetic stack of cells; prints per-slice counts.

Runs offline: without ``--checkpoint`` it uses deterministic *synthetic* MobileSAM weights
(the masks are texture-like, not cells, so the quality filters are switched off to get
some). With the official weights (``--checkpoint mobile_sam.pt``, or ``--official`` to
download them once) the default microscopy settings are used.

    .venv/bin/python examples/segment_stack.py                 # ~30 s of CPU time
    .venv/bin/python examples/segment_stack.py --output cells.zarr   # keep (and resume) it
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_esam import BatchSettings, EverythingParams, ModelSpec, run_batch
from napari_esam._sample_data import synthetic_nuclei
from napari_esam.core.runs.sources import StackSource


def synthetic_stack(n_slices: int, size: int) -> np.ndarray:
    """(n, size, size) uint16 widefield-like nuclei, a different field in every slice."""
    return np.stack(
        [synthetic_nuclei((size, size), n_nuclei=6 + 2 * i, seed=100 + i)[0]
         for i in range(n_slices)]
    )


def synthetic_checkpoint(folder: Path) -> Path:
    """Write synthetic MobileSAM weights to a ``.pt`` file (the official ones need a download)."""
    import torch

    from napari_esam.models.synthetic import synthetic_state_dict

    path = folder / "mobile_sam_synthetic.pt"
    torch.save({k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()}, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--points-per-side", type=int, default=6)
    ap.add_argument("--checkpoint", default=None, help="MobileSAM weights file")
    ap.add_argument("--official", action="store_true", help="download the official weights")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", default=None, help="keep the labels in this .zarr (resumable)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        synthetic = args.checkpoint is None and not args.official
        ckpt = str(synthetic_checkpoint(Path(tmp))) if synthetic else args.checkpoint
        params = EverythingParams(points_per_side=args.points_per_side)
        if synthetic:  # random-ish weights: keep every candidate mask that survives NMS
            params = EverythingParams(points_per_side=args.points_per_side, pred_iou_thresh=0.0,
                                      stability_score_thresh=0.0)
        settings = BatchSettings(ModelSpec("mobilesam", ckpt, args.device), params)
        stack = synthetic_stack(args.slices, args.size)
        source = StackSource.create(stack)  # slices along axis 0
        output = args.output or str(Path(tmp) / "labels.zarr")
        print(f"stack {stack.shape} {stack.dtype}; {'synthetic' if synthetic else 'real'} "
              f"MobileSAM weights; {args.points_per_side}x{args.points_per_side} points")

        def progress(ev) -> None:
            if ev.kind == "slice":
                eta = "?" if ev.eta is None else f"{ev.eta:.0f} s"
                print(f"  slice {ev.index}: {ev.n_objects} objects "
                      f"({ev.done}/{ev.total} done, {eta} left)")

        t0 = time.perf_counter()
        result = run_batch(source, settings, output, progress=progress)
        labels = np.asarray(result.labels)
        print(f"finished in {time.perf_counter() - t0:.1f} s -> {output}")
        print("objects per slice:")
        for index, count in result.counts.items():
            ids = np.unique(labels[index])
            ids = ids[ids > 0]
            span = f"ids {ids.min()}..{ids.max()}" if ids.size else "no objects"
            print(f"  slice {index}: {count:3d}  ({span})")
        stride = settings.id_stride(result.details["grid"])
        print(f"{sum(result.counts.values())} objects; ids are unique across the stack "
              f"(slice i uses i*{stride}+1 ...)")


if __name__ == "__main__":
    main()
