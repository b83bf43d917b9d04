"""Replacing a result safely: recognise our own stores, build the new one beside the old,
swap at the end.

* :func:`zarr_attrs` / :func:`is_own_store`: a folder is removed or replaced only when its
  ``zarr.json`` carries one of our attributes (never an unrelated folder named ``*.zarr``).
* :func:`replacement_path`: the hidden sibling ``.NAME.replacement`` where a run that
  replaces an existing result writes (so the old result stays until the new one is done).
* :func:`move_into_place`: rename the finished new result onto the target; an old target is
  renamed away first and removed last (a failure in between puts it back).
* :func:`remove_stale_temporaries`: hidden ``.NAME.tmp-*`` / ``.NAME.bak-*`` left by an
  export that was killed (call it while holding the target's lock).

The rule is written in ``docs/rules/outputs.md``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "REPLACEMENT_SUFFIX",
    "check_not_input",
    "is_own_store",
    "move_into_place",
    "remove_path",
    "remove_stale_temporaries",
    "replacement_path",
    "zarr_attrs",
]

#: suffix of the hidden sibling a replacing run writes into
REPLACEMENT_SUFFIX = ".replacement"
_TEMP = re.compile(r"\.(tmp|bak)-[0-9a-f]{8}$")


def zarr_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The attributes of the Zarr v3 node at ``path`` (``None``: not one, or unreadable)."""
    try:
        with open(Path(path) / "zarr.json", encoding="utf-8") as fh:
            attrs = json.load(fh).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def is_own_store(path: str | os.PathLike[str], attrs: Iterable[str]) -> bool:
    """Whether ``path`` is a folder (not a link) whose Zarr attributes hold one of
    ``attrs`` (the markers of the stores the caller may replace)."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return False
    found = zarr_attrs(p) or {}
    return any(a in found for a in attrs)


def check_not_input(source: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Refuse an ``output`` that is the input file or store ``source``, holds it (a Zarr
    group around the input array) or lies inside it: replacing it would delete the input."""
    inp, out = Path(source).expanduser().resolve(), Path(output).expanduser().resolve()
    if inp == out or out in inp.parents or inp in out.parents:
        raise ValueError(
            f"the output {str(out)!r} must not be the input {str(inp)!r}, nor hold it or lie "
            "inside it: choose an output elsewhere"
        )


def replacement_path(target: str | os.PathLike[str]) -> Path:
    """The hidden sibling where a run replacing ``target`` writes: ``.NAME.replacement``."""
    target = Path(target)
    return target.with_name(f".{target.name}{REPLACEMENT_SUFFIX}")


def remove_path(path: Path, *, strict: bool = True) -> None:
    """Remove a file or folder (``strict=False``: warn instead of raising)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as exc:
        if strict:
            raise
        warnings.warn(f"could not remove {str(path)!r}: {exc}", stacklevel=3)


def move_into_place(new: Path, target: Path) -> None:
    """Rename the complete ``new`` onto ``target``. A file replaces a file atomically;
    otherwise an existing target is renamed to a hidden backup, ``new`` renamed in and the
    backup removed (if the second rename fails, the backup is put back)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(new, target)  # fails rather than merging if a directory appeared meanwhile
        return
    if new.is_file() and target.is_file() and not target.is_symlink():
        os.replace(new, target)  # atomic for files
        return
    backup = target.with_name(f".{target.name}.bak-{secrets.token_hex(4)}")
    os.rename(target, backup)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(backup, target)
        raise
    remove_path(backup, strict=False)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-XXXXXXXX`` / ``.NAME.bak-XXXXXXXX`` siblings of
    ``target`` that an earlier, killed export left; returns them. Only call this while
    holding ``target``'s lock (no live export of the same target can own them)."""
    prefix = f".{target.name}."
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith(prefix) and _TEMP.fullmatch(name[len(prefix) - 1:]):
            remove_path(entry, strict=False)
            removed.append(entry)
    return removed
