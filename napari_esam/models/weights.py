"""Official checkpoint files: registry, download (pooch), integrity check, cache and safe loading.

* Files are verified by their **git blob id** (SHA-1 of ``b"blob <size>\\0" + bytes``), the id
  GitHub shows for the file, or, for files on Hugging Face, by their **SHA-256** (the Git LFS
  object id Hugging Face publishes), so a truncated or corrupt download is always detected.
* The cache folder is ``$NAPARI_ESAM_CACHE`` or the per-user cache (``pooch.os_cache``).
  A verified file is never downloaded again; a bad download never stays in the cache.
* Checkpoints are read with ``torch.load(..., weights_only=True)``: a file can't run code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "NAPARI_ESAM_CACHE"


class CheckpointError(RuntimeError):
    """A checkpoint could not be obtained or is not valid for the requested model."""


@dataclass(frozen=True)
class CheckpointSpec:
    """Where an official checkpoint lives and how to recognise and read it."""

    model: str
    url: str
    filename: str
    #: git blob id of the file (files on GitHub); ``None`` when ``sha256`` is given
    git_blob_sha1: str | None = None
    #: member of a zip archive holding the torch file (``None`` = the file itself)
    zip_member: str | None = None
    #: key of the dict holding the state dict inside the torch file (``None`` = top level)
    state_dict_key: str | None = None
    #: SHA-256 of the file (Hugging Face's Git LFS object id); checked instead of the blob id
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not (self.git_blob_sha1 or self.sha256):
            raise ValueError(f"{self.model}: a checkpoint needs a git blob id or a SHA-256")


CHECKPOINTS: dict[str, CheckpointSpec] = {
    "efficientsam_ti": CheckpointSpec(
        "efficientsam_ti",
        "https://github.com/yformer/EfficientSAM/raw/main/weights/efficient_sam_vitt.pt",
        "efficient_sam_vitt.pt",
        "af883c49e33c68f01107be52df0ecad26a48355f",
        state_dict_key="model",
    ),
    "efficientsam_s": CheckpointSpec(
        "efficientsam_s",
        "https://github.com/yformer/EfficientSAM/raw/main/weights/efficient_sam_vits.pt.zip",
        "efficient_sam_vits.pt.zip",
        "fa4e9f05f753e109dbde052f97d37903b833cf53",
        zip_member="efficient_sam_vits.pt",
        state_dict_key="model",
    ),
    "mobilesam": CheckpointSpec(
        "mobilesam",
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "mobile_sam.pt",
        "7ef2d090979fd9853adf17b7a99c8b94a1c5a6a7",
    ),
}

#: EfficientViT-SAM: the end-to-end trained checkpoints at the root of the official Hugging
#: Face repository (the upstream README's links); plain state dicts. SHA-256 = the Git LFS
#: object ids shown on the files' Hugging Face pages (unchanged by the October 2024 renames
#: from ``l0.pt`` ... ``xl1.pt``).
_EVIT_URL = "https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/"
_EVIT_SHA256 = {
    "l0": "c4f994b01a16d48bcf2fbbb089448cfbf58fae5811edfa8113c953b8b8cc64b8",
    "l1": "fa151df2b9b96896accd505470755cdd293a4c50cdabac95478f3fbd86d9152b",
    "l2": "d4bfd842224cbb99de09acc3325e81ac5b7e8725c8fbdab152305e5d934bfe4a",
    "xl0": "9bc2f87bd23d6e6d1f7b5beff910f98835c7c333fac73e695bac0bec685968f8",
    "xl1": "10f42277679427c1183dcff19758e536aa86bcc4304e4b387ff48865784be05c",
}
CHECKPOINTS.update(
    (name, CheckpointSpec(name, f"{_EVIT_URL}{name}.pt", f"{name}.pt", sha256=digest))
    for name, digest in ((f"efficientvit_sam_{v}", d) for v, d in _EVIT_SHA256.items())
)


def cache_dir() -> Path:
    """The folder holding downloaded checkpoints (``$NAPARI_ESAM_CACHE`` overrides it)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-esam"))


