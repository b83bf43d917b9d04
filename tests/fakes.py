"""The tests' one fakes module: stand-in models, synthetic images and shared helpers.

* :class:`FakeModel`: a tiny deterministic stand-in for the models, for fast tests of
  geometry and plumbing. Masks are disks of radius ``RADIUS`` original pixels around positive
  points (or filled boxes), minus disks around negative points, so tests can check *where* an
  object lands. The three multimask candidates have radii 0.5, 1 and 1.5 × RADIUS with
  scores 0.5, 0.9, 0.7. Pipeline geometry (longest-side resize to 1024, pad, 256 low-res
  frame) follows MobileSAM.
* :class:`BlobModel` (bright blobs), :class:`ObjectsModel` (exact connected components per
  tile), :func:`blob_stack`, :func:`blob_image`, :func:`tiled_blob_stack`: image-aware
  stand-ins and synthetic images for runs, tiling and the CLI.
* Shared helpers of the widget, tiling and segment-everything tests (:class:`Factory`,
  :func:`add_point`, :class:`CountingSource`, :func:`naive_sam`, ...).
* Linking: 3-D truths (:func:`stardist_mask3d`, :func:`touching_ellipsoids`,
  :func:`moving_discs`), the per-slice input made from them (:func:`relabel_per_slice`,
  :func:`drop_objects`), the naive baseline :func:`naive_stitch` and :func:`f1_at_iou`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.draw import disk
from torch import nn

from napari_esam.core.plane import amg_utils as U
from napari_esam.core.plane.predictor import Predictor
from napari_esam.models.base import PromptableModel

RADIUS = 12.0
SCALES = (0.5, 1.0, 1.5)
SCORES = (0.5, 0.9, 0.7)


class FakeModel(PromptableModel):
    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.encode_calls = 0

    def preprocess(self, image: np.ndarray):
        h, w = image.shape[:2]
        s = 1024 / max(h, w)
        nh, nw = int(h * s + 0.5), int(w * s + 0.5)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False)
        x = F.pad(x, (0, 1024 - nw, 0, 1024 - nh))
        return x.to(self.device), (nh, nw)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        pooled = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 64)
        return pooled.expand(x.shape[0], 256, 64, 64).contiguous() + self.dummy

    def decode(self, embedding, coords, labels, original_size, multimask_output=True,
               iou_gate=None):
        h, w = original_size
        s = 1024 / max(h, w) / 4  # original px -> 256 frame
        yy, xx = torch.meshgrid(
            torch.arange(256, device=coords.device) + 0.5,
            torch.arange(256, device=coords.device) + 0.5,
            indexing="ij",
        )
        c = coords.float() * s
        out = []
        for k in SCALES if multimask_output else (1.0,):
            r = RADIUS * s * k
            rows = []
            for b in range(c.shape[0]):
                lab = labels[b]
                logit = torch.full((256, 256), -10.0, device=coords.device)
                tl, br = c[b][lab == 2], c[b][lab == 3]
                if len(tl):
                    inside = (xx >= tl[0, 0]) & (xx <= br[0, 0])
                    inside &= (yy >= tl[0, 1]) & (yy <= br[0, 1])
                    logit = torch.where(inside, torch.full_like(logit, 10.0), logit)
                for p in c[b][lab == 1]:
                    d = torch.sqrt((xx - p[0]) ** 2 + (yy - p[1]) ** 2)
                    logit = torch.maximum(logit, r - d)
                for p in c[b][lab == 0]:
                    d = torch.sqrt((xx - p[0]) ** 2 + (yy - p[1]) ** 2)
                    logit = torch.minimum(logit, d - r)
                rows.append(logit.clamp(-10, 10))
            out.append(torch.stack(rows))
        low = torch.stack(out, 1)
        iou = torch.tensor(SCORES if multimask_output else (0.9,), device=coords.device)
        return low, iou.expand(low.shape[0], -1).clone()

    def postprocess_masks(self, low_res, input_size, original_size):
        x = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        return F.interpolate(x, original_size, mode="bilinear", align_corners=False)


# --- image-aware stand-ins for batch runs (BlobModel) and synthetic cell stacks

def prompt_centres(coords: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(B, 2) (x, y): each row's first point, or the centre of its box (labels 2 and 3)."""
    pts = coords[:, 0, :].detach().cpu().numpy().astype(np.float64)
    lab = labels.detach().cpu().numpy()
    box = (lab[:, 0] == 2) & (lab.shape[1] > 1)
    if box.any():
        pts[box] = coords[box][:, :2].detach().cpu().numpy().mean(axis=1)
    return pts


