"""``build_model``: a ready-to-use model on a device from a name and a checkpoint source."""

from __future__ import annotations

from typing import Any

from napari_esam.models.base import PromptableModel
from napari_esam.models.registry import MODEL_NAMES, create_model
from napari_esam.models.weights import CheckpointError, describe_mismatch, load_state_dict

DTYPES = ("float32", "float16", "bfloat16")


def resolve_device(device: str | Any = "auto") -> Any:
    """``"auto"`` → CUDA if available else CPU; ``"cuda"`` without CUDA is an error."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cuda' or 'cpu', not {device!r}")
    name = device.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was requested but no CUDA GPU is available to PyTorch "
                "(torch.cuda.is_available() is False); use device='cpu' or 'auto'"
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cuda' or 'cpu'")


def build_model(
    name: str,
    checkpoint: Any = None,
    device: str | Any = "auto",
    dtype: str | None = None,
) -> PromptableModel:
    """Build ``name`` (one of :data:`MODEL_NAMES`) with weights, in eval mode, on ``device``.

    ``checkpoint``: ``None`` (official file: downloaded, verified, cached), a local path, or an
    in-memory state dict (``Mapping[str, Tensor | ndarray]``). ``dtype``: ``None``/``"float32"``
    (the reference path) or, on CUDA only, ``"float16"``/``"bfloat16"`` autocast; the weights
    stay float32 and the predictor runs the model under ``torch.autocast``.
    """
    import torch

    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    dev = resolve_device(device)
    if dtype not in (None, *DTYPES):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype in ("float16", "bfloat16") and dev.type != "cuda":
        raise ValueError(f"dtype {dtype!r} is only supported on CUDA; use float32 on the CPU")
    model = create_model(name)
    state = load_state_dict(name, checkpoint)
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"the checkpoint does not fit model {name!r}: {problem}. Is it a checkpoint of "
            f"another model? Supported: {', '.join(MODEL_NAMES)}"
        )
    model.load_state_dict(state, strict=True)
    model.eval().to(dev)
    model.compute_dtype = getattr(torch, dtype) if dtype and dtype != "float32" else None
    return model
