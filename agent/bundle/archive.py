"""Reading a bundle: one uncompressed tar, ``manifest.json`` first, ``manifest.sig`` second.

The reader is a stream: it never seeks, so a bundle can come from a file, a pipe or a download.
Invariants enforced while reading:
- the first two members are the manifest and its signature, both small regular files;
- every other member is a regular file (no links, devices, folders), with a safe relative path,
  listed in the signed manifest, seen once, of exactly the listed size, and its sha256 matches;
- every listed file is present.
The payload is written while hashing (one pass), into a staging folder the caller owns.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from agent._crashpoint import crash_point
from agent.bundle.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_NAME,
    Manifest,
    check_member_path,
)
from agent.bundle.verify import check_file
from agent.errors import BundleFormatError, ManifestError, SignatureError

CHUNK = 1 << 20  # 1 MiB reads: large enough for hashlib's SHA-NI path, small for memory


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
        fileobj: a readable binary stream positioned at the start of the bundle.
    """

    def __init__(self, fileobj: IO[bytes]) -> None:
        try:
            self._tar = tarfile.open(fileobj=fileobj, mode="r|")
        except tarfile.TarError as e:
            raise BundleFormatError(f"not a bundle (tar): {e}") from e
        self._header_read = False

    def _next(self) -> tarfile.TarInfo | None:
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
    ) -> None:
        """Stream every payload member into ``dest`` while checking it against ``manifest``.

        Args:
            manifest: the VERIFIED manifest.
            dest: an empty staging folder; files are created exclusively, never followed links.
                None checks the payload without writing it (``edgepack bundle verify``).
            progress: called with the number of bytes just written.

        Raises:
            BundleFormatError: a member breaks a structural rule (the message names it).
            DigestMismatchError: a member's size or sha256 differs from the manifest.
        """
        if not self._header_read:
            raise BundleFormatError("read_header() must be called before extract_payload()")
        expected = {f.path: f for f in manifest.files}
        seen: set[str] = set()
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
            src = self._tar.extractfile(m)
            assert src is not None
            out = None
            if dest is not None:
                target = dest / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                out = os.fdopen(fd, "wb")
                crash_point(f"stage {m.name}: created")
            h = hashlib.sha256()
            written = 0
            try:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    if out is not None:
                        out.write(chunk)
                        crash_point(f"stage {m.name}: {written + len(chunk)} bytes written")
                    written += len(chunk)
                    if progress:
                        progress(len(chunk))
                if out is not None:
                    out.flush()
                    os.fsync(out.fileno())
                    crash_point(f"stage {m.name}: fsynced")
            except (tarfile.TarError, EOFError) as e:
                raise BundleFormatError(f"member {m.name!r} is truncated: {e}", member=m.name) from e
            finally:
                if out is not None:
                    out.close()
            check_file(entry, written, h.hexdigest())
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleFormatError(f"bundle is missing listed files: {', '.join(missing[:5])}",
                                    member=missing[0])

    def close(self) -> None:
        self._tar.close()