class BlobModel(FakeModel):
    """The bright 8-connected blob of the embedding's 64 x 64 grid under each prompt's
    first point (or its box's centre); predicted IoU 0.95 on a blob, 0.1 off."""

    name = "blob"

    def decode(self, embedding, coords, labels, original_size, multimask_output=True,
               iou_gate=None):
        h, w = original_size
        img = embedding[0, 0].detach().cpu().numpy()  # (64, 64) mean intensity, 0..255
        comp, _ = ndimage.label(img > 100)
        s = 1024 / max(h, w) / 16  # original px -> 64 grid
        pts = prompt_centres(coords, labels) * s
        ix = np.clip(pts[:, 0].astype(int), 0, 63)
        iy = np.clip(pts[:, 1].astype(int), 0, 63)
        ids = comp[iy, ix]
        masks = (comp[None] == ids[:, None, None]) & (ids[:, None, None] > 0)
        low = torch.from_numpy(masks.astype(np.float32) * 20 - 10)[:, None]
        low = F.interpolate(low, (256, 256), mode="nearest").to(coords.device)
        k = 3 if multimask_output else 1
        low = low.expand(-1, k, -1, -1).contiguous()
        scores = torch.tensor([0.95, 0.5, 0.5][:k] if multimask_output else [0.95])
        iou = scores.expand(len(ids), -1).clone()
        iou[torch.from_numpy(ids == 0)] = 0.1
        return low, iou.to(coords.device)


def blob_stack(n: int = 5, size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """(n, size, size) uint16 stack of bright disks on a dim noisy background.

    Slice ``i`` has ``2 + i % 3`` well separated blobs; returns the stack and those counts.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    stack = rng.integers(50, 300, (n, size, size)).astype(np.uint16)
    counts = []
    centres = [(16, 16), (16, 48), (48, 16), (48, 48)]
    for i in range(n):
        k = 2 + i % 3
        for cy, cx in centres[:k]:
            cy, cx = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
            stack[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 7**2] = 4000
        counts.append(k)
    return stack, counts


#: parameters that make segment-everything quick on a 64x64 blob stack
FAST = {"points_per_side": 8, "points_per_batch": 64}


# --- a large-ish image for the tiled CLI and cluster tests (with BlobModel)

TILE, HALO = 256, 64  # the tiled tests' grid
#: segment-everything parameters for BlobModel: 8x8 points per tile, one decoder batch
FAST_TILED = {"points_per_side": 8, "points_per_batch": 64}


def blob_image(shape=(600, 700), seed: int = 0, n_small: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(50, 300, shape).astype(np.uint16)
    taken = np.zeros(shape, bool)
    h, w = shape
    centres = [(214, 350, 90), (386, 202, 70)]  # on core junctions of the 256/64 grid
    for _ in range(n_small):
        centres.append((int(rng.integers(15, h - 15)), int(rng.integers(15, w - 15)),
                        int(rng.integers(8, 15))))
    for y, x, r in centres:
        if y + r >= h or x + r >= w:
            continue
        if taken[disk((y, x), r + 6, shape=shape)].any():
            continue
        rr, cc = disk((y, x), r, shape=shape)
        img[rr, cc] = 4000
        taken[rr, cc] = True
    return img


def tiled_blob_stack(n: int = 2, shape=(300, 400)) -> np.ndarray:
    return np.stack([blob_image(shape, seed=s, n_small=8) for s in range(n)])


# --- shared helpers (were in test_prompt_controller.py)

class CountingFake(FakeModel):
    """FakeModel counting decoder calls and recording the images it encodes (the model's
    (H, W, 3) uint8 input before resizing, see :func:`model_input`)."""

    def __init__(self, max_points: int | None = None, negatives: bool = True) -> None:
        super().__init__()
        self.decode_calls = 0
        self.max_points = max_points
        self.has_negative_point_embedding = negatives
        self.seen: list[np.ndarray] = []

    def preprocess(self, image: np.ndarray):
        self.seen.append(np.array(image))
        return super().preprocess(image)

    def decode(self, *args, **kwargs):
        self.decode_calls += 1
        return super().decode(*args, **kwargs)


class MaskFake(CountingFake):
    """CountingFake taking SAM's mask prompt: records every decoder call's prompts as
    ``(coords (B, N, 2) window px, labels (B, N), original_size, mask_input or None)``.
    A mask input adds its positive area to every candidate's logits, so it shows."""

    supports_mask_input = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple] = []

    def decode(self, embedding, coords, labels, original_size, multimask_output=True,
               mask_input=None, iou_gate=None):
        self.calls.append((
            coords.cpu().numpy().copy(), labels.cpu().numpy().copy(), tuple(original_size),
            None if mask_input is None else mask_input.cpu().numpy().copy(),
        ))
        low, iou = super().decode(embedding, coords, labels, original_size, multimask_output)
        if mask_input is not None:
            low = torch.maximum(low, mask_input.to(low.device).clamp(-10, 10))
        return low, iou


