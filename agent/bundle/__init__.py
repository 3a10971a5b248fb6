"""The bundle format and its trust decisions (pure functions over bytes and keys).

Producer: :mod:`packager` builds manifests and signs them. Consumer: :mod:`agent.store` streams a
bundle through :class:`BundleReader`, verifying with :func:`verify_manifest` before any payload.
A build's signed :class:`Release` (agent/bundle/release.py) lists its bundles per profile; the
packager writes it, the fleet reads it with :func:`read_release`.
"""

from typing import TYPE_CHECKING

from agent.bundle.keys import Keyring, PublicKey, SigningKey, key_id_of, load_keyring
from agent.bundle.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Fidelity,
    FileEntry,
    Manifest,
    Requirements,
    Target,
    check_member_path,
)
from agent.bundle.release import (
    RELEASE_FORMAT,
    RELEASE_NAME,
    RELEASE_SIG_NAME,
    Release,
    ReleaseBundle,
    read_release,
    sign_release,
    verify_release,
)
from agent.bundle.verify import (
    check_file,
    check_version,
    parse_signatures,
    sign_manifest,
    verify_manifest,
)

if TYPE_CHECKING:  # type checkers see the class; at run time it is imported on first use
    from agent.bundle.archive import BundleReader


def __getattr__(name: str) -> object:
    # tarfile is only needed while installing; importing it lazily keeps the idle agent small.
    if name == "BundleReader":
        from agent.bundle.archive import BundleReader

        return BundleReader
    raise AttributeError(name)


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "RELEASE_FORMAT",
    "RELEASE_NAME",
    "RELEASE_SIG_NAME",
    "SIGNATURE_NAME",
    "BundleReader",
    "Fidelity",
    "FileEntry",
    "Keyring",
    "Manifest",
    "PublicKey",
    "Release",
    "ReleaseBundle",
    "Requirements",
    "SigningKey",
    "Target",
    "check_file",
    "check_member_path",
    "check_version",
    "key_id_of",
    "load_keyring",
    "parse_signatures",
    "read_release",
    "sign_manifest",
    "sign_release",
    "verify_manifest",
    "verify_release",
]
