"""The benchmark suite: one table per run, every optimisation side by side with a plain path.

Plain scripts, not timed unit tests. Each job runs in its own subprocess (so that peak RSS,
and peak GPU memory on CUDA, are per job) and the parent prints one table. Synthetic
weights (the conformance recipe): outputs are compared between paths, not judged.

Jobs (``--parts``, default all but ``dtype`` off CUDA):

* ``models``: per model (``--models``), image encoder on a 1024x1024 input and decoder for
  1 and 64 point prompts. Plain path, timed interleaved with ours in the same process:
  *encoder* with reference-style operations (explicit softmax attention instead of fused
  SDPA; for MobileSAM also BatchNorm not folded into the convolutions); *decoder* with the
  image embedding repeated per prompt, as the reference implementations do (64 copies of
  256x64x64). Checks: max |diff| of embeddings / low-res logits, IoU of the masks.
  ``--compile``: also ``torch.compile`` of the encoder (compile time reported apart).
* ``reference``: with ``--reference-dir`` holding the ``segment_anything`` package (``pip
  install --no-deps --target DIR segment-anything==1.0``; MobileSAM's prompt encoder and
  mask decoder are SAM's), the *unmodified reference* decoder and
  ``SamAutomaticMaskGenerator`` (our TinyViT as its image encoder, torchvision replaced by
  a small shim) are timed in the same run, outputs compared.
* ``everything``: MobileSAM segment-everything on the 1024x1024 retina crop of the reference
  timings, grids 16 and 32 (time incl. the encoder, decoder calls, masks kept), vs a plain
  transcription of the reference generator (every candidate upsampled before filtering,
  embedding repeated per prompt; grid 16 only unless ``--full``); records compared with the
  reference's on the conformance fixtures ``amg``/``amg_all`` when ``../shared`` is there.
* ``objects``: stardist's 2-D nuclei image (``--stardist-dir``, see
  ``bench_object_prompts.py``): nuclei prompted and prompts for object prompts vs grids 16
  and 32, and everything mode end to end with object prompts vs grid 32.
* ``batch``: a 5-slice 512x512 stack through ``run_batch`` (grid 16), slices/s, vs a plain
  loop of ``segment_everything`` per slice; labels compared.
* ``dtype`` (CUDA): float16 and bfloat16 autocast vs float32: speed and mask IoU on the
  conformance prompts (``>= 0.99`` required).

Reference CPU figures (``shared/benchmarks/reference_cpu.md``: the unmodified reference
code on the 2-core CPU of a machine like CI's, float32) are printed beside ours; compare
them only with a run on such a machine, unloaded.

    .venv/bin/python benchmarks/bench_suite.py [--parts models,everything,objects,batch]
        [--models mobilesam,efficientsam_ti,efficientsam_s] [--device cpu] [--threads 2]
        [--repeats 3] [--stardist-dir DIR] [--reference-dir DIR] [--compile] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("NAPARI_ESAM_SHARED_DIR", REPO.parent / "shared"))
MODELS = ("mobilesam", "efficientsam_ti", "efficientsam_s")
#: shared/benchmarks/reference_cpu.md: encoder s, decoder 1 point s, decoder 64 points s
REFERENCE_CPU = {
    "efficientsam_ti": (3.87, 0.071, 6.29),
    "efficientsam_s": (7.52, 0.062, 5.90),
    "mobilesam": (1.21, 0.059, 5.67),
}
REFERENCE_AMG = {16: 27.0, 32: 107.9}  # MobileSAM generate() on 1024², incl. encoder
AMG_SETTINGS = dict(
    points_per_batch=64,
    pred_iou_thresh=0.8,
    stability_score_thresh=0.5,
    stability_score_offset=0.25,
    box_nms_thresh=0.999,
)
PARTS = ("models", "reference", "everything", "objects", "batch", "dtype")

Row = dict[str, Any]


# ------------------------------------------------------------------------------ helpers


def _row(part: str, model: str, what: str, ours: float | None, unit: str = "s",
         plain: float | None = None, ref: float | None = None, check: str = "") -> Row:
    """A table row; ``plain`` is the same-run baseline, ``ref`` the shared CPU figure."""
    return {"part": part, "model": model, "what": what, "ours": ours, "unit": unit,
            "plain": plain, "ref": ref, "check": check}


def _sync_for(device: Any) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                 sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per function: one warm-up each, then ``repeats`` rounds A, B, A, B...
    (``bench_round2.interleaved``; interleaving keeps a loaded machine's drift out of the
    ratio)."""
    sys.path.insert(0, str(HERE))
    from bench_round2 import interleaved

    return interleaved(fns, repeats, sync)


