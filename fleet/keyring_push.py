"""The fleet's desired keyring, and the pure decision of which device gets it pushed next.

A desired-state reconciler, pure like :mod:`fleet.rollout`: no MQTT, no SQLite, no clock (``now``
is passed in). ``edgepack fleet keyring push`` records a root-signed keyring as a fleet's desired
one (:func:`check_push` decides whether it may be: it verifies by itself and as an update of the
keyring recorded before); the controller feeds :class:`KeyringSync` what its inventory says of
each device and sends the :class:`KeyringPush` actions it returns as ``cmd/keyring``, after the
changed :attr:`KeyringSync.dirty` targets are written.

Per device and desired version (:func:`decide`, in this order):

1. It reports that version or a higher one: ``updated`` (if we pushed it) or ``current``.
2. It reports no root-signed keyring: ``needs_init`` (only its operator can give it the first
   one, with ``edgepack-agent keyring update FILE --init``; the network cannot).
3. Refused (``refused: <code> <reason>``) or given up (``failed: ...``): final for this version,
   never sent again.
4. Sent and not answered yet: wait (``sent``); when the reply timeout passes it may be sent again.
5. Offline: ``offline``; it is sent when the device is next seen online (its next birth).
6. Online: sent (``sent``), at most :data:`MAX_ATTEMPTS` times per (device, version); after that
   ``failed: not updated after N attempts``. So nothing is resent in a loop: a send needs a new birth, a reply
   timeout or a ``busy`` answer, and each one counts.

Sending the same keyring twice is harmless: the agent answers a keyring it already holds with
``changed: false``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.bundle.trust import TrustedKeyring, verify_keyring_update
from agent.errors import DowngradeError

PENDING = "pending"  # to be sent when the device is online
SENT = "sent"
OFFLINE = "offline"
UPDATED = "updated"
CURRENT = "current"
NEEDS_INIT = "needs_init"
REFUSED = "refused"  # outcome "refused: <code> <reason>"
FAILED = "failed"  # outcome "failed: <why>"

MAX_ATTEMPTS = 3  # sends of one version to one device
REPLY_TIMEOUT = 600.0  # seconds before an unanswered push to an online device may be sent again
RETRY_CODES = frozenset({"busy"})  # answers that are not a refusal: the device could not take it yet
_JOB_PREFIX = "keyring"


@dataclass(frozen=True)
class DesiredKeyring:
    """A fleet's desired keyring as recorded: the exact signed-keyring file bytes."""

    fleet: str
    version: int
    document: bytes
    created: float


@dataclass(frozen=True)
class KeyringDevice:
    """What the inventory says of one device: whether it is online, and the keyring version it
    reports (None: it has no root-signed keyring, or does not say)."""

    device: str
    online: bool
    reported: int | None


@dataclass(frozen=True)
class KeyringTarget:
    """One device's push of one desired version."""

    device: str
    version: int
    outcome: str = PENDING
    reported: int | None = None
    attempts: int = 0
    sent_at: float | None = None
    updated: float = 0.0

    @property
    def final(self) -> bool:
        """Refused or given up: never sent again for this version."""
        return self.outcome.startswith((REFUSED, FAILED))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyringTarget:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class KeyringPush:
    """Send the desired keyring to ``device`` as ``cmd/keyring``, correlated by ``job``."""

    device: str
    version: int
    job: str


def job_name(version: int, device: str, attempt: int) -> str:
    return f"{_JOB_PREFIX}.{version}.{device}.{attempt}"


def parse_job(job: str) -> tuple[int, str] | None:
    """(version, device) of a :func:`job_name`, or None if it is not a keyring push."""
    parts = job.split(".")
    if len(parts) != 4 or parts[0] != _JOB_PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2]


def check_push(document: bytes, recorded: DesiredKeyring | None,
               trusted: Sequence[TrustedKeyring] = ()) -> TrustedKeyring:
    """Decide whether ``document`` may become the fleet's desired keyring. Pure.

    Args:
        document: the signed-keyring file bytes.
        recorded: the fleet's desired keyring recorded before (None: none yet).
        trusted: keyrings the fleet holds (``--keyring``), checked when nothing is recorded.

    Returns:
        The keyring ``document`` holds.

    Raises:
        KeyringError: not a signed keyring, or inconsistent (e.g. not signed by its own root).
        SignatureError: not signed by the root of the recorded (or a given) keyring.
        DowngradeError: its version is not higher than the recorded one.
    """
    new = verify_keyring_update(document, None, trust_on_first_use=True)
    if recorded is not None:
        current = verify_keyring_update(recorded.document, None, trust_on_first_use=True)
        if new.version <= current.version:
            raise DowngradeError(f"keyring v{new.version} is not newer than v{current.version}, "
                                 f"the desired keyring of fleet {recorded.fleet}",
                                 offered=new.version, installed=current.version)
        trusted = (current,)
    for current in trusted:
        verify_keyring_update(document, current)  # what each device will check
    return new


