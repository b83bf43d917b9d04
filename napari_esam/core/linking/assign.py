"""The linking rule (``docs/rules/linking.md``): which object of one slice continues which
object of an earlier slice, and the final ids.

:class:`Linker` is fed the planes of a stack in order, one at a time, and links each new plane
to the ``gap + 1`` planes before it while it comes in (it keeps only those planes); what it
keeps for the whole stack is a small table per object (a *node*: slice, area, centroid,
predecessor). :meth:`Linker.finish` then splits 3-D chains at area valleys and numbers the
chains 1..n in order of first appearance.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from napari_esam.core.linking.overlaps import PlaneObjects, overlaps, shifted_overlaps

__all__ = [
    "MODES",
    "LinkParams",
    "Linker",
    "NodeTable",
    "assign_pairs",
    "component_ids",
    "fragment_joins",
    "valley_cuts",
]

MODES = ("3d", "track")
#: IoU from which two objects of neighbouring slices may be one object (both modes)
IOU_THRESHOLD = 0.25
#: track mode: largest distance, in equivalent radii of the earlier object, between its
#: predicted centroid and a later object's centroid for the distance fallback
MAX_STEP = 1.5
#: track mode: the distance fallback pairs objects whose areas differ by at most this factor
AREA_FACTOR = 2.0
#: 3-D mode: a chain is cut where its area falls to at most this fraction of the smaller of
#: the peaks on both sides (see ``valley_cuts``)
SPLIT_RATIO = 0.8
#: a node linked to nothing joins a neighbour covering at least this fraction of it
FRAGMENT_COVER = 0.5
_EPS = 1e-9


@dataclass(frozen=True)
class LinkParams:
    """Parameters of the linking rule.

    Args:
        mode: ``"3d"`` (one id per object through z) or ``"track"`` (one id per track in time:
            motion-compensated overlaps and a distance fallback).
        iou_threshold: smallest IoU of a link (in track mode: after the motion shift).
        gap: bridge up to this many consecutive slices where an object is missing (0: none).
        max_step: track mode, distance fallback gate in equivalent radii (0: no fallback).
        split_ratio: 3-D mode, area-valley depth at which chains are cut (None: never).
    """

    mode: str = "3d"
    iou_threshold: float = IOU_THRESHOLD
    gap: int = 1
    max_step: float = MAX_STEP
    split_ratio: float | None = SPLIT_RATIO

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (math.isfinite(self.iou_threshold) and 0.0 < self.iou_threshold <= 1.0):
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if isinstance(self.gap, bool) or not isinstance(self.gap, (int, np.integer)) \
                or self.gap < 0:
            raise ValueError(f"gap must be a non-negative integer, got {self.gap!r}")
        if not (math.isfinite(self.max_step) and self.max_step >= 0.0):
            raise ValueError(f"max_step must be a non-negative number, got {self.max_step}")
        if self.split_ratio is not None and not (
                math.isfinite(self.split_ratio) and 0.0 < self.split_ratio < 1.0):
            raise ValueError(f"split_ratio must be in (0, 1) or None, got {self.split_ratio}")


class NodeTable:
    """Growable per-object columns: one row (*node*) per object of every plane, in the order
    planes were added (stack, then slice) and, within a plane, order of first appearance."""

    FIELDS = {"stack": np.int64, "slice": np.int64, "area": np.int64, "cy": np.float64,
              "cx": np.float64, "pred": np.int64, "succ": np.int64,
              "vy": np.float64, "vx": np.float64, "up": np.int64, "up_px": np.int64,
              "down": np.int64, "down_px": np.int64}

    def __init__(self, capacity: int = 1024) -> None:
        self.size = 0
        self.cols = {k: np.empty(capacity, t) for k, t in self.FIELDS.items()}

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name: str) -> np.ndarray:
        cols = self.__dict__.get("cols")
        if cols is None or name not in cols:
            raise AttributeError(name)
        return cols[name][: self.size]

    def append(self, stack: int, slice_: int, objs: PlaneObjects) -> int:
        """Add the objects of one plane; returns the node index of its first object."""
        k, start = len(objs), self.size
        if start + k > len(self.cols["stack"]):
            cap = max(2 * len(self.cols["stack"]), start + k)
            for name, col in self.cols.items():
                grown = np.empty(cap, col.dtype)
                grown[:start] = col[:start]
                self.cols[name] = grown
        rows = slice(start, start + k)
        c = self.cols
        c["stack"][rows], c["slice"][rows], c["area"][rows] = stack, slice_, objs.area
        c["cy"][rows], c["cx"][rows] = objs.centroid[:, 0], objs.centroid[:, 1]
        c["pred"][rows] = c["succ"][rows] = -1
        c["vy"][rows] = c["vx"][rows] = 0.0
        c["up"][rows] = c["down"][rows] = -1
        c["up_px"][rows] = c["down_px"][rows] = 0
        self.size += k
        return start


def assign_pairs(rows: np.ndarray, cols: np.ndarray, score: np.ndarray) -> np.ndarray:
    """One-to-one pairs with the largest total score, one component of the pair graph at a
    time.

    Args:
        rows, cols: (E,) candidate pairs (any integer ids; a row id and a column id never
            refer to the same thing).
        score: (E,) positive score of each candidate.

    Returns:
        Indices into the candidates of the chosen pairs, ascending. Each connected component
        of the candidate graph with more than one candidate is solved exactly by
        ``scipy.optimize.linear_sum_assignment`` on its dense score matrix (rows and columns
        in ascending id order, 0 for non-candidates, which are never chosen); ties are
        resolved as that solver resolves them (deterministic).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(rows)
    if n == 0:
        return np.empty(0, np.int64)
    r_ids, r = np.unique(rows, return_inverse=True)
    c_ids, c = np.unique(cols, return_inverse=True)
    nr = len(r_ids)
    graph = coo_matrix((np.ones(n), (r, c + nr)), shape=(nr + len(c_ids),) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[r]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    chosen = []
    for group in np.split(order, bounds):
        if len(group) == 1:
            chosen.append(group)
            continue
        gr_ids, gr = np.unique(r[group], return_inverse=True)
        gc_ids, gc = np.unique(c[group], return_inverse=True)
        table = np.zeros((len(gr_ids), len(gc_ids)))
        table[gr, gc] = score[group]
        edge = np.full(table.shape, -1, np.int64)
        edge[gr, gc] = group
        ri, ci = linear_sum_assignment(table, maximize=True)
        picked = edge[ri, ci]
        chosen.append(picked[picked >= 0])
    return np.sort(np.concatenate(chosen))


def _larger(*pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge lists of (i, j, count) given as consecutive triples: the largest count per pair."""
    i = np.concatenate(pairs[0::3])
    j = np.concatenate(pairs[1::3])
    c = np.concatenate(pairs[2::3])
    order = np.lexsort((-c, j, i))
    i, j, c = i[order], j[order], c[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], c[first]


@dataclass
class _Plane:
    slice: int
    objs: PlaneObjects
    start: int  # node index of its first object


class Linker:
    """Links the planes of one stack after another as they are added (module docstring).

    Args:
        params: the rule's parameters (validated here).
    """

    def __init__(self, params: LinkParams) -> None:
        params.validate()
        self.params = params
        self.nodes = NodeTable()
        self._window: deque[_Plane] = deque(maxlen=params.gap + 1)
        self._stack = -1

    def add_plane(self, stack: int, slice_: int, objs: PlaneObjects) -> int:
        """Add the objects of plane ``slice_`` of stack ``stack`` (slices ascending within a
        stack; a new stack forgets the previous planes). Returns the node index of its first
        object."""
        if stack != self._stack:
            self._window.clear()
            self._stack = stack
        start = self.nodes.append(stack, slice_, objs)
        plane = _Plane(slice_, objs, start)
        if len(objs):
            earlier = [p for p in reversed(self._window) if slice_ - p.slice <= self.params.gap + 1]
            for prev in earlier:
                self._link_by_overlap(prev, plane)
            if self.params.mode == "track" and self.params.max_step > 0:
                for prev in earlier:
                    self._link_by_distance(prev, plane)
        self._window.append(plane)
        return start

    # ------------------------------------------------------------------ the two stages

    def _free(self, prev: _Plane, plane: _Plane) -> tuple[np.ndarray, np.ndarray]:
        """Local numbers of ``prev``'s objects without a successor and ``plane``'s without a
        predecessor."""
        n = self.nodes
        a = np.flatnonzero(n.succ[prev.start: prev.start + len(prev.objs)] < 0)
        b = np.flatnonzero(n.pred[plane.start: plane.start + len(plane.objs)] < 0)
        return a, b

    def _connect(self, prev: _Plane, plane: _Plane, i: np.ndarray, j: np.ndarray) -> None:
        n, k = self.nodes, plane.slice - prev.slice
        src, dst = prev.start + i, plane.start + j
        n.cols["pred"][dst] = src
        n.cols["succ"][src] = dst
        n.cols["vy"][dst] = (n.cy[dst] - n.cy[src]) / k
        n.cols["vx"][dst] = (n.cx[dst] - n.cx[src]) / k

    def _link_by_overlap(self, prev: _Plane, plane: _Plane) -> None:
        free_a, free_b = self._free(prev, plane)
        if len(free_a) == 0 or len(free_b) == 0:
            return
        n, k = self.nodes, plane.slice - prev.slice
        i, j, inter = overlaps(prev.objs, plane.objs)
        if self.params.mode == "track":
            rows = slice(prev.start, prev.start + len(prev.objs))
            shift = np.stack([n.vy[rows], n.vx[rows]], axis=1) * k
            i, j, inter = _larger(i, j, inter, *shifted_overlaps(prev.objs, plane.objs, shift))
        if k == 1:
            self._note_neighbours(prev, plane, i, j, inter)
        ok = np.isin(i, free_a) & np.isin(j, free_b)
        i, j, inter = i[ok], j[ok], inter[ok]
        iou = inter / (prev.objs.area[i] + plane.objs.area[j] - inter)
        keep = iou >= self.params.iou_threshold
        i, j, iou = i[keep], j[keep], iou[keep]
        chosen = assign_pairs(i, j, iou)
        self._connect(prev, plane, i[chosen], j[chosen])

    def _note_neighbours(self, prev: _Plane, plane: _Plane, i: np.ndarray, j: np.ndarray,
                         inter: np.ndarray) -> None:
        """Remember each object's largest overlap in the neighbouring slices (fragments)."""
        c = self.nodes.cols
        for mine, other, me, them, field in ((j, i, plane, prev, "up"),
                                             (i, j, prev, plane, "down")):
            if len(mine) == 0:
                continue
            order = np.lexsort((other, -inter, mine))  # largest overlap first, then lowest
            first = np.r_[True, mine[order][1:] != mine[order][:-1]]
            best = order[first]
            c[field][me.start + mine[best]] = them.start + other[best]
            c[field + "_px"][me.start + mine[best]] = inter[best]

    def _link_by_distance(self, prev: _Plane, plane: _Plane) -> None:
        free_a, free_b = self._free(prev, plane)
        if len(free_a) == 0 or len(free_b) == 0:
            return
        n, k = self.nodes, plane.slice - prev.slice
        a, b = prev.start + free_a, plane.start + free_b
        dist = np.full((len(a), len(b)), np.inf)
        for moved in (0, k):  # still, or moved on as in its last step
            py = n.cy[a] + moved * n.vy[a]
            px = n.cx[a] + moved * n.vx[a]
            dist = np.minimum(dist, np.hypot(py[:, None] - n.cy[b][None, :],
                                             px[:, None] - n.cx[b][None, :]))
        radius = np.sqrt(n.area[a] / np.pi)
        ratio = n.area[a][:, None] / n.area[b][None, :]
        ok = (dist <= self.params.max_step * radius[:, None]) & \
             (ratio <= AREA_FACTOR) & (ratio >= 1.0 / AREA_FACTOR)
        ia, ib = np.nonzero(ok)
        if len(ia) == 0:
            return
        # worth max_step minus the distance in radii: a pair is made when it is nearer than
        # the gate, the nearest pairs first
        gain = self.params.max_step - dist[ia, ib] / radius[ia] + _EPS
        chosen = assign_pairs(free_a[ia], free_b[ib], gain)
        i, j = free_a[ia][chosen], free_b[ib][chosen]
        self._connect(prev, plane, i, j)

    # ------------------------------------------------------------------------ final ids

    def finish(self) -> np.ndarray:
        """Cut chains at area valleys (3-D mode), let fragments join their neighbour, and
        return each node's final id: 1..n in node order (order of first appearance)."""
        n = self.nodes
        pred, succ = n.pred.copy(), n.succ.copy()
        if self.params.mode == "3d" and self.params.split_ratio is not None:
            for a, b in valley_cuts(pred, succ, n.area, self.params.split_ratio):
                succ[a] = -1
                pred[b] = -1
        linked = np.flatnonzero(pred >= 0)
        frag, joins = fragment_joins(pred, succ, n.area, n.up, n.up_px, n.down, n.down_px)
        return component_ids(len(n), np.concatenate([pred[linked], joins]),
                             np.concatenate([linked, frag]))


def fragment_joins(pred: np.ndarray, succ: np.ndarray, area: np.ndarray, up: np.ndarray,
                   up_px: np.ndarray, down: np.ndarray, down_px: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(fragment, node it joins): a node linked to nothing joins the object of the previous
    or next slice it overlaps most (the previous one on ties) when that overlap covers at
    least :data:`FRAGMENT_COVER` of it, the other node is larger and is linked to something."""
    alone = (pred < 0) & (succ < 0)
    use_up = up_px >= down_px
    target = np.where(use_up, up, down)
    px = np.where(use_up, up_px, down_px)
    ok = alone & (target >= 0) & (px >= FRAGMENT_COVER * area)
    ok[ok] &= ~alone[target[ok]] & (area[target[ok]] > area[ok])
    frag = np.flatnonzero(ok)
    return frag, target[frag]


def component_ids(size: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ids 1..n of the connected components of ``size`` nodes joined by the links
    ``a[e]``–``b[e]``, numbered in order of each component's first node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if size == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(size, size))
    _, comp = connected_components(graph, directed=False)
    _, first = np.unique(comp, return_index=True)  # first node of each component
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(1, len(first) + 1)
    return rank[comp]


def valley_cuts(pred: np.ndarray, succ: np.ndarray, area: np.ndarray,
                ratio: float) -> list[tuple[int, int]]:
    """Links (a, b) to cut so that no chain keeps an area valley (``docs/rules/linking.md``).

    A chain is cut between its k-th and (k+1)-th node when
    ``(area_k + area_k+1) / 2 <= ratio * min(max(area_1..area_k), max(area_k+1..area_m))``,
    at the k where the ratio of the two sides is smallest (the first such k on ties); both parts
    are examined again.
    """
    cuts: list[tuple[int, int]] = []
    s, a = succ.tolist(), area.astype(np.float64)
    for head in np.flatnonzero(pred < 0).tolist():
        chain = [head]
        while s[chain[-1]] >= 0:
            chain.append(s[chain[-1]])
        if len(chain) >= 3:
            _cut_chain(np.asarray(chain), a, ratio, cuts)
    return cuts


def _cut_chain(chain: np.ndarray, area: np.ndarray, ratio: float,
               cuts: list[tuple[int, int]]) -> None:
    todo = [chain]
    while todo:
        c = todo.pop()
        if len(c) < 3:
            continue
        v = area[c]
        left = np.maximum.accumulate(v)[:-1]
        right = np.maximum.accumulate(v[::-1])[::-1][1:]
        depth = (v[:-1] + v[1:]) / 2.0 / np.minimum(left, right)
        k = int(np.argmin(depth))
        if depth[k] <= ratio:
            cuts.append((int(c[k]), int(c[k + 1])))
            todo += [c[: k + 1], c[k + 1:]]
