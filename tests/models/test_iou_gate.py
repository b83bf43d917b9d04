"""The decoders' IoU gate (segment-everything's skip): rows with no IoU prediction above the
gate are not upscaled; every other row, and every IoU prediction, is as without the gate."""

from __future__ import annotations

import pytest
import torch

from napari_esam.models import efficientsam_decoder, sam_decoder


def _inputs(seed: int, rows: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(1, 256, 64, 64, generator=g)
    pe = torch.randn(1, 256, 64, 64, generator=g)
    sparse = torch.randn(rows, 2, 256, generator=g)
    return embedding, pe, sparse


def _decoders() -> dict[str, tuple[torch.nn.Module, object]]:
    torch.manual_seed(0)
    sam = sam_decoder.MaskDecoder(transformer_dim=256).eval()
    esam = efficientsam_decoder.MaskDecoder(256).eval()
    no_mask = torch.randn(1, 256, 1, 1)
    return {
        "sam": (sam, lambda d, e, p, s, m, gate: d(e, p, s, no_mask, m, gate)),
        "efficientsam": (esam, lambda d, e, p, s, m, gate: d(e, p, s, m, gate)),
    }


@pytest.mark.parametrize("kind", ["sam", "efficientsam"])
@pytest.mark.parametrize("multimask", [True, False])
def test_gate_skips_only_rows_that_cannot_pass(kind: str, multimask: bool) -> None:
    decoder, call = _decoders()[kind]
    embedding, pe, sparse = _inputs(1, 11)  # 11 rows: chunks of 4 (SAM) end in a part chunk
    with torch.inference_mode():
        masks, iou = call(decoder, embedding, pe, sparse, multimask, None)
        best = iou.max(dim=1).values
        gate = float(best.median())  # about half of the rows fall at or below it
        gated_masks, gated_iou = call(decoder, embedding, pe, sparse, multimask, gate)
    live = best > gate
    assert 0 < int(live.sum()) < len(live)
    torch.testing.assert_close(gated_iou, iou, rtol=0, atol=0)
    assert torch.isnan(gated_masks[~live]).all()
    assert not torch.isnan(gated_masks[live]).any()
    torch.testing.assert_close(gated_masks[live], masks[live], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["sam", "efficientsam"])
def test_gate_above_every_prediction_computes_no_mask(kind: str) -> None:
    decoder, call = _decoders()[kind]
    embedding, pe, sparse = _inputs(2, 5)
    with torch.inference_mode():
        _, iou = call(decoder, embedding, pe, sparse, True, None)
        masks, gated_iou = call(decoder, embedding, pe, sparse, True, float(iou.max()))
    torch.testing.assert_close(gated_iou, iou, rtol=0, atol=0)
    assert torch.isnan(masks).all()
