"""The linking rule's parts: the one-to-one assignment, gap bridging, valley cuts, fragments,
final ids and the parameters."""

from __future__ import annotations

import numpy as np
import pytest

from napari_esam.core.linking.assign import (
    Linker,
    LinkParams,
    assign_pairs,
    component_ids,
    fragment_joins,
    valley_cuts,
)
from napari_esam.core.linking.overlaps import plane_objects


def test_assignment_maximises_the_total_score() -> None:
    rows, cols = np.array([0, 0, 1]), np.array([0, 1, 0])
    # row 0's best is column 0 (0.6), but 0-1 and 1-0 give 0.5 + 0.5 > 0.6 + nothing
    assert assign_pairs(rows, cols, np.array([0.6, 0.5, 0.5])).tolist() == [1, 2]
    # one strong pair beats two weak ones (not the largest number of pairs)
    assert assign_pairs(rows, cols, np.array([0.9, 0.3, 0.3])).tolist() == [0]


def test_assignment_handles_separate_components_and_nothing() -> None:
    rows, cols = np.array([5, 9, 9, 7]), np.array([50, 90, 91, 70])
    assert assign_pairs(rows, cols, np.array([0.3, 0.4, 0.9, 0.2])).tolist() == [0, 2, 3]
    assert assign_pairs(np.empty(0, int), np.empty(0, int), np.empty(0)).tolist() == []


def square(plane_shape, top, left, size, value=1, plane=None) -> np.ndarray:
    plane = np.zeros(plane_shape, np.uint16) if plane is None else plane
    plane[top: top + size, left: left + size] = value
    return plane


def link(planes: list[np.ndarray], **kw) -> np.ndarray:
    linker = Linker(LinkParams(**kw))
    for z, p in enumerate(planes):
        linker.add_plane(0, z, plane_objects(p))
    return linker.finish()


def test_gap_bridging_links_across_a_missing_slice() -> None:
    full = square((20, 20), 5, 5, 8)
    empty = np.zeros((20, 20), np.uint16)
    assert link([full, empty, full], gap=1).tolist() == [1, 1]
    assert link([full, empty, full], gap=0).tolist() == [1, 2]
    assert link([full, empty, empty, full], gap=1).tolist() == [1, 2]
    assert link([full, empty, empty, full], gap=2).tolist() == [1, 1]


def test_one_to_one_links_where_greedy_merges() -> None:
    # slice 0: one wide object; slice 1: the same object shrunk and a new neighbour that
    # overlaps it too. Both have IoU >= 0.25 with it; only the better one continues it.
    a = square((20, 30), 2, 2, 12)
    b = square((20, 30), 2, 2, 10, value=4)
    b[2:14, 12:20] = 9  # its IoU with the wide object: 24 / (144 + 96 - 24) = 0.11
    ids = link([a, b])
    assert ids.tolist() == [1, 1, 2]


def test_track_mode_follows_a_fast_object() -> None:
    # a 6x6 square moving 4 px per frame: IoU 0.2 between frames, 1 after the motion shift
    planes = [square((20, 60), 7, 2 + 4 * t, 6) for t in range(8)]
    assert np.unique(link(planes, mode="track")).tolist() == [1]
    assert len(np.unique(link(planes, mode="3d"))) == 8  # no motion model: no links


def test_valley_cuts_split_two_stacked_objects_between_them() -> None:
    area = np.array([40, 90, 100, 70, 30, 35, 80, 100, 60], float)  # two bumps
    n = len(area)
    pred = np.arange(-1, n - 1)
    succ = np.r_[np.arange(1, n), -1]
    assert valley_cuts(pred, succ, area, 0.8) == [(4, 5)]
    one_bump = np.array([40, 90, 100, 95, 100, 70, 30], float)
    m = len(one_bump)
    assert valley_cuts(np.arange(-1, m - 1), np.r_[np.arange(1, m), -1], one_bump, 0.8) == []


def test_fragments_join_the_neighbour_covering_them() -> None:
    # node 0 -> 1 is a chain; node 2 is alone, 80 % covered by node 1 (next slice); node 3 is
    # alone and covered by nothing
    pred, succ = np.array([-1, 0, -1, -1]), np.array([1, -1, -1, -1])
    area = np.array([100, 100, 10, 10])
    up = np.array([-1, 0, -1, -1])
    up_px = np.array([0, 90, 0, 0])
    down = np.array([1, -1, 1, -1])
    down_px = np.array([90, 0, 8, 0])
    frag, target = fragment_joins(pred, succ, area, up, up_px, down, down_px)
    assert frag.tolist() == [2] and target.tolist() == [1]


def test_component_ids_follow_first_appearance() -> None:
    # links 3-0 and 4-1: components {0, 3}, {1, 4}, {2}
    assert component_ids(5, np.array([3, 4]), np.array([0, 1])).tolist() == [1, 2, 3, 1, 2]


@pytest.mark.parametrize(("kw", "message"), [
    ({"mode": "4d"}, "mode"),
    ({"iou_threshold": 0.0}, "iou_threshold"),
    ({"iou_threshold": float("nan")}, "iou_threshold"),
    ({"gap": -1}, "gap"),
    ({"gap": 1.5}, "gap"),
    ({"max_step": -1.0}, "max_step"),
    ({"split_ratio": 1.0}, "split_ratio"),
])
def test_bad_parameters_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinkParams(**kw).validate()
