"""The adversarial probe's defects of outputs, resume, locks, checkpoints and messages
(``../shared/notes/reliability-defects.md``), one test per defect, named by its number.

Each test runs the notes' command through the CLI's ``main()`` (a subprocess where a signal
or a second process is needed) on small synthetic stacks, with the blob model standing in
for MobileSAM (the weights file only has to exist; its bytes identify it in the run record),
and checks the message, the exit code and the files left on disk.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_esam.cli import main
from napari_esam.core.io.label_files import write_labels
from napari_esam.core.runs import settings as S
from napari_esam.core.runs.outputs import ZarrOutput
from napari_esam.core.runs.pipeline import run_batch
from napari_esam.core.tiling.grid import TileGrid
from napari_esam.core.tiling.store import read_signature
from tests.fakes import BlobModel, blob_stack

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def built(monkeypatch) -> list:
    """Every model the CLI builds is the blob model (fast); the built ones are recorded."""
    models: list = []

    def build(name, checkpoint=None, device="auto", dtype=None):
        models.append(BlobModel().eval())
        return models[-1]

    monkeypatch.setattr("napari_esam.models.loading.build_model", build)
    monkeypatch.setattr(S, "_MODELS", {})
    return models


@pytest.fixture
def work(tmp_path, built, monkeypatch) -> Path:
    """A scratch folder (the working directory) with the notes' inputs: ``in/stack4.tif``
    (4 planes of blobs), ``in/other4.tif`` (the same flipped left-right), ``in/nan.npy``
    (the stack as float with a NaN in plane 2) and the weights ``w/weights.pt``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    stack, _ = blob_stack(4)
    tifffile.imwrite("in/stack4.tif", stack, photometric="minisblack")
    tifffile.imwrite("in/other4.tif", stack[..., ::-1].copy(), photometric="minisblack")
    nan = stack.astype(np.float32)
    nan[2, 5, 5] = np.nan
    np.save("in/nan.npy", nan)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "weights.pt").write_bytes(b"weights A")
    return tmp_path


def ck(weights: str = "w/weights.pt") -> list[str]:
    return ["--checkpoint", weights, "--device", "cpu", "--points-per-side", "4",
            "--no-progress"]


def eck(weights: str = "w/weights.pt") -> list[str]:
    """The model options of ``embed``."""
    return ["--checkpoint", weights, "--device", "cpu", "--no-progress"]


def cli(*argv: object) -> int:
    return main([str(a) for a in argv])


def files(path: str | Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) with its bytes."""
    p = Path(path)
    if p.is_file():
        return {".": p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def labels(path: str | Path) -> np.ndarray:
    return zarr.open_array(Path(path) / "0", mode="r")[...]


def interrupt_after(monkeypatch, n: int) -> None:
    """Ctrl-C right after the ``n``-th plane of the next run is recorded."""
    real = ZarrOutput.record
    calls: list[int] = []

    def record(self, index, n_objects):
        real(self, index, n_objects)
        calls.append(index)
        if len(calls) == n:
            monkeypatch.setattr(ZarrOutput, "record", real)
            raise KeyboardInterrupt

    monkeypatch.setattr(ZarrOutput, "record", record)


def hidden(folder: Path) -> list[str]:
    """Names of hidden leftovers (temporaries, replacements, backups) and lock files."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") or p.name.endswith(".lock"))


HOLDER = """
import sys
from contextlib import ExitStack
from napari_esam.core.io.locks import hold
with ExitStack() as stack:
    for path in sys.argv[1:]:
        stack.enter_context(hold(path))
    print("ready", flush=True)
    sys.stdin.read()
"""


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# ----------------------------------------------------------------------------- defects


