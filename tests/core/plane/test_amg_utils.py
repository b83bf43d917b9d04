"""Unit tests of the segment-everything building blocks against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_esam.core.plane import amg_utils as U

# ------------------------------------------------------------------------------ grids, crops


def test_point_grid_is_cell_centres_x_fastest():
    g = U.build_point_grid(4)
    assert g.shape == (16, 2) and g.dtype == np.float64
    side = np.array([0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(g[:4, 0], side)  # x varies fastest
    np.testing.assert_allclose(g[:4, 1], 0.125)
    np.testing.assert_allclose(g[::4, 1], side)
    np.testing.assert_array_equal(U.build_point_grid(1), [[0.5, 0.5]])
    # 16 points per side on 512 px: 16 + 32 k
    np.testing.assert_array_equal(np.unique(U.build_point_grid(16) * 512), 16 + 32 * np.arange(16))
    with pytest.raises(ValueError):
        U.build_point_grid(0)


def test_layer_grids_downscale():
    grids = U.build_all_layer_point_grids(32, 2, 2)
    assert [len(g) for g in grids] == [32**2, 16**2, 8**2]
    assert [len(g) for g in U.build_all_layer_point_grids(10, 1, 3)] == [100, 9]


def test_crop_boxes_by_hand():
    boxes, layers = U.generate_crop_boxes((1000, 1500), 0, 512 / 1500)
    assert boxes == [[0, 0, 1500, 1000]] and layers == [0]
    boxes, layers = U.generate_crop_boxes((1000, 1500), 1, 512 / 1500)
    # overlap int(512/1500 * 1000) = 341; crop w ceil((341+1500)/2) = 921, h ceil(1341/2) = 671
    # x0 = 0, 921-341 = 580; y0 = 0, 671-341 = 330; product order: x outer, y inner
    assert boxes == [
        [0, 0, 1500, 1000],
        [0, 0, 921, 671],
        [0, 330, 921, 1000],
        [580, 0, 1500, 671],
        [580, 330, 1500, 1000],
    ]
    assert layers == [0, 1, 1, 1, 1]
    boxes, layers = U.generate_crop_boxes((512, 512), 2, 512 / 1500)
    assert layers.count(2) == 16 and len(boxes) == 21
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512


# ------------------------------------------------------------------------------ statistics


def test_stability_score_counts_and_nan():
    logits = torch.tensor([[[2.0, 0.5, -0.5, -2.0]], [[-3.0, -3.0, -3.0, -3.0]]])
    s = U.stability_score(logits, 0.0, 1.0)
    assert s.dtype == torch.float32
    assert s[0].item() == pytest.approx(1 / 3)  # > 1: one pixel; > -1: three pixels
    assert math.isnan(s[1].item())  # empty union
    assert not bool(s[1] >= 0.0)  # NaN fails a filter
    # strict on both sides: a logit exactly at +offset is not counted in the numerator
    assert U.stability_score(torch.tensor([[1.0, 0.0]]), 0.0, 1.0).item() == 0.0
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(5, 3, 17, 13)).astype(np.float32))
    ref = (x > 0.25).sum((-1, -2)).float() / (x > -0.25).sum((-1, -2)).float()
    torch.testing.assert_close(U.stability_score(x, 0.0, 0.25), ref, rtol=0, atol=0)


def _boxes_brute(masks: np.ndarray) -> np.ndarray:
    out = np.zeros((len(masks), 4), dtype=np.int64)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(ys):
            out[i] = [xs.min(), ys.min(), xs.max(), ys.max()]
    return out


def test_masks_to_boxes_inclusive_and_empty():
    rng = np.random.default_rng(1)
    masks = rng.random((40, 23, 31)) < 0.002
    masks[0] = False
    masks[1] = True
    masks[2, 5, 7] = True
    boxes = U.masks_to_boxes(torch.from_numpy(masks))
    assert boxes.dtype == torch.int64
    np.testing.assert_array_equal(boxes.numpy(), _boxes_brute(masks))
    assert boxes[0].tolist() == [0, 0, 0, 0]
    assert boxes[1].tolist() == [0, 0, 30, 22]
    # leading dimensions are kept
    assert U.masks_to_boxes(torch.from_numpy(masks.reshape(4, 10, 23, 31))).shape == (4, 10, 4)
    assert U.masks_to_boxes(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


def test_box_near_crop_edge_and_uncrop():
    crop = [0, 0, 100, 100]
    orig = [0, 0, 200, 200]
    boxes = torch.tensor([[10, 10, 50, 50], [10, 10, 95, 50], [0, 0, 50, 50], [30, 30, 70, 81]])
    near = U.is_box_near_crop_edge(boxes, crop, orig)
    # 95 is within 20 of the inner crop edge 100; 0 is both a crop and an image edge
    assert near.tolist() == [False, True, False, True]
    crop2 = [100, 100, 200, 200]  # boxes are in the crop frame
    assert U.is_box_near_crop_edge(torch.tensor([[0, 50, 50, 99]]), crop2, orig).tolist() == [True]
    assert U.is_box_near_crop_edge(torch.tensor([[50, 50, 99, 99]]), crop2, orig).tolist() == [
        False
    ]
    assert U.uncrop_boxes_xyxy(torch.tensor([[1, 2, 3, 4]]), [10, 20, 50, 50]).tolist() == [
        [11, 22, 13, 24]
    ]
    pts = U.uncrop_points(torch.tensor([[1.5, 2.5]], dtype=torch.float64), [10, 20, 50, 50])
    assert pts.tolist() == [[11.5, 22.5]]
    m = torch.ones(2, 3, 4, dtype=torch.bool)
    big = U.uncrop_masks(m, [5, 1, 9, 4], 6, 12)
    assert big.shape == (2, 6, 12) and big.sum() == 24 and big[:, 1:4, 5:9].all()
    assert U.uncrop_masks(m, [0, 0, 4, 3], 3, 4) is m
    assert U.box_xyxy_to_xywh(torch.tensor([[2, 3, 10, 7]])).tolist() == [[2, 3, 8, 4]]


# ------------------------------------------------------------------------------ NMS


def _iou_numpy(b: np.ndarray) -> np.ndarray:
    """Pairwise IoU with torchvision's float32 formula, written out in NumPy."""
    b = b.astype(np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.maximum(
        np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0
    )
    h = np.maximum(
        np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0
    )
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area[:, None] + area[None, :] - inter)