def _mask_iou(a: Any, b: Any) -> float:
    import torch

    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def _synthetic_model(name: str, device: str, dtype: str | None = None) -> Any:
    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    return build_model(name, checkpoint=synthetic_state_dict(name), device=device, dtype=dtype)


def _retina_1024() -> Any:
    import numpy as np
    import skimage.data

    return np.ascontiguousarray(skimage.data.retina()[193:1217, 193:1217])


def _peaks(device: Any) -> dict[str, float]:
    import resource

    import torch

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


# ---------------------------------------------------------------- plain (reference) paths


class _PlainOps:
    """Context manager: reference-style encoder operations (explicit softmax attention,
    unfolded BatchNorm), by swapping ``forward`` methods for the duration."""

    def __enter__(self) -> _PlainOps:
        from napari_esam.models import tiny_vit, vit

        def vit_attention(self, x):  # EfficientSAM reference Attention.forward
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5
            x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
            return self.proj(x)

        def window_attention(self, x):  # MobileSAM reference Attention.forward
            b, n, _ = x.shape
            h, d = self.num_heads, self.key_dim
            x = self.qkv(self.norm(x))
            q, k, v = x.view(b, n, h, 3 * d).transpose(1, 2).split(d, dim=-1)
            bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
            attn = (q @ k.transpose(-2, -1)) * d**-0.5 + bias
            x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, h * d)
            return self.proj(x)

        def conv_bn(self, x):  # reference Conv2d_BN: conv, then BatchNorm
            return self.bn(self.c(x))

        self._saved = [
            (vit.ViTAttention, vit.ViTAttention.forward),
            (tiny_vit.WindowAttention, tiny_vit.WindowAttention.forward),
            (tiny_vit.Conv2d_BN, tiny_vit.Conv2d_BN.forward),
        ]
        vit.ViTAttention.forward = vit_attention
        tiny_vit.WindowAttention.forward = window_attention
        tiny_vit.Conv2d_BN.forward = conv_bn
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, fn in self._saved:
            cls.forward = fn


def _plain_encode(model: Any, x: Any) -> Any:
    with _PlainOps():
        return model.encode(x)


def _repeated_decode(model: Any, emb: Any, coords: Any, labels: Any, size: Any) -> Any:
    """The reference decoders' way: the image embedding repeated per prompt row."""
    return model.decode(emb.repeat(coords.shape[0], 1, 1, 1), coords, labels, size)


# --------------------------------------------------------------------------------- jobs


