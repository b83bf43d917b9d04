#!/usr/bin/env bash
# The GPU table of issue 17 (item 6) in one short run, prepared for a lent GPU session.
#
# Runs benchmarks/bench_round2.py --device cuda --in-process: the fp32 and bf16 matrix peaks
# with every encoder's GFLOP/s; every model in float32, float16 and bfloat16 autocast (encoder,
# decoder 1 and 64 prompts, segment-everything grid 32 on 1024², mask IoU against float32);
# slices/s of a 16-slice 1024² stack; click latency. About 4-6 minutes on one H200 (the jobs run
# in one process, so the interpreter and CUDA start once); BUDGET_S (default 480) stops it.
#
# On the device machine, from the repository root (one call of the device tool's `run`):
#     bash benchmarks/gpu_round2.sh
# It writes round2_gpu.md (the table), round2_gpu.log (progress) and round2_gpu.json into $OUT
# (there) or benchmarks/results/ (elsewhere). Extra arguments go to bench_round2.py, e.g.
#     bash benchmarks/gpu_round2.sh --parts models --models mobilesam
# Without a CUDA GPU it stops at once with a one-line message (exit 2) and runs nothing.
#
# The device image has PyTorch, NumPy, SciPy, scikit-image, tifffile, Pillow and tqdm: all these
# parts need. It has no napari, so the click latency is the prompt widget's engine path (decode,
# upsample, threshold, paint) without the layers. Wheels put in .whl/ (carried with the call)
# are installed first into /tmp/site (see the device notes for how to fetch them).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_round2.sh: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False);" \
         "nothing was run." >&2
    exit 2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
    | tee "$DEST/round2_gpu.log"
timeout "${BUDGET_S:-480}" "$PY" benchmarks/bench_round2.py --device cuda --in-process \
    --repeats "${REPEATS:-10}" --workdir /tmp/napari-esam-round2 --json "$DEST/round2_gpu.json" "$@" \
    2> >(tee -a "$DEST/round2_gpu.log" >&2) | tee "$DEST/round2_gpu.md"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "gpu_round2.sh: stopped after ${BUDGET_S:-480} s (BUDGET_S);" \
    "the table was not printed, round2_gpu.log shows how far it got." >&2
exit "$status"