def test_defect_01_overwrite_into_the_group_holding_the_input_is_refused(work, capsys):
    """``everything p.zarr/raw -o p.zarr --overwrite`` (plain and tiled) used to delete the
    input array; it is refused and the group is untouched."""
    image = blob_stack(1)[0][0]
    group = zarr.open_group("p.zarr", mode="w")
    group.create_array("raw", data=image)
    before = files("p.zarr")
    for extra in ([], ["--tiled", "on", "--tile", "32", "--halo", "8"]):
        assert cli("everything", "p.zarr/raw", "-o", "p.zarr", "--overwrite", *ck(), *extra) == 2
        err = capsys.readouterr().err
        assert "must not be the input" in err and "Traceback" not in err
        assert files("p.zarr") == before
    np.testing.assert_array_equal(zarr.open_array("p.zarr/raw", mode="r")[...], image)
    assert hidden(work) == []


def test_defect_02_resume_with_another_image_of_the_same_shape_is_refused(work, capsys,
                                                                           monkeypatch):
    """A stopped run resumed with another stack of the same shape and dtype used to mix
    both; it is refused naming the content, and the same input then resumes to exactly the
    uninterrupted result."""
    interrupt_after(monkeypatch, 2)
    assert cli("everything", "in/stack4.tif", "-o", "r1.zarr", *ck()) == 1
    before = files("r1.zarr")
    assert cli("everything", "in/other4.tif", "-o", "r1.zarr", *ck()) == 2
    err = capsys.readouterr().err
    assert "other input or settings" in err and "content_hash" in err
    assert files("r1.zarr") == before
    assert cli("everything", "in/stack4.tif", "-o", "r1.zarr", *ck()) == 0
    assert cli("everything", "in/stack4.tif", "-o", "ref.zarr", *ck()) == 0
    np.testing.assert_array_equal(labels("r1.zarr"), labels("ref.zarr"))


def test_defect_03_resume_with_other_weights_under_the_same_name_is_refused(work, capsys,
                                                                            monkeypatch):
    """Weights of the same file name but other content used to resume a run; the record
    holds the weights' size and digest, so the resume is refused naming the checkpoint."""
    (work / "alt").mkdir()
    (work / "alt" / "weights.pt").write_bytes(b"weights B")
    interrupt_after(monkeypatch, 2)
    assert cli("everything", "in/stack4.tif", "-o", "r2.zarr", *ck()) == 1
    before = files("r2.zarr")
    assert cli("everything", "in/stack4.tif", "-o", "r2.zarr", *ck("alt/weights.pt")) == 2
    err = capsys.readouterr().err
    assert "other input or settings" in err and "checkpoint" in err
    assert files("r2.zarr") == before


