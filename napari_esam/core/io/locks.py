"""Advisory lock files: one writer at a time for an output, an export or an embedding store.

A run that writes ``TARGET`` holds ``TARGET.lock`` beside it (:func:`hold`): a small JSON
file naming the holder (pid, host, start time, command). A second run on the same target
is refused with :class:`LockedError`, one line naming the holder. The lock is kept by the
kernel (``flock`` on the open file), so a lock left by a run that died is free: it is taken
over. Where the file system has no ``flock``, a lock whose pid no longer runs on this host
is taken over. A lock held on another host that may have died is never taken over: the
message says to delete the lock file once that run is gone. Within one process a lock is
re-entrant for the thread that holds it (a run that exports its own result); another thread
is refused. The rule is written in ``docs/rules/outputs.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LOCK_SUFFIX", "LockedError", "hold", "lock_path", "read_holder"]

#: suffix of the lock file beside the target
LOCK_SUFFIX = ".lock"


class LockedError(OSError):
    """Another run holds the target's lock (the message names it)."""


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``TARGET.lock`` beside it."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    return target.with_name(target.name + LOCK_SUFFIX)


@dataclass
class _Held:
    fd: int
    path: Path
    thread: int
    count: int = 1


_HELD: dict[str, _Held] = {}
_HELD_LOCK = threading.Lock()


def read_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder recorded in a lock file (``None``: missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as fh:
            holder = json.load(fh)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run (it has not written its name yet)"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("time"):
        parts.append(f"since {holder['time']}")
    if holder.get("command"):
        parts.append(f"running {holder['command']!r}")
    return ", ".join(parts)


def _pid_alive(pid: Any) -> bool:
    """Whether a process ``pid`` runs on this host (unknown -> True: never take over)."""
    if os.name != "posix" or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists (another user's)
        return True
    return True


def _flock(fd: int) -> bool | None:
    """Take the kernel lock of ``fd`` without waiting: True (taken), False (held by
    another), None (this file system or platform has no flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK / EOPNOTSUPP: no flock here
        return None
    return True


def _refusal(target: Path, path: Path, holder: dict[str, Any] | None) -> LockedError:
    return LockedError(
        f"{str(target)!r} is in use by {_describe(holder)} (lock file {str(path)!r}): wait "
        "for that run to end, or delete the lock file if it is no longer running"
    )


def _acquire(target: Path, path: Path) -> int:
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "time": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(Path(a).name if i == 0 else a
                              for i, a in enumerate(sys.argv[:6]))}
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create the lock file {str(path)!r}: "
                          f"{exc.strerror}") from None
        try:
            taken = _flock(fd)
            holder = read_holder(path)
            if taken is False:
                raise _refusal(target, path, holder)
            if holder and holder.get("pid") != me["pid"]:
                here = holder.get("host") == me["host"]
                if not here or (taken is None and _pid_alive(holder.get("pid"))):
                    # another host (its run may live), or no flock and the pid still runs
                    raise _refusal(target, path, holder)
            # a holder that released the lock removes the file: ours must still be there
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            with contextlib.suppress(OSError):
                os.fsync(fd)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise _refusal(target, path, read_holder(path))  # pragma: no cover - constant churn


def _release(held: _Held) -> None:
    try:
        if os.stat(held.path).st_ino == os.fstat(held.fd).st_ino:
            os.unlink(held.path)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(held.fd)  # frees the kernel lock


@contextlib.contextmanager
def hold(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of ``target`` for the ``with`` block (yields the lock file's path).

    Raises :class:`LockedError` (naming the holder) when another run holds it, ``OSError``
    when the lock file cannot be created (e.g. a read-only folder)."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    path = lock_path(target)
    key = str(path)
    me = threading.get_ident()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            if held.thread != me:
                raise LockedError(
                    f"{str(target)!r} is in use by another thread of this process: wait for "
                    "its run to end"
                )
            held.count += 1
        else:
            held = _Held(_acquire(target, path), path, me)
            _HELD[key] = held
    try:
        yield path
    finally:
        with _HELD_LOCK:
            held.count -= 1
            if held.count == 0:
                _HELD.pop(key, None)
                _release(held)
