"""A SAM-style stateful predictor: ``set_image`` once, then ``predict`` many prompts.

Coordinates are SAM's: (x, y) in original image pixels, boxes XYXY. Masks are returned in the
model's order (for EfficientSAM the official example sorts them by score; ``scores`` lets you).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import numpy as np
import torch

from napari_esam.core.plane.image import check_contrast_limits, to_model_rgb
from napari_esam.models.base import PromptableModel


def _image_key(rgb: np.ndarray) -> str:
    return hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest() + str(rgb.shape)


class Predictor:
    """Computes an image embedding once and decodes point/box prompts on it."""

    def __init__(self, model: PromptableModel) -> None:
        self.model = model
        #: number of times the image encoder ran (for tests and diagnostics)
        self.encoder_calls = 0
        self.reset_image()

    # ----------------------------------------------------------------- image
    def reset_image(self) -> None:
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.image_key: str | None = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the model's ``compute_dtype`` on CUDA (else a no-op)."""
        dtype = getattr(self.model, "compute_dtype", None)
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def set_image(
        self, image: Any, contrast_limits: tuple[float, float] | None = None
    ) -> None:
        """Encode ``image`` ((H, W) or (H, W, 3), any integer/float dtype; see ``to_model_rgb``).

        Setting the same pixels again does not re-run the encoder. ``contrast_limits``:
        ``(lo, hi)`` with ``lo < hi`` (``None``: the image's own, see ``to_model_rgb``).
        """
        self._set_image(image, check_contrast_limits(contrast_limits))

    def _set_image(self, image: Any, contrast_limits: tuple[float, float] | None) -> None:
        """:meth:`set_image` with limits computed by the caller (equal limits, those of a
        constant plane, give a black image)."""
        rgb = to_model_rgb(image, contrast_limits)
        key = _image_key(rgb)
        if key == self.image_key and self.features is not None:
            return
        with torch.inference_mode():
            x, input_size = self.model.preprocess(rgb)
            with self.autocast():
                features = self.model.encode(x)
        self.encoder_calls += 1
        self.set_embedding(features.float(), rgb.shape[:2], input_size)
        self.image_key = key

    def set_embedding(
        self,
        features: torch.Tensor,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        """Use a precomputed embedding (e.g. from a cache or an embedding store)."""
        if tuple(features.shape[-3:]) != (256, 64, 64):
            raise ValueError(f"expected a (1, 256, 64, 64) embedding, got {tuple(features.shape)}")
        self.features = features.reshape(1, 256, 64, 64).to(self.device)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.image_key = None

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, 256, 64, 64) embedding of the current image."""
        self._require_image()
        return self.features

    def _require_image(self) -> None:
        if self.features is None:
            raise RuntimeError("no image is set; call set_image(image) before predicting")

    # --------------------------------------------------------------- prompts
    def prepare_prompts(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate prompts for B objects → (coords (B, N, 2) float32, labels (B, N) int64).

        ``point_coords`` (B, N, 2) with ``point_labels`` (B, N) of 1/0; ``boxes`` (B, 4) XYXY.
        Points go first, then the box corners (labels 2 and 3). Rows with fewer points than
        others are padded with label -1.
        """
        self._require_image()
        h, w = self.original_size
        n_obj = None
        pts = lbl = bxs = None
        if point_coords is not None:
            pts = np.asarray(point_coords, dtype=np.float64)
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise ValueError(f"point_coords must be (N, 2) (x, y) pairs, got {pts.shape}")
            if point_labels is None:
                raise ValueError("point_labels are required with point_coords (1 = fg, 0 = bg)")
            lbl = np.asarray(point_labels)
            if lbl.shape != pts.shape[:2]:
                raise ValueError(
                    f"point_labels shape {lbl.shape} does not match point_coords {pts.shape}"
                )
            if not np.isin(lbl, (0, 1)).all():
                raise ValueError("point_labels must be 1 (foreground) or 0 (background)")
            if pts.shape[1] == 0 and boxes is None:
                raise ValueError("point_coords is empty: give at least one (x, y) point or a box")
            if not np.isfinite(pts).all():
                raise ValueError("point_coords contain NaN or infinite values")
            outside = (pts[..., 0] < 0) | (pts[..., 0] > w) | (pts[..., 1] < 0) | (pts[..., 1] > h)
            if outside.any():
                bad = pts[outside][0]
                raise ValueError(
                    f"{int(outside.sum())} prompt point(s) lie outside the {w}x{h} (WxH) image, "
                    f"e.g. (x={bad[0]:g}, y={bad[1]:g}); points are (x, y) in pixels"
                )
            n_obj = pts.shape[0]
        elif point_labels is not None:
            raise ValueError("point_labels were given without point_coords")
        if boxes is not None:
            bxs = np.asarray(boxes, dtype=np.float64)
            if bxs.ndim != 2 or bxs.shape[-1] != 4:
                raise ValueError(f"a box is (x0, y0, x1, y1), got shape {bxs.shape}")
            if not np.isfinite(bxs).all():
                raise ValueError("boxes contain NaN or infinite values")
            x0, x1 = np.minimum(bxs[:, 0], bxs[:, 2]), np.maximum(bxs[:, 0], bxs[:, 2])
            y0, y1 = np.minimum(bxs[:, 1], bxs[:, 3]), np.maximum(bxs[:, 1], bxs[:, 3])
            if ((x1 <= 0) | (x0 >= w) | (y1 <= 0) | (y0 >= h)).any():
                raise ValueError(f"a box lies entirely outside the {w}x{h} (WxH) image")
            bxs = np.stack(
                [np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], 1
            )
            if n_obj is not None and bxs.shape[0] != n_obj:
                raise ValueError(
                    f"{bxs.shape[0]} boxes but {n_obj} point sets: give one of each per object"
                )
            n_obj = bxs.shape[0]
        if not n_obj:
            raise ValueError("no prompt given: pass point_coords/point_labels and/or a box")
        coords = np.zeros((n_obj, 0, 2))
        labels = np.zeros((n_obj, 0), dtype=np.int64)
        if pts is not None:
            coords, labels = pts, lbl.astype(np.int64)
        if bxs is not None:
            corners = bxs.reshape(n_obj, 2, 2)
            coords = np.concatenate([coords, corners], axis=1)
            labels = np.concatenate([labels, np.tile([[2, 3]], (n_obj, 1))], axis=1)
        limit = self.model.max_points
        if limit is not None and coords.shape[1] > limit:
            raise ValueError(
                f"{self.model.name} takes at most {limit} prompt points per object (a box "
                f"counts as 2); got {coords.shape[1]}. Remove some points."
            )
        return coords.astype(np.float32), labels

    def prepare_mask_input(self, mask_input: Any, n_obj: int) -> torch.Tensor | None:
        """Validate a mask prompt → (B or 1, 1, 256, 256) float32 tensor (``None`` stays).

        ``mask_input``: low-res logits of a previous prediction in SAM's padded 1024-px frame,
        (256, 256), (1, 256, 256) or (B | 1, 1, 256, 256) (``docs/interactive.md#mask-input``).
        """
        if mask_input is None:
            return None
        if not getattr(self.model, "supports_mask_input", False):
            raise ValueError(
                f"{self.model.name} takes no mask input (its decoder has no mask prompt); "
                "use MobileSAM or EfficientViT-SAM, or leave the mask input out"
            )
        m = torch.as_tensor(np.asarray(mask_input, dtype=np.float32))
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None] if m.shape[0] == n_obj and n_obj > 1 else m[None]
        if m.ndim != 4 or tuple(m.shape[1:]) != (1, 256, 256) or m.shape[0] not in (1, n_obj):
            raise ValueError(
                f"mask_input must be (256, 256), (1, 256, 256) or ({n_obj} or 1, 1, 256, 256) "
                f"low-res logits, got {tuple(np.shape(mask_input))}"
            )
        if not torch.isfinite(m).all():
            raise ValueError("mask_input contains NaN or infinite values")
        return m

    def decode_torch(
        self,
        coords: torch.Tensor,
        labels: torch.Tensor,
        multimask_output: bool = True,
        mask_input: torch.Tensor | None = None,
        iou_gate: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode prepared prompts on the current embedding → (low-res logits, IoU) on device.

        ``mask_input``: from :meth:`prepare_mask_input` (``None``: no mask prompt).
        ``iou_gate``: skip the masks of rows whose IoU predictions are all at most this
        (their logits are undefined; see :meth:`PromptableModel.decode`).
        """
        self._require_image()
        extra: dict[str, Any] = {}
        if mask_input is not None:
            extra["mask_input"] = mask_input.to(self.device)
        if iou_gate is not None:
            extra["iou_gate"] = float(iou_gate)
        with torch.inference_mode(), self.autocast():
            low_res, iou = self.model.decode(
                self.features,
                coords.to(self.device),
                labels.to(self.device),
                self.original_size,
                multimask_output,
                **extra,
            )
        return low_res.float(), iou.float()

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (B, K, 256, 256) → logits at the original image size (B, K, H, W)."""
        with torch.inference_mode():
            return self.model.postprocess_masks(low_res, self.input_size, self.original_size)

    def predict_batch(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        mask_input: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Many objects on one embedding in one decoder call.

        ``point_coords`` (B, N, 2), ``point_labels`` (B, N) and/or ``boxes`` (B, 4);
        ``mask_input`` (B or 1, 1, 256, 256) low-res logits of a previous prediction (models
        with a mask prompt only, :meth:`prepare_mask_input`).
        Returns masks (B, K, H, W), scores (B, K), low-res logits (B, K, 256, 256).
        """
        coords, labels = self.prepare_prompts(point_coords, point_labels, boxes)
        low_res, iou = self.decode_torch(
            torch.from_numpy(coords), torch.from_numpy(labels), multimask_output,
            self.prepare_mask_input(mask_input, len(coords)),
        )
        logits = self.upsample(low_res)
        masks = logits if return_logits else self.model.threshold(logits)
        return masks.cpu().numpy(), iou.cpu().numpy(), low_res.cpu().numpy()

    def predict(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        mask_input: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One object from points (N, 2) + labels (N,) and/or a box (4,), SAM's signature.

        ``mask_input``: (1, 256, 256) low-res logits, e.g. the best of a previous call's
        (SAM's iterative prompting; models with a mask prompt only).
        Returns masks (K, H, W) (bool unless ``return_logits``), scores (K,), low-res logits
        (K, 256, 256); K = 3 with ``multimask_output`` else 1.
        """
        pts = None if point_coords is None else np.asarray(point_coords, dtype=np.float64)[None]
        lbl = None if point_labels is None else np.asarray(point_labels)[None]
        bx = None if box is None else np.asarray(box, dtype=np.float64).reshape(1, -1)
        if pts is not None and (pts.ndim != 3 or pts.shape[-1] != 2):
            raise ValueError(f"point_coords must be (N, 2), got {pts.shape[1:]}")
        masks, scores, low_res = self.predict_batch(
            pts, lbl, bx, multimask_output, return_logits, mask_input
        )
        return masks[0], scores[0], low_res[0]
