"""EfficientViT image encoder of EfficientViT-SAM: backbone (L and XL), SAM neck, output norm.

Written from the specification in ``shared/conformance/README.md`` (section 6.3). Module and
parameter names follow the official checkpoints (``backbone.stages.<s>.op_list.<i>``,
``neck.input_ops`` / ``middle`` / ``output_ops``, ``norm``) so they load with ``strict=True``.

* Every BatchNorm uses eps 1e-6; the activation is GELU with the tanh approximation.
* Convolutions use ``padding = k // 2``; biases only where the official blocks have them.
* LiteMLA (ReLU linear attention) is evaluated in float32 even under autocast: its
  normaliser is a sum over all pixels that half precision cannot hold reliably.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_esam.models.common import LayerNorm2d

#: eps of every norm in EfficientViT-SAM (the official zoo sets it on the whole model)
NORM_EPS = 1e-6


def _act() -> nn.Module:
    return nn.GELU(approximate="tanh")


def _inference() -> bool:
    """True when no autograd graph is recorded (``no_grad`` / ``inference_mode``): the
    forward passes may then work in place and use BatchNorm folded into the convolution."""
    return not torch.is_grad_enabled()


class ConvLayer(nn.Module):
    """Conv2d (``padding = k // 2``), then BatchNorm if ``norm``, then GELU if ``act``.

    In eval mode without autograd, the BatchNorm is folded into the convolution's weight and
    bias (computed in float64 once and cached outside the state dict, channels-last on the
    CPU, recomputed when a parameter or running statistic changes), and GELU works in place:
    one kernel and one new tensor instead of three.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias
        )
        self.norm = nn.BatchNorm2d(cout, eps=NORM_EPS) if norm else None
        self.act = _act() if act else None
        self._folded: tuple[tuple, Tensor, Tensor] | None = None

    def folded_conv(self) -> tuple[Tensor, Tensor]:
        """(weight, bias) of the convolution with the eval-mode BatchNorm folded in."""
        conv, bn = self.conv, self.norm
        if bn is None or bn.running_mean is None or bn.running_var is None:
            raise RuntimeError("folded_conv needs a BatchNorm with running statistics")
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple(
            (t.data_ptr(), t._version, t.dtype, t.device) for t in sources if t is not None
        ) + (bn.eps,)
        if self._folded is None or self._folded[0] != key:
            w = conv.weight
            dt = torch.float32 if w.device.type == "mps" else torch.float64
            with torch.inference_mode(False), torch.no_grad():
                scale = torch.rsqrt(bn.running_var.to(dt) + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.to(dt)
                bias = -bn.running_mean.to(dt)
                if conv.bias is not None:
                    bias = bias + conv.bias.to(dt)
                bias = bias * scale
                if bn.bias is not None:
                    bias = bias + bn.bias.to(dt)
                weight = (w.to(dt) * scale.view(-1, 1, 1, 1)).to(w.dtype)
                if w.device.type == "cpu":  # the layout of the encoder's CPU activations
                    weight = weight.contiguous(memory_format=torch.channels_last)
                self._folded = (key, weight, bias.to(w.dtype))
        return self._folded[1], self._folded[2]

    def forward(self, x: Tensor) -> Tensor:
        fast = _inference()
        norm = self.norm
        if fast and norm is not None and not norm.training and norm.running_mean is not None:
            weight, bias = self.folded_conv()
            c = self.conv
            x = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            x = self.conv(x)
            if norm is not None:
                x = norm(x)
        if self.act is not None:
            x = torch.ops.aten.gelu_(x, approximate="tanh") if fast else self.act(x)
        return x


class ResBlock(nn.Module):
    """3x3 conv + BN + act, then 3x3 conv + BN (no biases)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: float = 1) -> None:
        super().__init__()
        mid = round(cin * expand)
        self.conv1 = ConvLayer(cin, mid, 3, stride)
        self.conv2 = ConvLayer(mid, cout, 3, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(nn.Module):
    """3x3 conv (stride) + BN + act to ``round(cin * expand)``, then 1x1 conv + BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: float = 6) -> None:
        super().__init__()
        mid = round(cin * expand)
        self.spatial_conv = ConvLayer(cin, mid, 3, stride)
        self.point_conv = ConvLayer(mid, cout, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(nn.Module):
    """ "Fewer-norm" inverted bottleneck: 1x1 conv with bias + act, depthwise 3x3 (stride)
    with bias + act, 1x1 conv without bias + BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: float = 6) -> None:
        super().__init__()
        mid = round(cin * expand)
        self.inverted_conv = ConvLayer(cin, mid, 1, bias=True, norm=False)
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, bias=True, norm=False)
        self.point_conv = ConvLayer(mid, cout, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (head dim 32, one extra k x k aggregation scale)."""

    def __init__(self, channels: int, kernel_size: int, dim: int = 32, eps: float = 1e-15):
        super().__init__()
        self.dim = dim
        self.eps = eps
        heads = channels // dim
        total = 3 * channels
        self.qkv = ConvLayer(channels, total, 1, norm=False, act=False)
        self.aggreg = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(
                        total,
                        total,
                        kernel_size,
                        padding=kernel_size // 2,
                        groups=total,
                        bias=False,
                    ),
                    nn.Conv2d(total, total, 1, groups=3 * heads, bias=False),
                )
            ]
        )
        self.proj = ConvLayer(2 * channels, channels, 1, act=False)

    def attend(self, qkv: Tensor, inplace: bool = False) -> Tensor:
        """(B, G*3*dim, H, W) grouped [q, k, v] -> (B, G*dim, H, W), in float32.

        Args:
            qkv: the concatenated q, k, v groups.
            inplace: the ReLUs may overwrite ``qkv`` (no autograd, a tensor of our own).
        """
        b, _, h, w = qkv.shape
        qkv = qkv.float().reshape(b, -1, 3 * self.dim, h * w)
        q, k, v = qkv.split(self.dim, dim=2)
        relu = F.relu_ if inplace else F.relu
        q = relu(q)
        k = relu(k)
        v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # a row of ones: (dim+1, N)
        vk = torch.matmul(v, k.transpose(-1, -2))  # (B, G, dim+1, dim)
        out = torch.matmul(vk, q)  # (B, G, dim+1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        return out.reshape(b, -1, h, w)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        multi = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        with torch.autocast(x.device.type, enabled=False):
            out = self.attend(multi, inplace=_inference()).to(x.dtype)
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # keep the input's layout
        return self.proj(out)


