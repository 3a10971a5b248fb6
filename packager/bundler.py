"""Writing signed bundles (the producer side of :mod:`agent.bundle`).

A bundle is an uncompressed tar: ``manifest.json``, ``manifest.sig``, then the payload files in
manifest order. Members are normalized (mtime 0, uid/gid 0, mode 0644) so the same inputs give the
same bytes. The file is written to a temporary name and renamed, so a failed build leaves nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

from agent._fs import file_digest
from agent.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    FileEntry,
    Keyring,
    Manifest,
    SigningKey,
    check_member_path,
    sign_manifest,
    verify_manifest,
)
from agent.errors import EdgepackError


def file_entry(rel: str, src: Path) -> FileEntry:
    """The manifest entry of one payload file: its path in the bundle, size and sha256."""
    check_member_path(rel)
    d = file_digest(src)
    return FileEntry(rel, d.size, d.sha256)


def file_entries(files: Mapping[str, Path]) -> list[FileEntry]:
    """Manifest entries for payload files given as {path in bundle: file on disk}."""
    return [file_entry(rel, src) for rel, src in files.items()]


def _info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_bundle(out: Path, manifest: Manifest, key: SigningKey, files: Mapping[str, Path]) -> bytes:
    """Sign ``manifest`` with ``key`` and write the bundle to ``out``.

    Args:
        out: the bundle file to create (replaced atomically).
        manifest: a manifest whose ``files`` describe ``files`` exactly and whose signer is ``key``.
        key: the signing key.
        files: {path in bundle: file on disk} for every manifest entry.

    Returns:
        The exact manifest bytes that were signed.

    Raises:
        ValueError: the manifest does not describe ``files`` (a producer bug, not user input).
    """
    if {f.path for f in manifest.files} != set(files):
        raise ValueError("manifest files and payload files differ")
    if manifest.signer_key_id != key.key_id:
        raise ValueError("manifest signer is not the signing key")
    manifest_bytes = manifest.to_bytes()
    sig = sign_manifest(manifest_bytes, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w|",
                                                      format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            tar.addfile(_info(SIGNATURE_NAME, len(sig)), io.BytesIO(sig))
            for entry in manifest.files:
                with open(files[entry.path], "rb") as f:
                    tar.addfile(_info(entry.path, entry.size), f)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return manifest_bytes


def read_manifest(path: Path) -> Manifest:
    """The manifest of a bundle file, parsed but NOT verified (for ``bundle inspect``).

    Raises:
        EdgepackError: the file cannot be read; UntrustedDataError: not a bundle.
    """
    from agent.bundle import BundleReader

    try:
        with open(path, "rb") as stream:
            mb, _sig = BundleReader(stream).read_header()
    except OSError as e:
        raise EdgepackError(f"cannot read {path}: {e}") from e
    return Manifest.from_bytes(mb)


def verify_bundle(path: Path, keyring: Keyring) -> Manifest:
    """Verify a bundle file as a device would: signature, manifest, then every payload's hash.

    Nothing is written. Returns the verified manifest.

    Raises:
        EdgepackError: the file cannot be read; UntrustedDataError: any check fails.
    """
    from agent.bundle import BundleReader

    try:
        with open(path, "rb") as stream:
            reader = BundleReader(stream)
            mb, sb = reader.read_header()
            m = verify_manifest(mb, sb, keyring)
            reader.extract_payload(m, None)  # hash every payload file, write nothing
    except OSError as e:
        raise EdgepackError(f"cannot read {path}: {e}") from e
    return m
