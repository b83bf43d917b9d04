"""Segment-everything speed on a 1024² image vs the reference ``SamAutomaticMaskGenerator``.

Same image and settings as ``shared/benchmarks/reference_cpu.md`` (retina crop, synthetic
weights, ``points_per_batch=64, pred_iou_thresh=0.8, stability_score_thresh=0.5,
stability_score_offset=0.25, box_nms_thresh=0.999``). Times the whole call, excluding the
image encoder (run once before, as the reference's own time includes it: ~1.2 s for
MobileSAM), and how much of it the decoder and the upsampling take. On a shared machine the
wall time is inflated by other processes; "cpu s / threads" (process CPU time divided by
the thread count) estimates the uncontended wall time.

    .venv/bin/python benchmarks/bench_everything.py [--model mobilesam] [--grids 16,32]
        [--threads 2] [--repeats 1] [--method sam]
"""

from __future__ import annotations

import argparse
import statistics
import time

REFERENCE_CPU = {16: 27.0, 32: 107.9}  # MobileSAM AMG generate(), 2 cores, incl. encoder
SETTINGS = dict(
    points_per_batch=64,
    pred_iou_thresh=0.8,
    stability_score_thresh=0.5,
    stability_score_offset=0.25,
    box_nms_thresh=0.999,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilesam")
    ap.add_argument("--grids", default="16,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--method", default="sam", choices=("sam", "efficientsam"))
    args = ap.parse_args()

    import numpy as np
    import skimage.data
    import torch

    from napari_esam import build_model, synthetic_state_dict
    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    torch.set_num_threads(args.threads)
    image = np.ascontiguousarray(skimage.data.retina()[193:1217, 193:1217])
    synth = {k: torch.from_numpy(v) for k, v in synthetic_state_dict(args.model).items()}
    model = build_model(args.model, checkpoint=synth, device="cpu")

    class Timed(Predictor):
        decode_s = 0.0
        upsample_s = 0.0

        def decode_torch(self, *a, **k):
            t0 = time.perf_counter()
            out = super().decode_torch(*a, **k)
            Timed.decode_s += time.perf_counter() - t0
            return out

        def upsample(self, x):
            t0 = time.perf_counter()
            out = super().upsample(x)
            Timed.upsample_s += time.perf_counter() - t0
            return out

    predictor = Timed(model)
    t0, c0 = time.perf_counter(), time.process_time()
    predictor.set_image(image)
    enc, enc_cpu = time.perf_counter() - t0, (time.process_time() - c0) / args.threads
    print(
        f"{args.model}, {args.threads} threads, encoder {enc:.2f} s (cpu s / threads "
        f"{enc_cpu:.2f}; not included below)"
    )
    print(
        "| grid | records | total s | cpu s / threads | decoder s | upsampling s | rest s "
        "| reference s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for g in (int(x) for x in args.grids.split(",")):
        totals, cpu, dec, up = [], [], [], []
        for _ in range(args.repeats):
            Timed.decode_s = Timed.upsample_s = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            recs = segment_everything(
                None, predictor, points_per_side=g, method=args.method, **SETTINGS
            )
            totals.append(time.perf_counter() - t0)
            cpu.append((time.process_time() - c0) / args.threads)
            dec.append(Timed.decode_s)
            up.append(Timed.upsample_s)
        i = totals.index(statistics.median(totals)) if len(totals) % 2 else 0
        ref = REFERENCE_CPU.get(g) if args.model == "mobilesam" else None
        print(
            f"| {g} | {len(recs)} | {totals[i]:.1f} | {cpu[i]:.1f} | {dec[i]:.1f} | {up[i]:.1f} | "
            f"{totals[i] - dec[i] - up[i]:.1f} | {ref if ref else '-'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
