"""The device's root-signed keyring on disk, and the release keys in effect.

``STATE_DIR/trust.json`` holds the signed keyring exactly as it was verified
(:mod:`agent.bundle.trust` makes every decision; this module reads and writes). Once it exists it
is the only source of release keys: the ``--keyring`` files are the fallback of a device that was
never given a root-signed keyring (otherwise a revoked key still listed in an old file would be
trusted again). An update is (1) locked against a concurrent one, (2) verified against the
keyring on disk, (3) written atomically (temp file, fsync, rename, fsync the folder), so a crash
leaves the old or the new keyring, never a mix or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from agent._fs import atomic_write
from agent.bundle import Keyring, load_keyring
from agent.bundle.trust import MAX_TRUST_BYTES, TrustedKeyring, verify_keyring_update
from agent.errors import KeyringError

TRUST_FILE = "trust.json"


class TrustStore:
    """The signed keyring of one state folder.

    Args:
        state_dir: the agent's state folder.
        fallback: plain keyring files used while no signed keyring is installed.
    """

    def __init__(self, state_dir: Path, fallback: Iterable[Path] = ()) -> None:
        self.path = Path(state_dir) / TRUST_FILE
        self.fallback = list(fallback)
        self._cached: tuple[tuple[int, int, int], TrustedKeyring] | None = None

    def load(self) -> TrustedKeyring | None:
        """The installed signed keyring (re-read only when the file changed), or None.

        Raises:
            KeyringError: the file exists but is unreadable, too large or no longer verifies
                against its own root (damaged on disk).
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._cached = None
            return None
        except OSError as e:
            raise KeyringError(f"cannot read {self.path}: {e}") from e
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._cached is not None and self._cached[0] == stamp:
            return self._cached[1]
        if st.st_size > MAX_TRUST_BYTES:
            raise KeyringError(f"{self.path} is larger than {MAX_TRUST_BYTES} bytes")
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise KeyringError(f"cannot read {self.path}: {e}") from e
        # It was verified against the previous keyring when it was written; on reading, it must
        # at least still be signed by its own root (a damaged or hand-edited file is refused).
        trusted = verify_keyring_update(data, None, trust_on_first_use=True)
        self._cached = (stamp, trusted)
        return trusted

    def release_keyring(self) -> Keyring:
        """The keys bundles are verified with now.

        Raises:
            KeyringError: as :meth:`load`, or a fallback file is unreadable.
        """
        trusted = self.load()
        return trusted.release_keyring() if trusted is not None else load_keyring(self.fallback)

    def update(self, data: bytes, *, trust_on_first_use: bool = False) -> tuple[TrustedKeyring, bool]:
        """Verify a signed keyring against the installed one and install it.

        Args:
            data: the signed-keyring file bytes.
            trust_on_first_use: accept a first keyring signed only by its own root (local
                operator only; see :func:`agent.bundle.trust.verify_keyring_update`).

        Returns:
            ``(keyring now installed, whether it changed)``.

        Raises:
            KeyringError, SignatureError, DowngradeError: refused; nothing was changed.
        """
        with self._locked():
            current = self.load()
            new = verify_keyring_update(data, current, trust_on_first_use=trust_on_first_use)
            if new is current:
                return current, False
            atomic_write(self.path, new.document, mode=0o644)
            self._cached = None
            return new, True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(TRUST_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the daemon and the CLI may update at the same time
            yield
        finally:
            os.close(fd)


__all__ = ["TRUST_FILE", "TrustStore"]