def _nms_brute(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """The reference greedy loop, in the order of torch's default CPU sort."""
    order = torch.sort(scores, descending=True)[1].tolist()
    over = _iou_numpy(boxes.numpy()) > thr
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return keep


def _random_boxes(rng: np.random.Generator, n: int, size: int = 60) -> torch.Tensor:
    xy = rng.integers(0, size, (n, 2))
    wh = rng.integers(0, 25, (n, 2))
    return torch.from_numpy(np.concatenate([xy, xy + wh], 1).astype(np.float32))


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.7, 0.999, 1.0])
def test_nms_matches_brute_force(thr):
    rng = np.random.default_rng(int(thr * 1000))
    boxes = _random_boxes(rng, 300)
    scores = torch.from_numpy(rng.random(300).astype(np.float32))
    assert U.nms(boxes, scores, thr).tolist() == _nms_brute(boxes, scores, thr)


def test_nms_ties_follow_torch_default_sort():
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 500, size=200)
    scores = torch.from_numpy(rng.integers(0, 3, 500).astype(np.float32))  # many ties
    keep = U.nms(boxes, scores, 0.5)
    assert keep.tolist() == _nms_brute(boxes, scores, 0.5)
    # nothing suppressed: the output is exactly torch's (non-stable) descending sort order,
    # which is what torchvision uses and what the conformance fixtures record
    zeros = torch.zeros(196)
    zeros[135] = 1.0
    far = torch.tensor([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(196)])
    out = U.nms(far, zeros, 0.5).tolist()
    assert out == torch.sort(zeros, descending=True)[1].tolist()
    assert out[0] == 135


