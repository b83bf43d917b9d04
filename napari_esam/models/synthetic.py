"""Deterministic synthetic weights (the conformance recipe), for tests, demos and benchmarks.

The recipe is the one of ``shared/conformance/README.md``: a per-tensor seed from the
CRC-32 of its name, one standard-normal draw of the full shape, then a scaling rule by
name and rank. The names and shapes come from our own module's state dict, so this works
without the conformance files.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping

import numpy as np


def synth_tensor(name: str, shape: Iterable[int]) -> np.ndarray:
    """The synthetic value of one state-dict entry."""
    shape = tuple(int(s) for s in shape)
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    x = rng.standard_normal(shape).astype(np.float32)
    f = np.float32
    if name.endswith("running_var"):
        return f(1) + f(0.1) * np.abs(x)
    if name.endswith("running_mean"):
        return f(0.02) * x
    if name.endswith("positional_encoding_gaussian_matrix"):
        return x
    if len(shape) >= 2:
        return x / f(math.sqrt(int(np.prod(shape[1:]))))
    if name.endswith("weight"):
        return f(1) + f(0.1) * x
    return f(0.02) * x


def synth_state_dict_from_shapes(shapes: Mapping[str, Iterable[int]]) -> dict[str, np.ndarray]:
    """Synthetic state dict for ``{name: shape}`` in the given order."""
    return {name: synth_tensor(name, shape) for name, shape in shapes.items()}


def synthetic_state_dict(model_name: str) -> dict[str, np.ndarray]:
    """Synthetic state dict for a registered model (names and shapes from our module)."""
    from napari_esam.models.registry import create_model

    module = create_model(model_name)
    return synth_state_dict_from_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()})
