"""Fast, image-aware stand-ins for the batch tests: a blob "model" and synthetic cell stacks.

:class:`BlobModel` segments bright blobs: a positive point inside a bright connected region
of the image returns that region (all three candidates, IoU 0.95 / 0.5 / 0.5, logits ±10 so
stability is 1); a point on the background returns an empty mask with IoU 0.1 (filtered by
``pred_iou_thresh``). Resolution is the 64x64 embedding grid, i.e. one original pixel for a
64x64 image. So segment-everything finds one object per blob, and the count per slice
follows the image: the batch tests check real per-slice results, not a constant.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from tests.fakes import FakeModel


class BlobModel(FakeModel):
    name = "blob"

    def decode(self, embedding, coords, labels, original_size, multimask_output=True):
        h, w = original_size
        img = embedding[0, 0].detach().cpu().numpy()  # (64, 64) mean intensity, 0..255
        comp, _ = ndimage.label(img > 100)
        s = 1024 / max(h, w) / 16  # original px -> 64 grid
        pts = coords[:, 0, :].detach().cpu().numpy() * s
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