def test_defect_04_overwrite_keeps_the_old_result_until_the_new_run_is_done(work, capsys,
                                                                             monkeypatch):
    """``--overwrite`` used to delete a finished result before the new input was read. Now
    the new run writes beside it and replaces it only when done: a failing input, a Ctrl-C
    (CLI), a failing ``run_batch(overwrite=True)`` and a failing ``embed --overwrite`` all
    leave the old result as it was; the stopped replacement resumes and then replaces it."""
    assert cli("everything", "in/stack4.tif", "-o", "keep.zarr", *ck()) == 0
    old = files("keep.zarr")
    assert cli("everything", "in/nan.npy", "-o", "keep.zarr", "--overwrite", *ck()) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "'keep.zarr' is unchanged" in err
    assert files("keep.zarr") == old
    # Ctrl-C during a valid replacement: the old result stays, the new work is resumable
    interrupt_after(monkeypatch, 2)
    assert cli("everything", "in/other4.tif", "-o", "keep.zarr", "--overwrite", *ck()) == 1
    err = capsys.readouterr().err
    assert "'keep.zarr' is unchanged" in err and "without --overwrite to resume" in err
    assert files("keep.zarr") == old
    assert cli("everything", "in/other4.tif", "-o", "keep.zarr", *ck()) == 0
    assert "resuming the unfinished --overwrite" in capsys.readouterr().err
    assert cli("everything", "in/other4.tif", "-o", "ref.zarr", *ck()) == 0
    np.testing.assert_array_equal(labels("keep.zarr"), labels("ref.zarr"))
    assert hidden(work) == []
    # the Python API: the same rule
    new = files("keep.zarr")
    settings = S.BatchSettings(S.ModelSpec("blob", device="cpu", factory="tests.fakes:BlobModel"),
                               S.EverythingParams(points_per_side=4))
    with pytest.raises(ValueError, match="NaN"):
        run_batch("in/nan.npy", settings, "keep.zarr", overwrite=True)
    assert files("keep.zarr") == new
    # embed --overwrite: the old store stays until the new one is complete
    assert cli("embed", "in/stack4.tif", "-o", "emb.zarr", *eck()) == 0
    store, signature = files("emb.zarr"), read_signature("emb.zarr")
    assert cli("embed", "in/nan.npy", "-o", "emb.zarr", "--overwrite", *eck()) == 2
    assert "NaN" in capsys.readouterr().err
    assert files("emb.zarr") == store
    assert cli("embed", "in/other4.tif", "-o", "emb.zarr", "--overwrite", *eck()) == 0
    assert read_signature("emb.zarr").content_hash != signature.content_hash
    # only the stopped replacement of the failed API run is left, resumable
    assert hidden(work) == [".keep.zarr.replacement"]
    assert sorted(ZarrOutput(".keep.zarr.replacement").done()) == [0, 1]


def test_defect_05_export_overwrite_replaces_only_its_own_targets(work, capsys):
    """``export --overwrite`` used to delete any folder named ``*.zarr`` (user data, the
    group holding its own input); it replaces only napari-esam label stores and TIFF
    files."""
    lab = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_labels("lab.tif", lab)
    Path("userdata.zarr").mkdir()
    Path("userdata.zarr/notes.txt").write_text("precious")
    group = zarr.open_group("proj3.zarr", mode="w")
    group.create_array("raw", data=lab)
    zarr.create_array("foreign.zarr", shape=(2, 2), dtype="uint8")
    Path("notes.tif").write_text("not a TIFF")
    cases = {"userdata.zarr": ("lab.tif", "not a labels store written by napari-esam"),
             "proj3.zarr": ("proj3.zarr/raw", "must not be the input"),
             "foreign.zarr": ("lab.tif", "not a labels store written by napari-esam"),
             "notes.tif": ("lab.tif", "it is not a TIFF file")}
    for target, (source, message) in cases.items():
        before = files(target)
        assert cli("export", source, "-o", target, "--overwrite") == 2
        assert message in capsys.readouterr().err
        assert files(target) == before
    # its own exports are replaced
    assert cli("export", "lab.tif", "-o", "mine.zarr") == 0
    assert cli("export", "proj3.zarr/raw", "-o", "mine.zarr", "--overwrite") == 0
    assert cli("export", "proj3.zarr/raw", "-o", "lab.tif", "--overwrite") == 0
    assert hidden(work) == []


