"""Ed25519 keys, key ids and the device keyring.

A key id is the sha256 (hex) of the raw 32-byte public key, so an id can never name a different key.
The keyring is a small JSON document the device trusts; a public key file written by
``edgepack keys generate`` is itself a one-key keyring, ready to copy to a device.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import KeyringError

# cryptography is imported where a signature is checked or made, not here: its Rust extension is
# ~6.6 MiB of the idle agent's RSS (bench/results/footprint.md), and an idle device that has
# nothing to verify should not carry it. Keys are kept as raw bytes until then.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEYRING_FORMAT = "edgepack-keyring/1"
MAX_KEYRING_BYTES = 256 << 10


def key_id_of(raw_public: bytes) -> str:
    """The key id of a raw Ed25519 public key: sha256 hex."""
    return hashlib.sha256(raw_public).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key with its id and a human name."""

    raw: bytes
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise KeyringError(f"an Ed25519 public key is 32 bytes, not {len(self.raw)}")

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature over exactly ``data``."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "algorithm": "ed25519", "public": self.raw.hex(),
                "name": self.name}

    @classmethod
    def from_dict(cls, item: object, what: str = "keyring") -> PublicKey:
        """Parse a :meth:`to_dict` entry; its ``key_id`` must match its key.

        Raises:
            KeyringError: not an ed25519 entry, bad hex, or an id that does not match.
        """
        if not isinstance(item, dict) or item.get("algorithm") != "ed25519":
            raise KeyringError(f"{what} entries must be ed25519 keys")
        try:
            raw = bytes.fromhex(str(item.get("public", "")))
        except ValueError as err:
            raise KeyringError(f"{what} public key is not hex") from err
        k = cls(raw, str(item.get("name", ""))[:128])
        if item.get("key_id") != k.key_id:
            raise KeyringError(f"{what} entry {str(item.get('key_id'))[:64]!r} does not match its key")
        return k


class SigningKey:
    """An Ed25519 private key (host only: lives in the packager's key file, never on a device)."""

    def __init__(self, key: Ed25519PrivateKey, name: str = "") -> None:
        self._key = key
        self.name = name

    @classmethod
    def generate(cls, name: str = "") -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate(), name)

    @classmethod
    def from_pem(cls, data: bytes, name: str = "") -> SigningKey:
        """Load a PKCS#8 PEM private key.

        Raises:
            KeyringError: not a PEM Ed25519 private key (or encrypted).
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise KeyringError(f"not an unencrypted PEM private key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyringError("the private key is not Ed25519")
        return cls(key, name)

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public(self) -> PublicKey:
        from cryptography.hazmat.primitives import serialization

        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw, self.name)

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class Keyring:
    """The set of public keys a device trusts, by key id.

    ``revoked`` names key ids that are never trusted (from the root-signed keyring,
    agent/bundle/trust.py): a revoked key is left out even if listed, and a signature by one is
    refused as revoked rather than as unknown.
    """

    def __init__(self, keys: list[PublicKey] | None = None, *,
                 revoked: Iterable[str] = ()) -> None:
        self.revoked = frozenset(revoked)
        self._keys: dict[str, PublicKey] = {}
        for k in keys or []:
            if k.key_id not in self.revoked:
                self._keys[k.key_id] = k

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> PublicKey | None:
        return self._keys.get(key_id)

    def public_keys(self) -> list[PublicKey]:
        return list(self._keys.values())

    def merged(self, other: Keyring) -> Keyring:
        return Keyring([*self.public_keys(), *other.public_keys()],
                       revoked=self.revoked | other.revoked)

    def to_bytes(self) -> bytes:
        doc = {"format": KEYRING_FORMAT, "keys": [k.to_dict() for k in self._keys.values()]}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Keyring:
        """Parse a keyring document; every key id must match its key.

        Raises:
            KeyringError: too large, malformed, another format, or an id that does not match.
        """
        if len(data) > MAX_KEYRING_BYTES:
            raise KeyringError(f"keyring is {len(data)} bytes (limit {MAX_KEYRING_BYTES})")
        try:
            doc: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nesting too deep
            raise KeyringError(f"keyring is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != KEYRING_FORMAT:
            raise KeyringError(f"not a keyring (expected format {KEYRING_FORMAT!r})")
        entries = doc.get("keys")
        if not isinstance(entries, list):
            raise KeyringError("keyring.keys must be a list")
        return cls([PublicKey.from_dict(item) for item in entries])


def load_keyring(paths: Iterable[Path]) -> Keyring:
    """Merge keyring files (each a JSON keyring, e.g. a ``*.pub.json`` from ``keys generate``).

    Args:
        paths: the files, in any order (a key in two files is trusted once).

    Returns:
        The merged keyring (empty when ``paths`` is).

    Raises:
        KeyringError: a file is missing, unreadable or malformed.
    """
    ring = Keyring()
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise KeyringError(f"cannot read keyring {p}: {e}",
                               hint="Pass --keyring FILE (or set EDGEPACK_KEYRING).") from e
        ring = ring.merged(Keyring.from_bytes(data))
    return ring
