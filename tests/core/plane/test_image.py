"""Image normalisation rules (core/image.py)."""

import numpy as np
import pytest

from napari_esam.core.plane.image import contrast_limits_of, to_model_rgb


def test_uint8_rgb_passes_unchanged():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = to_model_rgb(img)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, img)


def test_grayscale_becomes_three_equal_channels():
    img = np.arange(600, dtype=np.uint8).reshape(20, 30)
    out = to_model_rgb(img)
    assert out.shape == (20, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], img)


def test_uint16_is_scaled_by_robust_percentiles_ignoring_hot_pixels():
    rng = np.random.default_rng(1)
    img = rng.integers(1000, 3000, (100, 100)).astype(np.uint16)
    img[0, 0] = 65535  # a hot pixel must not squash the contrast
    out = to_model_rgb(img)[..., 0]
    assert out.max() == 255 and out.min() == 0
    # the bulk of the pixels spans most of the 8-bit range
    assert np.percentile(out, 90) - np.percentile(out, 10) > 150


def test_float_scaling_and_explicit_contrast_limits():
    img = np.linspace(-1.0, 1.0, 400, dtype=np.float32).reshape(20, 20)
    out = to_model_rgb(img, contrast_limits=(0.0, 1.0))[..., 0]
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert out[img <= 0].max() == 0


def test_constant_image_becomes_zeros():
    out = to_model_rgb(np.full((10, 10), 7, np.uint16))
    assert not out.any()


def test_contrast_limits_of_uses_finite_values():
    lo, hi = contrast_limits_of(np.arange(1000, dtype=np.float64))
    assert lo == pytest.approx(4.995) and hi == pytest.approx(994.005)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 10)), "empty"),
        (np.zeros((1, 10)), "too small"),
        (np.zeros((10, 1, 3)), "too small"),
        (np.zeros((2, 10, 10, 3)), "2-D image"),
        (np.zeros((10, 10, 2)), "1 or 3 channels"),
        (np.zeros((10, 10, 4)), "1 or 3 channels"),
        (np.array([[np.nan, 1.0], [2.0, 3.0]]), "NaN"),
        (np.array([[np.inf, 1.0], [2.0, 3.0]]), "NaN or infinite"),
        (np.zeros((10, 10), dtype=complex), "dtype"),
    ],
)
def test_bad_images_raise_clear_errors(image, message):
    with pytest.raises(ValueError, match=message):
        to_model_rgb(image)
