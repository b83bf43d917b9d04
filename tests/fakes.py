"""A tiny deterministic stand-in for the models, for fast tests of geometry and plumbing.

Masks are disks of radius ``RADIUS`` original pixels around positive points (or filled boxes),
minus disks around negative points, so tests can check *where* an object lands. The three
multimask candidates have radii 0.5, 1 and 1.5 × RADIUS with scores 0.5, 0.9, 0.7.
Pipeline geometry (longest-side resize to 1024, pad, 256 low-res frame) follows MobileSAM.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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

    def decode(self, embedding, coords, labels, original_size, multimask_output=True):
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