class PromptRecorder(FakeModel):
    """FakeModel recording what every decoder call receives: ``calls`` holds
    (coords (B, N, 2) in image pixels, labels (B, N), multimask_output) as NumPy."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[np.ndarray, np.ndarray, bool]] = []

    def decode(self, embedding, coords, labels, original_size, multimask_output=True,
               iou_gate=None):
        self.calls.append((coords.detach().cpu().numpy().astype(np.float64),
                           labels.detach().cpu().numpy(), bool(multimask_output)))
        return super().decode(embedding, coords, labels, original_size, multimask_output)


def model_input(pixels: np.ndarray, rgb: bool = False) -> np.ndarray:
    """What the model sees of a plane's raw ``pixels``: (H, W, 3) uint8 under the plane's own
    contrast rule (``docs/rules/tiling.md#contrast``)."""
    from napari_esam.core.plane.image import to_model_rgb
    from napari_esam.core.tiling.grid import plane_contrast_limits

    return to_model_rgb(pixels, plane_contrast_limits(pixels, rgb=rgb))


class Factory:
    """Model factory of the prompt widget building CountingFake models and remembering them."""

    def __init__(self, model_class: type | None = None, **kwargs) -> None:
        self.kwargs = kwargs
        self.model_class = model_class or CountingFake
        self.calls: list[tuple] = []
        self.models: list[CountingFake] = []

    def __call__(self, name, checkpoint, device):
        self.calls.append((name, checkpoint, device))
        model = self.model_class(**self.kwargs).eval()
        self.models.append(model)
        return model

    @property
    def model(self) -> CountingFake:
        return self.models[-1]

    @property
    def embedded(self) -> list[np.ndarray]:
        """The images every model of this factory encoded (model inputs, oldest first)."""
        return [img for m in self.models for img in m.seen]


def blobs(shape=(120, 160), dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 3000, shape).astype(dtype)


def centre(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


def add_point(ctrl, world_rc, polarity="positive"):
    ctrl.set_polarity(polarity)
    pts = ctrl.points_layer
    pts.add(pts.world_to_data(np.asarray(world_rc, float)))


def add_box(ctrl, world_r0c0, world_r1c1):
    shp = ctrl.shapes_layer
    a = shp.world_to_data(np.asarray(world_r0c0, float))
    b = shp.world_to_data(np.asarray(world_r1c1, float))
    rect = np.array([a, b])
    shp.add_rectangles(rect)


# --- shared helpers (were in test_tiling.py)

class CountingSource:
    """An array-like whose reads are counted (one call per dask chunk)."""

    def __init__(self, shape, dtype=np.uint16, seed=0):
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.reads: list[tuple] = []
        self.seed = seed
        self._lock = threading.Lock()

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        drop = tuple(i for i, k in enumerate(key) if isinstance(k, (int, np.integer)))
        key = tuple(slice(k, k + 1) if i in drop else k for i, k in enumerate(key))
        shape = tuple(len(range(*k.indices(n))) for k, n in zip(key, self.shape, strict=True))
        if 0 not in shape:  # dask probes with empty slices for the meta: not a read
            with self._lock:
                self.reads.append(key)
        y0 = key[-2].start or 0
        x0 = key[-1].start or 0
        yy, xx = np.ogrid[: shape[-2], : shape[-1]]
        out = (((yy + y0) * 7 + (xx + x0) * 3 + self.seed) % 5000).astype(self.dtype)
        out = out + np.zeros(shape, self.dtype)
        return out.squeeze(drop) if drop else out


# --- shared helpers (were in test_everything.py)

def naive_sam(
    image,
    model,
    *,
    points_per_side,
    points_per_batch=64,
    pred_iou_thresh=0.88,
    stability_score_thresh=0.95,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
    crop_n_layers=0,
    crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500,
    crop_n_points_downscale_factor=1,
    min_mask_region_area=0,
    predictor=None,
):
    """SamAutomaticMaskGenerator step by step: every candidate upsampled, then filtered.

    ``predictor`` (optional) is used for the whole-image crop (its embedding is reused)."""
    h_img, w_img = image.shape[:2]
    crop_boxes, layers = U.generate_crop_boxes((h_img, w_img), crop_n_layers, crop_overlap_ratio)
    grids = U.build_all_layer_point_grids(
        points_per_side, crop_n_layers, crop_n_points_downscale_factor
    )
    everything = []
    for cb, layer in zip(crop_boxes, layers, strict=True):
        x0, y0, x1, y1 = cb
        p = predictor if predictor is not None and layer == 0 else Predictor(model)
        p.set_image(image[y0:y1, x0:x1])
        h, w = p.original_size
        pts = grids[layer] * np.array([[w, h]])
        rows = []
        for s in range(0, len(pts), points_per_batch):
            b = pts[s : s + points_per_batch]
            low, iou = p.decode_torch(
                torch.from_numpy(b)[:, None], torch.ones(len(b), 1, dtype=torch.int64)
            )
            logits = p.upsample(low).flatten(0, 1)
            iou = iou.flatten()
            bp = np.repeat(b, low.shape[1], axis=0)
            for i in range(len(iou)):
                if pred_iou_thresh > 0 and not iou[i] > pred_iou_thresh:
                    continue
                st = U.stability_score(logits[i], 0.0, stability_score_offset)
                if stability_score_thresh > 0 and not st >= stability_score_thresh:
                    continue
                m = model.threshold(logits[i])
                box = U.masks_to_boxes(m)
                if U.is_box_near_crop_edge(box[None], cb, [0, 0, w_img, h_img])[0]:
                    continue
                rows.append(
                    dict(
                        mask=U.uncrop_masks(m, cb, h_img, w_img).numpy(),
                        cbox=box,
                        box=U.uncrop_boxes_xyxy(box, cb),
                        iou=float(iou[i]),
                        st=float(st),
                        pt=(bp[i] + [x0, y0]).tolist(),
                        crop=cb,
                    )
                )
        if rows:
            keep = U.batched_nms(
                torch.stack([r["cbox"] for r in rows]).float(),
                torch.tensor([r["iou"] for r in rows]),
                torch.zeros(len(rows)),
                box_nms_thresh,
            )
            everything += [rows[i] for i in keep.tolist()]
    if len(crop_boxes) > 1 and everything:
        cbs = torch.tensor([r["crop"] for r in everything])
        keep = U.batched_nms(
            torch.stack([r["box"] for r in everything]).float(),
            1 / ((cbs[:, 2] - cbs[:, 0]) * (cbs[:, 3] - cbs[:, 1])),
            torch.zeros(len(everything)),
            crop_nms_thresh,
        )
        everything = [everything[i] for i in keep.tolist()]
    if min_mask_region_area > 0 and everything:
        scores = []
        for r in everything:
            r["mask"], same = U.clean_mask(r["mask"], min_mask_region_area)
            scores.append(float(same))
        keep = U.batched_nms(
            U.masks_to_boxes(torch.from_numpy(np.stack([r["mask"] for r in everything]))).float(),
            torch.tensor(scores),
            torch.zeros(len(everything)),
            max(box_nms_thresh, crop_nms_thresh),
        )
        everything = [everything[i] for i in keep.tolist()]
    out = []
    for r in everything:
        bx = U.masks_to_boxes(torch.from_numpy(r["mask"])).tolist()
        c = r["crop"]
        out.append(
            dict(
                segmentation=r["mask"],
                area=int(r["mask"].sum()),
                bbox=[bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]],
                predicted_iou=r["iou"],
                point_coords=[r["pt"]],
                stability_score=r["st"],
                crop_box=[c[0], c[1], c[2] - c[0], c[3] - c[1]],
            )
        )
    return out


def naive_efficientsam(
    image,
    model,
    grid_size,
    iou_thresh,
    stability_thresh,
    offset,
    min_area,
    nms_thresh,
    predictor=None,
):
    """The notebook procedure: all queries in one call, all candidates upsampled."""
    p = predictor if predictor is not None else Predictor(model)
    p.set_image(image)
    h, w = p.original_size
    xy = [
        [0.5 + i / grid_size * w, 0.5 + j / grid_size * h]
        for i in range(grid_size)
        for j in range(grid_size)
    ]
    pts = torch.tensor(xy, dtype=torch.float64)
    low, iou = p.decode_torch(pts[:, None], torch.ones(len(xy), 1, dtype=torch.int64))
    logits = p.upsample(low)
    order = torch.argsort(iou, dim=-1, descending=True)
    iou = torch.take_along_dim(iou, order, dim=1)
    logits = torch.take_along_dim(logits, order[..., None, None], dim=1)
    keep = iou[:, 0] > iou_thresh
    q = torch.nonzero(keep).flatten()
    st = U.stability_score(logits[keep], 0.0, offset)[:, 0]
    ok = st > stability_thresh
    q, st = q[ok], st[ok]
    masks = model.threshold(logits[keep][ok][:, 0]).numpy()
    cleaned, scores = [], []
    for m in masks:
        m2, same = U.clean_mask(m, min_area)
        cleaned.append(m2)
        scores.append(float(same))
    if not cleaned:
        return []
    boxes = U.masks_to_boxes(torch.from_numpy(np.stack(cleaned)))
    keep = U.batched_nms(boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), nms_thresh)
    return [
        dict(
            segmentation=cleaned[i],
            query=int(q[i]),
            predicted_iou=float(iou[q[i], 0]),
            stability_score=float(st[i]),
        )
        for i in keep.tolist()
    ]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert set(rb) <= set(ra)
        for k, v in rb.items():
            if k == "segmentation":
                np.testing.assert_array_equal(ra[k], v)
            else:
                assert ra[k] == v, k


