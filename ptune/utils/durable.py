"""Atomic and durable file writes: what every checkpoint, state and metrics file is written with.

Atomic: a file is written beside its destination and renamed over it, so a reader (or ``resume=auto`` after a kill)
sees the old file or the new one, never half of one. Durable: the file is fsynced before the rename and its folder
after it, so after a power loss a complete-looking file cannot be empty (a rename reaches the disk before the data
it names unless both are flushed). Modes: every file gets the mode of any file the user writes (0666 less the
umask); writers that pick their own (``tempfile.mkstemp``, safetensors' ``save_file``: 0600) are corrected.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def user_file_mode() -> int:
    """0666 less the umask: the mode ``open`` gives a new file. Linux shows the umask in /proc; elsewhere it can only
    be read by setting it, so it is set and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder`` and every folder in it, e.g. a staged checkpoint before it is renamed in."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(root)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` creates a temporary file beside ``path``; it is fsynced, renamed to ``path``, the folder fsynced.

    On any failure the temporary file is removed and ``path`` keeps its previous content; an I/O error that names no
    file (a full disk) is raised as an ``OSError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(str(tmp))
        os.chmod(tmp, user_file_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = _naming(err, path)
        if named is not None:
            raise named from err
        raise
    fsync_dir(path.parent)


def _naming(err: BaseException, path: Path) -> OSError | None:
    """``err`` as an ``OSError`` naming ``path``, when it is an I/O error that names no file: ``write`` on a full disk
    gives ``[Errno 28]`` alone, safetensors' writer a ``SafetensorError`` ending in "(os error 28)". None otherwise."""
    if isinstance(err, OSError):
        return None if err.filename or err.errno is None else OSError(err.errno, err.strerror, str(path))
    found = re.search(r"\(os error (\d+)\)", str(err))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) if found else None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "xb") as handle:
            handle.write(data)

    atomic_write(path, write)


@contextlib.contextmanager
def staged_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """A folder written whole or not at all: yields a staging folder beside ``dst`` (which must be absent or empty);
    when the block succeeds it is fsynced and renamed to ``dst``, when it fails it is removed."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: exists and is not an empty folder; choose another output folder")
    staging = dst.with_name(f".{dst.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)  # what an earlier failed write left
    staging.mkdir(parents=True)
    try:
        yield staging
        fsync_tree(staging)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(dst.parent)
