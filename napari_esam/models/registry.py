"""Names of the supported models and their (weightless) module builders."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep this module torch-free: the CLI and plugin discovery import it
    from napari_esam.models.base import PromptableModel

#: every model name accepted by :func:`napari_esam.build_model`
MODEL_NAMES: tuple[str, ...] = ("efficientsam_ti", "efficientsam_s", "mobilesam")


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a known model, else raise a ``ValueError`` listing them."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return name


def create_model(name: str) -> PromptableModel:
    """A freshly initialised module for ``name`` (random weights, eval mode, CPU)."""
    check_model_name(name)
    if name == "mobilesam":
        from napari_esam.models.mobilesam import build_mobilesam

        model = build_mobilesam()
    else:
        from napari_esam.models.efficientsam import build_efficientsam

        model = build_efficientsam(name.rsplit("_", 1)[1])
    return model.eval()
