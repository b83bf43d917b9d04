"""One plane's objects and overlaps between planes, checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from napari_esam.core.linking.overlaps import (
    overlaps,
    plane_objects,
    relabel_plane,
    shifted_overlaps,
)


def random_plane(seed: int, big_ids: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    plane = rng.integers(0, 6, (40, 50)).astype(np.uint32) * 13
    return plane * 30_000_000 if big_ids else plane  # sorted, or a lookup table


def brute_objects(plane: np.ndarray) -> list[tuple[int, int, float, float]]:
    """(id, area, row, col) in order of first appearance in raster order."""
    seen: list[int] = []
    for v in plane.ravel().tolist():
        if v and v not in seen:
            seen.append(v)
    out = []
    for v in seen:
        rows, cols = np.nonzero(plane == v)
        out.append((v, len(rows), rows.mean(), cols.mean()))
    return out


@pytest.mark.parametrize("big_ids", [False, True])
def test_objects_are_numbered_in_order_of_first_appearance(big_ids: bool) -> None:
    plane = random_plane(0, big_ids)
    objs = plane_objects(plane)
    expected = brute_objects(plane)
    assert objs.ids.tolist() == [e[0] for e in expected]
    assert objs.area.tolist() == [e[1] for e in expected]
    np.testing.assert_allclose(objs.centroid, [e[2:] for e in expected])
    for n, v in enumerate(objs.ids):
        np.testing.assert_array_equal(objs.compact == n + 1, plane == v)


def test_bool_and_empty_planes() -> None:
    plane = np.zeros((5, 6), bool)
    assert len(plane_objects(plane)) == 0
    plane[1:3, 2:4] = True
    objs = plane_objects(plane)
    assert objs.ids.tolist() == [1] and objs.area.tolist() == [4]


@pytest.mark.parametrize(("plane", "message"), [
    (np.full((3, 3), 1.5), "integer"),
    (np.array([[0, -2], [1, 1]]), "non-negative"),
    (np.zeros((2, 3, 3), np.uint8), "2-D"),
])
def test_bad_planes_are_refused(plane: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plane_objects(plane)


def brute_overlaps(a: np.ndarray, b: np.ndarray, shift=None) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    h, w = a.shape
    oa, ob = plane_objects(a), plane_objects(b)
    for i, v in enumerate(oa.ids):
        dy, dx = (0, 0) if shift is None else np.rint(shift[i]).astype(int)
        for r, c in zip(*np.nonzero(a == v), strict=True):
            r2, c2 = r + dy, c + dx
            if 0 <= r2 < h and 0 <= c2 < w and b[r2, c2]:
                j = int(np.flatnonzero(ob.ids == b[r2, c2])[0])
                out[(i, j)] = out.get((i, j), 0) + 1
    return out


def as_dict(i, j, n) -> dict[tuple[int, int], int]:
    return {(int(a), int(b)): int(c) for a, b, c in zip(i, j, n, strict=True)}


def test_overlaps_match_brute_force() -> None:
    a, b = random_plane(1), random_plane(2, big_ids=True)
    assert as_dict(*overlaps(plane_objects(a), plane_objects(b))) == brute_overlaps(a, b)


def test_shifted_overlaps_move_each_object_by_its_own_shift() -> None:
    a, b = random_plane(3), random_plane(4)
    oa = plane_objects(a)
    shift = np.array([[2.4, -3.0], [-1.0, 0.6], [0.0, 0.0], [5.0, 5.0], [-7.0, 2.0]])[: len(oa)]
    got = as_dict(*shifted_overlaps(oa, plane_objects(b), shift))
    assert got == brute_overlaps(a, b, shift)
    # a disc moved by exactly its displacement overlaps itself completely
    yy, xx = np.mgrid[:30, :30]
    disc = ((yy - 10) ** 2 + (xx - 10) ** 2 <= 16).astype(np.uint8)
    moved = np.roll(disc, (5, 7), axis=(0, 1))
    od, om = plane_objects(disc), plane_objects(moved)
    assert as_dict(*shifted_overlaps(od, om, np.array([[5.0, 7.0]]))) == {(0, 0): od.area[0]}
    assert as_dict(*overlaps(od, om)) == {}


@pytest.mark.parametrize("big_ids", [False, True])
def test_relabel_plane(big_ids: bool) -> None:
    plane = random_plane(5, big_ids)
    objs = plane_objects(plane)
    values = np.arange(len(objs))[::-1] + 100
    out = relabel_plane(plane, objs.ids[::-1].copy(), values[::-1].copy(), np.dtype(np.uint16))
    assert out.dtype == np.uint16
    for v, new in zip(objs.ids, values, strict=True):
        assert np.all(out[plane == v] == new)
    assert np.all(out[plane == 0] == 0)


@pytest.mark.parametrize("big_ids", [False, True])
def test_relabel_plane_refuses_labels_it_was_not_given(big_ids: bool) -> None:
    plane = random_plane(6, big_ids)
    objs = plane_objects(plane)
    with pytest.raises(ValueError, match="not in ids"):
        relabel_plane(plane, objs.ids[1:], np.arange(len(objs) - 1) + 1, np.dtype(np.uint16))
