"""Atomic file writes, one mechanism for the whole pack (PLY, mesh files, suite state, benchmark results).

:func:`atomic_write` writes through ``write_fn(tmp_path)`` to a temporary file next to ``path`` and renames it
into place (``os.replace``): a reader sees the old file or the new one, never a half-written one.

* the temporary file is removed when ``write_fn`` fails (any exception, ``KeyboardInterrupt`` included);
* temporaries left by writers killed outright (``SIGKILL``, power cut) are named
  ``.tmp-<name>.<pid>.<random>.tmp`` and removed by the next write of the same file
  (:func:`remove_stale_temp_files`);
* the final file gets the mode a plain ``open(path, "w")`` would give (``0o666`` minus the umask), not
  ``mkstemp``'s ``0o600``.

The rename replaces a symbolic link at ``path`` itself, never the file it points to.  Files written in place
(a log, a lock file) are opened with :func:`open_no_follow`, which refuses a symbolic link at the path instead of
truncating its target (a link the writer did not create is never followed).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, List, Optional


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _temp_prefix(path: str) -> str:
    return f".tmp-{os.path.basename(path)}."


def remove_stale_temp_files(path: str) -> List[str]:
    """Remove temporaries of :func:`atomic_write` for ``path`` whose writing process no longer exists.

    Returns the removed paths."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = _temp_prefix(path)
    removed: List[str] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_part = name[len(prefix):].split(".", 1)[0]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except OSError:
            pass
    return removed


class SymlinkRefused(OSError):
    """:func:`open_no_follow` found a symbolic link where it was to write a file."""


def open_no_follow(path: str, mode: str = "w", encoding: Optional[str] = "utf-8"):
    """``open(path, mode)`` for writing (``"w"``, ``"a"``, ``"wb"``, ``"ab"``) that never follows a symbolic link
    at ``path`` (``O_NOFOLLOW``; the file is created if absent).

    Raises:
        SymlinkRefused: ``path`` is a symbolic link (the message names it and its target).
    """
    if mode.rstrip("b+") not in ("w", "a"):
        raise ValueError(f"open_no_follow writes only ('w', 'a', 'wb', 'ab'), got mode {mode!r}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_APPEND if mode.startswith("a") else 0
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise SymlinkRefused(f"{path} is a symbolic link (to {os.readlink(path)}); refusing to write through it: "
                                 "remove it") from None
        raise
    try:
        if mode.startswith("w"):  # truncate only now that the open did not follow a link
            os.ftruncate(fd, 0)
        return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding}))
    except BaseException:
        os.close(fd)
        raise


def atomic_write(path: str, write_fn: Callable[[str], Any]) -> str:
    """Write ``path`` atomically through ``write_fn(tmp_path)`` (module docstring); returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _write_synced(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str, data: bytes) -> str:
    """:func:`atomic_write` of ``data`` (flushed to disk before the rename). Raises ``TypeError`` for non-bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    return atomic_write(path, lambda tmp: _write_synced(tmp, bytes(data)))


def atomic_write_text(path: str, text: str) -> str:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, data: Any, **dump_kwargs) -> str:
    """:func:`atomic_write` of ``json.dumps(data, **dump_kwargs)`` (default: indent 2, sorted keys) and a newline."""
    dump_kwargs.setdefault("indent", 2)
    dump_kwargs.setdefault("sort_keys", True)
    return atomic_write_text(path, json.dumps(data, **dump_kwargs) + "\n")