def job_models(args: argparse.Namespace, name: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model = _synthetic_model(name, args.device)
    dev = model.device
    sync = _sync_for(dev)
    x, _ = model.preprocess(_retina_1024())
    ref = REFERENCE_CPU[name] if dev.type == "cpu" else (None, None, None)
    rows = []
    with torch.inference_mode():
        t = _interleaved(
            {"ours": lambda: model.encode(x), "plain": lambda: _plain_encode(model, x)},
            args.repeats, sync)
        emb = model.encode(x)
        diff = (emb - _plain_encode(model, x)).abs().max().item()
        rows.append(_row("models", name, "encoder 1024²", t["ours"], plain=t["plain"], ref=ref[0],
                         check=f"max|Δemb| {diff:.1e}"))
        if args.compile:
            enc = torch.compile(model.image_encoder)
            t0 = time.perf_counter()
            enc(x)
            sync()
            compile_s = time.perf_counter() - t0
            tc = _interleaved({"compiled": lambda: enc(x), "ours": lambda: model.encode(x)},
                              args.repeats, sync)
            d = (enc(x) - emb).abs().max().item()
            rows.append(_row("models", name, "encoder, torch.compile", tc["compiled"],
                             plain=tc["ours"], check=f"max|Δemb| {d:.1e}; compile "
                             f"{compile_s:.0f} s; plain = eager"))
        rng = np.random.default_rng(0)
        size = (1024, 1024)
        for q, ref_s in ((1, ref[1]), (64, ref[2])):
            coords = torch.from_numpy(rng.uniform(0, 1024, (q, 1, 2)).astype(np.float32)).to(dev)
            labels = torch.ones(q, 1, dtype=torch.int64, device=dev)
            fns = {"ours": lambda c=coords, lb=labels: model.decode(emb, c, lb, size)}
            if q > 1:
                fns["plain"] = lambda c=coords, lb=labels: _repeated_decode(model, emb, c, lb, size)
            t = _interleaved(fns, args.repeats, sync)
            check = ""
            if q > 1:
                a, ia = model.decode(emb, coords, labels, size)
                b, ib = _repeated_decode(model, emb, coords, labels, size)
                iou = min(_mask_iou(model.threshold(a[i]), model.threshold(b[i]))
                          for i in range(q))
                check = (f"max|Δlogit| {(a - b).abs().max().item():.1e}, "
                         f"max|ΔIoU| {(ia - ib).abs().max().item():.1e}, min mask IoU {iou:.4f}")
            rows.append(_row("models", name, f"decoder {q} point{'s' * (q > 1)}", t["ours"],
                             plain=t.get("plain"), ref=ref_s, check=check))
    return {"rows": rows, **_peaks(dev)}


def _torchvision_shim() -> None:
    """Just enough of torchvision for segment_anything on the CPU (NMS from amg_utils, which
    reproduces torchvision's CPU semantics; PIL resize as torchvision does for PIL)."""
    import types

    import numpy as np
    from PIL import Image

    from napari_esam.core.plane import amg_utils as U
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = U.batched_nms
    boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    tr = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")
    fn.to_pil_image = lambda a: Image.fromarray(np.asarray(a))
    fn.resize = lambda img, size: img.resize((size[1], size[0]), Image.BILINEAR)
    tv.ops, ops.boxes, tv.transforms, tr.functional = ops, boxes, tr, fn
    for mod in (tv, ops, boxes, tr, fn):
        sys.modules[mod.__name__] = mod


def _reference_sam(model: Any) -> Any:
    """segment_anything's Sam with MobileSAM's decoder weights and our TinyViT encoder."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    sam = Sam(
        image_encoder=model.image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                     input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("image_encoder.")}
    missing, unexpected = sam.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("image_encoder.") for k in missing)
    return sam.eval().to(model.device)


def job_reference(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    if not args.reference_dir:
        return {"rows": [_row("reference", "mobilesam", "reference code", None,
                              check="skipped: no --reference-dir")]}
    sys.path.insert(0, args.reference_dir)
    _torchvision_shim()
    from segment_anything import SamAutomaticMaskGenerator

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    torch.set_num_threads(args.threads)
    model = _synthetic_model("mobilesam", args.device)
    dev = model.device
    sync = _sync_for(dev)
    sam = _reference_sam(model)
    image = _retina_1024()
    rows = []
    with torch.inference_mode():
        x, _ = model.preprocess(image)
        emb = model.encode(x)
        pe = sam.prompt_encoder.get_dense_pe()
        rng = np.random.default_rng(0)
        for q in (1, 64):
            coords = torch.from_numpy(rng.uniform(0, 1024, (q, 1, 2)).astype(np.float32)).to(dev)
            labels = torch.ones(q, 1, dtype=torch.int64, device=dev)

            def reference(c=coords, lb=labels):
                sparse, dense = sam.prompt_encoder(points=(c, lb), boxes=None, masks=None)
                return sam.mask_decoder(image_embeddings=emb, image_pe=pe,
                                        sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=True)

            t = _interleaved({"ours": lambda c=coords, lb=labels: model.decode(
                emb, c, lb, (1024, 1024)), "ref": reference}, args.repeats, sync)
            a, ia = model.decode(emb, coords, labels, (1024, 1024))
            b, ib = reference()
            iou = min(_mask_iou(a[i] > 0, b[i] > 0) for i in range(q))
            rows.append(_row("reference", "mobilesam", f"decoder {q} point{'s' * (q > 1)}",
                             t["ours"], plain=t["ref"], ref=REFERENCE_CPU["mobilesam"][
                                 1 if q == 1 else 2],
                             check=f"vs segment_anything: max|Δlogit| "
                                   f"{(a - b).abs().max().item():.1e}, max|ΔIoU| "
                                   f"{(ia - ib).abs().max().item():.1e}, min mask IoU {iou:.4f}"))
    for g in (16, 32) if args.full else (16,):
        gen = SamAutomaticMaskGenerator(sam, points_per_side=g, crop_n_layers=0,
                                        min_mask_region_area=0, output_mode="binary_mask",
                                        **AMG_SETTINGS)
        sync()
        t0 = time.perf_counter()
        ref_recs = gen.generate(image)
        sync()
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        recs = segment_everything(image, Predictor(model), points_per_side=g, **AMG_SETTINGS)
        sync()
        t_ours = time.perf_counter() - t0
        rows.append(_row("reference", "mobilesam", f"everything grid {g}, 1024²", t_ours,
                         plain=t_ref, ref=REFERENCE_AMG[g],
                         check=f"records: {_compare_records(recs, ref_recs)}"))
    return {"rows": rows, **_peaks(dev)}


def _compare_records(ours: list[dict], ref: list[dict] | dict) -> str:
    """'identical (n)' when bbox, crop box, point, scores (1e-4) and masks (IoU >= 0.999)
    agree record by record; else what differs. ``ref``: records or a fixture dict."""
    import numpy as np

    if isinstance(ref, dict):  # conformance fixture arrays
        ref = [{"bbox": ref["bbox"][i].tolist(), "crop_box": ref["crop_box"][i].tolist(),
                "point_coords": [ref["point_coords"][i].tolist()],
                "predicted_iou": float(ref["predicted_iou"][i]),
                "stability_score": float(ref["stability_score"][i]),
                "segmentation": ref["segmentation"][i]} for i in range(len(ref["area"]))]
    if len(ours) != len(ref):
        return f"DIFFER: {len(ours)} vs {len(ref)} records"
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        same = (list(a["bbox"]) == [int(v) for v in b["bbox"]]
                and list(a["crop_box"]) == [int(v) for v in b["crop_box"]]
                and np.allclose(a["point_coords"], b["point_coords"])
                and abs(a["predicted_iou"] - b["predicted_iou"]) <= 1e-4
                and abs(a["stability_score"] - b["stability_score"]) <= 1e-4
                and _mask_iou(a["segmentation"], b["segmentation"]) >= 0.999)
        if not same:
            return f"DIFFER at record {i}"
    return f"identical ({len(ours)})"


def _plain_everything(image: Any, model: Any, grid: int) -> list[dict]:
    """A transcription of the reference generator (no crops): decode with the embedding
    repeated per prompt, upsample *all* 3 x 64 candidates of a batch, then filter."""
    import numpy as np
    import torch

    from napari_esam.core.plane import amg_utils as U
    from napari_esam.core.plane.predictor import Predictor

    pred = Predictor(model)
    pred.set_image(image)
    h, w = pred.original_size
    pts = U.build_point_grid(grid) * np.array([[w, h]])
    s = AMG_SETTINGS
    keep_masks, boxes, ious, stabs, points = [], [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(pts), s["points_per_batch"]):
            b = pts[start:start + s["points_per_batch"]]
            coords = torch.from_numpy(b).float()[:, None].to(model.device)
            labels = torch.ones(len(b), 1, dtype=torch.int64, device=model.device)
            low, iou = _repeated_decode(model, pred.features, coords, labels, (h, w))
            logits = pred.upsample(low.float()).flatten(0, 1)
            iou = iou.float().flatten()
            bp = torch.from_numpy(np.repeat(b, low.shape[1], axis=0))
            ok = iou > s["pred_iou_thresh"]
            logits, iou, bp = logits[ok], iou[ok], bp[ok.cpu()]
            st = U.stability_score(logits, 0.0, s["stability_score_offset"])
            ok = st >= s["stability_score_thresh"]
            logits, iou, bp, st = logits[ok], iou[ok], bp[ok.cpu()], st[ok]
            masks = model.threshold(logits)
            bx = U.masks_to_boxes(masks)
            ok = ~U.is_box_near_crop_edge(bx, [0, 0, w, h], [0, 0, w, h])
            keep_masks.append(masks[ok].cpu())
            boxes.append(bx[ok].cpu())
            ious.append(iou[ok].cpu())
            stabs.append(st[ok].cpu())
            points.append(bp[ok.cpu()])
    masks, bx = torch.cat(keep_masks), torch.cat(boxes)
    iou, st, bp = torch.cat(ious), torch.cat(stabs), torch.cat(points)
    keep = U.batched_nms(bx.float(), iou, torch.zeros(len(bx)), s["box_nms_thresh"]).tolist()
    return [{"segmentation": masks[i].numpy(), "bbox": U.box_xyxy_to_xywh(bx[i]).tolist(),
             "area": int(masks[i].sum()), "predicted_iou": float(iou[i]),
             "point_coords": [bp[i].tolist()], "stability_score": float(st[i]),
             "crop_box": [0, 0, w, h]} for i in keep]


def conformance_everything(model: Any) -> list[tuple[str, str, float | None, str]]:
    """MobileSAM everything on the conformance fixtures ``amg`` and ``amg_all``: per fixture
    (name, " (size², grid N)", seconds or None, records against the reference's or why it
    was skipped)."""
    import json as _json

    import numpy as np

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    out = []
    for fixture in ("amg", "amg_all"):
        path = SHARED / "conformance" / "mobilesam" / f"{fixture}.npz"
        if not path.is_file():
            out.append((fixture, "", None, f"skipped: {path} not found"))
            continue
        with np.load(path) as f:
            ref = {k: f[k] for k in f.files}
        settings = _json.loads(str(ref["settings_json"]))
        settings.pop("output_mode")
        t0 = time.perf_counter()
        recs = segment_everything(ref["image"], Predictor(model), **settings)
        out.append((fixture, f" ({ref['image'].shape[0]}², grid {settings['points_per_side']})",
                    time.perf_counter() - t0,
                    f"records vs the reference's: {_compare_records(recs, ref)}"))
    return out


def job_everything(args: argparse.Namespace) -> dict:

    import torch

    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.predictor import Predictor

    torch.set_num_threads(args.threads)
    model = _synthetic_model("mobilesam", args.device)
    dev = model.device
    sync = _sync_for(dev)
    image = _retina_1024()

    class Counting(Predictor):
        calls = 0

        def decode_torch(self, *a, **k):
            Counting.calls += 1
            return super().decode_torch(*a, **k)

    rows = []
    Predictor(model).set_image(image)  # warm-up
    for g in (16, 32):
        Counting.calls = 0
        sync()
        t0 = time.perf_counter()
        recs = segment_everything(image, Counting(model), points_per_side=g, **AMG_SETTINGS)
        sync()
        ours = time.perf_counter() - t0
        plain, check = None, f"{Counting.calls} decoder calls, {len(recs)} masks kept"
        if g == 16 or args.full:
            t0 = time.perf_counter()
            plain_recs = _plain_everything(image, model, g)
            sync()
            plain = time.perf_counter() - t0
            check += f"; vs plain: {_compare_records(recs, plain_recs)}"
        rows.append(_row("everything", "mobilesam", f"grid {g}, 1024² (incl. encoder)", ours,
                         plain=plain, ref=REFERENCE_AMG[g] if dev.type == "cpu" else None,
                         check=check))
    for fixture, what, secs, check in conformance_everything(model):
        rows.append(_row("everything", "mobilesam", f"conformance {fixture}{what}", secs,
                         check=check))
    return {"rows": rows, **_peaks(dev)}


def job_objects(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_object_prompts as bop
    import torch

    try:
        image, labels = bop.load_stardist_nuclei(args.stardist_dir)
    except FileNotFoundError as exc:
        return {"rows": [_row("objects", "-", "stardist nuclei", None, check=f"skipped: {exc}")]}
    import numpy as np

    n = len(np.unique(labels)) - 1
    rows = []
    for r in bop.evaluate_prompts(image, labels):
        rows.append(_row("objects", "-", f"{r['prompts']}: nuclei prompted", r["coverage"],
                         unit="%", check=f"{r['n']} prompts, {r['hit']}/{n} nuclei, "
                         f"{r['background']} on background" + (
                             f", detection {r['detect_s'] * 1e3:.0f} ms"
                             if r["detect_s"] is not None else "")))
    t = bop.time_everything(image, args.threads, args.device)
    o, g = t["objects"], t["grid 32"]
    rows.append(_row("objects", "mobilesam", "everything, object prompts vs grid 32 (512²)",
                     o["s"], plain=g["s"],
                     check=f"decoder calls {o['calls']} vs {g['calls']}, masks {o['masks']} vs "
                           f"{g['masks']}; incl. encoder and detection"))
    return {"rows": rows, **_peaks(torch.device(args.device if args.device != "auto" else "cpu"))}


def _synthetic_mobilesam() -> Any:
    """Zero-argument model factory for the batch runner (synthetic weights, CPU)."""
    return _synthetic_model("mobilesam", "cpu")


def job_batch(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from napari_esam._sample_data import synthetic_nuclei
    from napari_esam.core.plane.everything import segment_everything
    from napari_esam.core.plane.labels import masks_to_labels
    from napari_esam.core.plane.predictor import Predictor
    from napari_esam.core.runs.pipeline import run_batch
    from napari_esam.core.runs.settings import BatchSettings, EverythingParams, ModelSpec

    torch.set_num_threads(args.threads)
    stack = np.stack([synthetic_nuclei(seed=s)[0] for s in range(5)])
    kw = dict(AMG_SETTINGS, points_per_side=16)
    params = EverythingParams(**kw)
    settings = BatchSettings(model=ModelSpec(name="mobilesam", device=args.device,
                                             factory=_synthetic_mobilesam),
                             params=params, id_scope="slice")
    model = _synthetic_mobilesam().to(args.device)
    sync = _sync_for(model.device)
    Predictor(model).set_image(stack[0])  # warm-up

    def plain():
        out = []
        for sl in stack:
            recs = segment_everything(sl, Predictor(model), **kw)
            out.append(masks_to_labels(recs, sl.shape))
        return np.stack(out)

    run_batch(stack[:1], settings)  # builds and caches the batch runner's model
    sync()
    t0 = time.perf_counter()
    res = run_batch(stack, settings)
    sync()
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = plain()
    sync()
    base = time.perf_counter() - t0
    same = np.array_equal(np.asarray(res.labels), ref)
    rows = [_row("batch", "mobilesam", "5 slices 512², grid 16", len(stack) / ours, unit="sl/s",
                 plain=len(stack) / base,
                 check=f"labels {'identical' if same else 'DIFFER'}; plain = loop of "
                       "segment_everything")]
    return {"rows": rows, **_peaks(model.device)}


def job_dtype(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from napari_esam.core.plane.predictor import Predictor

    if not torch.cuda.is_available() or args.device == "cpu":
        return {"rows": [_row("dtype", "-", "float16/bfloat16", None,
                              check="skipped: needs CUDA")]}
    conf = SHARED / "conformance"
    rows = []
    for name in args.models:
        base = _synthetic_model(name, "cuda")
        x, _ = base.preprocess(_retina_1024())
        for dt in ("float16", "bfloat16"):
            low = _synthetic_model(name, "cuda", dt)
            pa, pb = Predictor(base), Predictor(low)
            ious = []
            for fixture, cases in (("points", ("single", "multi")), ("box", ("box", "box_point"))):
                path = conf / name / f"{fixture}.npz"
                if not path.is_file():
                    continue
                with np.load(path) as f:
                    ref = {k: f[k] for k in f.files}
                image = load_conformance_image(conf / name)
                pa.set_image(image)
                pb.set_image(image)
                for case in cases:
                    pts = ref.get(f"{case}__point_coords")
                    lbl = ref.get(f"{case}__point_labels")
                    box = ref.get(f"{case}__box")
                    if pts is not None:  # EfficientSAM lists the box corners (labels 2, 3)
                        fg = np.isin(lbl, (0, 1))
                        pts, lbl = (pts[fg], lbl[fg]) if fg.any() else (None, None)
                    ma, _, _ = pa.predict(pts, lbl, box)
                    mb, _, _ = pb.predict(pts, lbl, box)
                    ious += [_mask_iou(ma[k], mb[k]) for k in range(len(ma))]
            def enc_low(m=low, x=x, dt=dt):
                with torch.autocast("cuda", dtype=getattr(torch, dt)):
                    return m.encode(x)

            with torch.inference_mode():
                t = _interleaved({"ours": enc_low, "plain": lambda m=base, x=x: m.encode(x)},
                                 args.repeats, torch.cuda.synchronize)
            worst = min(ious) if ious else float("nan")
            rows.append(_row("dtype", name, f"encoder {dt} autocast", t["ours"], plain=t["plain"],
                             check=f"min mask IoU vs float32 {worst:.4f} on {len(ious)} masks "
                                   f"({'ok' if worst >= 0.99 else 'BELOW 0.99'})"))
    return {"rows": rows, **_peaks(torch.device("cuda"))}


def load_conformance_image(folder: Path) -> Any:
    """The image of a model's conformance prompts (``encoder.npz``'s ``image``)."""
    import numpy as np

    with np.load(folder / "encoder.npz") as f:
        return f["image"]


JOBS: dict[str, Callable[..., dict]] = {
    "reference": job_reference,
    "everything": job_everything,
    "objects": job_objects,
    "batch": job_batch,
    "dtype": job_dtype,
}


# ------------------------------------------------------------------------------- report


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "%":
        return f"{v:.1%}"
    if unit == "s":
        return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"
    return f"{v:.3g} {unit}"


def _ratio(a: float | None, b: float | None, unit: str) -> str:
    """Speed-up of ours over the other: time ratio, or rate ratio for sl/s."""
    if a is None or b is None or a <= 0 or b <= 0 or unit == "%":
        return "-"
    return f"{(b / a if unit == 's' else a / b):.2f}x"


def print_table(rows: list[Row], jobs: dict[str, dict], args: argparse.Namespace,
                device: str) -> None:
    import torch

    print(f"\nnapari-esam benchmark suite: {device}, torch {torch.__version__}, "
          f"{args.threads} threads, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"times: median of {args.repeats} after 1 warm-up, ours and plain interleaved "
          "(everything/objects/batch: one run each); x = speed-up of ours")
    head = ("| part | model | measurement | ours | plain, same run | x | reference CPU "
            "| x | peak RSS | checks |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        job = jobs.get(r["job"], {})
        mem = f"{job['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in job else "-"
        if "peak_gpu_gb" in job:
            mem += f" (GPU {job['peak_gpu_gb']:.2f} GB)"
        print(f"| {r['part']} | {r['model']} | {r['what']} | {_fmt(r['ours'], r['unit'])} | "
              f"{_fmt(r['plain'], r['unit'])} | {_ratio(r['ours'], r['plain'], r['unit'])} | "
              f"{_fmt(r['ref'], r['unit'])} | {_ratio(r['ours'], r['ref'], r['unit'])} | "
              f"{mem} | {r['check']} |")


def _run_job(job: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--job", job, *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"rows": [_row(job.split(":")[0], job.partition(":")[2] or "-", job, None,
                              check="FAILED: " + " / ".join(tail))]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=None, help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stardist-dir", default=None)
    ap.add_argument("--reference-dir", default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile encoders")
    ap.add_argument("--full", action="store_true", help="plain/reference paths at grid 32 too")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.job:
        kind, _, name = args.job.partition(":")
        out = job_models(args, name) if kind == "models" else JOBS[kind](args)
        print(json.dumps(out))
        return
    parts = args.parts.split(",") if args.parts else [
        p for p in PARTS if p != "dtype" or args.device == "cuda"]
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"unknown parts {sorted(bad)}; choose from {', '.join(PARTS)}")
    argv = [a for a in sys.argv[1:] if a]
    jobs: dict[str, dict] = {}
    rows: list[Row] = []
    t0 = time.perf_counter()
    for part in parts:
        names = [f"models:{m}" for m in args.models] if part == "models" else [part]
        for job in names:
            print(f"[{time.perf_counter() - t0:6.0f} s] {job} ...", file=sys.stderr, flush=True)
            jobs[job] = _run_job(job, argv)
            for r in jobs[job]["rows"]:
                r["job"] = job
                rows.append(r)
    print(f"[{time.perf_counter() - t0:6.0f} s] done", file=sys.stderr)
    print_table(rows, jobs, args, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "jobs": jobs}, indent=1))


if __name__ == "__main__":
    main()
