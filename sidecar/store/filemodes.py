"""Files the sidecar creates are its own user's only (security invariant 11).

The key store, its WAL and shared-memory files, a YAML store's state file and the
access log hold hashes, usage, client addresses and paths: created ``0600`` (and the
directories the sidecar creates ``0700``) whatever the umask. SQLite gives ``-wal`` and
``-shm`` the database file's own mode, so creating the database file ``0600`` before
SQLite opens it covers all three. Files that already exist keep their mode (an operator
may have chosen it); ``sidecar config check`` warns about the group- or world-readable ones.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "open_private_append", "private_dir", "private_file", "readable_by_others"]

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents ``0700`` (existing directories are left alone)."""
    missing: list[Path] = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue  # another process made it first
        os.chmod(d, DIR_MODE)  # the umask may have taken bits away; never adds any for others


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (its directory 0700 if missing)."""
    path = Path(path)
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def open_private_append(path: Path) -> int:
    """A descriptor for appending to ``path``; a file created here is 0600."""
    path = Path(path)
    if not path.parent.exists():
        private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    existed = path.exists()
    fd = os.open(path, flags, FILE_MODE)
    if not existed:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, FILE_MODE)
        except OSError:
            pass
    return fd


def readable_by_others(path: Path) -> str | None:
    """A warning when an existing file is group- or world-readable (or writable), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
        return None
    return (
        f"{path} is mode {stat.S_IMODE(st.st_mode):04o}: other local users can read it; "
        f"run `chmod 600 {path}` (the sidecar creates its files 0600)"
    )
