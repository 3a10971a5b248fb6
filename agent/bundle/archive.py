"""Reading a bundle: one uncompressed tar, ``manifest.json`` first, ``manifest.sig`` second.

The reader is a stream: it never seeks, so a bundle can come from a file, a pipe or a download.
Invariants enforced while reading:
- the first two members are the manifest and its signature, both small regular files;
- every other member is a regular file (no links, devices, folders), with a safe relative path,
  listed in the signed manifest, seen once, of exactly the listed size, and its sha256 matches;
- every listed file is present.
The payload is written while hashing (one pass), into a staging folder the caller owns.

Resumable staging: while it extracts, the reader can hand its caller :class:`Segment` records at
checkpoints (every :data:`CHECKPOINT_BYTES` of a file, and at each file's end, always with the
staged bytes fsynced). A segment keeps the archive's own bytes before a file's data (tar headers,
padding; before the first payload file, the manifest and signature members too) and how much of
the file is staged, so the archive up to a checkpoint is exactly the heads and the staged files in
order. A reader built with ``resume=`` those segments continues the archive from that byte: the
rest of a half-staged file first (appended), then the members that follow. Its caller re-hashes the
heads and staged files to continue the whole download's sha256, so a resumed install checks every
byte of the bundle as a fresh one does.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent._crashpoint import crash_point
from agent.bundle.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    check_member_path,
)
from agent.bundle.verify import check_file
from agent.errors import BundleFormatError, ManifestError, SignatureError

CHUNK = 1 << 20  # 1 MiB reads: large enough for hashlib's SHA-NI path, small for memory
# How often a resumable extraction persists its progress: what a killed agent downloads again at
# most, against one fsync and one small journal write per step.
CHECKPOINT_BYTES = 16 << 20
_BLOCK = tarfile.BLOCKSIZE


@dataclass
class Segment:
    """One payload file as the archive carried it (see the module docstring).

    Attributes:
        head: the archive's bytes between the previous file's data and this file's data.
        path: the member's path, as listed in the manifest.
        staged: how many of its data bytes are staged (and fsynced) at the last checkpoint.
        complete: all of it is staged and its sha256 matched the manifest.
        staged_sha256: the sha256 of the staged bytes while incomplete (a resume re-reads them
            and refuses a changed file before continuing it).
    """

    head: bytes
    path: str
    staged: int = 0
    complete: bool = False
    staged_sha256: str = ""


Checkpoint = Callable[[list[Segment]], None]


@dataclass
class Resume:
    """Where a resumed extraction starts: the segments of the last checkpoint, and the sha256 of
    the last file's staged bytes when it is incomplete (its caller read them back already)."""

    segments: list[Segment]
    tail_hash: Any = None  # hashlib sha256 object of the incomplete last file's staged bytes

    @property
    def offset(self) -> int:
        """The archive byte the extraction continues from."""
        return sum(len(s.head) + s.staged for s in self.segments)


class _Tap(io.RawIOBase):
    """The archive as tarfile reads it: counts the position, and keeps the bytes that are not
    payload data so they can become a :class:`Segment`'s head (tarfile reads ahead, so the bytes
    are sorted out by position, not by when they were read)."""

    def __init__(self, inner: IO[bytes], pos: int) -> None:
        super().__init__()
        self._inner = inner
        self.pos = pos
        self._kept = bytearray()
        self._kept_from = pos  # _kept holds the bytes [_kept_from, pos)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        start, self.pos = self.pos, self.pos + n
        if self.pos > self._kept_from:
            self._kept += data[max(self._kept_from - start, 0):]
        return n

    def data_at(self, start: int, end: int) -> bytes:
        """Payload data occupies [start, end): return the kept bytes before it, keep none of it."""
        if start < self._kept_from:
            raise BundleFormatError("archive members overlap")
        head = bytes(self._kept[: start - self._kept_from])
        self._kept = self._kept[end - self._kept_from:] if self.pos > end else bytearray()
        self._kept_from = end
        return head


