"""The packager's build cache and the file helpers every build step shares.

Invariant: anything under the cache directory is either complete or absent. Each step writes to a
temporary name in the destination's directory and renames it into place only on success, so an
interrupted build (error, Ctrl-C, kill) never leaves a file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from agent._fs import atomic_file, file_digest

__all__ = ["atomic_dir", "atomic_file", "copy_atomic", "default_cache_dir", "sha256_file", "sha256_files"]

_CHUNK = 4 * 1024 * 1024  # bytes per read while hashing: large reads keep hashlib at disk speed


def default_cache_dir() -> Path:
    """Where built artifacts are kept between runs: ``$EDGEPACK_CACHE`` or ``~/.cache/edgepack``.

    Returns:
        The cache directory (not created here).
    """
    env = os.environ.get("EDGEPACK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgepack"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return file_digest(path).sha256


def sha256_files(paths: Iterable[Path], *, root: Path) -> str:
    """One hex sha256 over several files: each file's path relative to ``root``, size, then bytes.

    Names and sizes are hashed too so that moving bytes from one file to another changes the digest.
    """
    h = hashlib.sha256()
    for p in paths:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(str(p.stat().st_size).encode() + b"\0")
        with p.open("rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; on success it replaces ``dst``.

    An existing ``dst`` is removed only after the new one is complete. On any exception the
    temporary directory is removed.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    try:
        yield tmp
        if dst.exists():
            # rename-over only works onto an empty directory: move the old one aside first
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_atomic(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` through a temporary file (see :func:`atomic_file`).

    Returns:
        ``dst``.
    """
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made if missing): one builder of a cached artifact at
    a time across processes; the others wait, then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield

