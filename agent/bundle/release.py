"""The release: one signed document per build, naming each profile's bundle and what to expect of it.

Producer: ``edgepack build`` (packager/release.py) writes :data:`RELEASE_NAME` and
:data:`RELEASE_SIG_NAME` beside the bundles, signed by the key that signed them. Consumer: the
fleet's rollouts (fleet/rollout_ops.py, fleet/controller.py) read it with :func:`read_release` /
:func:`verify_release` and install, per device profile, the bundle it lists.

Invariants (as for the manifest, agent/bundle/manifest.py):
- Trust is decided over the exact bytes: (1) cap the size, (2) verify the signature envelope over
  those bytes with the manifest's own scheme (agent/bundle/verify.py: same Ed25519 keys, same
  keyring, same ``edgepack-signature/1`` envelope), (3) only then parse, (4) check the release
  names the key that signed it. Nothing is re-serialized to verify.
- ``to_bytes()`` is canonical (sorted keys, compact, UTF-8).
- Unknown fields survive a round trip, at the top and in each bundle entry, so an older reader
  keeps a newer minor format intact; another major ``format`` is refused.
- A bundle entry names its file (no path: it lies beside the release), the file's size and sha256
  (checked by :func:`check_release_file`) and the sha256 of the exact ``manifest.json`` bytes inside
  it, which is the ``digest`` a device reports for the bundle it serves.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from agent._fs import read_capped
from agent.bundle.keys import Keyring, SigningKey
from agent.bundle.verify import sign_manifest, trusted_signer
from agent.errors import DigestMismatchError, ReleaseError, SignatureError

RELEASE_NAME: Final = "release.json"
RELEASE_SIG_NAME: Final = "release.json.sig"
RELEASE_FORMAT: Final = "edgepack-release/1"
MAX_RELEASE_BYTES: Final = 1 << 20  # 1 MiB: ~2,000 bundle entries; cap the read before parsing
MAX_RELEASE_SIG_BYTES: Final = 64 << 10
MAX_RELEASE_BUNDLES: Final = 1000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as a manifest's model and profile
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")  # a bare file name: no folder, no ".."
_QUALITY_KEYS: Final = ("delta_pct", "top1_agreement", "reference")


def _format_major(fmt: object) -> str | None:
    prefix = RELEASE_FORMAT.partition("/")[0]
    if not isinstance(fmt, str) or not fmt.startswith(prefix + "/"):
        return None
    return fmt[len(prefix) + 1 :].split(".")[0]


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ReleaseError(f"{where}: missing {key!r}")
    v = d[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    # bool is an int subclass: a version of true is not a version.
    if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
        raise ReleaseError(f"{where}.{key} has the wrong type ({type(v).__name__})")
    return v


def _number_or_none(v: object) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))


@dataclass(frozen=True)
class ReleaseBundle:
    """One profile's bundle in a release.

    Raises:
        ReleaseError: a field is malformed (on construction).
    """

    profile: str
    file: str  # the bundle's file name, beside the release (no folder)
    sha256: str  # of the bundle file
    size: int  # bytes of the bundle file
    manifest_digest: str  # sha256 of the exact manifest.json bytes inside: the device's "digest"
    model: str
    version: int
    runtime: str
    format: str
    precision: str
    quant: str
    device: str
    # The manifest's quality: at least delta_pct (float | None: no reference), top1_agreement
    # (float | None) and reference (str).
    quality: dict[str, Any]
    # Speed measured on the build host by the gate's benchmark (ttft_ms, decode_tok_s,
    # peak_rss_mb, tokens, decode_tokens); None when the variant could not run there.
    expected: dict[str, Any] | None
    fidelity_threshold: float | None  # the fidelity check's min agreement; None: no table
    unrecognized: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"release.bundles[{self.profile!r}]"
        if not isinstance(self.profile, str) or not _NAME.match(self.profile):
            raise ReleaseError(f"release bundle profile {self.profile!r} must match {_NAME.pattern}")
        if not isinstance(self.file, str) or not _FILE.match(self.file):
            raise ReleaseError(f"{where}.file {self.file!r} must be a bare file name "
                               f"({_FILE.pattern})")
        for name in ("sha256", "manifest_digest"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _SHA256.match(v):
                raise ReleaseError(f"{where}.{name} must be 64 lowercase hex digits")
        for name in ("size", "version"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ReleaseError(f"{where}.{name} must be a non-negative integer")
        if not isinstance(self.model, str) or not _NAME.match(self.model):
            raise ReleaseError(f"{where}.model {self.model!r} must match {_NAME.pattern}")
        for name in ("runtime", "format", "precision", "device"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ReleaseError(f"{where}.{name} must be a non-empty string")
        if not isinstance(self.quant, str):
            raise ReleaseError(f"{where}.quant must be a string")
        q = self.quality
        if not isinstance(q, dict) or any(k not in q for k in _QUALITY_KEYS):
            raise ReleaseError(f"{where}.quality must be an object with {', '.join(_QUALITY_KEYS)}")
        if not _number_or_none(q["delta_pct"]) or not _number_or_none(q["top1_agreement"]) \
                or not isinstance(q["reference"], str):
            raise ReleaseError(f"{where}.quality: delta_pct and top1_agreement must be numbers or "
                               "null, reference a string")
        e = self.expected
        if e is not None and (not isinstance(e, dict)
                              or not all(_number_or_none(v) for v in e.values())):
            raise ReleaseError(f"{where}.expected must be null or an object of numbers")
        t = self.fidelity_threshold
        if not _number_or_none(t) or (t is not None and not 0 <= t <= 1):
            raise ReleaseError(f"{where}.fidelity_threshold must be null or a number in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReleaseBundle:
        """Validate one bundle entry.

        Raises:
            ReleaseError: a field is missing, of the wrong type, or malformed.
        """
        if not isinstance(d, dict):
            raise ReleaseError("release.bundles entries must be objects")
        w = f"release.bundles[{d.get('profile')!r}]"
        known = set(cls.__dataclass_fields__) - {"unrecognized"}
        return cls(
            profile=_get(d, "profile", str, w), file=_get(d, "file", str, w),
            sha256=_get(d, "sha256", str, w), size=_get(d, "size", int, w),
            manifest_digest=_get(d, "manifest_digest", str, w), model=_get(d, "model", str, w),
            version=_get(d, "version", int, w), runtime=_get(d, "runtime", str, w),
            format=_get(d, "format", str, w), precision=_get(d, "precision", str, w),
            quant=_get(d, "quant", str, w), device=_get(d, "device", str, w),
            quality=dict(_get(d, "quality", dict, w)),
            expected=(dict(_get(d, "expected", dict, w)) if d.get("expected") is not None
                      else None),
            fidelity_threshold=d.get("fidelity_threshold"),
            unrecognized={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.unrecognized)
        d.update({
            "profile": self.profile, "file": self.file, "sha256": self.sha256, "size": self.size,
            "manifest_digest": self.manifest_digest, "model": self.model, "version": self.version,
            "runtime": self.runtime, "format": self.format, "precision": self.precision,
            "quant": self.quant, "device": self.device, "quality": self.quality,
            "expected": self.expected, "fidelity_threshold": self.fidelity_threshold,
        })
        return d


@dataclass(frozen=True)
class Release:
    """A signed build: one bundle per device profile, all of one model version.

    Raises:
        ReleaseError: a field is malformed, or a bundle is of another model or version, or is
            keyed by another profile than its own (on construction).
    """

    model: str
    version: int
    created: str  # ISO 8601 UTC, informational only (never used for trust)
    bundles: dict[str, ReleaseBundle]  # by profile name
    signer_key_id: str
    source: dict[str, Any] = field(default_factory=dict)  # kind, digest and name of the source model
    format: str = RELEASE_FORMAT
    unrecognized: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if _format_major(self.format) != _format_major(RELEASE_FORMAT):
            raise ReleaseError(
                f"release format {self.format!r} is not supported (this edgepack reads "
                f"{RELEASE_FORMAT}.x)", hint="Upgrade edgepack.")
        if not isinstance(self.model, str) or not _NAME.match(self.model):
            raise ReleaseError(f"release model {self.model!r} must match {_NAME.pattern}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ReleaseError("release version must be a non-negative integer")
        if not isinstance(self.bundles, dict) or len(self.bundles) > MAX_RELEASE_BUNDLES:
            raise ReleaseError(f"release bundles must be an object of at most "
                               f"{MAX_RELEASE_BUNDLES} profiles")
        for profile, b in self.bundles.items():
            if not isinstance(b, ReleaseBundle) or b.profile != profile:
                raise ReleaseError(f"release bundle keyed {profile!r} is not that profile's")
            if (b.model, b.version) != (self.model, self.version):
                raise ReleaseError(f"release {self.release_id} lists {b.file}, a bundle of "
                                   f"{b.model} v{b.version}")
        if not isinstance(self.signer_key_id, str) or not _SHA256.match(self.signer_key_id):
            raise ReleaseError("release signer key id must be 64 lowercase hex digits")
        if not isinstance(self.source, dict) or not isinstance(self.created, str):
            raise ReleaseError("release source must be an object and created a string")

    @property
    def release_id(self) -> str:
        """``"<model>-v<version>"``: what a rollout names it by."""
        return f"{self.model}-v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.unrecognized)
        d.update({"format": self.format, "model": self.model, "version": self.version,
                  "created": self.created, "signer": {"key_id": self.signer_key_id},
                  "source": self.source,
                  "bundles": {p: b.to_dict() for p, b in self.bundles.items()}})
        return d

    def to_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, no whitespace, UTF-8. These are what gets signed."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        """Validate a release object.

        Raises:
            ReleaseError: another major format, or a field missing, malformed or inconsistent.
        """
        if not isinstance(d, dict):
            raise ReleaseError("a release must be a JSON object")
        fmt = _get(d, "format", str, "release")
        if _format_major(fmt) != _format_major(RELEASE_FORMAT):
            raise ReleaseError(f"release format {fmt!r} is not supported (this edgepack reads "
                               f"{RELEASE_FORMAT}.x)", hint="Upgrade edgepack.")
        bundles = _get(d, "bundles", dict, "release")
        if len(bundles) > MAX_RELEASE_BUNDLES:
            raise ReleaseError(f"release lists {len(bundles)} bundles (limit {MAX_RELEASE_BUNDLES})")
        signer = _get(d, "signer", dict, "release")
        known = {"format", "model", "version", "created", "signer", "source", "bundles"}
        return cls(
            model=_get(d, "model", str, "release"), version=_get(d, "version", int, "release"),
            created=str(d.get("created", "")),
            bundles={str(p): ReleaseBundle.from_dict(b) for p, b in bundles.items()},
            signer_key_id=_get(signer, "key_id", str, "release.signer"),
            source=dict(_get(d, "source", dict, "release")) if "source" in d else {},
            format=fmt, unrecognized={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Release:
        """Parse release bytes (call only after the signature over them verified, or to inspect).

        Raises:
            ReleaseError: too large, not UTF-8 JSON, or invalid.
        """
        if len(data) > MAX_RELEASE_BYTES:
            raise ReleaseError(f"release is {len(data)} bytes (limit {MAX_RELEASE_BYTES})")
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nesting too deep
            raise ReleaseError(f"release is not valid UTF-8 JSON: {e}") from e
        return cls.from_dict(obj)


def sign_release(data: bytes, key: SigningKey) -> bytes:
    """The ``release.json.sig`` bytes for the release bytes ``data`` signed by ``key`` (producer).

    The envelope is a manifest signature's (agent/bundle/verify.py): one keyring verifies both.
    """
    return sign_manifest(data, key)


def verify_release(data: bytes, signature: bytes, keyring: Keyring) -> Release:
    """Verify a release's signature over its exact bytes, then parse it.

    Args:
        data: the exact ``release.json`` bytes.
        signature: the ``release.json.sig`` bytes.
        keyring: the trusted keys (the ones a device trusts for bundles).

    Returns:
        The parsed, trusted release.

    Raises:
        ReleaseError: too large, or the signed release is malformed or names another signer.
        SignatureError: unsigned, or no signature by a trusted key verifies over the bytes.
    """
    if len(data) > MAX_RELEASE_BYTES:
        raise ReleaseError(f"release is {len(data)} bytes (limit {MAX_RELEASE_BYTES})")
    if not signature:
        raise SignatureError("the release is unsigned (empty signature)")
    if len(signature) > MAX_RELEASE_SIG_BYTES:
        raise SignatureError(f"release signature is {len(signature)} bytes "
                             f"(limit {MAX_RELEASE_SIG_BYTES})")
    signer = trusted_signer(data, signature, keyring, document="release", owner="release")
    release = Release.from_bytes(data)
    if release.signer_key_id != signer.key_id:
        raise ReleaseError(f"release names signer {release.signer_key_id[:16]} but was signed by "
                           f"{signer.key_id[:16]}")
    return release


def read_release(path: Path, keyring: Keyring) -> tuple[Release, bytes, bytes]:
    """Read and verify a release file and the signature beside it.

    Args:
        path: ``release.json`` (or the folder holding it); its signature is the file of the same
            name plus ``.sig`` (``release.json.sig``).
        keyring: the trusted keys.

    Returns:
        (the verified release, its exact bytes, the signature bytes) — the bytes to keep, so the
        release can be verified again later without re-serializing it.

    Raises:
        ReleaseError: the release file cannot be read, is too large or invalid.
        SignatureError: the signature file is missing (an unsigned release is refused) or does
            not verify.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RELEASE_NAME
    sig_path = path.with_name(path.name + ".sig")
    data = read_capped(path, MAX_RELEASE_BYTES, ReleaseError, "a release")
    if not sig_path.exists():
        raise SignatureError(
            f"{sig_path} is missing: the release is unsigned and is refused",
            hint="'edgepack build' writes release.json.sig beside release.json; copy both.")
    signature = read_capped(sig_path, MAX_RELEASE_SIG_BYTES, SignatureError, "a release signature")
    return verify_release(data, signature, keyring), data, signature