class ResidualBlock(nn.Module):
    """``main(x) + x`` (or just ``main(x)`` without shortcut, for the stride-2 blocks)."""

    def __init__(self, main: nn.Module, shortcut: bool = True) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.main(x)
        if not self.shortcut:
            return out
        return out.add_(x) if _inference() else out + x


class EfficientViTBlock(nn.Module):
    """``x + LiteMLA(x)``, then ``x + MBConv(x)``."""

    def __init__(self, channels: int, kernel_size: int, expand: float) -> None:
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, kernel_size))
        self.local_module = ResidualBlock(MBConv(channels, channels, 1, expand))

    def forward(self, x: Tensor) -> Tensor:
        return self.local_module(self.context_module(x))


class OpSequential(nn.Module):
    """Modules applied in order, stored as ``op_list`` (the checkpoints' naming)."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: Tensor) -> Tensor:
        for op in self.op_list:
            x = op(x)
        return x


@dataclass(frozen=True)
class BackboneConfig:
    """Widths, depths, stage types ("res", "fmb", "mb", "att") and expand ratios per stage."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    types: tuple[str, ...]
    expands: tuple[float, ...]
    att_kernel: int


L_WIDTHS = (32, 64, 128, 256, 512)
L_TYPES = ("res", "fmb", "fmb", "mb", "att")
L_EXPANDS = (1, 4, 4, 4, 6)
XL_WIDTHS = (32, 64, 128, 256, 512, 1024)
XL_TYPES = ("res", "fmb", "fmb", "fmb", "att", "att")
XL_EXPANDS = (1, 4, 4, 4, 4, 6)


def _block(kind: str, cin: int, cout: int, stride: int, expand: float) -> nn.Module:
    if kind == "res":
        return ResBlock(cin, cout, stride, expand)
    if kind == "fmb":
        return FusedMBConv(cin, cout, stride, expand)
    return MBConv(cin, cout, stride, expand)