def test_nms_across_blocks_and_chains(monkeypatch):
    monkeypatch.setattr(U, "_NMS_BLOCK", 16)
    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, 200, size=40)
    scores = torch.from_numpy(rng.random(200).astype(np.float32))
    for thr in (0.2, 0.5, 0.8):
        assert U.nms(boxes, scores, thr).tolist() == _nms_brute(boxes, scores, thr)
    # a suppression chain: box k overlaps k+1 only; greedy keeps every other box
    chain = torch.tensor([[2.0 * k, 0, 2.0 * k + 3, 10] for k in range(40)])
    s = torch.linspace(1, 0, 40)
    assert U.nms(chain, s, 0.1).tolist() == list(range(0, 40, 2))


def test_nms_zero_area_and_duplicates():
    boxes = torch.tensor([[5.0, 5, 5, 5], [5.0, 5, 5, 5], [0, 0, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # two zero-area boxes: IoU 0/0 = NaN never suppresses; identical boxes have IoU 1
    assert U.nms(boxes, scores, 0.999).tolist() == [0, 1, 2]
    assert U.nms(boxes, scores, 1.0).tolist() == [0, 1, 2, 3]
    assert U.nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_batched_nms_per_category_and_paths():
    rng = np.random.default_rng(5)
    boxes = _random_boxes(rng, 300, size=30)
    scores = torch.from_numpy(rng.random(300).astype(np.float32))
    idxs = torch.from_numpy(rng.integers(0, 3, 300))
    keep = U.batched_nms(boxes, scores, idxs, 0.4)
    expected = set()
    for c in range(3):
        cur = torch.where(idxs == c)[0]
        expected |= {int(cur[i]) for i in _nms_brute(boxes[cur], scores[cur], 0.4)}
    assert set(keep.tolist()) == expected
    assert (scores[keep].diff() <= 0).all()  # score order
    # more than 1000 boxes: per-category path, then a sort of the kept scores
    boxes = _random_boxes(rng, 1100, size=400)
    scores = torch.from_numpy(rng.integers(0, 4, 1100).astype(np.float32))
    zeros = torch.zeros(1100, dtype=torch.int64)
    kept = sorted(_nms_brute(boxes, scores, 0.5))
    kept_t = torch.tensor(kept)
    expected_order = kept_t[torch.sort(scores[kept_t], descending=True)[1]].tolist()
    assert U.batched_nms(boxes, scores, zeros, 0.5).tolist() == expected_order
    assert U.batched_nms(boxes[:0], scores[:0], zeros[:0], 0.5).tolist() == []


# ------------------------------------------------------------------------------ clean-up


def _brute_small_regions(mask: np.ndarray, area: float, mode: str) -> np.ndarray:
    """Per-component loop with scipy labels, raster-order tie-break on the largest island."""
    working = ~mask if mode == "holes" else mask
    lab, n = ndimage.label(working, structure=np.ones((3, 3)))
    out = mask.copy()
    sizes = [(lab == i).sum() for i in range(1, n + 1)]
    for i, s in enumerate(sizes, 1):
        if s < area:
            out[lab == i] = mode == "holes"
    if mode == "islands" and n and all(s < area for s in sizes):
        out[lab == int(np.argmax(sizes)) + 1] = True
    return out


def test_remove_small_regions_holes_and_islands():
    m = np.zeros((12, 12), bool)
    m[1:9, 1:9] = True
    m[3, 3] = False  # 1-px hole
    m[5:7, 5:7] = False  # 4-px hole
    m[10, 10] = True  # 1-px island
    out, changed = U.remove_small_regions(m, 3, "holes")
    assert changed and out[3, 3] and not out[5:7, 5:7].any()
    out, changed = U.remove_small_regions(m, 5, "holes")
    assert changed and out[1:9, 1:9].all()
    out, changed = U.remove_small_regions(m, 2, "islands")
    assert changed and not out[10, 10] and out[1, 1]
    same, changed = U.remove_small_regions(m, 1, "islands")
    assert not changed and same is not None and np.array_equal(same, m)
    # 8-connectivity: (9, 9) touches (8, 8) and (10, 10) diagonally, so all is one island
    d = m.copy()
    d[9, 9] = True
    out, changed = U.remove_small_regions(d, 2, "islands")
    assert not changed and np.array_equal(out, d)
    # holes are 8-connected too: two diagonal 1-px holes form one 2-px hole
    h = np.ones((5, 5), bool)
    h[1, 1] = h[2, 2] = False
    out, changed = U.remove_small_regions(h, 2, "holes")
    assert not changed and np.array_equal(out, h)
    out, changed = U.remove_small_regions(h, 3, "holes")
    assert changed and out.all()


def test_remove_small_regions_keeps_largest_when_all_small():
    m = np.zeros((8, 8), bool)
    m[0, 0:3] = True  # 3 px
    m[5, 5:7] = True  # 2 px
    out, changed = U.remove_small_regions(m, 10, "islands")
    assert changed and out.sum() == 3 and out[0, 0:3].all()
    # tie between equal-size islands: OpenCV numbers components by their first 2x2 block,
    # so an island starting at row 1, col 0 precedes one starting at row 0, col 6
    t = np.zeros((6, 10), bool)
    t[0, 6:8] = True
    t[1, 0:2] = True
    out, _ = U.remove_small_regions(t, 5, "islands")
    assert out[1, 0:2].all() and not out[0].any()
    # blocks are aligned to the image, not to the mask's bounding box (which starts at 1, 1):
    # the island at row 1 is in block row 0, the one at row 2 in block row 1
    t = np.zeros((6, 12), bool)
    t[1, 7:9] = True
    t[2, 1:3] = True
    out, _ = U.remove_small_regions(t, 5, "islands")
    assert out[1, 7:9].all() and not out[2].any()


def test_remove_small_regions_random_vs_brute_force():
    rng = np.random.default_rng(6)
    eight = np.ones((3, 3))
    for _ in range(200):
        h, w = rng.integers(2, 25, 2)
        m = rng.random((h, w)) < rng.uniform(0.1, 0.7)
        area = int(rng.integers(1, 12))
        for mode in ("holes", "islands"):
            out, changed = U.remove_small_regions(m, area, mode)
            lab, n = ndimage.label(~m if mode == "holes" else m, eight)
            sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            assert changed == bool((sizes < area).any())
            if mode == "islands" and n and (sizes < area).all():
                # only the tie-break of the kept largest island may differ from raster order
                assert out.sum() == sizes.max() and not (out & ~m).any()
                continue
            np.testing.assert_array_equal(out, _brute_small_regions(m, area, mode))


def test_remove_small_regions_bbox_shortcut_vs_full_image():
    """Blobs away from the border take the bounding-box path; it must equal full labelling."""
    rng = np.random.default_rng(7)
    eight = np.ones((3, 3))
    for _ in range(300):
        h, w = rng.integers(3, 50, 2)
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.uniform(0.3, 0.95)
        area = int(rng.integers(2, 60))
        for mode in ("holes", "islands"):
            out, changed = U.remove_small_regions(m, area, mode)
            lab, n = ndimage.label(~m if mode == "holes" else m, eight)
            sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            assert changed == bool((sizes < area).any())
            if mode == "islands" and n and (sizes < area).all():
                assert out.sum() == sizes.max() and not (out & ~m).any()
                continue
            np.testing.assert_array_equal(out, _brute_small_regions(m, area, mode))


def test_clean_mask_reports_unchanged():
    m = np.zeros((20, 20), bool)
    m[2:18, 2:18] = True
    out, unchanged = U.clean_mask(m, 10)
    assert unchanged and np.array_equal(out, m)
    m[5, 5] = False
    out, unchanged = U.clean_mask(m, 10)
    assert not unchanged and out[5, 5]
    out, unchanged = U.clean_mask(m, 0)
    assert unchanged and not out[5, 5]
