"""Mask prompts: the mask → logits rule, the predictor's ``mask_input`` and its checks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_esam.core.plane.mask_prompts import EPS, frame_size, mask_to_logits
from napari_esam.core.plane.predictor import Predictor
from napari_esam.core.tiling.grid import Window
from napari_esam.core.tiling.predictor import MaskPrompt, RegionMask, TiledPredictor
from tests.fakes import FakeModel, MaskFake, blobs

HIGH = float(np.log((1 - EPS) / EPS))


def test_mask_to_logits_places_the_mask_in_the_padded_1024_frame():
    mask = np.zeros((500, 1000), dtype=bool)
    mask[100:300, 200:600] = True  # x 1.024 / 4: low-res rows 25.6..76.8, cols 51.2..153.6
    logits = mask_to_logits(mask)
    assert logits.shape == (256, 256) and logits.dtype == np.float32
    assert frame_size(500, 1000) == (512, 1024)
    assert np.allclose(logits[27:76, 52:153], HIGH)  # inside
    assert np.allclose(logits[:25], -HIGH) and np.allclose(logits[:, :51], -HIGH)  # outside
    assert np.allclose(logits[77:], -HIGH)  # below it, and the padding (rows >= 128)
    edge = logits[25, 60:140]  # the low-res row the object's top edge crosses
    assert (np.abs(edge) < HIGH - 0.5).all()


def test_mask_to_logits_refuses_non_2d_masks():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_logits(np.zeros((4, 4, 3), bool))


def test_predictor_passes_the_mask_input_to_the_decoder():
    model = MaskFake().eval()
    p = Predictor(model)
    p.set_image(blobs())
    mask = np.full((1, 256, 256), -5.0, np.float32)
    mask[0, 100:110, 100:110] = 5.0
    p.predict(np.array([[40.0, 30.0]]), np.array([1]), mask_input=mask)
    got = model.calls[-1][3]
    assert got.shape == (1, 1, 256, 256) and np.array_equal(got[0], mask)
    p.predict(np.array([[40.0, 30.0]]), np.array([1]))
    assert model.calls[-1][3] is None
    # a batch: one mask per object, or one for all
    p.predict_batch(np.zeros((3, 1, 2)) + 20, np.ones((3, 1)), mask_input=np.zeros((3, 256, 256)))
    assert model.calls[-1][3].shape == (3, 1, 256, 256)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.zeros((1, 128, 128)), "low-res logits"),
        (np.zeros((2, 1, 256, 256)), "low-res logits"),
        (np.full((256, 256), np.nan), "NaN"),
    ],
)
def test_bad_mask_inputs_are_clear_errors(mask, match):
    p = Predictor(MaskFake().eval())
    p.set_image(blobs())
    with pytest.raises(ValueError, match=match):
        p.predict(np.array([[40.0, 30.0]]), np.array([1]), mask_input=mask)


def test_a_model_without_a_mask_prompt_refuses_a_mask_input():
    p = Predictor(FakeModel().eval())  # like EfficientSAM: no mask prompt
    p.set_image(blobs())
    with pytest.raises(ValueError, match="takes no mask input"):
        p.predict(np.array([[40.0, 30.0]]), np.array([1]), mask_input=np.zeros((256, 256)))


def test_tiled_mask_prompts_are_decoded_in_their_own_window():
    model = MaskFake().eval()
    tp = TiledPredictor(model, tile=512, halo=128)
    tp.set_image(blobs((1500, 1500)))
    pts, lbl = np.array([[[700.0, 700.0]]]), np.array([[1]])
    first = tp.predict_objects(pts, lbl)[0]
    prompt = MaskPrompt(first.low_res[int(np.argmax(first.scores))], first.window)
    tp.predict_objects(pts, lbl, mask_prompts=[prompt])
    coords, _, size, mask = model.calls[-1]
    assert size == first.window.shape and np.array_equal(mask[0, 0], prompt.logits)
    # a mask prompt of a window that cannot hold the object is dropped
    far = MaskPrompt(prompt.logits, Window(0, 0, 512, 512))
    tp.predict_objects(np.array([[[1400.0, 1400.0]]]), lbl, mask_prompts=[far])
    assert model.calls[-1][3] is None


def test_a_region_mask_is_brought_into_the_decoding_window():
    model = MaskFake().eval()
    tp = TiledPredictor(model, tile=2000, halo=0)  # one tile: the window is the plane
    tp.set_image(blobs((600, 800)))
    region = np.ones((100, 200), dtype=bool)
    prompt = RegionMask(region, Window(300, 400, 400, 600))
    tp.predict_objects(None, None, np.array([[400.0, 300.0, 600.0, 400.0]]),
                       mask_prompts=[prompt])
    canvas = np.zeros((600, 800), bool)
    canvas[300:400, 400:600] = True
    np.testing.assert_array_equal(model.calls[-1][3][0, 0], mask_to_logits(canvas))
