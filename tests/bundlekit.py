"""Helpers for tests that build bundles by hand, including deliberately broken ones."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.bundle import FileEntry, Manifest, SigningKey, Target
from agent.bundle.manifest import Requirements


def make_manifest(
    files: list[FileEntry], key: SigningKey, *, version: int = 1, model: str = "tiny",
    arch: tuple[str, ...] = (), min_ram: int = 0,
) -> Manifest:
    return Manifest(
        model_name=model, version=version, profile="x86-64-cpu",
        target=Target("llamacpp", "gguf", "int8", "Q8_0", "cpu", files[0].path),
        files=files, requirements=Requirements(arch, min_ram, 0),
        signer_key_id=key.key_id,
    )


def raw_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """Hand-build a tar (for attack tests that break the format on purpose)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def read_members(bundle: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(bundle) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


# --- byte-level tar surgery (tests/integration/test_generated_attacks.py) -------------------------

BLOCK = 512
# The ustar header's fields: name -> (offset, length).
HEADER_FIELDS: dict[str, tuple[int, int]] = {
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
    "mtime": (136, 12), "chksum": (148, 8), "typeflag": (156, 1), "linkname": (157, 100),
    "magic": (257, 6), "version": (263, 2), "uname": (265, 32), "gname": (297, 32),
    "devmajor": (329, 8), "devminor": (337, 8), "prefix": (345, 155), "pad": (500, 12),
}
END_OF_ARCHIVE = bytes(2 * BLOCK)


@dataclass(frozen=True)
class TarMember:
    """Where one member of a plain ustar archive lies: its header, its data, its padded end."""

    name: str
    header: int
    data: int
    size: int

    @property
    def end(self) -> int:  # the first byte after the data
        return self.data + self.size

    @property
    def next(self) -> int:  # the next header: the data padded to a whole block
        return self.data + -(-self.size // BLOCK) * BLOCK


def tar_layout(tar: bytes) -> list[TarMember]:
    """The members of a plain ustar archive (regular files, no extension headers), in order."""
    out: list[TarMember] = []
    off = 0
    while off + BLOCK <= len(tar) and tar[off:off + BLOCK] != bytes(BLOCK):
        h = tar[off:off + BLOCK]
        if h[156:157] not in (b"0", b"\0"):
            raise ValueError(f"member at {off} is not a plain regular file")
        name = h[0:100].split(b"\0")[0].decode()
        prefix = h[345:500].split(b"\0")[0].decode()
        size = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
        out.append(TarMember(f"{prefix}/{name}" if prefix else name, off, off + BLOCK, size))
        off = out[-1].next
    return out


def set_checksum(header: bytearray) -> bytes:
    """``header`` (one 512-byte ustar block) with its checksum field recomputed."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def size_field(n: int) -> bytes:
    """A 12-byte size field: octal when it fits, else GNU base-256 (negative ones too)."""
    if 0 <= n < 8**11:
        return b"%011o\0" % n
    return (b"\x80" + n.to_bytes(11, "big")) if n >= 0 else (b"\xff" + (256**11 + n).to_bytes(11, "big"))


def tar_member(name: str, data: bytes, *, size: int | None = None, kind: bytes = tarfile.REGTYPE,
               linkname: str = "", fmt: Literal[0, 1, 2] = tarfile.PAX_FORMAT,
               pax: dict[str, str] | None = None) -> bytes:
    """One member's bytes (extension headers, header, data, padding).

    ``size`` overrides the size the header claims (the data stays as given); ``kind`` and
    ``linkname`` make links, devices and folders; ``pax`` adds extended-header records.
    """
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    ti.type = kind
    ti.linkname = linkname
    ti.pax_headers = dict(pax or {})
    buf = bytearray(ti.tobuf(fmt, "utf-8", "surrogateescape"))
    if size is not None:
        h = bytearray(buf[-BLOCK:])
        h[124:136] = size_field(size)
        buf[-BLOCK:] = set_checksum(h)
    return bytes(buf) + data + bytes(-len(data) % BLOCK)


def partial_offset(staging_dir: Path) -> int:
    """The byte a streamed install kept in ``staging_dir`` resumes its download from (0: none),
    read from its journal (agent/partial.py) the way the agent reads it."""
    import base64
    import json

    journals = list(staging_dir.glob("partial-*.journal.json"))
    if not journals:
        return 0
    try:
        doc = json.loads(journals[0].read_bytes())
    except (OSError, ValueError):  # replaced between the glob and the read: the next poll sees it
        return 0
    return sum(len(base64.b64decode(s["head"])) + s["staged"] for s in doc["segments"])
