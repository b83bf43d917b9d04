"""Refine runs over stacks (:func:`napari_esam.core.runs.refine.run_refine`): per-plane
results, the Zarr record, cancel / kill / resume, and bad inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile

from napari_esam.core.plane.refine import refine_labels
from napari_esam.core.runs.outputs import RUN_ATTR
from napari_esam.core.runs.refine import RefineOutput, RefineSettings, run_refine
from napari_esam.core.runs.settings import ModelSpec, TilingParams
from tests.fakes import CountingFake, MaskInputModel, refine_scene


def settings(**changes) -> RefineSettings:
    spec = ModelSpec("fake", device="cpu", factory="tests.fakes:FakeModel")
    return RefineSettings(spec, **changes)


@pytest.fixture(scope="module")
def scene():
    """A 3-plane stack and its labels (the second plane shifted by a few pixels)."""
    pairs = [refine_scene(seed=s) for s in range(3)]
    image = np.stack([p[0] for p in pairs])
    labels = np.stack([p[1] for p in pairs])
    image[1], labels[1] = np.roll(image[1], 7, axis=1), np.roll(labels[1], 7, axis=1)
    return image, labels


@pytest.fixture(scope="module")
def reference(scene):
    image, labels = scene
    return [refine_labels(image[i], labels[i], CountingFake().eval()) for i in range(3)]


def test_in_memory_run_is_the_plane_rule_on_every_plane(scene, reference):
    image, labels = scene
    before = labels.copy()
    run = run_refine(image, labels, settings(), model=CountingFake().eval())
    np.testing.assert_array_equal(labels, before)
    assert run.complete and not run.cancelled and not run.mask_input
    for i, ref in enumerate(reference):
        np.testing.assert_array_equal(run.labels[i], ref.labels)
        assert run.kept[i] == ref.kept and run.counts[i] == len(ref.refined)
    assert [i for i, _ in run.kept[0]] == [9]


def test_zarr_record_and_a_killed_run_resumes(scene, reference, tmp_path):
    image, labels = scene
    out = tmp_path / "refined.zarr"
    model = CountingFake().eval()

    def kill(ev):
        if ev.kind == "step" and ev.index == 1:
            raise KeyboardInterrupt  # a kill in the middle of plane 1

    with pytest.raises(KeyboardInterrupt):
        run_refine(image, labels, settings(), out, model=model, progress=kill)
    rec = RefineOutput(out).group.attrs.asdict()[RUN_ATTR]
    assert rec["slices"] == {"0": 3} and not rec["complete"]
    assert rec["kept"] == {"0": [[9, pytest.approx(reference[0].kept[0][1])]]}
    assert rec["settings"]["command"] == "refine" and rec["labels"]["dtype"] == "uint16"
    seen = []
    model.decode_calls = 0
    run = run_refine(image, labels, settings(), out, model=model, progress=seen.append)
    assert seen[0].kind == "start" and seen[0].skipped == 1
    assert [ev.index for ev in seen if ev.kind == "slice"] == [1, 2]
    assert model.decode_calls == 2  # planes 1 and 2, one batch each
    assert run.complete and run.kept[0] == reference[0].kept
    for i, ref in enumerate(reference):
        np.testing.assert_array_equal(run.labels[i], ref.labels)
    assert RefineOutput(out).group.attrs.asdict()[RUN_ATTR]["complete"]
    # a finished run again: every plane skipped
    model.decode_calls = 0
    again = run_refine(image, labels, settings(), out, model=model)
    assert model.decode_calls == 0 and again.counts == run.counts


def test_cancel_keeps_finished_planes(scene, tmp_path):
    image, labels = scene
    state = {"slices": 0}

    def progress(ev):
        state["slices"] += ev.kind == "slice"

    run = run_refine(image, labels, settings(), tmp_path / "c.zarr", progress=progress,
                     cancel=lambda: state["slices"] >= 1, model=CountingFake().eval())
    assert run.cancelled and list(run.counts) == [0]


def test_resume_refused_with_other_labels_or_settings(scene, tmp_path):
    image, labels = scene
    out = tmp_path / "r.zarr"
    run_refine(image, labels, settings(), out, indices=[0], model=CountingFake().eval())
    other = labels.copy()
    other[0, :5, :5] = 1
    with pytest.raises(ValueError, match="labels content_hash"):
        run_refine(image, other, settings(), out, model=CountingFake().eval())
    with pytest.raises(ValueError, match="iou_threshold"):
        run_refine(image, labels, settings(iou_threshold=0.7), out,
                   model=CountingFake().eval())
    run = run_refine(image, labels, settings(iou_threshold=0.7), out, overwrite=True,
                     model=CountingFake().eval())
    assert run.complete


def test_tiled_planes(scene):
    """Tiling on with 256 px tiles: several tiles per plane, each object decoded on one
    window with its mask input (the echoing stand-in gives the objects back)."""
    image, labels = scene
    run = run_refine(image, labels, settings(tiling=TilingParams("on", 256, 64)),
                     indices=[1], model=MaskInputModel().eval())
    assert run.grid.n_tiles == 4 and run.mask_input and run.kept == {1: []}
    for obj_id in (3, 7, 9, 12):
        a, b = run.labels[1] == obj_id, labels[1] == obj_id
        assert (a & b).sum() / (a | b).sum() > (0.6 if obj_id == 9 else 0.9)  # 9: 1 px wide
    np.testing.assert_array_equal(run.labels[0], labels[0])  # not in indices: unchanged


def test_bad_inputs(scene, tmp_path):
    image, labels = scene
    s = settings()
    with pytest.raises(ValueError, match="must be integers"):
        run_refine(image, labels.astype(np.float32), s)
    with pytest.raises(ValueError, match="does not match the image"):
        run_refine(image, labels[:, :-1], s)
    with pytest.raises(ValueError, match="no objects"):
        run_refine(image, np.zeros_like(labels), s)
    with pytest.raises(FileNotFoundError):
        run_refine(image, tmp_path / "missing.tif", s)
    with pytest.raises(ValueError, match="IoU threshold"):
        run_refine(image, labels, dataclasses.replace(s, iou_threshold=-1))
    path = tmp_path / "labels.tif"
    tifffile.imwrite(path, labels, photometric="minisblack")
    with pytest.raises(ValueError, match="must not be an input"):
        run_refine(image, path, s, path)
