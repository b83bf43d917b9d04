"""The helpers of ``benchmarks/bench_round2.py`` on tiny inputs (nothing is timed here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_round2.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_round2", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_round2"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_round2", None)


def test_flops_count_attention_and_linear_layers(bench):
    import torch
    import torch.nn.functional as F

    q = torch.randn(1, 2, 8, 4)
    lin = torch.nn.Linear(4, 5)
    with torch.inference_mode():  # equal shapes: the CPU's fused kernel
        flops, out = bench.count_flops(
            lambda: (F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(8, 8)),
                     lin(torch.ones(3, 4))))
    # QK^T and AV: 2 * 2 * (1*2)*8*8*4; the linear layer: 2*3*4*5
    assert flops == 2 * 2 * 2 * 8 * 8 * 4 + 2 * 3 * 4 * 5
    assert out[0].shape == (1, 2, 8, 4)
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 5)  # the unfused path
    flops, _ = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * 2 * 8 * 6 * (4 + 5)


def test_matmul_peak_function_multiplies(bench):
    import torch

    fn, flops = bench.matmul_peak_fn(16, torch.device("cpu"), torch.float32)
    assert flops == 2 * 16**3
    assert fn().shape == (16, 16)


def test_others_load_subtracts_our_cpu(bench):
    before = {"busy": 100.0, "total": 200.0, "steal": 0.0, "ours": 10.0, "wall": 0.0}
    after = {"busy": 130.0, "total": 220.0, "steal": 2.0, "ours": 20.0, "wall": 10.0}
    assert bench.others_load(before, after) == "2.0 cores, steal 0.2"
    assert bench.others_load(before, dict(before)) == ""


def test_format_mask_iou_and_click_split(bench):
    assert bench.fmt(0.0042, "s") == "4.20 ms"
    assert bench.fmt(0.5, "s") == "500 ms"
    assert bench.fmt(2.5, "s") == "2.50 s"
    assert bench.fmt(None, "s") == "-"
    assert bench.fmt(1234.0, "GFLOP/s") == "1,234 GFLOP/s"
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert bench.mask_iou(a, b) == 1.0
    a[:2], b[1:3] = True, True
    assert bench.mask_iou(a, b) == pytest.approx(4 / 12)
    med, note = bench.split_clicks([(0.1, 0), (0.3, 0), (5.0, 1)])
    assert med == pytest.approx(0.2)
    assert "median of 2 clicks" in note and "1 more click" in note


def test_tile_points_lie_in_the_middle_tiles_core(bench):
    from napari_esam.core.tiling.grid import HALO, TILE, TileGrid

    labels = np.zeros((2048, 2048), np.uint16)
    # the middle tile's core is 768..1280 on both axes; 64 px inside it: 832..1216
    for i, (y, x) in enumerate([(100, 100), (900, 1000), (1100, 850), (1250, 1000)], 1):
        labels[y - 5 : y + 5, x - 5 : x + 5] = i
    pts = bench.tile_points(labels, 5)
    grid = TileGrid(labels.shape, TILE, HALO)
    core = grid.tile_at(grid.n_y // 2, grid.n_x // 2).core
    assert (core.y0, core.x0, core.y1, core.x1) == (768, 768, 1280, 1280)
    np.testing.assert_allclose(sorted(map(tuple, pts)), [(899.5, 999.5), (1099.5, 849.5)])
    assert bench.tile_points(np.zeros((2048, 2048), np.uint16), 3).shape == (0, 2)


def test_scale_rows_read_growth_against_the_smallest_size(bench):
    results = [
        {"size": 2048, "tiles": 9, "time_s": 9.0, "rss_model_gb": 0.4, "objects": 3},
        {"size": 4096, "tiles": 25, "time_s": 30.0, "rss_model_gb": 0.4, "objects": 9},
        {"rows": []},  # a failed size
    ]
    rows = bench.scale_rows(results, 4)
    assert [r["value"] for r in rows] == [pytest.approx(1.0), pytest.approx(1.2)]
    assert rows[1]["ratio"] == "time x3.3, tiles x2.8, area x4"


def test_unknown_part_and_missing_cuda_fail_cleanly(bench, capsys):
    import torch

    with pytest.raises(SystemExit) as exc:
        bench.parse(["--parts", "peak,nope"])
    assert exc.value.code == 2
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "nothing was run" in err


def test_cpu_parts_include_everything_and_objects_against_the_reference(bench):
    args = bench.parse([])
    assert {"everything", "objects"} <= set(args.parts)
    assert bench.jobs_for("everything", args) == ["everything"]
    assert args.amg_grid == 32


@pytest.fixture
def bench_suite():
    """``benchmarks/bench_suite.py`` with its torchvision shim installed; ``segment_anything``
    is imported afresh against the shim and every module involved is restored afterwards."""
    prefixes = ("torchvision", "segment_anything", "bench_suite")
    saved = {k: v for k, v in sys.modules.items() if k.startswith(prefixes)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(PATH.parent))
    try:
        import bench_suite

        bench_suite._torchvision_shim()
        pytest.importorskip("segment_anything", reason="segment-anything==1.0 not installed")
        yield bench_suite
    finally:
        sys.path.remove(str(PATH.parent))
        for k in [k for k in sys.modules if k.startswith(prefixes)]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.slow
def test_reference_generator_gives_our_records(bench, bench_suite):
    import torch

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    torch.set_num_threads(2)
    model = bench.synthetic_model("mobilesam", "cpu")
    image = bench_suite._retina_1024()
    # the IoU filter on (44 of the 64 prompts pass it: the gate skips 20), stability off
    settings = dict(bench.AMG_SETTINGS, pred_iou_thresh=0.45, stability_score_thresh=0.0)
    with torch.inference_mode():
        ref = bench._reference_generator(model, 8, **settings).generate(image)
    ours = segment_everything(image, Predictor(model), points_per_side=8, **settings)
    assert len(ref) >= 3  # synthetic masks are large: most touch the border or overlap
    assert bench_suite._compare_records(ours, ref) == f"identical ({len(ref)})"