# --- shared helpers (were in test_tiled_everything.py)

class ObjectsModel(PromptableModel):
    """A stub whose "object" under a positive point is the bright connected component of the
    tile, so the expected segmentation is known exactly.

    ``encode`` records the tile (thresholded at 128 after contrast scaling) and returns an
    embedding filled with the tile's id; ``decode`` (a positive point, or else a box's
    centre, picks the component) puts (tile id, component id) in the
    low-res logits (predicted IoU 0.95 on an object for the first candidate, else 0.1);
    ``postprocess_masks`` rebuilds the exact component as +-10 logits at full resolution.
    """

    name = "objects-stub"

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.tiles: dict[int, np.ndarray] = {}
        self.encode_calls = 0
        self._pending: np.ndarray | None = None

    def preprocess(self, image):
        h, w = image.shape[:2]
        self._pending = ndimage.label(image[..., 0] > 127)[0]
        s = 1024 / max(h, w)
        return torch.zeros(1, 3, 8, 8), (int(h * s + 0.5), int(w * s + 0.5))

    def encode(self, x):
        self.encode_calls += 1
        k = len(self.tiles) + 1
        self.tiles[k] = self._pending
        return torch.full((x.shape[0], 256, 64, 64), float(k))

    def decode(self, embedding, coords, labels, original_size, multimask_output=True,
               iou_gate=None):
        k = int(embedding.reshape(-1)[0].item())
        comp = self.tiles[k]
        assert comp.shape == tuple(original_size)
        n = 3 if multimask_output else 1
        low = torch.zeros(coords.shape[0], n, 256, 256)
        iou = torch.full((coords.shape[0], n), 0.1)
        centres = prompt_centres(coords, labels)
        for i in range(coords.shape[0]):
            pos = coords[i][labels[i] == 1]
            if len(pos) or (labels[i] == 2).any():
                x, y = (int(v) for v in (pos[0].tolist() if len(pos) else centres[i]))
                c = int(comp[min(y, comp.shape[0] - 1), min(x, comp.shape[1] - 1)])
                low[i, :, 0, 0], low[i, :, 0, 1] = k, c
                iou[i, 0] = 0.95 if c else 0.1
        return low, iou

    def postprocess_masks(self, low_res, input_size, original_size):
        k = int(low_res.reshape(-1, 256 * 256)[:, 0].max().item())
        if k == 0:
            return torch.full((*low_res.shape[:2], *original_size), -10.0)
        comp = torch.from_numpy(self.tiles[k])
        ids = low_res[:, :, 0, 1].round().int()
        same = (comp[None, None] == ids[:, :, None, None]) & (ids[:, :, None, None] > 0)
        return torch.where(same, 10.0, -10.0)


