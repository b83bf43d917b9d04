"""Model factory for benchmarks that must run against more than one napari-esam tree.

``ModelSpec(factory="_synthetic_mobilesam:build")`` (with ``benchmarks/`` on ``PYTHONPATH``)
builds MobileSAM with the synthetic weights of the conformance recipe on the CPU. It uses
only ``napari_esam.models.loading.build_model`` and ``napari_esam.models.synthetic``, which
have the same API before and after the one-pipeline refactor, so the same factory string
works with the old ``napari_esam.core.batch`` and the new ``napari_esam.core.runs``.
"""

from __future__ import annotations

from typing import Any


def build() -> Any:
    import numpy as np
    import torch

    from napari_esam.models.loading import build_model
    from napari_esam.models.synthetic import synthetic_state_dict

    # torch tensors, not NumPy: the loader turns 0-d arrays into 1-d ones
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in
             synthetic_state_dict("mobilesam").items()}
    return build_model("mobilesam", checkpoint=state, device="cpu")
