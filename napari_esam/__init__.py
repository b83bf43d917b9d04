"""napari-esam: EfficientSAM and MobileSAM segmentation for napari.

Importing the package is light (no torch): the public API is loaded on first access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MODEL_NAMES": "napari_esam.models.registry",
    "build_model": "napari_esam.models.loading",
    "load_state_dict": "napari_esam.models.weights",
    "checkpoint_path": "napari_esam.models.weights",
    "CheckpointError": "napari_esam.models.weights",
    "synthetic_state_dict": "napari_esam.models.synthetic",
    "Predictor": "napari_esam.core.plane.predictor",
    "to_model_rgb": "napari_esam.core.plane.image",
    "segment_everything": "napari_esam.core.plane.everything",
    "segment_everything_objects": "napari_esam.core.plane.object_prompts",
    "detect_object_prompts": "napari_esam.core.plane.object_prompts",
    "masks_to_labels": "napari_esam.core.plane.labels",
    "write_labels": "napari_esam.core.io.label_files",
    "read_labels": "napari_esam.core.io.label_files",
    "TiledPredictor": "napari_esam.core.tiling.predictor",
    "run_batch": "napari_esam.core.runs.pipeline",
    "run_linked": "napari_esam.core.runs.linked",
    "link_labels": "napari_esam.core.linking.stack",
    "tracks_data": "napari_esam.core.linking.tracks",
    "tracks_table": "napari_esam.core.linking.tracks",
    "write_tracks_csv": "napari_esam.core.linking.tracks",
    "BatchSettings": "napari_esam.core.runs.settings",
    "EverythingParams": "napari_esam.core.runs.settings",
    "ModelSpec": "napari_esam.core.runs.settings",
    "TilingParams": "napari_esam.core.runs.settings",
    "refine_labels": "napari_esam.core.plane.refine",
    "refine_plane": "napari_esam.core.tiling.refine",
    "run_refine": "napari_esam.core.runs.refine",
    "RefineSettings": "napari_esam.core.runs.refine",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'napari_esam' has no attribute {name!r}")