def read_release_unverified(path: Path) -> Release:
    """Parse a release file WITHOUT checking its signature (for ``release inspect``).

    Raises:
        ReleaseError: unreadable, too large or invalid.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RELEASE_NAME
    return Release.from_bytes(read_capped(path, MAX_RELEASE_BYTES, ReleaseError, "a release"))


def check_release_file(entry: ReleaseBundle, size: int, sha256_hex: str) -> None:
    """Check a bundle file's measured size and sha256 against its release entry. Pure.

    Raises:
        DigestMismatchError: the size or the hash differs.
    """
    if size != entry.size:
        raise DigestMismatchError(f"{entry.file}: {size} bytes, the release says {entry.size}",
                                  path=entry.file, expected=str(entry.size), actual=str(size))
    if sha256_hex != entry.sha256:
        raise DigestMismatchError(
            f"{entry.file}: sha256 {sha256_hex[:16]}… does not match the release's "
            f"{entry.sha256[:16]}… (another build, corrupted or tampered)",
            path=entry.file, expected=entry.sha256, actual=sha256_hex)


__all__ = ["MAX_RELEASE_BYTES", "RELEASE_FORMAT", "RELEASE_NAME", "RELEASE_SIG_NAME", "Release",
           "ReleaseBundle", "check_release_file", "read_release", "read_release_unverified",
           "sign_release", "verify_release"]
