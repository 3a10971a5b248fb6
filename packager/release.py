"""Writing, inspecting and verifying release documents on the host (the format: agent/bundle/release.py).

``edgepack build`` calls :func:`write_release` after signing its bundles; ``edgepack release
inspect`` and ``release verify`` call :func:`describe` and :func:`verify_release_dir`. Both files
are written atomically (temp file + fsync + rename), the release first: a reader that catches the
new release with the old signature refuses it rather than trusting a mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent._fs import atomic_write, file_digest
from agent.bundle import Keyring, SigningKey
from agent.bundle.release import (
    RELEASE_NAME,
    Release,
    ReleaseBundle,
    check_release_file,
    read_release,
    sign_release,
)
from agent.errors import EdgepackError


def write_release(out_dir: Path, release: Release, key: SigningKey) -> Path:
    """Sign ``release`` with ``key`` and write ``release.json`` + ``release.json.sig`` in ``out_dir``.

    Returns:
        The path of ``release.json``.

    Raises:
        ValueError: the release does not name ``key`` as its signer (a producer bug).
    """
    if release.signer_key_id != key.key_id:
        raise ValueError("release signer is not the signing key")
    data = release.to_bytes()
    path = out_dir / RELEASE_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    atomic_write(path.with_name(path.name + ".sig"), sign_release(data, key))
    return path


@dataclass(frozen=True)
class FileCheck:
    """One bundle file beside a release, checked against its entry."""

    profile: str
    file: str
    ok: bool
    reason: str = ""


def verify_release_dir(path: Path, keyring: Keyring, *, bundles: bool = False
                       ) -> tuple[Release, list[FileCheck]]:
    """Verify a release's signature and, with ``bundles``, each listed bundle file beside it.

    Args:
        path: ``release.json`` or its folder.
        keyring: trusted keys.
        bundles: also hash every bundle file and compare its size and sha256 with the release.

    Returns:
        The verified release and one :class:`FileCheck` per bundle (empty without ``bundles``).

    Raises:
        SignatureError, ReleaseError: the release does not verify (files are not looked at then).
    """
    path = Path(path)
    release, _, _ = read_release(path, keyring)
    folder = path if path.is_dir() else path.parent
    checks: list[FileCheck] = []
    if bundles:
        for profile, entry in release.bundles.items():
            checks.append(_check_file(folder, profile, entry))
    return release, checks


def _check_file(folder: Path, profile: str, entry: ReleaseBundle) -> FileCheck:
    try:
        d = file_digest(folder / entry.file)
        check_release_file(entry, d.size, d.sha256)
    except OSError as e:
        return FileCheck(profile, entry.file, False, f"cannot read: {e.strerror or e}")
    except EdgepackError as e:
        return FileCheck(profile, entry.file, False, str(e))
    return FileCheck(profile, entry.file, True)


def describe(release: Release) -> list[str]:
    """The release as a human table: a header line, then one row per profile."""
    lines = [f"release:   {release.release_id}  created {release.created or '?'}  signer "
             f"{release.signer_key_id[:16]}  source {release.source.get('kind', '?')} "
             f"{str(release.source.get('digest', ''))[:16]}",
             f"{'profile':18s} {'runtime':9s} {'quant':7s} {'device':6s} {'MiB':>7s} "
             f"{'Δ ppl %':>8s} {'top-1':>6s} {'tok/s':>7s} {'fid.':>5s}  file"]
    for p, b in sorted(release.bundles.items()):
        delta = b.quality.get("delta_pct")
        agree = b.quality.get("top1_agreement")
        speed = (b.expected or {}).get("decode_tok_s")
        lines.append(
            f"{p:18s} {b.runtime:9s} {b.quant or b.precision:7s} {b.device:6s} "
            f"{b.size / 2**20:7.1f} {_num(delta, '+.2f'):>8s} {_num(agree, '.3f'):>6s} "
            f"{_num(speed, '.1f'):>7s} {_num(b.fidelity_threshold, '.2f'):>5s}  {b.file}")
    return lines


def _num(v: object, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, int | float) and not isinstance(v, bool) else "n/a"


__all__ = ["FileCheck", "describe", "verify_release_dir", "write_release"]