def decide(t: KeyringTarget | None, dev: KeyringDevice, version: int,
           now: float) -> tuple[KeyringTarget, KeyringPush | None]:
    """The next step of one device's push of ``version`` (the module's rules). Pure.

    Args:
        t: the push so far (None: this device was not considered for ``version`` yet).
        dev: what the inventory says of the device now.
        version: the desired version.
        now: epoch seconds.

    Returns:
        The target (the same object when nothing changed) and the push to send, if any.
    """
    t = t if t is not None and t.version == version else KeyringTarget(dev.device, version, updated=now)
    t = _set(t, now, reported=dev.reported)
    if dev.reported is not None and dev.reported >= version:
        done = UPDATED if t.attempts and not t.outcome.startswith(REFUSED) else CURRENT
        return _set(t, now, outcome=done, sent_at=None), None
    if dev.reported is None:
        return _set(t, now, outcome=NEEDS_INIT), None
    if t.final:
        return t, None
    if t.outcome == SENT and t.sent_at is not None and now - t.sent_at < REPLY_TIMEOUT:
        return (t, None) if dev.online else (_set(t, now, outcome=OFFLINE), None)
    if t.attempts >= MAX_ATTEMPTS:
        return _set(t, now, outcome=f"{FAILED}: not updated after {t.attempts} attempts"), None
    if not dev.online:
        return _set(t, now, outcome=OFFLINE), None
    t = _set(t, now, outcome=SENT, attempts=t.attempts + 1, sent_at=now)
    return t, KeyringPush(dev.device, version, job_name(version, dev.device, t.attempts))


def answered(t: KeyringTarget, ok: bool, result: dict[str, Any] | None, error: dict[str, str] | None,
             now: float) -> KeyringTarget:
    """The device's reply to a push of ``t.version``. Pure.

    A refusal is final; ``busy`` is not a refusal (sent again, within the attempts).
    """
    if t.final or t.outcome in (UPDATED, CURRENT):
        return t
    if ok:
        got = ((result or {}).get("keyring") or {}).get("version")
        reported = got if type(got) is int else t.reported
        return _set(t, now, outcome=UPDATED, reported=reported, sent_at=None)
    code, message = (error or {}).get("code", "internal"), (error or {}).get("message", "")
    if code in RETRY_CODES:
        return _set(t, now, outcome=PENDING, sent_at=None)
    return _set(t, now, outcome=f"{REFUSED}: {code} {message}".rstrip(), sent_at=None)


def _set(t: KeyringTarget, now: float, **changes: Any) -> KeyringTarget:
    if all(getattr(t, k) == v for k, v in changes.items()):
        return t
    return dataclasses.replace(t, updated=now, **changes)


class KeyringSync:
    """One fleet's desired keyring and its pushes, fed by the controller. Pure.

    Args:
        desired: the recorded desired keyring (None: none yet).
        targets: its targets as last written. A ``sent`` one is sent again when its device is
            next seen online: the process that sent it may have died before the answer came.
    """

    def __init__(self, desired: DesiredKeyring | None = None,
                 targets: Iterable[KeyringTarget] = ()) -> None:
        self.desired = desired
        self.targets: dict[str, KeyringTarget] = {
            t.device: dataclasses.replace(t, outcome=PENDING, sent_at=None) if t.outcome == SENT else t
            for t in targets}
        self.devices: dict[str, KeyringDevice] = {}
        self.dirty: set[str] = set()  # targets changed since the last write

    def want(self, desired: DesiredKeyring, now: float) -> list[KeyringPush]:
        """A newer desired keyring was recorded: every known device is considered again."""
        if self.desired is not None and desired.version <= self.desired.version:
            return []
        self.desired, self.targets = desired, {}
        return [p for d in list(self.devices.values()) for p in self.device(d, now)]

    def device(self, dev: KeyringDevice, now: float) -> list[KeyringPush]:
        """The inventory changed for ``dev`` (a birth or a state)."""
        self.devices[dev.device] = dev
        return self._decide(dev, now)

    def reply(self, device: str, job: str, ok: bool, result: dict[str, Any] | None,
              error: dict[str, str] | None, now: float) -> None:
        """A device answered a push (any attempt of the desired version counts)."""
        owner = parse_job(job)
        t = self.targets.get(device)
        if owner is None or owner[1] != device or t is None or owner[0] != t.version:
            return
        self._put(answered(t, ok, result, error, now))

    def tick(self, now: float) -> list[KeyringPush]:
        """Reply timeouts and ``busy`` answers: sent again when due (within the attempts)."""
        due = [d for d, t in self.targets.items() if t.outcome == PENDING
               or (t.outcome == SENT and t.sent_at is not None and now - t.sent_at >= REPLY_TIMEOUT)]
        return [p for d in due if d in self.devices for p in self._decide(self.devices[d], now)]

    def rows(self) -> list[KeyringTarget]:
        """The targets to write (the dirty ones)."""
        return [self.targets[d] for d in sorted(self.dirty) if d in self.targets]

    def _decide(self, dev: KeyringDevice, now: float) -> list[KeyringPush]:
        if self.desired is None:
            return []
        t, push = decide(self.targets.get(dev.device), dev, self.desired.version, now)
        self._put(t)
        return [push] if push else []

    def _put(self, t: KeyringTarget) -> None:
        if self.targets.get(t.device) is not t:
            self.targets[t.device] = t
            self.dirty.add(t.device)


__all__ = [
    "CURRENT", "FAILED", "MAX_ATTEMPTS", "NEEDS_INIT", "OFFLINE", "PENDING", "REFUSED", "REPLY_TIMEOUT",
    "SENT", "UPDATED", "DesiredKeyring", "KeyringDevice", "KeyringPush", "KeyringSync", "KeyringTarget",
    "answered", "check_push", "decide", "job_name", "parse_job",
]