def test_defect_06_a_second_run_is_refused_and_a_damaged_work_store_is_recovered(work,
                                                                                 capsys):
    """Two runs on one output: the second is refused naming the holder (everything to a
    TIFF or a Zarr with --overwrite, embed, export); a holder killed with SIGKILL leaves a
    stale lock that the next run takes over; a TIFF run's damaged working store (what the
    race left: no labels array) no longer blocks every later run."""
    assert cli("everything", "in/stack4.tif", "-o", "out.zarr", *ck()) == 0
    old = files("out.zarr")
    targets = ["cct.tif", "out.zarr", "emb.zarr", "x.tif"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *targets], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "ready"
        runs = [["everything", "in/stack4.tif", "-o", "cct.tif", *ck()],
                ["everything", "in/other4.tif", "-o", "out.zarr", "--overwrite", *ck()],
                ["embed", "in/stack4.tif", "-o", "emb.zarr", *eck()],
                ["export", "out.zarr", "-o", "x.tif"]]
        for argv in runs:
            assert cli(*argv) == 2
            err = capsys.readouterr().err
            assert f"is in use by pid {holder.pid}" in err and ".lock'" in err, err
        assert files("out.zarr") == old
        assert not any(Path(p).exists() for p in ("cct.tif", "emb.zarr", "x.tif",
                                                   "cct.tif.partial.zarr"))
    finally:
        holder.kill()  # SIGKILL: its lock files stay behind, stale
        holder.wait()
    assert Path("cct.tif.lock").exists()
    # the damaged working store an earlier race left (a group without its labels array)
    Path("cct.tif.partial.zarr").mkdir()
    for f, data in old.items():
        if not f.startswith("0/"):
            (Path("cct.tif.partial.zarr") / f).write_bytes(data)
    assert cli("everything", "in/stack4.tif", "-o", "cct.tif", *ck()) == 0
    assert "was damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread("cct.tif"), labels("out.zarr"))
    assert hidden(work) == ["emb.zarr.lock", "out.zarr.lock", "x.tif.lock"]  # still stale
    for argv in ([["embed", "in/stack4.tif", "-o", "emb.zarr", *eck()],
                  ["export", "out.zarr", "-o", "x.tif"]]):
        assert cli(*argv) == 0  # the stale locks are taken over
    # a damaged result of the user's is not touched: the message names it and --overwrite
    (work / "out.zarr" / "0" / "zarr.json").unlink()
    assert cli("everything", "in/stack4.tif", "-o", "out.zarr", *ck()) == 2
    err = capsys.readouterr().err
    assert "out.zarr' is damaged" in err and "--overwrite" in err
    assert hidden(work) == []  # the last stale lock was taken over, and released


def test_defect_14_weights_with_nan_are_refused_naming_the_entry(tmp_path, capsys):
    """A checkpoint with a NaN entry used to give empty labels with exit 0; it is refused
    at load, naming the entry, and no output is created."""
    from napari_esam.models.synthetic import synthetic_state_dict

    state = {k: torch.as_tensor(v) for k, v in synthetic_state_dict("mobilesam").items()}
    key = [k for k, v in state.items() if v.is_floating_point()][5]
    state[key].fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    tifffile.imwrite(tmp_path / "img.tif", blob_stack(1)[0][0])
    S.clear_model_cache()
    assert cli("everything", tmp_path / "img.tif", "-o", tmp_path / "k.zarr", "--checkpoint",
               tmp_path / "nan.pt", "--device", "cpu", "--points-per-side", "2") == 2
    err = capsys.readouterr().err
    assert key in err and "NaN or infinite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "nan.pt"]