# --- shared helpers (were in test_batch_widget.py)

def make_widget(viewer):
    """The 'Segment everything' widget with the blob model and a fast grid."""
    from napari_esam.widgets.everything.view import EverythingWidget

    widget = EverythingWidget(viewer)
    widget.controller.model_factory = BlobModel
    widget.points_per_side.setValue(FAST["points_per_side"])
    widget.device_combo.setCurrentText("cpu")
    return widget


def run_and_wait(qtbot, widget, timeout=120_000):
    """Start the widget's run and wait until its worker has finished."""
    worker = widget.run(start=False)
    assert worker is not None, widget.status.text()
    with qtbot.waitSignal(worker.finished, timeout=timeout):
        worker.start()
    return worker


# --- volumes and time-lapses with known objects (propagation, linking)

def carved_foreground(labels: np.ndarray) -> np.ndarray:
    """Foreground of a label image or volume with touching objects cut apart: pixels with a
    neighbour (along any axis) of another nonzero label are removed, as the dim gap between
    touching nuclei would be, so each object is its own component in every slice."""
    fg = labels > 0
    cut = np.zeros_like(fg)
    for axis in range(labels.ndim):
        a = [slice(None)] * labels.ndim
        b = [slice(None)] * labels.ndim
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        for p, q in ((tuple(a), tuple(b)), (tuple(b), tuple(a))):
            cut[p] |= (labels[q] != labels[p]) & (labels[q] > 0) & fg[p]
    return fg & ~cut


