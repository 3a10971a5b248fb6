"""What ``edgepack fleet keyring push|status`` does: record a fleet's desired keyring, read how
its pushes went.

As for rollouts, the command line and the controller share nothing but the database: ``push``
checks the signed keyring (:func:`fleet.keyring_push.check_push`) and records it; the controller
of that fleet sends it to every device that reports an older one (:class:`fleet.keyring_push.
KeyringSync`) and writes each outcome; ``status`` reads what it last wrote.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent._fs import read_capped
from agent.bundle.trust import MAX_TRUST_BYTES, TrustedKeyring, verify_keyring_update
from agent.errors import KeyringError
from fleet.keyring_push import DesiredKeyring, check_push
from fleet.store import FleetStore


def _read(path: Path) -> bytes:
    return read_capped(path, MAX_TRUST_BYTES, KeyringError, "a signed keyring")


def push_keyring(db: Path, path: Path, fleet: str, trusted: list[Path] | None = None, *,
                 now: float | None = None) -> TrustedKeyring:
    """Record a root-signed keyring as ``fleet``'s desired keyring, for its controller to push.

    Args:
        db: the controller's database.
        path: the signed-keyring file (``edgepack keys generate --root|rotate|revoke``).
        fleet: the fleet id.
        trusted: signed keyrings the fleet's devices hold, checked when the fleet has no
            desired keyring recorded yet (after that, the recorded one is the reference).
        now: epoch seconds (default: now).

    Returns:
        The recorded keyring.

    Raises:
        KeyringError: unreadable, not a signed keyring, or inconsistent.
        SignatureError: not signed by the root of the fleet's recorded (or a ``trusted``) keyring.
        DowngradeError: not newer than the recorded one.
    """
    document = _read(path)
    held = [verify_keyring_update(_read(p), None, trust_on_first_use=True) for p in trusted or []]
    with FleetStore(db) as store, store.transaction() as tx:
        # Checked and recorded in one transaction: two pushes at once cannot both pass.
        new = check_push(document, store.desired_keyring(fleet), held)
        store.add_keyring(tx, DesiredKeyring(fleet, new.version, document,
                                             time.time() if now is None else now))
    return new


def keyring_status(db: Path, fleet: str | None = None) -> dict[str, Any]:
    """The ``fleet keyring status --json`` document: per fleet (``fleet``, or every one with a
    desired keyring), the desired ``version``, when it was recorded, ``counts`` of outcomes and
    per device the version it ``reported`` (None: no root-signed keyring), the push ``outcome``
    (``updated``, ``current``, ``sent``, ``offline``, ``needs_init``, ``refused: <code> <reason>``,
    ``failed: ...``), ``attempts`` and when it last changed."""
    out: dict[str, Any] = {}
    with FleetStore(db) as store:
        for f in [fleet] if fleet else store.keyring_fleets():
            desired = store.desired_keyring(f)
            if desired is None:
                out[f] = {"version": None, "created": None, "counts": {}, "devices": {}}
                continue
            targets = store.keyring_targets(f, desired.version)
            counts: dict[str, int] = {}
            for t in targets:
                kind = t.outcome.split(":")[0]
                counts[kind] = counts.get(kind, 0) + 1
            out[f] = {"version": desired.version, "created": desired.created, "counts": counts,
                      "devices": {t.device: {"reported": t.reported, "outcome": t.outcome,
                                             "attempts": t.attempts, "updated": t.updated}
                                  for t in targets}}
    return out


def format_keyring_status(doc: dict[str, Any]) -> str:
    """The human ``fleet keyring status``: per fleet a line, then one line per device."""
    lines = []
    for fleet, f in doc.items():
        if f["version"] is None:
            lines.append(f"fleet {fleet}: no desired keyring recorded")
            continue
        counts = ", ".join(f"{n} {k}" for k, n in sorted(f["counts"].items())) or "no device seen yet"
        lines.append(f"fleet {fleet}: desired keyring v{f['version']} ({counts})")
        for d, t in f["devices"].items():
            reported = f"v{t['reported']}" if t["reported"] is not None else "-"
            lines.append(f"  {d:24s} {reported:>5s}  {t['outcome']}")
    return "\n".join(lines) or "no desired keyring recorded"


__all__ = ["format_keyring_status", "keyring_status", "push_keyring"]
