"""EfficientViT-SAM image encoders: ours against the reference code, side by side in one run.

The reference is the PyPI package ``efficientsam==1.0.0`` (mit-han-lab's model code, the one
that made the conformance fixtures), in its own virtual environment. Each model runs in two
long-lived worker processes, ours (this interpreter) and the reference (``--ref-python``); the
driver asks them for one timed encoder call at a time, alternating which goes first in each
round (A B, B A, ...), so that both see the same machine load. Nothing else runs meanwhile.

Both build the model with the synthetic weights of the conformance recipe
(``napari_esam.models.synthetic``, from each model's own state-dict names and shapes) and encode
the same exact encoder input: the conformance fixture's ``input`` (the public main image,
preprocessed, 512² for L0/L1/L2, 1024² for XL0/XL1). float32 on the CPU, ``torch.no_grad()``,
``--threads`` torch threads on both sides. The table gives the median of ``--repeats`` calls
after ``--warmup`` calls, and the max |difference| of the two embeddings (and of each against
the fixture's), so that the numbers are known to time the same computation.

Setting up the reference environment (torch from the local CPU wheel first, so that pip does
not pull a CUDA build; torchvision is replaced by ``benchmarks/_reference_stubs``)::

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 numpy
    /work/refvenv/bin/pip install --no-deps efficientsam==1.0.0

Run from the repository root::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_evit_reference.py \
        --ref-python /work/refvenv/bin/python [--models l0 l1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("l0", "l1", "l2", "xl0", "xl1")
ROOT = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / "_reference_stubs"
DEFAULT_CONFORMANCE = ROOT.parent / "shared" / "conformance"


# ------------------------------------------------------------------------------- workers
def _build_ours(variant: str):
    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    name = f"efficientvit_sam_{variant}"
    model = build_model(name, checkpoint=synthetic_state_dict(name), device="cpu")
    return model.encode


def _build_reference(variant: str):
    import torch
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    from napari_esam.models.synthetic import synth_state_dict_from_shapes

    model = create_efficientvit_sam_model(f"efficientvit-sam-{variant}", pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {k: torch.from_numpy(v) for k, v in synth_state_dict_from_shapes(shapes).items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.image_encoder


def worker(side: str, variant: str, threads: int, conformance: Path) -> None:
    """Build one encoder, then answer ``time`` / ``save PATH`` / ``quit`` lines on stdin."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    family = "l0" if variant.startswith("l") else "xl0"
    fixture = np.load(conformance / f"efficientvit_sam_{family}" / "encoder.npz")
    x = torch.from_numpy(fixture["input"])
    encode = _build_ours(variant) if side == "ours" else _build_reference(variant)
    reply = {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(reply), flush=True)
    out = None
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "quit":
            break
        if cmd == "time":
            with torch.no_grad():
                c0, t0 = time.process_time(), time.perf_counter()
                out = encode(x)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            print(json.dumps({"s": dt, "cpu_s": dc, "cpu": time.process_time()}), flush=True)
        elif cmd == "save":
            np.save(arg, out.numpy())
            print(json.dumps({"saved": arg}), flush=True)