def moving_disc_frames(
    n: int = 10, shape=(96, 128), step=(2, 3), n_discs: int = 1, radius: int = 9,
    lifetimes: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 (n, H, W): 255 inside discs, truth int32 (n, H, W)): disc ``k`` (id k+1)
    starts at a fixed place and moves by ``step`` (rows, cols) per frame, present in frames
    ``0..lifetimes[k]-1`` (default: all)."""
    h, w = shape
    frames = np.zeros((n, h, w), np.uint8)
    truth = np.zeros((n, h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    starts = [(20, 20), (60, 30), (30, 80)]
    for k in range(n_discs):
        life = n if lifetimes is None else lifetimes[k]
        for t in range(min(n, life)):
            cy, cx = starts[k][0] + step[0] * t, starts[k][1] + step[1] * t
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            frames[t][disc] = 255
            truth[t][disc] = k + 1
    return frames, truth


# --- linking (tests/core/linking, tests/cli/test_link.py, benchmarks/bench_linking.py):
# truth volumes, the per-slice input made from them, the naive baseline and the metric

STARDIST_MASK3D = "mask3d.tif"
STARDIST_DIR = Path(__file__).resolve().parent / "data" / "stardist"


def stardist_mask3d() -> np.ndarray:
    """stardist's 3-D nuclei ground truth (31x61x57, 51 nuclei), the copy in
    ``tests/data/stardist/`` (see its README)."""
    import tifffile

    return tifffile.imread(STARDIST_DIR / STARDIST_MASK3D)


def relabel_per_slice(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """The per-slice input made from a 3-D truth: each slice's connected pieces of each
    object, with random distinct uint32 ids (unrelated between slices)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(truth.shape, np.uint32)
    for z in range(truth.shape[0]):
        plane, pieces = truth[z], np.zeros(truth.shape[1:], np.int64)
        n = 0
        for k, box in enumerate(ndimage.find_objects(plane)):
            if box is None:
                continue
            comp, m = ndimage.label(plane[box] == k + 1)
            pieces[box][comp > 0] = comp[comp > 0] + n
            n += m
        ids = rng.choice(2**31, size=n, replace=False).astype(np.uint32) + 1
        out[z] = np.concatenate([[0], ids])[pieces]
    return out


