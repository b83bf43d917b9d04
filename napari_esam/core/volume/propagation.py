"""Segment an object through a stack from prompts on one or a few of its slices.

The rule (``docs/rules/propagation.md``):

1. **Seeds.** Each prompted slice is decoded from its own prompts; a seed holds one mask per
   object (several objects are propagated together, matched by order across seed slices).
2. **Prompts from the previous slice.** A slice is prompted, per object, from the last
   accepted mask of its neighbour: the mask's bounding box, one positive point at the mask's
   interior maximum (distance transform; ties: the first in row-major order) and, where the
   model takes one, the previous best low-res logits as a mask prompt. All objects still
   running are decoded in one batched call per slice; each keeps its best-scoring candidate.
3. **Between two seeds** the gap is filled from both ends: the lower half (rounded up) from
   the lower seed upwards, the rest from the upper seed downwards; no stop rule applies there.
4. **Outwards** from the first and the last seed, slice by slice, an object **stops** when
   its mask on a slice is empty or scores below ``min_score`` for ``patience`` consecutive
   slices (a miss keeps prompting from the last accepted mask, so ``patience=2`` bridges a
   one-slice gap), or when it no longer **overlaps** the last accepted mask: the overlap is
   the IoU, except for a mask smaller than the last one (the object tapering towards its
   end), where it is the fraction of the new mask inside the last one; below
   ``iou_threshold`` the mask has jumped to another object or leaked out of this one. The
   slice that stops an object is not kept. ``start`` / ``stop`` bound the slices considered
   (inclusive). (A plain IoU rule cuts the tapering ends of anisotropic nuclei: in
   stardist's 3-D example 55 of 315 true slice-to-slice IoUs are below 0.5, while every
   overlap by this rule is above it.) **Taper:** once an object's area has fallen below
   ``taper`` × its largest area so far (seeds, gaps, then the runs downwards and upwards, in
   this order), a mask more than 10 % larger than the last
   accepted one ends it: a tapering object that grows again has met the next object stacked
   on it (in stardist's example, nuclei touch end to end in z).

The model is reached through a callback (:data:`SliceDecoder`), so the rule is tested with
stand-in models and works on one-tile planes and tiled planes alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_esam.core.tiling.grid import Window
from napari_esam.core.tiling.predictor import MaskPrompt

__all__ = [
    "PropagationParams",
    "SliceMask",
    "SlicePrompt",
    "SliceDecoder",
    "mask_iou",
    "overlap",
    "prompt_from_mask",
    "iter_propagate",
    "propagate",
]


#: the taper rule's growth tolerance: a mask more than this times the last area "grows"
_GROWTH = 1.1


@dataclass(frozen=True)
class PropagationParams:
    """Stop rule and range of :func:`propagate` (module doc).

    Args:
        iou_threshold: stop an object when its :func:`overlap` with the last accepted mask
            is below this.
        min_score: a mask scoring below this (predicted IoU) counts as missing.
        patience: stop after this many consecutive missing slices (>= 1).
        taper: the taper rule's fraction of the largest area (``None``: no taper rule).
        start, stop: first and last slice index considered (``None``: the stack's ends).
        mask_input: prompt with the previous low-res logits (models with a mask prompt).
    """

    iou_threshold: float = 0.5
    min_score: float = 0.5
    patience: int = 1
    taper: float | None = 0.5
    start: int | None = None
    stop: int | None = None
    mask_input: bool = True

    def validate(self, n_slices: int) -> None:
        """Raise ``ValueError`` for values out of range."""
        for name in ("iou_threshold", "min_score"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.taper is not None and not (math.isfinite(self.taper) and 0 < self.taper < 1):
            raise ValueError(f"taper must be in (0, 1) or None, got {self.taper}")
        if int(self.patience) < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        lo, hi = self.bounds(n_slices)
        if lo > hi:
            raise ValueError(f"the slice range {lo}..{hi} is empty (stack of {n_slices})")

    def bounds(self, n_slices: int) -> tuple[int, int]:
        """(first, last) slice considered."""
        lo = 0 if self.start is None else max(0, int(self.start))
        hi = n_slices - 1 if self.stop is None else min(n_slices - 1, int(self.stop))
        return lo, hi


@dataclass
class SliceMask:
    """One object's mask on one slice: ``mask`` (h, w) bool covering plane region ``window``,
    its predicted IoU ``score`` and its best low-res logits (a :class:`MaskPrompt`)."""

    window: Window
    mask: np.ndarray
    score: float
    logits: MaskPrompt | None = None

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


@dataclass(frozen=True)
class SlicePrompt:
    """The prompt of one object on one slice: points (N, 2) (x, y) with labels (N,), a box
    (x0, y0, x1, y1) or ``None``, and a mask prompt or ``None``."""

    coords: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    mask_prompt: MaskPrompt | None = None


#: decodes the given objects' prompts on slice ``index`` → one :class:`SliceMask` each
SliceDecoder = Callable[[int, Sequence[SlicePrompt]], list[SliceMask]]


def mask_iou(a: SliceMask, b: SliceMask) -> float:
    """IoU of two windowed masks (0 when both are empty)."""
    frame = a.window.union(b.window)
    fa = np.zeros(frame.shape, dtype=bool)
    fb = np.zeros(frame.shape, dtype=bool)
    fa[a.window.relative_to(frame)] = a.mask
    fb[b.window.relative_to(frame)] = b.mask
    union = np.count_nonzero(fa | fb)
    return 0.0 if union == 0 else np.count_nonzero(fa & fb) / union


def overlap(new: SliceMask, last: SliceMask) -> float:
    """The stop rule's overlap of a slice's mask with the last accepted one: the IoU, or for
    a smaller mask the fraction of it inside the last one (module doc, rule 4)."""
    n_new, n_last = np.count_nonzero(new.mask), np.count_nonzero(last.mask)
    if n_new >= n_last:
        return mask_iou(new, last)
    frame = new.window.union(last.window)
    fa = np.zeros(frame.shape, dtype=bool)
    fb = np.zeros(frame.shape, dtype=bool)
    fa[new.window.relative_to(frame)] = new.mask
    fb[last.window.relative_to(frame)] = last.mask
    return np.count_nonzero(fa & fb) / max(1, n_new)


def prompt_from_mask(prev: SliceMask, mask_input: bool = True) -> SlicePrompt:
    """The next slice's prompt from an accepted mask (module doc, rule 2)."""
    rows, cols = np.nonzero(prev.mask)
    if not len(rows):
        raise ValueError("cannot prompt from an empty mask")
    y0, x0 = prev.window.y0, prev.window.x0
    box = np.array(
        [x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1], float
    )
    dist = ndimage.distance_transform_edt(np.pad(prev.mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    point = np.array([[x0 + c + 0.5, y0 + r + 0.5]])
    logits = prev.logits if mask_input else None
    return SlicePrompt(point, np.array([1]), box, logits)


def propagate(
    decode: SliceDecoder,
    seeds: dict[int, list[SliceMask]],
    n_slices: int,
    params: PropagationParams = PropagationParams(),
    *,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict[int, list[SliceMask | None]]:
    """Propagate the seeds' objects through slices ``0..n_slices-1`` (module doc).

    Args:
        decode: decodes prompts on a slice (:data:`SliceDecoder`).
        seeds: per prompted slice, one mask per object (the same number on every seed).
        n_slices: the stack's length along the propagation axis.
        params: stop rule and range.
        progress: ``progress(done, total)`` after each decoded slice.
        cancel: polled between slices; when it returns True, :class:`InterruptedError`.

    Returns:
        per slice with at least one object, one mask per object (``None`` where the object
        is absent); seeds included.
    """
    steps = iter_propagate(decode, seeds, n_slices, params, cancel=cancel)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def iter_propagate(
    decode: SliceDecoder,
    seeds: dict[int, list[SliceMask]],
    n_slices: int,
    params: PropagationParams = PropagationParams(),
    *,
    cancel: Callable[[], bool] | None = None,
) -> Generator[tuple[int, int], None, dict[int, list[SliceMask | None]]]:
    """:func:`propagate` as a generator yielding ``(done, total)`` after each decoded slice
    and returning the result (for progress reporting from a worker)."""
    params.validate(n_slices)
    if not seeds:
        raise ValueError("no seed: prompt the object on at least one slice")
    counts = {len(v) for v in seeds.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(
            "every prompted slice must hold the same number of objects (matched in order), "
            f"got {sorted(len(v) for v in seeds.values())}"
        )
    n_obj = counts.pop()
    lo, hi = params.bounds(n_slices)
    order = sorted(i for i in seeds if lo <= i <= hi)
    if not order:
        raise ValueError(f"no prompted slice lies in the range {lo}..{hi}")
    out: dict[int, list[SliceMask | None]] = {i: list(seeds[i]) for i in order}
    # (from seed, first slice, last slice, step, stop rule); empty when first is past last
    runs: list[tuple[int, int, int, int, bool]] = []
    for a, b in zip(order, order[1:], strict=False):
        half = (b - a) // 2  # of the b - a - 1 slices between, the lower half rounded up
        runs += [(a, a + 1, a + half, 1, False), (b, b - 1, a + half + 1, -1, False)]
    runs += [(order[0], order[0] - 1, lo, -1, True), (order[-1], order[-1] + 1, hi, 1, True)]
    runs = [r for r in runs if (r[2] - r[1]) * r[3] >= 0]
    total = sum(abs(last - first) + 1 for _, first, last, _, _ in runs)
    done = 0
    peak = [0] * n_obj  # each object's largest area so far (all runs; the taper rule)
    for seed, first, last, step, stop_rule in runs:
        accepted: list[SliceMask | None] = [
            None if m is None or m.empty else m for m in out[seed]
        ]
        misses = [0] * n_obj
        area = [0 if m is None else int(np.count_nonzero(m.mask)) for m in accepted]
        peak = [max(p, a) for p, a in zip(peak, area, strict=True)]
        for index in range(first, last + step, step):
            if cancel is not None and cancel():
                raise InterruptedError("propagation cancelled")
            live = [b for b in range(n_obj) if accepted[b] is not None]
            if not live:
                done += abs(last - index) + 1
                break
            prompts = [prompt_from_mask(accepted[b], params.mask_input) for b in live]
            got = decode(index, prompts)
            row: list[SliceMask | None] = out.setdefault(index, [None] * n_obj)
            for b, m in zip(live, got, strict=True):
                if not stop_rule:
                    if not m.empty:
                        row[b] = accepted[b] = m
                        peak[b] = max(peak[b], int(np.count_nonzero(m.mask)))
                    continue
                if m.empty or m.score < params.min_score:
                    misses[b] += 1
                    if misses[b] >= params.patience:
                        accepted[b] = None
                    continue
                if overlap(m, accepted[b]) < params.iou_threshold:
                    accepted[b] = None
                    continue
                n = int(np.count_nonzero(m.mask))
                tapered = params.taper is not None and area[b] < params.taper * peak[b]
                if tapered and n > _GROWTH * area[b]:
                    accepted[b] = None
                    continue
                row[b] = m
                accepted[b] = m
                misses[b] = 0
                area[b], peak[b] = n, max(peak[b], n)
            done += 1
            yield done, total
    return {i: row for i, row in sorted(out.items()) if any(m is not None for m in row)}
