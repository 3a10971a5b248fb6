"""Crash-safe file operations and the one file-hash helper.

Writes go to a temp file in the same folder, are fsynced, renamed over the target, and the folder
is fsynced, so a crash at any point leaves either the old or the new content and a rename that
survives power loss. Hashing uses :func:`hashlib.file_digest` (one pass, large reads, SHA-NI
where the CPU has it) and always answers ``(sha256, size)`` in that order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from agent._crashpoint import crash_point
from agent.errors import EdgepackError


class FileDigest(NamedTuple):
    """A file's sha256 (hex) and its size in bytes."""

    sha256: str
    size: int


def file_digest(source: Path | str | IO[bytes]) -> FileDigest:
    """The sha256 and size of a file (a path, or a binary file object read from where it stands).

    Raises:
        OSError: the file cannot be read.
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return file_digest(f)
    start = source.tell()
    h = hashlib.file_digest(source, "sha256")  # type: ignore[arg-type]  # any binary file object
    return FileDigest(h.hexdigest(), source.tell() - start)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it, rename it onto ``path`` and
    fsync the folder. On any exception (KeyboardInterrupt included) the temporary file is removed
    and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        crash_point(f"{path.name}: temp written")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        crash_point(f"{path.name}: temp fsynced")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    crash_point(f"{path.name}: renamed")
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new content."""
    with atomic_file(path, mode) as tmp:
        tmp.write_bytes(data)


def fsync_tree(root: Path) -> None:
    """fsync every folder under ``root`` (files were fsynced as they were written)."""
    for dirpath, _dirs, _files in os.walk(root):
        fsync_dir(Path(dirpath))
        crash_point(f"fsync folder {os.path.relpath(dirpath, root)}")


def read_capped(path: Path, limit: int, error: type[EdgepackError], what: str) -> bytes:
    """The whole of a small file, refused unread beyond ``limit`` bytes (a document is capped
    before it is parsed).

    Raises:
        ``error``: the file cannot be read, or is over ``limit`` bytes ("not ``what``").
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from e
    if len(data) > limit:
        raise error(f"{path} is over {limit} bytes: not {what}")
    return data

