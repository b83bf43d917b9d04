"""The inference fast path of the EfficientViT encoder (BatchNorm folded into the convolution,
in-place GELU and residual adds without autograd) against the plain path (autograd on).

Small layers with random weights; the conformance tests check the whole encoders.
"""

from __future__ import annotations

import pytest
import torch

from napari_esam.models.efficientvit import (
    L_TYPES,
    BackboneConfig,
    ConvLayer,
    EfficientViTBlock,
    EfficientViTSamImageEncoder,
    EncoderConfig,
    FusedMBConv,
    ResidualBlock,
    UpSample,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and running statistics (running_var in 0.5..1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.rand(t.shape, generator=g)
            t.copy_(0.5 + r if name.endswith("running_var") else r - 0.5)
    return module.eval()


def _both(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain path with autograd, fast path under inference_mode)."""
    plain = module(x).detach()
    with torch.inference_mode():
        fast = module(x)
    return plain, fast


def test_folded_conv_matches_conv_then_batchnorm():
    layer = _randomise(ConvLayer(8, 16, 3, stride=2))
    x = torch.randn(2, 8, 9, 11)
    plain, fast = _both(layer, x)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    # the folded weights are a cache outside the state dict: the keys stay the official ones
    assert set(layer.state_dict()) == {
        "conv.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
        "norm.num_batches_tracked",
    }


@pytest.mark.parametrize("change", ["load_state_dict", "in_place", "double"])
def test_folded_conv_follows_changed_weights(change):
    layer = _randomise(ConvLayer(4, 6, 1, act=False))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        before = layer(x)
    if change == "load_state_dict":
        layer.load_state_dict(_randomise(ConvLayer(4, 6, 1, act=False), seed=1).state_dict())
    elif change == "in_place":
        with torch.no_grad():
            layer.norm.running_var.mul_(4)
    else:
        layer.double()
        x = x.double()
    plain, fast = _both(layer, x)
    assert fast.dtype == x.dtype
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    if change != "double":
        assert not torch.allclose(fast, before.to(fast.dtype), atol=1e-3)


def test_training_mode_without_autograd_still_uses_batch_statistics():
    layer = _randomise(ConvLayer(4, 6, 3)).train()
    x = torch.randn(2, 4, 7, 7)
    mean_before = layer.norm.running_mean.clone()
    with torch.no_grad():
        out = layer(x)
    assert not torch.equal(layer.norm.running_mean, mean_before)  # statistics were updated
    conv = layer.conv(x)
    expected = torch.nn.functional.gelu(
        (conv - conv.mean((0, 2, 3), keepdim=True))
        / torch.sqrt(conv.var((0, 2, 3), unbiased=False, keepdim=True) + layer.norm.eps)
        * layer.norm.weight[:, None, None] + layer.norm.bias[:, None, None],
        approximate="tanh",
    )
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ResidualBlock(FusedMBConv(16, 16, 1, 2)),
        lambda: ResidualBlock(FusedMBConv(16, 32, 2, 4), shortcut=False),
        lambda: EfficientViTBlock(64, 3, 2),
    ],
    ids=["residual", "no_shortcut", "attention_block"],
)
def test_fast_path_leaves_its_input_alone_and_matches(make):
    block = _randomise(make())
    x = torch.randn(1, block_channels(block), 8, 8)
    x_copy = x.clone()
    plain, fast = _both(block, x)
    assert torch.equal(x, x_copy)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def block_channels(block: torch.nn.Module) -> int:
    """Input channels of a block: those of its first convolution."""
    return next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def test_upsample_to_its_own_size_is_the_bicubic_identity():
    x = torch.randn(1, 3, 16, 16)
    out = UpSample((16, 16))(x)
    ref = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(out, ref)
    assert UpSample((32, 32))(x).shape == (1, 3, 32, 32)


def test_small_encoder_fast_path_matches_and_returns_nchw():
    """Channels-last inside on the CPU, a plain NCHW embedding outside."""
    backbone = BackboneConfig((8, 16, 32, 64, 64), (1, 1, 1, 1, 1), L_TYPES, (1, 2, 2, 2, 2), 3)
    encoder = _randomise(EfficientViTSamImageEncoder(EncoderConfig(backbone, 64, 1, 1)))
    x = torch.randn(1, 3, 64, 64)
    plain, fast = _both(encoder, x)
    assert fast.shape == (1, 256, 64, 64)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