class EfficientViTBackbone(nn.Module):
    """EfficientViT-L / -XL backbone; ``forward`` returns the output of every stage."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        w0 = cfg.widths[0]
        stem: list[nn.Module] = [ConvLayer(3, w0, 3, 2)]
        stem += [
            ResidualBlock(_block(cfg.types[0], w0, w0, 1, cfg.expands[0]))
            for _ in range(cfg.depths[0])
        ]
        stages = [OpSequential(stem)]
        cin = w0
        for width, depth, kind, expand in zip(
            cfg.widths[1:], cfg.depths[1:], cfg.types[1:], cfg.expands[1:], strict=True
        ):
            down = "fmb" if kind == "fmb" else "mb"
            ops: list[nn.Module] = [
                ResidualBlock(_block(down, cin, width, 2, 4 * expand), shortcut=False)
            ]
            for _ in range(depth):
                if kind == "att":
                    ops.append(EfficientViTBlock(width, cfg.att_kernel, expand))
                else:
                    ops.append(ResidualBlock(_block(kind, width, width, 1, expand)))
            stages.append(OpSequential(ops))
            cin = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class UpSample(nn.Module):
    """Bicubic resize (align_corners=False, A = -0.75) to a fixed size (also when equal)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x  # bicubic at scale 1 samples every pixel with weight 1: the identity
        return F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)


class SamNeck(nn.Module):
    """Three stage outputs (deepest first) -> 1x1 conv + BN, bicubic to 64 x 64, summed;
    ``head_depth`` residual FusedMBConvs; a 1x1 conv with bias."""

    def __init__(
        self,
        in_channels: tuple[int, int, int],
        head_depth: int,
        expand: float,
        width: int = 256,
        out_size: int = 64,
    ) -> None:
        super().__init__()
        self.input_ops = nn.ModuleList(
            OpSequential([ConvLayer(c, width, 1, act=False), UpSample((out_size, out_size))])
            for c in in_channels
        )
        self.middle = OpSequential(
            [ResidualBlock(FusedMBConv(width, width, 1, expand)) for _ in range(head_depth)]
        )
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvLayer(width, width, 1, bias=True, norm=False, act=False)])]
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        a, b, c = (op(f) for op, f in zip(self.input_ops, feats, strict=True))
        x = self.middle(a + (b + c))
        return self.output_ops[0](x)


@dataclass(frozen=True)
class EncoderConfig:
    backbone: BackboneConfig
    #: encoder input side S
    input_size: int
    neck_depth: int
    neck_expand: float


def _l(depths: tuple[int, ...], neck_depth: int) -> EncoderConfig:
    """An L variant: 512-px input, attention kernel 5, neck FusedMBConv expand 1."""
    cfg = BackboneConfig(L_WIDTHS, depths, L_TYPES, L_EXPANDS, 5)
    return EncoderConfig(cfg, 512, neck_depth, 1)


def _xl(depths: tuple[int, ...], neck_depth: int) -> EncoderConfig:
    """An XL variant: 1024-px input, attention kernel 3, neck FusedMBConv expand 4."""
    cfg = BackboneConfig(XL_WIDTHS, depths, XL_TYPES, XL_EXPANDS, 3)
    return EncoderConfig(cfg, 1024, neck_depth, 4)


ENCODERS: dict[str, EncoderConfig] = {
    "l0": _l((1, 1, 1, 4, 4), 4),
    "l1": _l((1, 1, 1, 6, 6), 8),
    "l2": _l((1, 2, 2, 8, 8), 12),
    "xl0": _xl((0, 1, 1, 2, 3, 3), 6),
    "xl1": _xl((1, 2, 2, 4, 6, 6), 12),
}


class EfficientViTSamImageEncoder(nn.Module):
    """Backbone -> SAM neck (last three stages) -> LayerNorm2d: (B, 3, S, S) -> (B, 256, 64, 64)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = EfficientViTBackbone(cfg.backbone)
        widths = cfg.backbone.widths
        self.neck = SamNeck((widths[-1], widths[-2], widths[-3]), cfg.neck_depth, cfg.neck_expand)
        self.norm = LayerNorm2d(256, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and _inference():
            # oneDNN's CPU convolutions are faster on channels-last (NHWC) activations
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(x)
        return self.norm(self.neck([feats[-1], feats[-2], feats[-3]])).contiguous()
