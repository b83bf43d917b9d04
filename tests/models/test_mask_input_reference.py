"""Mask input (SAM's mask prompt) against the reference decoder of ``segment-anything==1.0``.

MobileSAM's prompt encoder and mask decoder are SAM's; EfficientViT-SAM's are SAM's with
every norm at eps 1e-6 (``../shared/conformance/README.md``), so the reference decoder with
its norms set to that eps is the EfficientViT-SAM reference. Same synthetic weights, the same
random image embedding, points and mask input: the low-res logits and IoU predictions must
agree to float tolerance. The reference package imports torchvision at import time, which is
not installed here: a stand-in module is put in its place for these tests (the decoder does
not use it). Without ``segment_anything`` the tests skip, saying so.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from napari_esam.models.registry import create_model
from napari_esam.models.synthetic import synthetic_state_dict


@pytest.fixture(scope="module")
def reference():
    """``segment_anything.modeling`` (a torchvision stand-in only where it is absent)."""
    saved = {k: v for k, v in sys.modules.items() if k.startswith("torchvision")}
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        ops, boxes = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.boxes")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")

        def unused(*args, **kwargs):
            raise RuntimeError("torchvision stand-in: not used by the decoder")

        boxes.batched_nms = boxes.box_area = unused
        fn.resize = fn.to_pil_image = unused
        tv.ops, ops.boxes, tv.transforms, tr.functional = ops, boxes, tr, fn
        for mod in (tv, ops, boxes, tr, fn):
            sys.modules[mod.__name__] = mod
    try:
        modeling = pytest.importorskip(
            "segment_anything.modeling",
            reason="segment-anything==1.0 (the reference decoder) is not installed",
        )
        yield modeling
    finally:
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _pair(reference, name: str, eps: float | None):
    ours = create_model(name)
    sd = {k: torch.from_numpy(v) for k, v in synthetic_state_dict(name).items()}
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    pe = reference.PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
        mask_in_chans=16,
    )
    md = reference.MaskDecoder(
        num_multimask_outputs=3,
        transformer=reference.TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    for prefix, module in (("prompt_encoder.", pe), ("mask_decoder.", md)):
        module.load_state_dict(
            {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True
        )
        module.eval()
        if eps is not None:  # EfficientViT-SAM: every norm at eps 1e-6
            for m in module.modules():
                if hasattr(m, "eps") and isinstance(m.eps, float):
                    m.eps = eps
    return ours, pe, md


@pytest.mark.parametrize(
    ("name", "eps"), [("mobilesam", None), ("efficientvit_sam_l0", 1e-6)]
)
@pytest.mark.parametrize("with_box", [False, True])
def test_mask_input_matches_the_reference_decoder(reference, name, eps, with_box):
    ours, pe, md = _pair(reference, name, eps)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    coords = torch.tensor([[[300.0, 420.0], [520.0, 610.0]]])
    labels = torch.tensor([[1, 0]])
    if with_box:
        coords = torch.cat([coords, torch.tensor([[[250.0, 380.0], [640.0, 700.0]]])], 1)
        labels = torch.cat([labels, torch.tensor([[2, 3]])], 1)
    mask = torch.randn(1, 1, 256, 256, generator=g) * 8
    with torch.no_grad():
        low, iou = ours.decode(emb, coords, labels, (1024, 1024), True, mask_input=mask)
        pts = (coords, labels) if not with_box else (coords[:, :2], labels[:, :2])
        box = coords[:, 2:].reshape(1, 4) if with_box else None
        sparse, dense = pe(points=pts, boxes=box, masks=mask)
        ref_low, ref_iou = md(emb, pe.get_dense_pe(), sparse, dense, multimask_output=True)
        no_mask, _ = ours.decode(emb, coords, labels, (1024, 1024), True)
    assert (low - ref_low).abs().max().item() < 1e-4
    assert (iou - ref_iou).abs().max().item() < 1e-4
    # the mask prompt changes the output (the comparison is not of the no-mask path)
    assert (low - no_mask).abs().max().item() > 1e-2
