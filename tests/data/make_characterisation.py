"""Pin today's outputs before the one-pipeline refactor (issue 12): run once, on the commit
before the refactor, with ``python -m tests.data.make_characterisation``.

Writes ``tests/data/characterisation.npz``: labels of stacks (untiled and tiled), the records
of segment-everything on one slice and prompt masks, all from the deterministic stand-in
models of the tests (``BlobModel``, ``FakeModel``), so they need no weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tests.batch_fakes import FAST, BlobModel, blob_stack
from tests.tiled_fakes import FAST_TILED, HALO, TILE, blob_image
from tests.tiled_fakes import blob_stack as tiled_blob_stack

from tests.fakes import FakeModel

OUT = Path(__file__).with_name("characterisation.npz")


def main() -> None:
    from napari_esam.core.batch import BatchSettings, EverythingParams, ModelSpec, run_batch
    from napari_esam.core.everything import segment_everything
    from napari_esam.core.predictor import Predictor
    from napari_esam.core.tiled_everything import segment_everything_tiled
    from napari_esam.core.tiled_predictor import TiledPredictor

    pins: dict[str, np.ndarray] = {}
    stack, _ = blob_stack(5)
    spec = ModelSpec(name="blob", factory=BlobModel)
    for scope in ("stack", "slice"):
        settings = BatchSettings(spec, EverythingParams(**FAST), id_scope=scope)
        pins[f"batch_{scope}_labels"] = np.asarray(run_batch(stack, settings).labels)

    model = BlobModel()
    records = segment_everything(stack[2], Predictor(model), **FAST)
    pins["records_bbox"] = np.array([r["bbox"] for r in records], np.int64)
    pins["records_area"] = np.array([r["area"] for r in records], np.int64)
    pins["records_iou"] = np.array([r["predicted_iou"] for r in records], np.float64)
    pins["records_points"] = np.array([r["point_coords"][0] for r in records], np.float64)

    plane = blob_image((600, 700))
    pins["tiled_plane_image_seed"] = np.array([0])
    pins["tiled_plane_labels"] = np.asarray(
        segment_everything_tiled(plane, BlobModel(), tile=TILE, halo=HALO, **FAST_TILED))
    pins["tiled_stack_labels"] = np.asarray(
        segment_everything_tiled(tiled_blob_stack(2), BlobModel(), tile=TILE, halo=HALO,
                                 **FAST_TILED))

    pred = Predictor(FakeModel())
    pred.set_image(plane)
    masks, scores, _ = pred.predict(np.array([[300.0, 200.0]]), np.array([1]))
    pins["prompt_masks"] = np.asarray(masks)
    pins["prompt_scores"] = np.asarray(scores)
    big = np.tile(plane, (4, 4))  # 2400 x 2800: several 1024-px tiles
    tp = TiledPredictor(FakeModel())
    tp.set_image(big)
    tmasks, tscores, _ = tp.predict(np.array([[1500.0, 1100.0]]), np.array([1]))
    pins["tiled_prompt_masks"] = np.asarray(tmasks)
    pins["tiled_prompt_scores"] = np.asarray(tscores)
    np.savez_compressed(OUT, **pins)
    print({k: (v.shape, str(v.dtype)) for k, v in pins.items()})


if __name__ == "__main__":
    main()
