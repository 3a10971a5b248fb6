"""Helpers for tests that build bundles by hand, including deliberately broken ones."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

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


