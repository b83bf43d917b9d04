"""masks_to_labels: overlap rule, size filters, consecutive ids, dtype."""

from __future__ import annotations

import numpy as np
import pytest

from napari_esam.core.plane.labels import labels_dtype, masks_to_labels


def rec(mask: np.ndarray, iou: float = 0.9, bbox: bool = True) -> dict:
    r = {"segmentation": mask, "area": int(mask.sum()), "predicted_iou": iou}
    if bbox and mask.any():
        ys, xs = np.nonzero(mask)
        r["bbox"] = [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    return r


def box(shape, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


SHAPE = (20, 30)


def test_small_on_top_of_large_by_area():
    big = box(SHAPE, 0, 20, 0, 20)
    small = box(SHAPE, 5, 10, 5, 10)
    # the big mask comes first (higher score) but the small one stays visible on top
    lab = masks_to_labels([rec(big, 0.99), rec(small, 0.5)], SHAPE)
    assert lab.dtype == np.uint16 and lab.shape == SHAPE
    assert (lab[5:10, 5:10] == 2).all()
    assert (lab[big & ~small] == 1).all()
    assert (lab[:, 20:] == 0).all()
    # by score, the better mask covers the other: the small one vanishes entirely
    lab = masks_to_labels([rec(big, 0.99), rec(small, 0.5)], SHAPE, order="score")
    assert set(np.unique(lab)) == {0, 1} and (lab[big] == 1).all()
    lab = masks_to_labels([rec(small, 0.5), rec(big, 0.4)], SHAPE, order="score")
    assert (lab[5:10, 5:10] == 1).all() and (lab[big & ~small] == 2).all()


def test_equal_area_ties():
    a = box(SHAPE, 0, 10, 0, 10)
    b = box(SHAPE, 5, 15, 5, 15)
    # equal areas: the higher predicted IoU is on top, whatever the record order
    for recs, top in (([rec(a, 0.7), rec(b, 0.8)], 2), ([rec(b, 0.8), rec(a, 0.7)], 1)):
        lab = masks_to_labels(recs, SHAPE)
        assert (lab[5:10, 5:10] == top).all()
    # equal area and score: the earlier record is on top (both orders)
    for order in ("area", "score"):
        lab = masks_to_labels([rec(a), rec(b)], SHAPE, order=order)
        assert (lab[5:10, 5:10] == 1).all()
        assert (lab[10:15, 10:15] == 2).all()


def test_size_filter_judges_the_visible_area():
    big = box(SHAPE, 0, 20, 0, 30)  # 600 px: a "background" mask
    a = box(SHAPE, 0, 5, 0, 5)  # 25
    b = box(SHAPE, 10, 12, 10, 12)  # 4
    c = box(SHAPE, 2, 8, 2, 8)  # 36, covered by a on 3x3 = 9 px -> 27 visible
    recs = [rec(big), rec(a), rec(b), rec(c)]
    lab = masks_to_labels(recs, SHAPE, max_size=500)
    # big is painted first (largest); a, b, c cover 4 + 27 + 25 px of it, 544 stay > 500
    assert lab.max() == 3 and (lab[0] != 0).any()
    assert (lab[big & ~(a | b | c)] == 0).all()
    lab = masks_to_labels(recs, SHAPE, min_size=5, max_size=500)
    # b dropped (area 4); ids stay consecutive in record order: a -> 1, c -> 2
    assert sorted(np.unique(lab)) == [0, 1, 2]
    assert (lab[a] == 1).all() and (lab[c & ~a] == 2).all() and (lab[b] == 0).all()
    # after painting: d covers 12 px of c, leaving 24 visible: min_size 24 keeps c, 25 drops it
    d = box(SHAPE, 0, 5, 0, 6)  # 30 px, painted after c (smaller)
    lab = masks_to_labels([rec(c), rec(d)], SHAPE, min_size=24)
    assert (lab[c & ~d] == 1).all() and (lab[d] == 2).all()
    lab = masks_to_labels([rec(c), rec(d)], SHAPE, min_size=25)
    assert (lab[d] == 1).all() and (lab[c & ~d] == 0).all() and lab.max() == 1
    # fully hidden object: removed, ids stay 1..N
    inner = box(SHAPE, 1, 3, 1, 3)
    lab = masks_to_labels([rec(inner, 0.1), rec(a, 0.9)], SHAPE, order="score")
    assert sorted(np.unique(lab)) == [0, 1] and (lab[a] == 1).all()


def test_ids_follow_record_order_and_bbox_is_optional():
    # disjoint masks of different sizes, so painting order (by area) differs from record order
    shape = (10, 50)
    sizes = [2, 5, 1, 4, 3, 6]
    masks = [box(shape, 0, s, 7 * i, 7 * i + s) for i, s in enumerate(sizes)]
    recs = [rec(m, bbox=False) for m in masks]
    for order in ("area", "score"):
        lab = masks_to_labels(recs, shape, order=order)
        for i, m in enumerate(masks):
            assert (lab[m] == i + 1).all()
        assert lab.max() == len(masks) and (lab > 0).sum() == sum(s * s for s in sizes)
        np.testing.assert_array_equal(masks_to_labels([rec(m) for m in masks], shape), lab)
    # records without "area" use the pixel count; ids stay consecutive after filtering
    no_area = [{"segmentation": m} for m in masks]
    small = masks_to_labels(no_area, shape, max_size=9)  # records 0, 2, 4 (disjoint: visible)
    assert [int(small[masks[i]].min()) for i in (0, 2, 4)] == [1, 2, 3]
    assert small.max() == 3 and (small > 0).sum() == 4 + 1 + 9
    only_big = masks_to_labels(no_area, shape, min_size=16)
    assert (only_big[masks[1]] == 1).all() and (only_big[masks[3]] == 2).all()
    assert only_big.max() == 3


def test_empty_and_dtype():
    lab = masks_to_labels([], (4, 5))
    assert lab.shape == (4, 5) and lab.dtype == np.uint16 and not lab.any()
    assert masks_to_labels([], (4, 5), dtype=np.int32).dtype == np.int32
    assert labels_dtype(65535) == np.uint16 and labels_dtype(65536) == np.uint32
    assert labels_dtype(2**32) == np.uint64
    m = box(SHAPE, 0, 2, 0, 2)
    assert masks_to_labels([rec(m)], SHAPE, dtype="uint8").dtype == np.uint8
    with pytest.raises(ValueError, match="integer"):
        masks_to_labels([rec(m)], SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="fit"):
        many = [rec(box((2, 200), 0, 2, i, i + 1)) for i in range(130)]
        masks_to_labels(many, (2, 200), dtype=np.int8)
    with pytest.raises(ValueError, match="shape"):
        masks_to_labels([rec(m)], (5, 5))
    with pytest.raises(ValueError, match="order"):
        masks_to_labels([rec(m)], SHAPE, order="size")