def _describe(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"a symlink to {m.linkname!r}"
    if m.islnk():
        return f"a hard link to {m.linkname!r}"
    if m.isdir():
        return "a folder"
    return "a special file"


class BundleReader:
    """Stream a bundle: :meth:`read_header`, verify it (caller), then :meth:`extract_payload`.

    Args:
        fileobj: a readable binary stream positioned at the start of the bundle, or with
            ``resume``, at byte ``resume.offset`` of it.
        resume: continue an extraction from its last checkpoint (the caller has verified the
            manifest it keeps; :meth:`read_header` is not called).
    """

    def __init__(self, fileobj: IO[bytes], *, resume: Resume | None = None) -> None:
        self._resume = resume
        self._tap = _Tap(fileobj, resume.offset if resume else 0)
        self._segments: list[Segment] = list(resume.segments) if resume else []
        self._tar: tarfile.TarFile | None = None
        self._base = 0  # the archive byte the tar stream was opened at
        self._header_read = resume is not None
        if resume is None:
            self._open_tar()

    def _open_tar(self) -> None:
        self._base = self._tap.pos
        try:
            self._tar = tarfile.open(fileobj=self._tap, mode="r|")  # reads the first header
        except tarfile.TarError as e:
            raise BundleFormatError(f"not a bundle (tar): {e}") from e

    def _next(self) -> tarfile.TarInfo | None:
        assert self._tar is not None
        try:
            return self._tar.next()
        except tarfile.TarError as e:
            raise BundleFormatError(f"corrupt bundle archive: {e}") from e

    def _read_small(self, name: str, limit: int) -> bytes:
        m = self._next()
        if m is None or m.name != name:
            got = "end of archive" if m is None else repr(m.name)
            if name == SIGNATURE_NAME:
                raise SignatureError(f"the bundle has no signature ({name} expected, got {got})")
            raise BundleFormatError(f"{name} must come first in the bundle, got {got}",
                                    member="" if m is None else m.name)
        if not m.isreg():
            raise BundleFormatError(f"{name} is {_describe(m)}, not a regular file", member=name)
        if m.size > limit:
            raise BundleFormatError(f"{name} is {m.size} bytes (limit {limit})", member=name)
        assert self._tar is not None
        f = self._tar.extractfile(m)
        assert f is not None  # regular files always have a stream
        try:
            return f.read(limit + 1)
        except (tarfile.TarError, EOFError) as e:
            raise BundleFormatError(f"{name} is truncated: {e}", member=name) from e

    def read_header(self) -> tuple[bytes, bytes]:
        """Read the manifest and signature bytes (unverified).

        Raises:
            BundleFormatError: the archive does not start with the manifest.
            SignatureError: the signature member is missing.
        """
        manifest = self._read_small(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        sig = self._read_small(SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
        self._header_read = True
        return manifest, sig

    def extract_payload(
        self,
        manifest: Manifest,
        dest: Path | None,
        progress: Callable[[int], None] | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        """Stream every payload member into ``dest`` while checking it against ``manifest``.

        Args:
            manifest: the VERIFIED manifest.
            dest: an empty staging folder (with ``resume``, the one the checkpoints describe);
                files are created exclusively, never followed links. None checks the payload
                without writing it (``edgepack bundle verify``).
            progress: called with the number of bytes just written.
            checkpoint: called with every segment so far, each time the staged bytes are fsynced
                at a checkpoint; the caller persists them to resume from there.

        Raises:
            BundleFormatError: a member breaks a structural rule (the message names it).
            DigestMismatchError: a member's size or sha256 differs from the manifest.
        """
        if not self._header_read:
            raise BundleFormatError("read_header() must be called before extract_payload()")
        expected = {f.path: f for f in manifest.files}
        seen = {s.path for s in self._segments}
        if self._tar is None:
            self._continue(expected, dest, progress, checkpoint)
        while (m := self._next()) is not None:
            try:
                check_member_path(m.name)
            except ManifestError as e:
                raise BundleFormatError(f"unsafe member path {m.name!r}: {e}", member=m.name) from e
            if not m.isreg():
                raise BundleFormatError(f"member {m.name!r} is {_describe(m)}; only regular files "
                                        "are allowed", member=m.name)
            entry = expected.get(m.name)
            if entry is None:
                raise BundleFormatError(f"member {m.name!r} is not listed in the signed manifest",
                                        member=m.name)
            if m.name in seen:
                raise BundleFormatError(f"member {m.name!r} appears twice", member=m.name)
            seen.add(m.name)
            if m.size != entry.size:
                check_file(entry, m.size, "")  # raises DigestMismatchError naming the sizes
            start = self._base + m.offset_data
            seg = Segment(self._tap.data_at(start, start + m.size), m.name)
            self._segments.append(seg)
            assert self._tar is not None
            src = self._tar.extractfile(m)
            assert src is not None
            out = None
            if dest is not None:
                target = dest / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                out = os.fdopen(fd, "wb")
                crash_point(f"stage {m.name}: created")
            self._stage(src, out, entry, seg, hashlib.sha256(), progress, checkpoint)
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleFormatError(f"bundle is missing listed files: {', '.join(missing[:5])}",
                                    member=missing[0])

    def _continue(self, expected: dict[str, FileEntry], dest: Path | None,
                  progress: Callable[[int], None] | None, checkpoint: Checkpoint | None) -> None:
        """A resumed extraction: the rest of a half-staged file, its padding, then the archive."""
        assert self._resume is not None
        last = self._segments[-1] if self._segments else None
        if last is not None and not last.complete:
            entry = expected.get(last.path)
            if entry is None or dest is None or self._resume.tail_hash is None:
                # The caller's journal names a file the manifest lacks, or gave no staging folder
                # or no hash of the staged bytes: nothing to continue.
                raise BundleFormatError(f"cannot resume {last.path!r}: no staged part of it to "
                                        "continue", member=last.path)
            start = self._tap.pos - last.staged
            self._tap.data_at(self._tap.pos, start + entry.size)
            fd = os.open(dest / last.path, os.O_WRONLY | os.O_NOFOLLOW)
            out = os.fdopen(fd, "wb")
            out.truncate(last.staged)  # bytes past the last checkpoint were never recorded
            out.seek(last.staged)
            src = _Limited(self._tap, entry.size - last.staged, last.path)
            self._stage(src, out, entry, last, self._resume.tail_hash, progress, checkpoint)
        if last is not None:
            pad = -last.staged % _BLOCK  # the tar stream goes on at the next block
            if pad and len(self._tap.read(pad) or b"") != pad:
                raise BundleFormatError("bundle archive is truncated", member=last.path)
        self._open_tar()

    def _stage(self, src: io.RawIOBase | IO[bytes], out: IO[bytes] | None, entry: FileEntry, seg: Segment,
               h: Any, progress: Callable[[int], None] | None,
               checkpoint: Checkpoint | None) -> None:
        """Copy one member's data from ``src`` (already ``seg.staged`` bytes in) to ``out``."""
        written = seg.staged
        since = 0
        name = seg.path
        try:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
                    crash_point(f"stage {name}: {written + len(chunk)} bytes written")
                written += len(chunk)
                since += len(chunk)
                if progress:
                    progress(len(chunk))
                if out is not None and checkpoint is not None and since >= CHECKPOINT_BYTES:
                    out.flush()
                    os.fsync(out.fileno())
                    seg.staged, seg.staged_sha256, since = written, h.copy().hexdigest(), 0
                    checkpoint(self._segments)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
                crash_point(f"stage {name}: fsynced")
        except (tarfile.TarError, EOFError) as e:
            raise BundleFormatError(f"member {name!r} is truncated: {e}", member=name) from e
        finally:
            if out is not None:
                out.close()
        check_file(entry, written, h.hexdigest())
        seg.staged, seg.complete, seg.staged_sha256 = written, True, ""
        if out is not None and checkpoint is not None:
            checkpoint(self._segments)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


class _Limited(io.RawIOBase):
    """The next ``n`` bytes of a stream; fewer is a truncated member."""

    def __init__(self, inner: io.RawIOBase, n: int, name: str) -> None:
        super().__init__()
        self._inner, self._left, self._name = inner, n, name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        data = self._inner.read(min(len(buffer), self._left))
        if not data:
            raise BundleFormatError(f"member {self._name!r} is truncated", member=self._name)
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)
