"""Names of the supported models and their (weightless) module builders."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep this module torch-free: the CLI and plugin discovery import it
    from napari_esam.models.base import PromptableModel

#: every model name accepted by :func:`napari_esam.build_model`
MODEL_NAMES: tuple[str, ...] = (
    "efficientsam_ti",
    "efficientsam_s",
    "mobilesam",
    "efficientvit_sam_l0",
    "efficientvit_sam_l1",
    "efficientvit_sam_l2",
    "efficientvit_sam_xl0",
    "efficientvit_sam_xl1",
)

#: one line per model for choosers: parameters, encoder input side, speed class on a CPU
MODEL_DESCRIPTIONS: dict[str, str] = {
    "efficientsam_ti": "EfficientSAM-Ti — 10 M parameters, 1024 px, fast",
    "efficientsam_s": "EfficientSAM-S — 26 M parameters, 1024 px, medium",
    "mobilesam": "MobileSAM — 10 M parameters, 1024 px, fast",
    "efficientvit_sam_l0": "EfficientViT-SAM L0 — 35 M parameters, 512 px, fast",
    "efficientvit_sam_l1": "EfficientViT-SAM L1 — 48 M parameters, 512 px, fast",
    "efficientvit_sam_l2": "EfficientViT-SAM L2 — 61 M parameters, 512 px, medium",
    "efficientvit_sam_xl0": "EfficientViT-SAM XL0 — 117 M parameters, 1024 px, slow on CPU",
    "efficientvit_sam_xl1": (
        "EfficientViT-SAM XL1 — 203 M parameters, 1024 px, best quality, slow on CPU"
    ),
}


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a known model, else raise a ``ValueError`` listing them."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return name


def model_description(name: str) -> str:
    """A short human description of ``name`` (size, input size, speed class)."""
    return MODEL_DESCRIPTIONS[check_model_name(name)]


def create_model(name: str) -> PromptableModel:
    """A freshly initialised module for ``name`` (random weights, eval mode, CPU)."""
    check_model_name(name)
    if name == "mobilesam":
        from napari_esam.models.mobilesam import build_mobilesam

        model = build_mobilesam()
    elif name.startswith("efficientvit_sam_"):
        from .efficientvit_sam import build_efficientvit_sam

        model = build_efficientvit_sam(name.rsplit("_", 1)[1])
    else:
        from napari_esam.models.efficientsam import build_efficientsam

        model = build_efficientsam(name.rsplit("_", 1)[1])
    return model.eval()