def drop_objects(stack: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """``stack`` with each 2-D object erased with probability ``fraction``."""
    rng = np.random.default_rng(seed)
    out = stack.copy()
    for z in range(out.shape[0]):
        ids = np.unique(out[z])
        ids = ids[ids != 0]
        out[z][np.isin(out[z], ids[rng.random(len(ids)) < fraction])] = 0
    return out


def touching_ellipsoids(shape=(24, 96, 96), spacing=(8, 16, 16), seed: int = 0) -> np.ndarray:
    """3-D truth: ellipsoids on a jittered grid, packed so that they touch (a voxel inside
    several goes to the one it is deepest in), touching in z too."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, float)
    axes = [np.arange(s / 2, n, s) for n, s in zip(shape, spacing, strict=True)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    centres = centres + rng.uniform(-0.25, 0.25, centres.shape) * spacing
    best = np.full(shape, np.inf)
    labels = np.zeros(shape, np.int32)
    for k, c in enumerate(centres):
        semi = spacing * rng.uniform(0.5, 0.7, 3)
        lo = np.maximum(np.floor(c - semi).astype(int), 0)
        hi = np.minimum(np.ceil(c + semi).astype(int) + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grid = np.ogrid[box]
        d = sum(((g - ci) / si) ** 2 for g, ci, si in zip(grid, c, semi, strict=True))
        inside = (d < 1) & (d < best[box])
        best[box][inside] = d[inside]
        labels[box][inside] = k + 1
    return labels


def moving_discs(frames: int = 30, size: int = 192, spacing: int = 40, seed: int = 0,
                 speed=(0.3, 1.0), radius=(8.0, 12.0), turn: float = 0.2) -> np.ndarray:
    """(T, Y, X) truth of a time-lapse: discs moving at 0.3-1 radius per frame in slowly
    turning directions, colliding elastically and bouncing off the walls (touching, never
    passing through each other)."""
    rng = np.random.default_rng(seed)
    g = np.arange(spacing / 2, size, spacing)
    pos = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    pos = pos + rng.uniform(-5, 5, pos.shape)
    n = len(pos)
    r = rng.uniform(*radius, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    vel = np.stack([np.sin(angle), np.cos(angle)], 1) * (rng.uniform(*speed, n) * r)[:, None]
    out = np.zeros((frames, size, size), np.int32)
    for t in range(frames):
        best = np.full((size, size), np.inf)
        for k in range(n):
            lo = np.maximum(np.floor(pos[k] - r[k]).astype(int), 0)
            hi = np.minimum(np.ceil(pos[k] + r[k]).astype(int) + 1, size)
            yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1]]
            d = np.hypot(yy - pos[k, 0], xx - pos[k, 1]) / r[k]
            box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
            inside = (d <= 1) & (d < best[box])
            best[box][inside] = d[inside]
            out[t][box][inside] = k + 1
        c, s = np.cos(rng.normal(0, turn, n)), np.sin(rng.normal(0, turn, n))
        vel = np.stack([c * vel[:, 0] - s * vel[:, 1], s * vel[:, 0] + c * vel[:, 1]], 1)
        pos = pos + vel
        for a in range(n):
            for b in range(a + 1, n):
                gap = pos[b] - pos[a]
                dist = float(np.hypot(*gap))
                if 0 < dist < r[a] + r[b]:
                    normal = gap / dist
                    closing = float(np.dot(vel[a] - vel[b], normal))
                    if closing > 0:
                        vel[a] -= closing * normal
                        vel[b] += closing * normal
                    push = (r[a] + r[b] - dist) / 2 * normal
                    pos[a] -= push
                    pos[b] += push
        for d in range(2):
            low, high = pos[:, d] < r, pos[:, d] > size - 1 - r
            pos[low, d] = 2 * r[low] - pos[low, d]
            pos[high, d] = 2 * (size - 1 - r[high]) - pos[high, d]
            vel[low | high, d] *= -1
    return out


def naive_stitch(stack: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """The baseline: slice by slice, each object takes the id of the object of the previous
    (already stitched) slice with which its IoU is largest (lowest id on ties) when that IoU is
    at least ``threshold``, else a new id."""
    out = np.zeros(stack.shape, np.int64)
    next_id = 0
    for z in range(stack.shape[0]):
        values, cur = np.unique(stack[z], return_inverse=True)
        cur = cur.reshape(stack.shape[1:]) + (0 if values[0] == 0 else 1)
        k = len(values) - (1 if values[0] == 0 else 0)
        new = np.zeros(k + 1, np.int64)
        if z > 0 and k:
            prev = out[z - 1]
            both = (cur > 0) & (prev > 0)
            pairs, inter = np.unique(np.stack([cur[both], prev[both]]), axis=1,
                                     return_counts=True)
            area_cur = np.bincount(cur.ravel(), minlength=k + 1)
            prev_ids, prev_area = np.unique(prev, return_counts=True)
            area_prev = dict(zip(prev_ids.tolist(), prev_area.tolist(), strict=True))
            best = np.zeros(k + 1)
            for (c, p), i in zip(pairs.T.tolist(), inter.tolist(), strict=True):
                iou = i / (area_cur[c] + area_prev[p] - i)
                if iou > best[c] or (iou == best[c] and p < new[c]):
                    best[c], new[c] = iou, p
            new[best < threshold] = 0
        for c in range(1, k + 1):
            if new[c] == 0:
                next_id += 1
                new[c] = next_id
        new[0] = 0
        out[z] = new[cur]
    return out


def f1_at_iou(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of predicted vs true objects, a pair matching when their IoU (over the whole
    volume) is above ``threshold`` (>= 0.5 makes matches one-to-one)."""
    t = truth.ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    both = (t > 0) & (p > 0)
    base = int(p.max()) + 1
    pairs, inter = np.unique(t[both] * base + p[both], return_counts=True)
    ti, pi = np.divmod(pairs, base)
    area_t, area_p = np.bincount(t), np.bincount(p)
    tp = int((inter / (area_t[ti] + area_p[pi] - inter) > threshold).sum())
    n_true, n_pred = int((area_t[1:] > 0).sum()), int((area_p[1:] > 0).sum())
    return 2 * tp / (n_true + n_pred) if n_true + n_pred else 1.0


# --- refine labels: a decoder that takes a mask input and records its prompts

class MaskInputModel(FakeModel):
    """FakeModel with a mask input, as MobileSAM's decoder (``supports_mask_input``).

    Every decode is recorded in ``calls`` (NumPy copies: ``coords``, ``labels``,
    ``mask_input`` or None, ``original_size``, ``multimask``). With a mask input the
    answer *is* that mask (the given logits, for every candidate; predicted IoU 0.9), so a
    refined object lands exactly where its mask input puts it in the model's frame; without
    one it answers as :class:`FakeModel` (filled box, disk around the point).
    """

    name = "fake-mask-input"
    supports_mask_input = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def decode(self, embedding, coords, labels, original_size, multimask_output=True,
               mask_input=None, iou_gate=None):
        self.calls.append({
            "coords": coords.detach().cpu().numpy().copy(),
            "labels": labels.detach().cpu().numpy().copy(),
            "mask_input": None if mask_input is None else mask_input.detach().cpu().numpy(),
            "original_size": tuple(int(s) for s in original_size),
            "multimask": bool(multimask_output),
        })
        if mask_input is None:
            return super().decode(embedding, coords, labels, original_size, multimask_output)
        k = 3 if multimask_output else 1
        low = mask_input.float().expand(coords.shape[0], k, 256, 256).clone()
        return low, torch.full((coords.shape[0], k), 0.9)


def refine_scene(shape=(300, 400), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image uint16, labels uint16) for refine tests: two disks (ids 7 and 3, radius 25
    and 30, well inside), one touching the image's left border (id 12), and a thin diagonal
    line (id 9) whose box the FakeModel fills, so its refined mask disagrees with it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(100, 400, shape).astype(np.uint16)
    labels = np.zeros(shape, np.uint16)
    labels[disk((60, 60), 25, shape=shape)] = 7
    labels[disk((150, 250), 30, shape=shape)] = 3
    labels[disk((240, 10), 28, shape=shape)] = 12
    for i in range(100):
        labels[100 + i, 40 + i] = 9
    image[labels > 0] = 3000
    return image, labels
