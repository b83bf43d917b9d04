"""Sample data: a synthetic fluorescence image of cell nuclei, generated (no download)."""

from __future__ import annotations

from typing import Any

import numpy as np

SHAPE = (512, 512)
SEED = 20241121


def synthetic_nuclei(
    shape: tuple[int, int] = SHAPE, n_nuclei: int = 60, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A widefield-like image of stained nuclei and its ground-truth labels.

    Nuclei are ellipses (radii 9–20 px, random orientation, a little overlap allowed) with
    uneven staining (brighter rim, textured chromatin), blurred by a Gaussian PSF, on a
    smooth background with vignetting; Poisson photon noise plus Gaussian read noise.
    Returns ``(image uint16, labels uint16)``; the same ``seed`` gives the same arrays.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    signal = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    centres: list[tuple[float, float, float]] = []
    tries = 0
    while len(centres) < n_nuclei and tries < 20 * n_nuclei:
        tries += 1
        a = rng.uniform(10, 20)
        b = a * rng.uniform(0.55, 0.95)
        cy, cx = rng.uniform(a, h - a), rng.uniform(a, w - a)
        if any((cy - y) ** 2 + (cx - x) ** 2 < (0.85 * (a + r)) ** 2 for y, x, r in centres):
            continue
        centres.append((cy, cx, a))
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(t) + dy * np.sin(t)) / a
        v = (-dx * np.sin(t) + dy * np.cos(t)) / b
        r2 = u * u + v * v
        inside = r2 <= 1.0
        labels[inside & (labels == 0)] = len(centres)
        brightness = rng.uniform(0.45, 1.0)
        signal += inside * brightness * (0.75 + 0.25 * r2)  # brighter towards the envelope
    texture = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    signal *= 1.0 + 0.9 * texture / (texture.std() + 1e-6) * 0.25
    signal = ndi.gaussian_filter(signal, 1.6)  # optics
    vignette = 1.0 - 0.35 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2) * 4
    background = 180.0 + 60.0 * ndi.gaussian_filter(rng.standard_normal(shape), 40) * 10
    photons = np.clip(background * vignette + 2600.0 * signal * vignette, 0, None)
    counts = rng.poisson(photons).astype(np.float32) + rng.normal(100.0, 6.0, shape)  # offset
    image = np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return image, labels


def make_sample_cells() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """npe2 sample data ``napari-esam:cells``: synthetic fluorescent nuclei (uint16)."""
    image, _ = synthetic_nuclei()
    lo, hi = np.percentile(image, (0.5, 99.8))
    meta = {
        "name": "cells (synthetic nuclei)",
        "colormap": "gray",
        "contrast_limits": (float(lo), float(hi)),
        "metadata": {"source": "napari-esam synthetic nuclei", "seed": SEED},
    }
    return [(image, meta, "image")]