def test_defect_15_embed_reads_rgba_and_channel_first_stacks_as_everything_does(work,
                                                                                 capsys):
    """``embed`` used to read an RGBA image as 128 gray planes of 128x4 px; it reads the
    colour axis as everything does (RGBA: one RGB plane; a 3-plane channel-first stack:
    three gray planes), and everything then takes every embedding from the store."""
    rgba = np.random.default_rng(3).integers(0, 255, (96, 96, 4)).astype(np.uint8)
    tifffile.imwrite("rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.save("cf3.npy", rgba[..., :3].transpose(2, 0, 1).copy())
    grid = TileGrid((96, 96), 64, 16)
    n = grid.n_tiles
    tiling = ["--tiled", "on", "--tile", "64", "--halo", "16"]
    assert cli("embed", "rgba.tif", "-o", "m23.zarr", *eck(), *tiling) == 0
    assert (f"(96, 96, 4), {grid.n_y}x{grid.n_x} tiles of 64 px (halo 16) per plane, "
            f"{n} in all") in capsys.readouterr().err
    assert read_signature("m23.zarr").rgb
    assert cli("everything", "rgba.tif", "-o", "l.zarr", *ck(), *tiling,
               "--embeddings", "m23.zarr") == 0
    assert "encoder runs 0" in capsys.readouterr().err
    assert cli("embed", "cf3.npy", "-o", "m24.zarr", *eck(), *tiling) == 0
    assert f"{3 * n} in all" in capsys.readouterr().err
    assert not read_signature("m24.zarr").rgb


# ----------------------------------------------------------------- 16: messages, leftovers


def test_defect_16_a_folder_input_is_named(work, capsys):
    Path("folder").mkdir()
    assert cli("everything", "folder", "-o", "o.zarr", *ck()) == 2
    err = capsys.readouterr().err
    assert "folder' is a folder, not an image" in err and "No group found" not in err
    assert not Path("o.zarr").exists()


def test_defect_16_truncated_tiffs_are_named_before_the_model_loads(work, capsys, built):
    data = Path("in/stack4.tif").read_bytes()
    Path("trunc.tif").write_bytes(data[: len(data) // 2])
    assert cli("everything", "trunc.tif", "-o", "t.zarr", *ck()) == 2
    err = capsys.readouterr().err
    assert "trunc.tif' is " in err and "truncated" in err and err.count("\n") == 1
    assert built == []  # refused before any model
    assert cli("export", "trunc.tif", "-o", "x.zarr") == 2
    err = capsys.readouterr().err
    assert "trunc.tif' is " in err and "truncated" in err
    Path("head.tif").write_bytes(data[:100])  # the page directories cut
    assert cli("everything", "head.tif", "-o", "t.zarr", *ck()) == 2
    err = capsys.readouterr().err
    assert "head.tif' is not a readable TIFF" in err and err.count("\n") == 1
    assert sorted(p.name for p in work.iterdir()) == ["head.tif", "in", "trunc.tif", "w"]


def test_defect_16_export_refuses_unsupported_formats(work, capsys):
    np.save("lab.npy", np.zeros((4, 4), np.uint16))
    assert cli("export", "lab.npy", "-o", "x.tif") == 2
    assert "unsupported labels format '.npy' for 'lab.npy'" in capsys.readouterr().err
    assert not Path("x.tif").exists()


def test_defect_16_a_text_checkpoint_gets_no_unsafe_advice(tmp_path, capsys, monkeypatch):
    """A text file given as weights is named as not a checkpoint, without torch's advice to
    load it with ``weights_only=False`` (the real loader; no model is built)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(S, "_MODELS", {})
    tifffile.imwrite("img.tif", blob_stack(1)[0][0])
    Path("notes.pt").write_text("precious notes\n")
    Path("pickle.pt").write_text("cos\nsystem\n(S'echo hi'\ntR.\n")
    for name in ("notes.pt", "pickle.pt"):
        assert cli("everything", "img.tif", "-o", "o.zarr", *ck(name)) == 2
        err = capsys.readouterr().err
        assert f"{name} is not a PyTorch checkpoint" in err and "weights_only" not in err
    assert not Path("o.zarr").exists()


def test_defect_16_a_full_disk_names_the_output_and_keeps_finished_slices(work, capsys,
                                                                          monkeypatch):
    real = ZarrOutput.write
    calls: list[int] = []

    def write(self, region, labels):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, region, labels)

    monkeypatch.setattr(ZarrOutput, "write", write)
    assert cli("everything", "in/stack4.tif", "-o", "full.zarr", *ck()) == 2
    err = capsys.readouterr().err
    assert "no space left on the device of 'full.zarr'" in err
    assert "2 finished slices were kept in 'full.zarr'" in err
    assert sorted(ZarrOutput("full.zarr").done()) == [0, 1]


def test_defect_16_an_output_of_other_tiling_names_the_options(work, capsys):
    """The output of a tiled run resumed without the tiling options used to be called "not
    a napari-esam batch output"; the message names the differences and the options."""
    tifffile.imwrite("one.tif", blob_stack(1)[0][0])
    tiled = ["--tiled", "on", "--tile", "32", "--halo", "8"]
    assert cli("everything", "one.tif", "-o", "tiled_output.zarr", *ck(), *tiled) == 0
    assert cli("everything", "one.tif", "-o", "tiled_output.zarr", *ck()) == 2
    err = capsys.readouterr().err
    assert "not a napari-esam batch output" not in err
    assert "(CLI: --tiled on --tile 32 --halo 8)" in err


def test_defect_16_ctrl_c_during_export_says_it_was_discarded(work, capsys, monkeypatch):
    from napari_esam.core.io import label_files

    write_labels("old.tif", np.ones((4, 8, 8), np.uint16))
    write_labels("new.zarr", np.full((4, 8, 8), 2, np.uint16))
    old = files("old.tif")
    real = label_files._tiff_pages

    def pages(x, converter, pool):
        for i, page in enumerate(real(x, converter, pool)):
            if i == 2:
                raise KeyboardInterrupt
            yield page

    monkeypatch.setattr(label_files, "_tiff_pages", pages)
    assert cli("export", "new.zarr", "-o", "old.tif", "--overwrite") == 1
    err = capsys.readouterr().err
    assert "interrupted; the export was discarded and 'old.tif' was left as it was" in err
    assert files("old.tif") == old and hidden(work) == []


def test_defect_16_stale_export_temporaries_are_removed(work):
    """A killed export's hidden ``.NAME.tmp-*`` are removed by the next export of NAME (it
    holds NAME's lock, so no live export owns them); other hidden files stay."""
    Path(".out.tif.tmp-deadbeef").write_bytes(b"x" * 1000)
    Path(".out.zarr.tmp-0123abcd").mkdir()
    Path(".out.tif.tmp-notmine").write_text("keep")
    write_labels("out.tif", np.ones((8, 8), np.uint8))
    write_labels("out.zarr", np.ones((8, 8), np.uint8))
    assert hidden(work) == [".out.tif.tmp-notmine"]


def test_defect_16_failed_runs_leave_no_empty_store(work, capsys):
    nan = np.load("in/nan.npy")
    nan[0, 0, 0] = np.inf
    np.save("in/bad.npy", nan)
    for out in ("e.zarr", "e.tif"):
        assert cli("everything", "in/bad.npy", "-o", out, *ck()) == 2
        assert "NaN or infinite" in capsys.readouterr().err
    assert cli("embed", "in/bad.npy", "-o", "emb.zarr", *eck()) == 2
    assert sorted(p.name for p in work.iterdir()) == ["in", "w"]


def test_defect_16_sigterm_during_export_cleans_up_like_ctrl_c(work):
    """SIGTERM (kill, systemd, Slurm) during an export used to leave the hidden
    ``.NAME.tmp-*``; it is handled like Ctrl-C: the temporary is removed, the old target is
    left as it was, the message says so and the exit code is 143."""
    write_labels("old.tif", np.ones((40, 32, 32), np.uint16))
    write_labels("new.zarr", np.full((40, 32, 32), 2, np.uint16))
    old = files("old.tif")
    script = (
        "import sys, time\n"
        "from napari_esam.core.io import label_files\n"
        "real = label_files._tiff_pages\n"
        "def pages(*a):\n"
        "    for page in real(*a):\n"
        "        time.sleep(0.25)\n"
        "        yield page\n"
        "label_files._tiff_pages = pages\n"
        "from napari_esam.cli import main\n"
        "sys.exit(main(['export', 'new.zarr', '-o', 'old.tif', '--overwrite']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    deadline = time.monotonic() + 60
    while not list(work.glob(".old.tif.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(work.glob(".old.tif.tmp-*")), "the export did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); the export was discarded and 'old.tif' was left" in err
    assert "Traceback" not in err
    assert files("old.tif") == old and hidden(work) == []
