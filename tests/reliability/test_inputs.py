"""The adversarial probe's input defects as tests (``../shared/notes/reliability-defects.md``,
defects 7-13): every bad input, metadata, size, format limit, checkpoint archive or parameter
ends in one clear line (CLI: exit 2, no traceback) and loses nothing; a damaged cache is
recomputed. One test (or more) per defect, named after its number; inputs are small and
synthetic, the models are the fast fakes of ``tests/fakes.py`` except where the checkpoint
loader itself is under test."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_esam.cli import main
from napari_esam.core.runs import settings as S
from tests.fakes import BlobModel, blob_stack

FAST = ["--device", "cpu", "--points-per-side", "8", "--no-progress"]


@pytest.fixture
def blob_models(monkeypatch):
    """Every model the CLI builds is a fast BlobModel (no checkpoint is read)."""
    monkeypatch.setattr(S, "_MODELS", {})
    monkeypatch.setattr("napari_esam.models.loading.build_model",
                        lambda *a, **k: BlobModel().eval())


def cli(capsys, *argv) -> tuple[int, str]:
    """``napari-esam ARGV`` in this process: (exit code, stderr); stdout is dropped."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(err: str, *words: str) -> str:
    """The CLI's error line (asserting it is one line, no traceback, naming ``words``)."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("napari-esam")]
    assert "Traceback" not in err and len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def synthetic_weights(tmp_path_factory) -> bytes:
    """Synthetic MobileSAM weights, as the bytes of a ``torch.save`` file."""
    from napari_esam.models.synthetic import synthetic_state_dict

    path = tmp_path_factory.mktemp("weights") / "mobilesam_synth.pt"
    torch.save({k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()},
               path)
    return path.read_bytes()


# ------------------------------------------------------------------ 12: zip checkpoints


def test_defect_12_zip_member_outside_archive_is_refused(tmp_path, synthetic_weights, capsys):
    """A member named ``../../..<abs path>`` must not make the loader read that file."""
    from napari_esam.models.weights import CheckpointError, load_state_dict

    outside = tmp_path / "ck" / "TRAVERSAL_MARKER.pt"
    outside.parent.mkdir()
    outside.write_bytes(synthetic_weights)  # valid weights outside the archive
    archive = tmp_path / "trav.pt.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../.." + str(outside), b"not weights")
    with pytest.raises(CheckpointError, match="points outside the archive"):
        load_state_dict("mobilesam", archive)
    image = tmp_path / "img.tif"
    tifffile.imwrite(image, blob_stack(1)[0][0])
    code, err = cli(capsys, "everything", image, "-o", tmp_path / "t.zarr", "--checkpoint",
                    archive, *FAST)
    assert code == 2
    one_line_error(err, "trav.pt.zip", "outside the archive")
    assert not (tmp_path / "t.zarr").exists()


def _declare_size(archive: Path, size: int) -> None:
    """Make the zip directory declare ``size`` uncompressed bytes for its one member."""
    data = bytearray(archive.read_bytes())
    at = data.index(b"PK\x01\x02")  # central directory entry; file size at offset 24
    struct.pack_into("<I", data, at + 24, size)
    archive.write_bytes(bytes(data))


def test_defect_12_zip_member_size_is_checked_before_extracting(tmp_path, synthetic_weights):
    """The zip directory's uncompressed size is checked against the limit first (a small zip
    that would inflate to GiBs is refused without writing them)."""
    from napari_esam.models.weights import CheckpointError, load_state_dict

    archive = tmp_path / "bomb.pt.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("efficient_sam_vits.pt", synthetic_weights)
    _declare_size(archive, 3 * 2**30)
    with pytest.raises(CheckpointError, match=r"3\.0 GiB, more than the 2 GiB"):
        load_state_dict("mobilesam", archive)


def test_defect_12_a_good_zip_still_loads_and_errors_name_the_users_file(
        tmp_path, synthetic_weights):
    from napari_esam.models.weights import CheckpointError, load_state_dict

    good = tmp_path / "good.pt.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("weights/mobile_sam.pt", synthetic_weights)
    assert len(load_state_dict("mobilesam", good)) > 100
    bad = tmp_path / "evil.pt.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("mobile_sam.pt", b"garbage, not a torch file")
    with pytest.raises(CheckpointError) as info:
        load_state_dict("mobilesam", bad)
    assert str(bad) in str(info.value) and "mobile_sam.pt" in str(info.value)
    assert "/tmp" not in str(info.value).replace(str(tmp_path), "")


# ------------------------------------------------------------------ 13: bad parameters

NAN = float("nan")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"points_per_side": 2.5}, "points_per_side must be a whole number"),
    ({"points_per_side": 10**6}, "points_per_side must be in 1..1024"),
    ({"pred_iou_thresh": NAN}, "pred_iou_thresh must be a number in"),
    ({"box_nms_thresh": 5}, "box_nms_thresh must be a number in"),
    ({"crop_overlap_ratio": 1.5}, "crop_overlap_ratio must be in"),
    ({"stability_score_offset": -1}, "stability_score_offset must be >= 0"),
    ({"point_grids": np.array([[2.0, 2.0]])}, "point_grids must hold normalised"),
    ({"point_grids": np.array([[NAN, 0.5]])}, "point_grids must hold normalised"),
    ({"crop_n_layers": -1}, "crop_n_layers must be in 0..4"),
    ({"contrast_limits": (4000, 0)}, "low < high"),
])
def test_defect_13_segment_everything_refuses_arguments_out_of_range(kwargs, message):
    from napari_esam.core.plane.everything import segment_everything

    image = blob_stack(1)[0][0]
    kwargs = {"points_per_side": 4, **kwargs}
    if "point_grids" in kwargs:
        kwargs["points_per_side"] = None
    with pytest.raises(ValueError, match=message):
        segment_everything(image, BlobModel().eval(), **kwargs)


def test_defect_13_predictor_grid_and_labels_refuse_garbage():
    from napari_esam.core.plane.labels import masks_to_labels
    from napari_esam.core.plane.predictor import Predictor
    from napari_esam.core.runs.settings import TilingParams
    from napari_esam.core.tiling.grid import TileGrid

    image = blob_stack(1)[0][0]
    predictor = Predictor(BlobModel().eval())
    for limits, message in [((4000, 0), "low < high"), ((10, 10), "low < high"),
                            ((NAN, 10), "finite"), ((1, 2, 3), "two numbers")]:
        with pytest.raises(ValueError, match=message):
            predictor.set_image(image, limits)
    assert not predictor.is_image_set  # nothing was encoded
    predictor.set_image(image)
    with pytest.raises(ValueError, match="point_coords is empty"):
        predictor.predict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(point_coords=[[NAN, 3.0]], point_labels=[1])
    with pytest.raises(ValueError, match=r"max_size \(10\) must be"):
        masks_to_labels([], (4, 4), min_size=50, max_size=10)
    with pytest.raises(ValueError, match="tile must be a whole number"):
        TileGrid((300, 300), 100.5, 10)
    with pytest.raises(ValueError, match="halo must be a whole number"):
        TilingParams("on", 128, 10.5).validate()


def test_defect_13_cli_refuses_a_huge_grid_in_one_line_and_creates_nothing(
        tmp_path, blob_models, capsys):
    image = tmp_path / "img.tif"
    tifffile.imwrite(image, blob_stack(1)[0][0])
    out = tmp_path / "p.zarr"
    code, err = cli(capsys, "everything", image, "-o", out, *FAST, "--points-per-side",
                    "1000000")
    assert code == 2
    one_line_error(err, "points_per_side must be in 1..1024")
    assert not out.exists()


# ------------------------------------------------------------------ 11: uint64 TIFF


def test_defect_11_uint64_labels_export_to_tiff_and_read_back(tmp_path, capsys):
    from napari_esam import write_labels
    from napari_esam._reader import get_reader
    from napari_esam.core.io.label_files import read_labels

    labels = np.zeros((2, 8, 8), np.uint64)
    labels[0, 2:5, 2:5] = 2**40
    labels[1, 4:, :3] = 2**63 + 7
    z = zarr.open_array(tmp_path / "u64.zarr", mode="w", shape=labels.shape, dtype="u8")
    z[:] = labels
    code, err = cli(capsys, "export", tmp_path / "u64.zarr", "-o", tmp_path / "u64.tif")
    assert code == 0, err
    data, meta = read_labels(tmp_path / "u64.tif")
    assert np.asarray(data).dtype == np.uint64 and meta["axes"] == "zyx"
    np.testing.assert_array_equal(np.asarray(data), labels)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "u64.tif"), labels)
    layer = get_reader(str(tmp_path / "u64.tif"))(str(tmp_path / "u64.tif"))[0]
    np.testing.assert_array_equal(np.asarray(layer[0]), labels)

    target = write_labels(tmp_path / "w.ome.tif", labels[0], scale=(0.5, 0.25))
    data, meta = read_labels(target)
    np.testing.assert_array_equal(np.asarray(data), labels[0])
    assert meta["scale"] == [0.5, 0.25] and meta["napari_esam"]


# ------------------------------------------------------------------ shared inputs


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Path]:
    """A 4-slice TIFF stack and the finished ``everything`` output of it (made once; tests
    copy the output before damaging it)."""
    root = tmp_path_factory.mktemp("finished")
    stack = root / "stack4.tif"
    tifffile.imwrite(stack, blob_stack(4)[0], photometric="minisblack")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "_MODELS", {})
        mp.setattr("napari_esam.models.loading.build_model",
                   lambda *a, **k: BlobModel().eval())
        assert main(["everything", str(stack), "-o", str(root / "base4.zarr"), *FAST]) == 0
    return {"stack": stack, "output": root / "base4.zarr"}


def copy_of(path: Path, target: Path) -> Path:
    shutil.copytree(path, target)
    return target


def edit_attrs(store: Path, change) -> None:
    """Apply ``change(attributes)`` to the root ``zarr.json`` of a Zarr v3 store."""
    meta = json.loads((store / "zarr.json").read_text())
    change(meta["attributes"])
    (store / "zarr.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------ 8: malformed metadata

RUN = "napari-esam-run"


@pytest.mark.parametrize(("change", "what"), [
    (lambda a: a[RUN].__setitem__("slices", "garbage"), "'slices' is str"),
    (lambda a: a.__setitem__(RUN, None), "it is NoneType"),
    (lambda a: a.__setitem__(RUN, [1, 2]), "it is list"),
    (lambda a: a[RUN].__setitem__("slices", {"0": "many"}), "slice 0 has 'many' objects"),
    (lambda a: a[RUN].__setitem__("slices", {"abc": 1}), "slice 'abc' is not a slice index"),
    (lambda a: a[RUN].__setitem__("slices", {"0": 3, "99": 5}),
     "slice 99 is done but the input has 4 slices"),
    (lambda a: a[RUN].__setitem__("complete", "yes"), "'complete' is 'yes'"),
])
def test_defect_08_malformed_resume_record_is_refused_until_overwrite(
        tmp_path, finished, blob_models, capsys, change, what):
    out = copy_of(finished["output"], tmp_path / "c1.zarr")
    edit_attrs(out, change)
    before = (out / "zarr.json").read_bytes()
    code, err = cli(capsys, "everything", finished["stack"], "-o", out, *FAST)
    assert code == 2
    one_line_error(err, "c1.zarr", "resume record", "is damaged", what, "--overwrite")
    assert (out / "zarr.json").read_bytes() == before  # nothing was touched
    code, err = cli(capsys, "everything", finished["stack"], "-o", out, *FAST, "--overwrite")
    assert code == 0, err
    record = zarr.open_group(out, mode="r").attrs[RUN]
    assert record["complete"] and sorted(record["slices"]) == ["0", "1", "2", "3"]


@pytest.mark.parametrize(("change", "what"), [
    (lambda a: a["ome"].__setitem__("multiscales", [{}]), "has no list of 'datasets'"),
    (lambda a: a["ome"].__setitem__("multiscales", "garbage"), "not a list of mappings"),
    (lambda a: a["ome"]["multiscales"][0]["datasets"][0].__setitem__("path", "nope"),
     "its dataset 'nope' is not in the group"),
])
def test_defect_08_malformed_ome_multiscales_give_one_line(tmp_path, finished, blob_models,
                                                           capsys, change, what):
    from napari_esam._reader import get_reader
    from napari_esam.core.io.label_files import read_labels

    bad = copy_of(finished["output"], tmp_path / "ome_bad.zarr")
    edit_attrs(bad, change)
    code, err = cli(capsys, "export", bad, "-o", tmp_path / "x.tif")
    assert code == 2
    one_line_error(err, "ome_bad.zarr", "'multiscales' metadata is malformed", what)
    assert not (tmp_path / "x.tif").exists()
    code, err = cli(capsys, "everything", bad, "-o", tmp_path / "y.zarr", *FAST)
    assert code == 2
    one_line_error(err, "ome_bad.zarr", what)
    with pytest.raises(ValueError, match="malformed"):
        read_labels(bad)
    reader = get_reader(str(bad))  # our marker is there: claimed, then a clear error
    with pytest.raises(ValueError, match="malformed"):
        reader(str(bad))


def test_defect_08_tiff_tag_holding_a_json_list_or_bad_fields(tmp_path, capsys):
    from napari_esam._reader import get_reader

    listed = tmp_path / "tag_list.tif"
    tifffile.imwrite(listed, np.ones((8, 8), np.uint8),
                     extratags=[(65420, "s", 0, json.dumps([1, 2]), True)])
    assert get_reader(str(listed)) is None  # not ours: napari's own reader takes it
    fields = tmp_path / "tag_fields.tif"
    marker = {"napari-esam": {"kind": "labels", "axes": 3, "scale": "x", "name": "ok"}}
    tifffile.imwrite(fields, np.ones((8, 8), np.uint8),
                     extratags=[(65420, "s", 0, json.dumps(marker), True)])
    with pytest.warns(UserWarning, match=r"malformed napari-esam metadata 'axes' \(3\), "
                      r"'scale' \('x'\); the defaults are used"):
        layer = get_reader(str(fields))(str(fields))[0]
    assert layer[1]["scale"] == (1.0, 1.0) and layer[1]["name"] == "ok"
    code, err = cli(capsys, "export", fields, "-o", tmp_path / "t2.zarr")
    assert code == 0 and err.count("\n") == 1
    assert err.startswith("napari-esam export: warning: ") and "'axes' (3)" in err


def test_defect_08_damaged_embedding_store_is_refused(tmp_path, blob_models, capsys):
    from tests.fakes import blob_image

    image = tmp_path / "img.tif"
    tifffile.imwrite(image, blob_image((300, 400)), photometric="minisblack")
    tiled = ["--tiled", "on", "--tile", "256", "--halo", "32"]
    store = tmp_path / "emb.zarr"
    assert cli(capsys, "embed", image, "-o", store, "--device", "cpu", *tiled,
               "--no-progress")[0] == 0
    good = tmp_path / "good.zarr"
    shutil.copytree(store, good)
    edit_attrs(store, lambda a: a["napari_esam_embeddings"].pop("tile"))
    code, err = cli(capsys, "everything", image, "-o", tmp_path / "m.zarr", *FAST, *tiled,
                    "--embeddings", store)
    assert code == 2
    one_line_error(err, "emb.zarr", "is damaged", "no 'tile'", "--overwrite")
    assert not (tmp_path / "m.zarr").exists()
    shutil.rmtree(store / "done")
    code, err = cli(capsys, "embed", image, "-o", store, "--device", "cpu", *tiled,
                    "--no-progress", "--overwrite")
    assert code == 0, err
    shutil.rmtree(good / "done")
    code, err = cli(capsys, "everything", image, "-o", tmp_path / "m.zarr", *FAST, *tiled,
                    "--embeddings", good)
    assert code == 2
    one_line_error(err, "good.zarr", "is damaged", "'done' is missing")


# ------------------------------------------------------------------ 7: corrupt chunks


def truncate(path: Path, keep: int = 50) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_defect_07_corrupt_output_chunk_is_named_by_export_and_reader(tmp_path, finished,
                                                                       capsys):
    from napari_esam._reader import get_reader
    from napari_esam.core.io.label_files import read_labels

    bad = copy_of(finished["output"], tmp_path / "c8.zarr")
    truncate(bad / "0" / "c" / "0" / "0" / "0")
    code, err = cli(capsys, "export", bad, "-o", tmp_path / "x.tif")
    assert code == 2
    one_line_error(err, str(bad / "0" / "c" / "0" / "0" / "0"), "chunk (0, 0, 0)",
                   "cannot be decoded", "run the same command again")
    assert not (tmp_path / "x.tif").exists() and not list(tmp_path.glob(".x.tif*"))
    data, _ = read_labels(bad)
    np.testing.assert_array_equal(data[1:], zarr.open_array(finished["output"] / "0")[1:])
    with pytest.raises(ValueError, match=r"chunk \(0, 0, 0\) of .*c8\.zarr"):
        np.asarray(data)
    with pytest.raises(ValueError, match="cannot be decoded"):
        layer = get_reader(str(bad))(str(bad))[0]
        np.asarray(layer[0][0])


def test_defect_07_corrupt_output_chunk_is_recomputed_on_resume(tmp_path, finished,
                                                                blob_models, capsys):
    bad = copy_of(finished["output"], tmp_path / "c8.zarr")
    truncate(bad / "0" / "c" / "2" / "0" / "0")
    code, err = cli(capsys, "everything", finished["stack"], "-o", bad, *FAST)
    assert code == 0, err
    assert "repaired: slice 2: chunk (2, 0, 0)" in err and "Traceback" not in err
    assert "tiles segmented 1 (already done: 3)" in err
    np.testing.assert_array_equal(zarr.open_array(bad / "0")[...],
                                  zarr.open_array(finished["output"] / "0")[...])
    assert zarr.open_group(bad, mode="r").attrs[RUN]["complete"]
    code, err = cli(capsys, "export", bad, "-o", tmp_path / "x.tif")
    assert code == 0, err


def test_defect_07_corrupt_input_chunk_is_named(tmp_path, finished, blob_models, capsys):
    src = tmp_path / "in.zarr"
    z = zarr.open_array(src, mode="w", shape=(4, 64, 64), chunks=(1, 64, 64), dtype="u2")
    z[:] = tifffile.imread(finished["stack"])
    truncate(src / "c" / "1" / "0" / "0", 20)
    code, err = cli(capsys, "everything", src, "-o", tmp_path / "out.zarr", *FAST)
    assert code == 2
    one_line_error(err, str(src / "c" / "1" / "0" / "0"), "cannot be decoded")


def test_defect_07_undecodable_embedding_tile_is_recomputed_and_rewritten(
        tmp_path, blob_models, capsys):
    from napari_esam.core.tiling.store import EmbeddingStore, read_signature
    from tests.fakes import blob_image

    image = tmp_path / "img.tif"
    tifffile.imwrite(image, blob_image((300, 400)), photometric="minisblack")
    tiled = ["--tiled", "on", "--tile", "256", "--halo", "32"]
    store = tmp_path / "e.zarr"
    assert cli(capsys, "embed", image, "-o", store, "--device", "cpu", *tiled,
               "--no-progress")[0] == 0
    code, err = cli(capsys, "everything", image, "-o", tmp_path / "ref.zarr", *FAST, *tiled,
                    "--embeddings", store)
    assert code == 0 and "embeddings from the store 4" in err
    tile = store / "embeddings" / "c" / "0" / "1" / "0" / "0" / "0"
    truncate(tile, 1000)
    for run in ("m", "m2"):  # the first run recomputes and rewrites it, the second reads it
        code, err = cli(capsys, "everything", image, "-o", tmp_path / f"{run}.zarr", *FAST,
                        *tiled, "--embeddings", store)
        assert code == 0 and "Traceback" not in err, err
        np.testing.assert_array_equal(zarr.open_array(tmp_path / f"{run}.zarr" / "0")[...],
                                      zarr.open_array(tmp_path / "ref.zarr" / "0")[...])
        repaired = "damaged store tiles recomputed 1" in err
        assert repaired == (run == "m") and ("encoder runs 1" in err) == (run == "m"), err
    opened = EmbeddingStore.open(store, read_signature(store), "r")
    assert opened.load((), 0, 1)[0].shape == (256, 64, 64)  # decodes again
    truncate(store / "done" / "c" / "0" / "0", 3)  # the flags themselves: all recomputed
    code, err = cli(capsys, "everything", image, "-o", tmp_path / "m3.zarr", *FAST, *tiled,
                    "--embeddings", store)
    assert code == 0 and "encoder runs 4" in err, err


def test_defect_07_undecodable_scratch_tile_is_recomputed_on_resume(tmp_path, blob_models,
                                                                    monkeypatch, capsys):
    """A tile kept in the scratch group of an interrupted tiled run whose chunk is damaged
    is segmented again; the result equals an uninterrupted run."""
    from tests.fakes import blob_image

    image = tmp_path / "img.tif"
    tifffile.imwrite(image, blob_image((300, 400)), photometric="minisblack")
    tiled = ["--tiled", "on", "--tile", "256", "--halo", "32"]
    assert cli(capsys, "everything", image, "-o", tmp_path / "ref.zarr", *FAST, *tiled)[0] == 0
    calls = []
    original = BlobModel.encode

    def encode_then_interrupt(self, x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(BlobModel, "encode", encode_then_interrupt)
    out = tmp_path / "m.zarr"
    assert cli(capsys, "everything", image, "-o", out, *FAST, *tiled)[0] == 1
    monkeypatch.setattr(BlobModel, "encode", original)
    scratch = tmp_path / "m.zarr.tiles.zarr"
    assert sorted(p.name for p in scratch.glob("t*")) == ["t0", "t1"]  # 2 tiles kept
    bits = sorted(scratch.glob("t*/bits/c/0"))  # (a tile without masks has no chunk)
    truncate(bits[-1], 5)
    code, err = cli(capsys, "everything", image, "-o", out, *FAST, *tiled)
    assert code == 0, err
    assert "tiles segmented 3 (already done: 1)" in err
    np.testing.assert_array_equal(zarr.open_array(out / "0")[...],
                                  zarr.open_array(tmp_path / "ref.zarr" / "0")[...])


# ------------------------------------------------------------------ 9: huge declared shapes

#: a side no machine can hold one chunk/plane of (1e12 pixels)
HUGE = 1_000_000


def huge_header_tiff(path: Path, side: int = HUGE) -> Path:
    """A 126-byte TIFF whose tags declare ``side`` x ``side`` uint8 in one uncompressed strip."""
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 122), (277, 3, 1), (278, 4, side), (279, 4, 4)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4)
    return path


def test_defect_09_huge_declared_shapes_are_refused_with_their_size(tmp_path, blob_models,
                                                                    capsys):
    header = huge_header_tiff(tmp_path / "huge_hdr.tif")
    code, err = cli(capsys, "everything", header, "-o", tmp_path / "h.zarr", *FAST)
    assert code == 2
    one_line_error(err, "huge_hdr.tif", "(1000000, 1000000) uint8", "931.3 GiB", "truncated")
    one_chunk = tmp_path / "huge.zarr"
    zarr.open_array(one_chunk, mode="w", shape=(HUGE, HUGE), chunks=(HUGE, HUGE), dtype="u2")
    for argv in (["everything", one_chunk, "-o", tmp_path / "h2.zarr", *FAST],
                 ["export", one_chunk, "-o", tmp_path / "h.tif"]):
        code, err = cli(capsys, *argv)
        assert code == 2
        one_line_error(err, "huge.zarr", "chunks of (1000000, 1000000)", "1.8 TiB",
                       "smaller chunks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.zarr", "huge_hdr.tif"]


def test_defect_09_huge_tiff_pages_and_untiled_planes_are_refused_before_any_work(
        tmp_path, blob_models, capsys):
    from napari_esam import write_labels
    from napari_esam.core.runs.pipeline import run_batch

    chunked = tmp_path / "huge2.zarr"
    zarr.open_array(chunked, mode="w", shape=(HUGE, HUGE), chunks=(1024, 1024), dtype="u2")
    code, err = cli(capsys, "export", chunked, "-o", tmp_path / "h.tif")
    assert code == 2
    one_line_error(err, "TIFF page of 1000000 x 1000000 uint16", "3.6 TiB", ".zarr instead")
    with pytest.raises(ValueError, match="TIFF page"):
        write_labels(tmp_path / "w.tif", zarr.open_array(chunked, mode="r"))
    code, err = cli(capsys, "everything", chunked, "-o", tmp_path / "h.zarr", *FAST,
                    "--tiled", "off")
    assert code == 2
    one_line_error(err, "tile of 1000000 x 1000000 px", "--tiled on --tile")
    with pytest.raises(ValueError, match=r"labels held in memory .* \.zarr output"):
        run_batch(zarr.open_array(chunked, mode="r"))  # in memory: 1.8 TiB of labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge2.zarr"]


def test_defect_09_an_enormous_embedding_store_is_refused_before_writing(
        tmp_path, blob_models, monkeypatch, capsys):
    chunked = tmp_path / "huge2.zarr"
    zarr.open_array(chunked, mode="w", shape=(HUGE, HUGE), chunks=(1024, 1024), dtype="u2")

    def no_encoding(self, x):  # the old code started encoding 1.7 million tiles
        raise AssertionError("a tile was encoded")

    monkeypatch.setattr(BlobModel, "encode", no_encoding)
    code, err = cli(capsys, "embed", chunked, "-o", tmp_path / "e.zarr", "--device", "cpu",
                    "--no-progress")
    assert code == 2
    one_line_error(err, "e.zarr", "6.5 TiB (1695204 tiles of 4.0 MiB)", "free on its disk",
                   "--no-space-check")
    assert not (tmp_path / "e.zarr").exists()
    code, err = cli(capsys, "everything", chunked, "-o", tmp_path / "m.zarr", *FAST,
                    "--embeddings", tmp_path / "e.zarr")
    assert code == 2
    one_line_error(err, "e.zarr", "6.5 TiB", "--no-space-check")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge2.zarr"]


# ------------------------------------------------------------------ 10: late failures


def test_defect_10_six_d_input_to_tiff_is_refused_before_any_work(tmp_path, blob_models,
                                                                   monkeypatch, capsys):
    stack = blob_stack(4, size=48)[0].reshape(2, 1, 2, 1, 48, 48)
    np.save(tmp_path / "d6.npy", stack)

    def no_encoding(self, x):
        raise AssertionError("a plane was segmented before the refusal")

    monkeypatch.setattr(BlobModel, "encode", no_encoding)
    code, err = cli(capsys, "everything", tmp_path / "d6.npy", "-o", tmp_path / "e42.tif",
                    *FAST)
    assert code == 2
    one_line_error(err, "6 dimensions", ".zarr instead", "nothing was computed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d6.npy"]


def test_defect_10_own_outputs_open_in_export_and_reader(tmp_path, blob_models, capsys):
    from napari_esam._reader import get_reader
    from napari_esam.core.io.label_files import read_labels

    stack = blob_stack(4, size=48)[0]
    np.save(tmp_path / "d6.npy", stack.reshape(2, 1, 2, 1, 48, 48))
    assert cli(capsys, "everything", tmp_path / "d6.npy", "-o", tmp_path / "e09.zarr",
               *FAST)[0] == 0
    labels6 = zarr.open_array(tmp_path / "e09.zarr" / "0")[...]
    assert labels6.shape == (2, 1, 2, 1, 48, 48) and labels6.any()
    layer = get_reader(str(tmp_path / "e09.zarr"))(str(tmp_path / "e09.zarr"))[0]
    np.testing.assert_array_equal(np.asarray(layer[0]), labels6)
    code, err = cli(capsys, "export", tmp_path / "e09.zarr", "-o", tmp_path / "x9.zarr")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(read_labels(tmp_path / "x9.zarr")[0]), labels6)
    code, err = cli(capsys, "export", tmp_path / "e09.zarr", "-o", tmp_path / "x9.tif")
    assert code == 2
    one_line_error(err, "6 dimensions", ".zarr instead")

    np.save(tmp_path / "zlast.npy", np.moveaxis(stack, 0, 2).copy())  # (48, 48, 4): z last
    axis = ["--axis", "2", "--channel-axis", "none"]
    assert cli(capsys, "everything", tmp_path / "zlast.npy", "-o", tmp_path / "e43.zarr",
               *axis, *FAST)[0] == 0
    stored = zarr.open_array(tmp_path / "e43.zarr" / "0")[...]
    planes = np.moveaxis(stored, 2, 0)  # the planes, as pages
    assert stored.shape == (48, 48, 4) and planes.any()
    data, meta = read_labels(tmp_path / "e43.zarr")
    assert data.shape == (4, 48, 48) and meta["axes"] == "zyx"
    np.testing.assert_array_equal(np.asarray(data), planes)
    layer = get_reader(str(tmp_path / "e43.zarr"))(str(tmp_path / "e43.zarr"))[0]
    np.testing.assert_array_equal(np.asarray(layer[0]), planes)
    code, err = cli(capsys, "export", tmp_path / "e43.zarr", "-o", tmp_path / "x43.tif")
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "x43.tif"), planes)
    code, err = cli(capsys, "everything", tmp_path / "zlast.npy", "-o", tmp_path / "e44.tif",
                    *axis, *FAST)
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "e44.tif"), planes)
