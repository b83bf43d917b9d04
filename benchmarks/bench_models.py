"""Per-model speed: encoder (the model's own input: 1024², 512² for EfficientViT-SAM L),
decoder for 1 and 64 prompts, peak memory.

Each model runs in its own subprocess so that peak RSS is per model. Synthetic weights (the
conformance recipe), float32 on the CPU unless ``--device cuda``. Prints one table.

The reference timings (``shared/benchmarks/reference_cpu.md``) of EfficientViT-SAM were taken
on a day the machine ran about 2x slower (its MobileSAM encoder took 2.73 s there, 1.21 s in
the first table): the table therefore also compares each encoder with MobileSAM's *of the same
run* on both sides (``enc/mobilesam``), which does not depend on the machine's day.

    .venv/bin/python benchmarks/bench_models.py [--device auto] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

MODELS = ("mobilesam", "efficientsam_ti", "efficientsam_s", "efficientvit_sam_l0",
          "efficientvit_sam_l1", "efficientvit_sam_l2", "efficientvit_sam_xl0",
          "efficientvit_sam_xl1")
#: shared/benchmarks/reference_cpu.md (2 cores, float32): encoder, decoder 1, decoder 64, and
#: the reference MobileSAM encoder of the same session (for the same-run ratio)
REFERENCE_CPU = {
    "efficientsam_ti": (3.87, 0.071, 6.29, 1.21),
    "efficientsam_s": (7.52, 0.062, 5.90, 1.21),
    "mobilesam": (1.21, 0.059, 5.67, 1.21),
    "efficientvit_sam_l0": (0.89, 0.120, 10.49, 2.73),
    "efficientvit_sam_l1": (1.00, 0.102, 11.56, 2.73),
    "efficientvit_sam_l2": (1.74, 0.137, 12.29, 2.73),
    "efficientvit_sam_xl0": (5.56, 0.124, 11.48, 2.73),
    "efficientvit_sam_xl1": (6.35, 0.096, 10.64, 2.73),
}


def _timeit(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_one(name: str, device: str, threads: int, repeats: int, dtype: str | None) -> dict:
    import resource

    import numpy as np
    import torch

    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    torch.set_num_threads(threads)
    model = build_model(name, checkpoint=synthetic_state_dict(name), device=device, dtype=dtype)
    dev = model.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    autocast = (
        torch.autocast("cuda", dtype=model.compute_dtype)
        if model.compute_dtype is not None
        else torch.autocast("cpu", enabled=False)
    )
    rng = np.random.default_rng(0)
    s = int(model.img_size)
    x = torch.from_numpy(rng.standard_normal((1, 3, s, s)).astype(np.float32)).to(dev)
    with torch.inference_mode(), autocast:
        emb = model.encode(x)
        enc = _timeit(lambda: model.encode(x), repeats, sync)
        size = (1024, 1024)
        res = {}
        for q in (1, 64):
            coords = torch.from_numpy(rng.uniform(0, 1024, (q, 1, 2)).astype(np.float32)).to(dev)
            labels = torch.ones(q, 1, dtype=torch.int64, device=dev)
            res[q] = _timeit(
                lambda c=coords, lb=labels: model.decode(emb, c, lb, size), repeats, sync
            )
    out = {
        "model": name,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "encoder_s": enc,
        "decoder1_s": res[1],
        "decoder64_s": res[64],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "torch": torch.__version__,
        "threads": threads,
    }
    if dev.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=[None, "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.threads, args.repeats, args.dtype)))
        return
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device,
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]
    print(f"\ndevice: {first['device']}  torch {first['torch']}  threads {first['threads']}  "
          f"dtype {args.dtype or 'float32'}  python {platform.python_version()}")
    print(f"median of {args.repeats} after 1 warm-up; ref = shared/benchmarks/reference_cpu.md")
    head = (f"| {'model':20} | {'encoder':>9} | {'ref enc':>7} | {'speed-up':>8} "
            f"| {'enc/mobilesam (ref)':>19} | {'dec 1':>8} "
            f"| {'dec 64':>8} | {'ref dec64':>9} | {'speed-up':>8} | {'peak RSS':>8} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    mobile = next((r["encoder_s"] for r in rows if r["model"] == "mobilesam"), None)
    for r in rows:
        ref = REFERENCE_CPU[r["model"]]
        rel = (f"{r['encoder_s'] / mobile:.2f} ({ref[0] / ref[3]:.2f})" if mobile else "-")
        print(f"| {r['model']:20} | {r['encoder_s']:8.3f}s | {ref[0]:6.2f}s | "
              f"{ref[0] / r['encoder_s']:7.2f}x | {rel:>19} | {r['decoder1_s'] * 1e3:6.1f}ms | "
              f"{r['decoder64_s']:7.3f}s | {ref[2]:8.2f}s | {ref[2] / r['decoder64_s']:7.2f}x | "
              f"{r['peak_rss_gb']:6.2f}GB |")
        if "peak_gpu_gb" in r:
            print(f"|   peak GPU memory {r['peak_gpu_gb']:.2f} GB")


if __name__ == "__main__":
    main()