def git_blob_sha1(path: str | os.PathLike) -> str:
    """Git's blob id of a file: SHA-1 of ``b"blob <size>\\0"`` followed by the bytes."""
    path = Path(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_id(path: str | os.PathLike, spec: CheckpointSpec) -> tuple[str, str, str]:
    """(kind, found, expected) of the identity ``spec`` checks: SHA-256 when the spec has
    one, else the git blob id."""
    if spec.sha256:
        return "SHA-256", sha256(path), spec.sha256
    return "git blob id", git_blob_sha1(path), str(spec.git_blob_sha1)


def _spec(model: str) -> CheckpointSpec:
    from napari_esam.models.registry import check_model_name

    return CHECKPOINTS[check_model_name(model)]


def checkpoint_path(model: str, *, download: bool = True, progressbar: bool = True) -> Path:
    """Path of the verified official checkpoint of ``model``, downloading it if needed."""
    spec = _spec(model)
    target = cache_dir() / spec.filename
    if target.is_file():
        _, found, expected = file_id(target, spec)
        if found == expected:
            return target
        target.unlink()  # corrupt or stale: never keep it
    if not download:
        raise CheckpointError(
            f"the {model} checkpoint is not in the cache; put {spec.filename} (from {spec.url}) "
            f"at {target}, or pass checkpoint=PATH"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        import pooch

        try:
            fetched = Path(
                pooch.retrieve(
                    spec.url, known_hash=None, fname=spec.filename, path=tmpdir,
                    progressbar=progressbar,
                )
            )
        except Exception as exc:  # network errors come in many classes (requests, urllib, OSError)
            raise CheckpointError(
                f"could not download the {model} checkpoint from {spec.url} ({exc}). If this "
                f"machine is offline, download the file elsewhere and put it at {target}, or "
                f"pass checkpoint=PATH (CLI: --checkpoint PATH)"
            ) from exc
        kind, found, expected = file_id(fetched, spec)
        if found != expected:
            raise CheckpointError(
                f"the downloaded {model} checkpoint is corrupt or truncated ({kind} {found}, "
                f"expected {expected}); it was deleted, try again"
            )
        os.replace(fetched, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target


#: how PyTorch files begin: a zip archive (torch.save since 1.6) or a pickle (older ones)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
#: largest uncompressed size of a zip member read as a checkpoint (the zip's own directory
#: says it before anything is extracted); the largest official checkpoint is under 1 GB
MAX_ZIP_MEMBER_BYTES = 2 * 2**30


def _torch_load(path: Path, shown: str | os.PathLike | None = None) -> Any:
    """``torch.load`` with ``weights_only=True``; errors name ``shown`` (default: ``path``)."""
    import pickle

    import torch

    name = str(path if shown is None else shown)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint {name}: {exc.strerror}") from exc
    if not head.startswith(_TORCH_MAGIC):
        raise CheckpointError(
            f"{name} is not a PyTorch checkpoint (it starts with {head!r}, not a zip archive "
            "or a pickle): give the .pt/.pth file of the model's weights"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{name} is not a plain weights file: it holds objects other than tensors, so it "
            f"was refused (loading it could run code){_unpickler_detail(exc)}"
        ) from exc
    except Exception as exc:  # torch raises many kinds (RuntimeError, EOFError, IndexError...)
        raise CheckpointError(
            f"{name} is not a readable PyTorch checkpoint (corrupt or truncated?): {exc}"
        ) from exc


def _unpickler_detail(exc: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file
    with ``weights_only=False`` (unsafe for exactly the files this check refuses)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and "weights_only" not in line and not line.startswith(
                ("Weights only load failed", "Check the documentation", "Please file")):
            return ": " + line.removeprefix("WeightsUnpickler error: ").rstrip(".")
    return ""
def _safe_member(path: Path, member: str) -> str:
    """``member`` if it names a file inside the archive (no absolute path, no ``..``, no
    drive), else :class:`CheckpointError`."""
    parts = member.replace("\\", "/").split("/")
    if member.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
        raise CheckpointError(
            f"{path} is a zip archive whose member {member!r} points outside the archive; "
            "refused (use a zip holding a plain .pt file, or the .pt file itself)"
        )
    return member


def _read_zip_member(path: Path, zf: zipfile.ZipFile, member: str) -> Any:
    """Load ``member`` of the open archive ``zf`` (the user's file ``path``): its size from the
    zip directory is checked first, then it is copied (at most that many bytes) into a temporary
    file of our own naming and loaded from there."""
    info = zf.getinfo(_safe_member(path, member))
    if info.file_size > MAX_ZIP_MEMBER_BYTES:
        raise CheckpointError(
            f"{path}: the member {member!r} would unpack to {info.file_size / 2**30:.1f} GiB, "
            f"more than the {MAX_ZIP_MEMBER_BYTES / 2**30:.0f} GiB a checkpoint may have; "
            "refused (is it the right file?)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "member.pt"
        try:
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise CheckpointError(f"{path} is a corrupt zip archive: {exc}") from exc
        return _torch_load(target, shown=f"{path} (member {member!r})")


def _read_checkpoint_file(path: Path, spec: CheckpointSpec | None) -> Any:
    """Read a .pt file, or a zip archive holding one .pt file (EfficientSAM-S's format)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                is_torch_archive = any(n.endswith("data.pkl") for n in names)
                if not is_torch_archive:
                    members = [n for n in names
                               if n.endswith((".pt", ".pth")) and not n.endswith("/")]
                    if spec is not None and spec.zip_member in names:
                        members = [spec.zip_member]
                    if len(members) != 1:
                        raise CheckpointError(
                            f"{path} is a zip archive but does not hold exactly one .pt file "
                            f"(found {members or 'none'})"
                        )
                    return _read_zip_member(path, zf, members[0])
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path} is a corrupt zip archive: {exc}") from exc
    return _torch_load(path)


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        return obj
    raise CheckpointError(f"{source} does not hold a state dict (found {type(obj).__name__})")


def load_state_dict(model: str, checkpoint: Any = None) -> dict[str, Any]:
    """State dict (name -> torch tensor) for ``model`` from a checkpoint source.

    ``checkpoint``: ``None`` (the official file, downloaded and cached), a path to a ``.pt``
    file (or a zip holding one), or a mapping of names to tensors or NumPy arrays.
    """
    import torch

    spec = _spec(model)
    if checkpoint is None:
        raw: Any = _read_checkpoint_file(checkpoint_path(model), spec)
        source = spec.filename
    elif isinstance(checkpoint, Mapping):
        raw, source = checkpoint, "the given state dict"
    elif isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint).expanduser()
        raw, source = _read_checkpoint_file(path, spec), str(path)
    else:
        raise TypeError(
            f"checkpoint must be None, a path or a mapping, not {type(checkpoint).__name__}"
        )
    state = _unwrap(raw, source)
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):  # copy only if torch can't share it (keeps 0-d)
            if not (value.flags.c_contiguous and value.flags.writeable):
                value = value.copy(order="C")
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: entry {key!r} holds NaN or infinite values: the checkpoint is "
                "corrupt (or a bad conversion); use the official weights or another file"
            )
        out[str(key)] = value
    return out


def describe_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """A human explanation of why ``found`` can't be loaded as ``expected`` (None if it can)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]})")
    return "; ".join(parts)
