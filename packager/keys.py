"""Signing keys on the build host: key pairs on disk, and the root-signed keyring.

The private key file is PKCS#8 PEM, mode 0600 (owner only); the public half is written as a
one-key keyring (``NAME.pub.json``). Roles (agent/bundle/trust.py): a *root* key signs the
keyring, *release* keys sign bundles. The keyring file (``keyring.signed.json``) is what devices
get (``edgepack-agent keyring update FILE``, or ``cmd/keyring``); each change here makes the next
version of it: (1) :func:`next_keyring` computes the new keyring (pure), (2) :func:`sign_with`
signs its exact bytes with the current root keys (and the new ones, when the root rotates),
(3) the caller writes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.bundle import Keyring, PublicKey, SigningKey
from agent.bundle.trust import TrustedKeyring, keyring_bytes, sign_keyring, verify_keyring_update
from agent.errors import KeyringError

SIGNED_KEYRING_NAME = "keyring.signed.json"


@dataclass(frozen=True)
class KeyFiles:
    """A generated key and where its two halves were written."""

    key: SigningKey
    private: Path
    keyring: Path


def generate_key_files(name: str, directory: Path, *, force: bool = False) -> KeyFiles:
    """Make an Ed25519 key: ``DIR/NAME.key`` (private, 0600) and ``DIR/NAME.pub.json`` (keyring).

    Raises:
        KeyringError: the private key file exists and ``force`` is not set.
    """
    directory.mkdir(parents=True, exist_ok=True)
    priv, pub = directory / f"{name}.key", directory / f"{name}.pub.json"
    if priv.exists() and not force:
        raise KeyringError(f"{priv} exists", hint="Use --force to replace it (old bundles stay "
                                                  "verifiable only with the old public key).")
    key = SigningKey.generate(name)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private: owner only
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_pem())
    pub.write_bytes(Keyring([key.public]).to_bytes())
    return KeyFiles(key, priv, pub)


def load_signing_key(path: Path | str) -> SigningKey:
    """Load a private key written by :func:`generate_key_files` (its name is the file's stem).

    Raises:
        KeyringError: the file is unreadable or not an unencrypted Ed25519 PEM key.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise KeyringError(f"cannot read key {p}: {e}",
                           hint="Create one with: edgepack keys generate --name release -o keys/") from e
    return SigningKey.from_pem(data, p.stem)


def load_public_keys(path: Path | str) -> list[PublicKey]:
    """The keys of a public keyring file (``NAME.pub.json``) or a private key file (``NAME.key``).

    Raises:
        KeyringError: unreadable or malformed.
    """
    p = Path(path)
    if p.suffix == ".key":
        return [load_signing_key(p).public]
    try:
        return Keyring.from_bytes(p.read_bytes()).public_keys()
    except OSError as e:
        raise KeyringError(f"cannot read {p}: {e}") from e


def next_keyring(current: TrustedKeyring | None, *, add: Sequence[PublicKey] = (),
                 remove: Sequence[str] = (), revoke: Sequence[str] = (),
                 roots: Sequence[PublicKey] | None = None,
                 threshold: int | None = None) -> TrustedKeyring:
    """The next keyring version (pure): release keys added / removed, keys revoked, new roots.

    Args:
        current: the keyring now in force (None: make version 1; ``roots`` required).
        add: release keys to trust.
        remove: release key ids (or unique prefixes) to stop trusting, not revoked.
        revoke: key ids (or unique prefixes) never to trust again (release or root keys).
        roots: the new root key set (None: keep the current one).
        threshold: root signatures a later update needs (None: keep, or 1).

    Raises:
        KeyringError: an unknown or ambiguous key id, or nothing left to sign with.
    """
    known = [*(current.release_keys if current else ()), *add, *(current.root_keys if current else ())]

    def resolve(prefix: str) -> str:
        hits = {k.key_id for k in known if k.key_id.startswith(prefix.lower())}
        if len(hits) != 1 or len(prefix) < 8:
            raise KeyringError(f"key id {prefix!r} names {len(hits)} known key(s)",
                               hint="Give at least 8 hex digits of a key id ('edgepack keys show').")
        return hits.pop()

    gone = {resolve(r) for r in remove}
    revoked = set(current.revoked if current else ()) | {resolve(r) for r in revoke}
    release = {k.key_id: k for k in (*(current.release_keys if current else ()), *add)}
    release = {i: k for i, k in release.items() if i not in gone and i not in revoked}
    root = list(roots) if roots is not None else list(current.root_keys if current else ())
    root = [k for k in root if k.key_id not in revoked]
    if not root:
        raise KeyringError("the new keyring would have no root key",
                           hint="Pass --new-root KEY when revoking the root.")
    thr = threshold or (current.threshold if current and roots is None else 1)
    return TrustedKeyring((current.version + 1) if current else 1, tuple(root),
                          min(thr, len(root)), tuple(release.values()), frozenset(revoked))


def sign_with(keyring: TrustedKeyring, keys: list[SigningKey],
              current: TrustedKeyring | None = None) -> bytes:
    """The signed-keyring file for ``keyring``, signed by ``keys``, checked as a device would.

    Args:
        keyring: the new keyring (from :func:`next_keyring`).
        keys: root private keys: enough of the current roots and, if the root changes, of the
            new ones.
        current: the keyring devices hold now (None: this is the first one).

    Raises:
        SignatureError: the signatures would not satisfy a device (too few root keys).
    """
    data = keyring_bytes(keyring)
    doc = sign_keyring(data, [(k.key_id, k.sign(data)) for k in keys])
    verify_keyring_update(doc, current, trust_on_first_use=current is None)  # as a device would
    return doc


__all__ = ["SIGNED_KEYRING_NAME", "KeyFiles", "generate_key_files", "load_public_keys",
           "load_signing_key", "next_keyring", "sign_with"]
