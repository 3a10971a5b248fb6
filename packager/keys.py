"""Signing keys on the build host: make a key pair on disk, load a private key.

The private key file is PKCS#8 PEM, mode 0600 (owner only); the public half is written as a
one-key keyring (``NAME.pub.json``), ready to copy to devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.bundle import Keyring, SigningKey
from agent.errors import KeyringError


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


__all__ = ["KeyFiles", "generate_key_files", "load_signing_key"]
