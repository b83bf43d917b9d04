"""``napari-esam refine``: a stack refined into Zarr and TIFF, Ctrl-C and resume, and the
one-line errors (exit 2) for bad inputs. The model under the CLI's key is a stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_esam.cli import main
from napari_esam.core.runs import settings as B
from napari_esam.core.runs.outputs import RUN_ATTR
from napari_esam.core.runs.refine import RefineSettings, run_refine
from tests.fakes import FakeModel, refine_scene

#: the settings of the reference runs (the stand-in's own)
REFERENCE = RefineSettings(B.ModelSpec("fake", device="cpu", factory="tests.fakes:FakeModel"))


class InterruptingFake(FakeModel):
    """FakeModel whose ``stop_at``-th decode raises KeyboardInterrupt (a Ctrl-C)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.stop_at, self.decodes = stop_at, 0

    def decode(self, *args, **kwargs):
        self.decodes += 1
        if self.decodes == self.stop_at:
            raise KeyboardInterrupt
        return super().decode(*args, **kwargs)


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    pairs = [refine_scene(seed=s) for s in range(3)]
    image = np.stack([p[0] for p in pairs])
    labels = np.stack([p[1] for p in pairs])
    img, lab = tmp_path / "cells.tif", tmp_path / "cells_labels.tif"
    tifffile.imwrite(img, image, photometric="minisblack", metadata={"axes": "ZYX"})
    tifffile.imwrite(lab, labels, photometric="minisblack", metadata={"axes": "ZYX"})
    return img, lab, image, labels


@pytest.fixture
def stand_in(tmp_path):
    """The CLI's ``--model mobilesam --checkpoint CKPT --device cpu`` is a stand-in."""
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"not loaded: the model cache answers")
    spec = B.ModelSpec("mobilesam", str(ckpt.resolve()), "cpu", None)

    def use(model):
        B._MODELS[spec.key()] = model.eval()
        return model

    use(InterruptingFake())
    yield ["--model", "mobilesam", "--checkpoint", str(ckpt), "--device", "cpu",
           "--no-progress"], use
    B._MODELS.pop(spec.key(), None)


def test_refine_to_zarr_and_tiff(files, stand_in, tmp_path, capsys):
    img, lab, image, labels = files
    opts, _ = stand_in
    assert main(["refine", str(img), str(lab), "-o", str(tmp_path / "r.zarr"), *opts]) == 0
    captured = capsys.readouterr()
    assert "has no mask input" in captured.err  # FakeModel, like EfficientSAM
    assert "3 of 3 slices, 9 objects refined, 3 kept as they were" in captured.out
    for i in range(3):
        assert f"kept slice {i}: id 9 (IoU 0.01)" in captured.out
    group = zarr.open_group(tmp_path / "r.zarr", mode="r")
    got = group["0"][:]
    want = run_refine(image, labels, REFERENCE,
                      model=FakeModel().eval())
    np.testing.assert_array_equal(got, want.labels)
    assert got.dtype == labels.dtype and group.attrs[RUN_ATTR]["complete"]
    assert group.attrs["napari-esam"]["axes"] == "zyx"
    out = tmp_path / "r.tif"
    assert main(["refine", str(img), str(lab), "-o", str(out), *opts]) == 0
    np.testing.assert_array_equal(tifffile.imread(out), got)
    assert not Path(str(out) + ".partial.zarr").exists()


def test_ctrl_c_then_resume(files, stand_in, tmp_path, capsys):
    img, lab, image, labels = files
    opts, use = stand_in
    out = tmp_path / "r.zarr"
    use(InterruptingFake(stop_at=2))  # planes are one decoder batch each: Ctrl-C in plane 1
    assert main(["refine", str(img), str(lab), "-o", str(out), *opts]) == 1
    assert "interrupted" in capsys.readouterr().err
    assert zarr.open_group(out, mode="r").attrs[RUN_ATTR]["slices"] == {"0": 3}
    model = use(InterruptingFake())
    assert main(["refine", str(img), str(lab), "-o", str(out), *opts]) == 0
    assert "1 of 3 slices already done" in capsys.readouterr().err
    assert model.decodes == 2
    want = run_refine(image, labels, REFERENCE,
                      model=FakeModel().eval())
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["0"][:], want.labels)
    # other settings: refused with the difference named; --overwrite starts over
    assert main(["refine", str(img), str(lab), "-o", str(out), "--iou-threshold", "0.7",
                 *opts]) == 2
    assert "iou_threshold" in capsys.readouterr().err
    assert main(["refine", str(img), str(lab), "-o", str(out), "--iou-threshold", "0.7",
                 "--overwrite", *opts]) == 0


def _bad(tmp_path, name, data):
    path = tmp_path / name
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("shape", "does not match the image"),
        ("float", "labels must be integers"),
        ("empty", "no objects"),
        ("missing-labels", "LABELS not found"),
        ("missing-image", "IMAGE not found"),
        ("out-is-labels", "must not be the LABELS"),
        ("out-is-image", "must not be the IMAGE"),
        ("threshold", "--iou-threshold must be in [0, 1]"),
        ("suffix", "OUTPUT must end in .zarr"),
    ],
)
def test_bad_inputs_one_line_exit_2(case, message, files, stand_in, tmp_path, capsys):
    img, lab, image, labels = files
    opts, _ = stand_in
    out = tmp_path / "out.zarr"
    extra: list[str] = []
    if case == "shape":
        lab = _bad(tmp_path, "l.tif", labels[:, :, :-1])
    elif case == "float":
        lab = _bad(tmp_path, "l.tif", labels.astype(np.float32))
    elif case == "empty":
        lab = _bad(tmp_path, "l.tif", np.zeros_like(labels))
    elif case == "missing-labels":
        lab = tmp_path / "nope.tif"
    elif case == "missing-image":
        img = tmp_path / "nope.tif"
    elif case == "out-is-labels":
        out = lab.with_suffix(".tif")
    elif case == "out-is-image":
        out = img
    elif case == "threshold":
        extra = ["--iou-threshold", "1.5"]
    elif case == "suffix":
        out = tmp_path / "out.png"
    before = tifffile.imread(files[1])
    assert main(["refine", str(img), str(lab), "-o", str(out), *extra, *opts]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-esam refine: error: ") and message in err
    assert err.count("\n") == 1, err
    np.testing.assert_array_equal(tifffile.imread(files[1]), before)  # nothing lost


def test_parser_defaults_are_the_cores():
    from napari_esam.cli import refine as cli_refine
    from napari_esam.core.plane import refine as core_refine

    assert cli_refine.IOU_THRESHOLD == core_refine.IOU_THRESHOLD
    assert cli_refine.DEFAULT_BATCH == core_refine.DEFAULT_BATCH
