"""Trust decisions over bytes: pure functions, no files, no clock, no network.

Order matters and is fixed: (1) cap the sizes, (2) parse the signature envelope, (3) find a
signature by a trusted key and verify it over the EXACT manifest bytes, (4) only then parse the
manifest, (5) check the manifest names the key that signed it, (6) refuse downgrades and replays.
Payload checks (length + sha256 per file) use :func:`check_file`, called while streaming.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.bundle.keys import Keyring, PublicKey, SigningKey
from agent.bundle.manifest import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, FileEntry, Manifest
from agent.errors import DigestMismatchError, DowngradeError, ManifestError, SignatureError

SIGNATURE_FORMAT = "edgepack-signature/1"


@dataclass(frozen=True)
class Signature:
    key_id: str
    sig: bytes


def sign_manifest(manifest_bytes: bytes, key: SigningKey) -> bytes:
    """The ``manifest.sig`` bytes for ``manifest_bytes`` signed by ``key`` (producer side)."""
    doc = {
        "format": SIGNATURE_FORMAT,
        "signatures": [{"key_id": key.key_id, "sig": key.sign(manifest_bytes).hex()}],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_signatures(data: bytes) -> list[Signature]:
    """Parse a ``manifest.sig`` envelope.

    Raises:
        SignatureError: missing, too large or malformed.
    """
    if not data:
        raise SignatureError("the bundle has no signature")
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"signature file is {len(data)} bytes (limit {MAX_SIGNATURE_BYTES})")
    try:
        doc: Any = json.loads(data.decode("utf-8"))
    # RecursionError: nesting deeper than the parser's stack (64 KiB of "[" is enough).
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SignatureError(f"signature file is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"signature file is not {SIGNATURE_FORMAT!r}")
    entries = doc.get("signatures")
    if not isinstance(entries, list) or not entries:
        raise SignatureError("signature file lists no signatures")
    out = []
    for item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("key_id"), str):
            raise SignatureError("malformed signature entry")
        try:
            sig = bytes.fromhex(str(item.get("sig", "")))
        except ValueError as err:
            raise SignatureError("signature is not hex") from err
        out.append(Signature(item["key_id"], sig))
    return out


def trusted_signer(data: bytes, signature_bytes: bytes, keyring: Keyring, *,
                   document: str = "manifest", owner: str = "bundle") -> PublicKey:
    """The trusted key whose signature in the envelope verifies over exactly ``data``.

    Steps (2) and (3) of the module's order, shared by every signed document (manifests, releases):
    the caller caps ``data`` before and parses it only after.

    Args:
        data: the exact signed bytes.
        signature_bytes: the signature envelope (``manifest.sig``, ``release.json.sig``).
        keyring: the trusted keys.
        document, owner: what the bytes are and what they belong to, for the messages.

    Raises:
        SignatureError: the envelope is malformed, the keyring is empty, no signature is by a
            trusted key, or a trusted key's signature does not match the bytes.
    """
    signatures = parse_signatures(signature_bytes)
    if len(keyring) == 0:
        raise SignatureError(f"the device keyring is empty: no {owner} can be trusted",
                             hint="Give the agent a keyring with --keyring FILE.")
    for s in signatures:
        key = keyring.get(s.key_id)
        if key is not None and key.verify(s.sig, data):
            return key
    known = [s.key_id[:16] for s in signatures if s.key_id in keyring]
    revoked = [s.key_id[:16] for s in signatures if s.key_id in keyring.revoked]
    if revoked and not known:
        raise SignatureError(
            f"the {owner} is signed by revoked key {revoked[0]}: it is never trusted again",
            hint="Re-sign it with a current release key ('edgepack keys rotate').")
    if known:
        raise SignatureError(
            f"the signature by trusted key {known[0]} does not match the {document} bytes "
            f"(the {document} was modified after signing, or the signature is corrupt)"
        )
    raise SignatureError(
        f"the {owner} is signed by an untrusted key "
        f"({', '.join(s.key_id[:16] for s in signatures)}); trusted: "
        f"{', '.join(k.key_id[:16] for k in keyring.public_keys())}"
    )


def verify_manifest(
    manifest_bytes: bytes,
    signature_bytes: bytes,
    keyring: Keyring,
    installed_version: int | None = None,
    installed_digest: str | None = None,
    offered_digest: str | None = None,
) -> Manifest:
    """Verify a manifest's signature, then parse it and refuse downgrades.

    Args:
        manifest_bytes: the exact ``manifest.json`` bytes from the bundle.
        signature_bytes: the ``manifest.sig`` bytes from the bundle.
        keyring: the keys this device trusts.
        installed_version: highest version of this model ever committed here (None: none).
        installed_digest: manifest digest of that highest version, to tell a reinstall of the
            same bundle (allowed) from a different bundle reusing the version (refused).
        offered_digest: manifest digest of the offered bundle.

    Returns:
        The parsed, trusted manifest.

    Raises:
        SignatureError: no signature by a trusted key verifies over the manifest bytes.
        ManifestError: the signed manifest is malformed or names another signer.
        DowngradeError: the version is older than (or reuses) the installed one.
    """
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(manifest_bytes)} bytes (limit {MAX_MANIFEST_BYTES})")
    signer = trusted_signer(manifest_bytes, signature_bytes, keyring)
    try:
        manifest = Manifest.from_bytes(manifest_bytes)
    except RecursionError as e:  # nested deeper than the parser's stack, within the size cap
        raise ManifestError(f"manifest is not valid JSON: {e}") from e
    if manifest.signer_key_id and manifest.signer_key_id != signer.key_id:
        raise ManifestError(
            f"manifest names signer {manifest.signer_key_id[:16]} but was signed by "
            f"{signer.key_id[:16]}"
        )
    check_version(manifest, installed_version, installed_digest, offered_digest)
    return manifest


def check_version(
    manifest: Manifest,
    installed_version: int | None,
    installed_digest: str | None = None,
    offered_digest: str | None = None,
) -> None:
    """Refuse an older version (downgrade / replay) or a different bundle reusing the version.

    Raises:
        DowngradeError: with the offered and installed versions.
    """
    if installed_version is None:
        return
    if manifest.version < installed_version:
        raise DowngradeError(
            f"bundle {manifest.model_name} v{manifest.version} is older than v{installed_version} "
            "already installed (downgrade or replay refused)",
            offered=manifest.version,
            installed=installed_version,
        )
    if (
        manifest.version == installed_version
        and installed_digest is not None
        and offered_digest is not None
        and installed_digest != offered_digest
    ):
        raise DowngradeError(
            f"bundle {manifest.model_name} v{manifest.version} differs from the installed bundle "
            "with the same version (a version is never reused)",
            offered=manifest.version,
            installed=installed_version,
        )


def check_file(entry: FileEntry, size: int, sha256_hex: str) -> None:
    """Check one payload file's measured length and sha256 against its manifest entry.

    Raises:
        DigestMismatchError: the length or the hash differs.
    """
    if size != entry.size:
        raise DigestMismatchError(
            f"{entry.path}: {size} bytes, manifest says {entry.size}",
            path=entry.path, expected=str(entry.size), actual=str(size),
        )
    if sha256_hex != entry.sha256:
        raise DigestMismatchError(
            f"{entry.path}: sha256 {sha256_hex[:16]}… does not match the manifest's "
            f"{entry.sha256[:16]}… (corrupted or tampered)",
            path=entry.path, expected=entry.sha256, actual=sha256_hex,
        )