class Worker:
    """One worker subprocess speaking the line protocol of :func:`worker`."""

    def __init__(self, python: str, side: str, variant: str, threads: int, conformance: Path):
        paths = [str(ROOT)] + ([str(STUBS)] if side == "ref" else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        cmd = [python, __file__, "--worker", side, "--models", variant,
               "--threads", str(threads), "--conformance", str(conformance)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} ended (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


# -------------------------------------------------------------------------------- driver
def _busy_jiffies() -> int:
    """Busy CPU time of the whole machine (all cores), in clock ticks."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def compare(variant: str, args: argparse.Namespace, tmp: Path) -> dict:
    import numpy as np

    ours = Worker(sys.executable, "ours", variant, args.threads, args.conformance)
    ref = Worker(args.ref_python, "ref", variant, args.threads, args.conformance)
    try:
        for _ in range(args.warmup):
            ours.ask("time")
            ref.ask("time")
        times: dict[str, list[float]] = {"ours": [], "ref": []}
        cpu: dict[str, list[float]] = {"ours": [], "ref": []}
        cpu0 = {"ours": ours.ask("time")["cpu"], "ref": ref.ask("time")["cpu"]}
        ticks = os.sysconf("SC_CLK_TCK")
        busy0, wall0 = _busy_jiffies(), time.perf_counter()
        cpu1 = dict(cpu0)
        for i in range(args.repeats):
            order = [("ours", ours), ("ref", ref)]
            for side, w in order if i % 2 == 0 else order[::-1]:
                r = w.ask("time")
                times[side].append(r["s"])
                cpu[side].append(r["cpu_s"])
                cpu1[side] = r["cpu"]
        busy = (_busy_jiffies() - busy0) / ticks
        wall = time.perf_counter() - wall0
        own = sum(cpu1[s] - cpu0[s] for s in cpu0)
        emb = {}
        for side, w in (("ours", ours), ("ref", ref)):
            path = tmp / f"{variant}_{side}.npy"
            w.ask(f"save {path}")
            emb[side] = np.load(path)
        info = ref.info
    finally:
        ours.close()
        ref.close()
    fixture = np.load(args.conformance / f"efficientvit_sam_{variant}" / "encoder.npz")["embedding"]
    return {
        "model": f"efficientvit_sam_{variant}",
        "ours": statistics.median(times["ours"]),
        "ref": statistics.median(times["ref"]),
        "ours_cpu": statistics.median(cpu["ours"]),
        "ref_cpu": statistics.median(cpu["ref"]),
        "ours_all": times["ours"],
        "ref_all": times["ref"],
        "diff": float(np.abs(emb["ours"] - emb["ref"]).max()),
        "diff_fixture_ours": float(np.abs(emb["ours"] - fixture).max()),
        "diff_fixture_ref": float(np.abs(emb["ref"] - fixture).max()),
        # cores used by other processes while timing: machine busy time minus both workers'
        "others_cores": max(0.0, (busy - own) / wall),
        "torch": info["torch"],
        "threads": info["threads"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-python", default="/work/refvenv/bin/python",
                        help="python of the environment with efficientsam==1.0.0")
    parser.add_argument("--models", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--conformance", type=Path, default=DEFAULT_CONFORMANCE)
    parser.add_argument("--worker", choices=("ours", "ref"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.models[0], args.threads, args.conformance)
        return
    if not Path(args.ref_python).exists():
        sys.exit(f"error: no reference python at {args.ref_python} (see this script's docstring)")
    load_before = _loadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.models:
            rows.append(compare(variant, args, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    load_after = _loadavg()
    print(f"\nmachine: {_cpu_model()}, {os.cpu_count()} cores; torch {rows[0]['torch']}, "
          f"{rows[0]['threads']} threads, float32, CPU; python {platform.python_version()}")
    print(f"load average before {load_before}, after {load_after}")
    print(f"median of {args.repeats} encoder calls after {args.warmup} warm-up, ours and reference "
          "alternating (ABBA): wall time, and the process's CPU time per call; diff = max "
          "|ours - reference| of the embedding; others = cores used by other processes meanwhile")
    head = (f"| {'model':20} | {'ours':>8} | {'reference':>9} | {'ratio':>5} | {'ours CPU':>8} "
            f"| {'ref CPU':>8} | {'CPU ratio':>9} | {'diff':>7} | {'diff vs fixture':>15} "
            f"| {'others (cores)':>14} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        ratio, cpu_ratio = r["ours"] / r["ref"], r["ours_cpu"] / r["ref_cpu"]
        print(f"| {r['model']:20} | {r['ours']:7.3f}s | {r['ref']:8.3f}s | {ratio:5.2f} "
              f"| {r['ours_cpu']:7.3f}s | {r['ref_cpu']:7.3f}s | {cpu_ratio:9.2f} "
              f"| {r['diff']:7.1e} | {r['diff_fixture_ours']:15.1e} | {r['others_cores']:14.2f} |")


if __name__ == "__main__":
    main()
