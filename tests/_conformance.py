"""Access to ``../shared/conformance`` for the conformance tests.

The folder is found at ``$NAPARI_ESAM_CONFORMANCE_DIR`` or ``<repo>/../shared/conformance``.
When it is absent the tests skip with that reason, except when
``NAPARI_ESAM_REQUIRE_CONFORMANCE=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_esam.models.synthetic import synth_state_dict_from_shapes

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE_DIR = Path(
    os.environ.get("NAPARI_ESAM_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance")
)
SHA256 = {
    "efficientsam_ti": "58cd95559b52d155865f2019a3b2d69316d405f3cd944d2590bea3ecfe0942e9",
    "efficientsam_s": "74ff28957be9b114925a0517cd9fcb60669be62ce23288994bc447c07ad3a597",
    "mobilesam": "e84c2b337bef8af946b42ce78d18ee1aea22185aec328f41322b0dd2dd001f95",
}


def model_dir(model: str) -> Path:
    """The model's conformance folder, or skip (fail when conformance is required)."""
    path = CONFORMANCE_DIR / model
    if not (path / "manifest.json").is_file():
        reason = f"conformance fixtures not found at {path} (set NAPARI_ESAM_CONFORMANCE_DIR)"
        if os.environ.get("NAPARI_ESAM_REQUIRE_CONFORMANCE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def load_npz(model: str, name: str) -> dict[str, np.ndarray]:
    with np.load(model_dir(model) / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def manifest(model: str) -> list[dict]:
    return json.loads((model_dir(model) / "manifest.json").read_text())


_CACHE: dict[str, dict[str, np.ndarray]] = {}


def manifest_state_dict(model: str) -> dict[str, np.ndarray]:
    """The synthetic state dict of the manifest, checked against its SHA-256."""
    if model not in _CACHE:
        entries = manifest(model)
        sd = synth_state_dict_from_shapes({e["name"]: e["shape"] for e in entries})
        digest = hashlib.sha256()
        for arr in sd.values():
            digest.update(np.ascontiguousarray(arr).tobytes())
        assert digest.hexdigest() == SHA256[model], "synthetic weight recipe mismatch"
        _CACHE[model] = sd
    return _CACHE[model]


def assert_amg_records(records: list[dict], ref: dict[str, np.ndarray], expected: int) -> None:
    """The automatic mask generator's records against a reference fixture (``amg*.npz``):
    ``expected`` records with the same boxes, crop boxes and points, and predicted IoU and
    stability within 1e-4 (the masks are compared by the caller)."""
    assert len(records) == len(ref["area"]) == expected
    np.testing.assert_array_equal([r["bbox"] for r in records], ref["bbox"])
    np.testing.assert_array_equal([r["crop_box"] for r in records], ref["crop_box"])
    np.testing.assert_array_equal([r["point_coords"][0] for r in records], ref["point_coords"])
    np.testing.assert_allclose(
        [r["predicted_iou"] for r in records], ref["predicted_iou"], rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(
        [r["stability_score"] for r in records], ref["stability_score"], rtol=0, atol=1e-4
    )
