"""The root-signed keyring: which release keys a device trusts, who may change that, and revocation.

Roles, as in TUF: *root* keys sign the keyring; *release* keys sign bundles and releases. A device
holds one signed keyring (``STATE_DIR/trust.json``); a newer one replaces it only if it verifies
against the one it holds. Pure functions over bytes: the caller reads and writes the files.

Document (a signed envelope around the exact keyring bytes, never re-serialized to verify)::

    {"format": "edgepack-signed-keyring/1",
     "signed": "<the keyring JSON text>",
     "signatures": [{"key_id": "<sha256 of the public key>", "sig": "<hex Ed25519>"}, ...]}

    keyring JSON: {"format": "edgepack-trust/1", "version": N,
                   "root": {"threshold": T, "keys": [<public key>, ...]},
                   "release_keys": [<public key>, ...], "revoked": ["<key id>", ...]}

Update rules (:func:`verify_keyring_update`), in this order: (1) cap the size, (2) parse the
envelope, (3) the signatures of at least ``threshold`` of the CURRENT root keys verify over the
exact signed bytes, (4) only then parse the keyring, (5) its version is higher than the current
one (the same version is accepted only as the very same bytes: a no-op), (6) at least
``threshold`` of its NEW root keys signed it too (so rotating the root needs both the old and
the new root), (7) nothing once revoked comes back: ``revoked`` only grows, and no revoked key is
a release or root key. The first keyring of a device has no current root to check against: only
a local operator may install it (``trust_on_first_use``), and it must be signed by its own root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.bundle.keys import Keyring, PublicKey, key_id_of
from agent.bundle.verify import Signature, parse_signatures
from agent.errors import DowngradeError, KeyringError, SignatureError

SIGNED_FORMAT = "edgepack-signed-keyring/1"
TRUST_FORMAT = "edgepack-trust/1"
MAX_TRUST_BYTES = 48 << 10  # fits an MQTT command (64 KiB) with room; dozens of keys
MAX_KEYS = 64


@dataclass(frozen=True)
class TrustedKeyring:
    """A verified root-signed keyring.

    Attributes:
        version: monotonic; a device never goes back to a lower one.
        root_keys, threshold: who may sign the next keyring (``threshold`` distinct root keys).
        release_keys: keys whose bundle and release signatures are trusted.
        revoked: key ids never trusted again, for anything.
        document: the exact signed-keyring file bytes, for storing and forwarding.
        extra: fields of the keyring this agent does not know (kept, never acted on).
    """

    version: int
    root_keys: tuple[PublicKey, ...]
    threshold: int
    release_keys: tuple[PublicKey, ...]
    revoked: frozenset[str]
    document: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version < 1:
            raise KeyringError(f"keyring version must be an integer >= 1, not {self.version!r}")
        if not self.root_keys:
            raise KeyringError("keyring names no root key")
        if type(self.threshold) is not int or not 1 <= self.threshold <= len(self.root_keys):
            raise KeyringError(f"root threshold {self.threshold!r} must be 1..{len(self.root_keys)}")
        bad = sorted(k.key_id[:16] for k in (*self.root_keys, *self.release_keys)
                     if k.key_id in self.revoked)
        if bad:
            raise KeyringError(f"keyring lists revoked key(s) {', '.join(bad)} as trusted")

    def release_keyring(self) -> Keyring:
        """The keys bundles and releases are verified with (never a revoked one)."""
        return Keyring(list(self.release_keys), revoked=self.revoked)

    def summary(self) -> dict[str, Any]:
        """For status, birth and ``keyring show``."""
        return {"version": self.version, "threshold": self.threshold,
                "root_keys": [k.key_id for k in self.root_keys],
                "release_keys": [{"key_id": k.key_id, "name": k.name} for k in self.release_keys],
                "revoked": sorted(self.revoked)}

    def body(self) -> dict[str, Any]:
        """The keyring JSON object (producer side: what :func:`sign_keyring` signs)."""
        return {**self.extra, "format": TRUST_FORMAT, "version": self.version,
                "root": {"threshold": self.threshold, "keys": [k.to_dict() for k in self.root_keys]},
                "release_keys": [k.to_dict() for k in self.release_keys],
                "revoked": sorted(self.revoked)}


# --- producer side ---------------------------------------------------------------------------------


def keyring_bytes(keyring: TrustedKeyring) -> bytes:
    """The exact bytes to sign for ``keyring`` (canonical JSON: sorted keys, compact)."""
    return json.dumps(keyring.body(), sort_keys=True, separators=(",", ":")).encode()


def sign_keyring(signed: bytes, signatures: list[tuple[str, bytes]]) -> bytes:
    """The signed-keyring file for the keyring bytes ``signed`` and ``(key_id, signature)`` pairs.

    Raises:
        KeyringError: ``signed`` is not UTF-8 (it travels as a JSON string).
    """
    try:
        text = signed.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KeyringError("keyring bytes must be UTF-8") from e
    doc = {"format": SIGNED_FORMAT, "signed": text,
           "signatures": [{"key_id": k, "sig": s.hex()} for k, s in signatures]}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


# --- consumer side ---------------------------------------------------------------------------------


def _envelope(data: bytes) -> tuple[bytes, list[Signature]]:
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_TRUST_BYTES:
        raise KeyringError(f"signed keyring is larger than {MAX_TRUST_BYTES} bytes")
    try:
        doc: Any = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KeyringError(f"signed keyring is not JSON: {type(e).__name__}") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNED_FORMAT:
        raise KeyringError(f"not a signed keyring (expected format {SIGNED_FORMAT!r})",
                           hint="Make one with 'edgepack keys generate --root', 'keys rotate' or "
                                "'keys revoke'.")
    signed = doc.get("signed")
    if not isinstance(signed, str):
        raise KeyringError("signed keyring has no 'signed' text")
    sig_doc = json.dumps({"format": "edgepack-signature/1", "signatures": doc.get("signatures")})
    try:
        sigs = parse_signatures(sig_doc.encode())
    except SignatureError as e:
        raise SignatureError(f"keyring signatures: {e}") from None
    return signed.encode("utf-8"), sigs


def _signed_by(signed: bytes, sigs: list[Signature], roots: tuple[PublicKey, ...]) -> set[str]:
    by_id = {k.key_id: k for k in roots}
    return {s.key_id for s in sigs if s.key_id in by_id and by_id[s.key_id].verify(s.sig, signed)}


def _keys(items: object, what: str) -> tuple[PublicKey, ...]:
    if not isinstance(items, list) or len(items) > MAX_KEYS:
        raise KeyringError(f"keyring {what} must be a list of at most {MAX_KEYS} keys")
    keys = (PublicKey.from_dict(item, f"keyring {what}") for item in items)
    return tuple({k.key_id: k for k in keys}.values())


def parse_keyring(signed: bytes, document: bytes = b"") -> TrustedKeyring:
    """Parse keyring bytes (already verified by the caller: see :func:`verify_keyring_update`).

    Raises:
        KeyringError: malformed, another format, or inconsistent.
    """
    try:
        d: Any = json.loads(signed.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KeyringError(f"keyring is not JSON: {type(e).__name__}") from None
    if not isinstance(d, dict) or d.get("format") != TRUST_FORMAT:
        raise KeyringError(f"keyring format is not {TRUST_FORMAT!r}")
    root = d.get("root")
    if not isinstance(root, dict):
        raise KeyringError("keyring has no 'root' object")
    revoked = d.get("revoked", [])
    if (not isinstance(revoked, list) or len(revoked) > 4 * MAX_KEYS
            or not all(isinstance(r, str) and len(r) == 64 for r in revoked)):
        raise KeyringError("keyring 'revoked' must be a list of key ids")
    known = {"format", "version", "root", "release_keys", "revoked"}
    # Types are checked by TrustedKeyring itself (a JSON true is not a version).
    return TrustedKeyring(d.get("version", 0), _keys(root.get("keys"), "root"),
                          root.get("threshold", 0),
                          _keys(d.get("release_keys", []), "release"),
                          frozenset(revoked), bytes(document),
                          {k: v for k, v in d.items() if k not in known})


def verify_keyring_update(data: bytes, current: TrustedKeyring | None, *,
                          trust_on_first_use: bool = False) -> TrustedKeyring:
    """Decide whether a signed keyring may replace ``current`` (see the module's rules).

    Args:
        data: the signed-keyring file bytes, as received.
        current: the keyring this device holds (None: it holds none yet).
        trust_on_first_use: with no ``current``, accept a keyring signed by its own root. Only
            for a local operator installing the first keyring, never for a network command.

    Returns:
        The new trusted keyring, or ``current`` itself when ``data`` is the very same keyring.

    Raises:
        KeyringError: malformed; or no current keyring and ``trust_on_first_use`` not set.
        SignatureError: not signed by ``threshold`` current root keys, or (root rotation) not
            also by ``threshold`` of the new root keys.
        DowngradeError: an older version, or the same version with other contents (a replay).
    """
    signed, sigs = _envelope(data)
    if current is None:
        if not trust_on_first_use:
            raise KeyringError("this device has no root-signed keyring yet, so no update can be "
                               "verified", hint="Install the first one locally: "
                                                "'edgepack-agent keyring update FILE --init'.")
    else:
        ok = _signed_by(signed, sigs, current.root_keys)
        if len(ok) < current.threshold:
            raise SignatureError(
                f"keyring update is signed by {len(ok)} of the current root keys, "
                f"{current.threshold} needed (signers: {', '.join(s.key_id[:16] for s in sigs)})")
    new = parse_keyring(signed, bytes(data))
    if current is not None:
        if new.version < current.version or (new.version == current.version
                                             and keyring_digest(new) != keyring_digest(current)):
            raise DowngradeError(
                f"keyring v{new.version} is not newer than v{current.version} installed "
                "(rollback or replay refused)", offered=new.version, installed=current.version)
        if new.version == current.version:
            return current
    ok = _signed_by(signed, sigs, new.root_keys)
    if len(ok) < new.threshold:
        raise SignatureError(f"keyring v{new.version} is signed by {len(ok)} of its own root keys, "
                             f"{new.threshold} needed (a new root must sign its first keyring)")
    if current is not None:
        back = sorted(r[:16] for r in current.revoked - new.revoked)
        if back:
            raise KeyringError(f"keyring v{new.version} un-revokes {', '.join(back)}: a revoked key "
                               "is never trusted again")
    return new


def keyring_digest(k: TrustedKeyring) -> str:
    """A digest of the keyring's meaning (version, roots, release keys, revocations)."""
    return key_id_of(keyring_bytes(k))


def signer_revoked(signer_key_id: str | None, keyring: TrustedKeyring | None) -> bool:
    """True if a bundle's signer is revoked by ``keyring`` (for health and status)."""
    return bool(signer_key_id) and keyring is not None and signer_key_id in keyring.revoked


__all__ = [
    "MAX_TRUST_BYTES", "SIGNED_FORMAT", "TRUST_FORMAT", "TrustedKeyring", "keyring_bytes",
    "keyring_digest", "parse_keyring", "sign_keyring", "signer_revoked", "verify_keyring_update",
]
