"""A synthetic large-ish image for the tiled CLI and cluster tests (with ``BlobModel``).

``blob_image`` is a uint16 plane of bright disks on a dim noisy background: small disks
spread at random and two large ones (wider than the tiles' overlap) centred on seams of the
256/64 grid, so both seam rules (ownership and merging of pieces) are exercised.
"""

from __future__ import annotations

import numpy as np
from skimage.draw import disk

#: the grid the tests use (small tiles keep BlobModel fast)
TILE, HALO = 256, 64
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


def blob_stack(n: int = 2, shape=(300, 400)) -> np.ndarray:
    return np.stack([blob_image(shape, seed=s, n_small=8) for s in range(n)])
