"""What ``edgepack rollout ...`` does: record a rollout, queue an operator command, read status.

The command line and the controller share nothing but the database: ``start`` verifies the
signed release and records the rollout (``new``); the controller plans it against its inventory
and drives it. ``pause``/``resume``/``abort`` queue a command the controller applies on its next
tick (it works while the controller is down: the command waits). ``status`` reads what the
controller last committed — the same document the ``--json`` output and a console show.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from agent.bundle import load_keyring
from agent.bundle.release import read_release
from fleet.rollout import Rollout, RolloutError, RolloutSpec, bundle_refs
from fleet.store import FleetStore

COMMANDS = ("pause", "resume", "abort")


def new_rollout_id() -> str:
    return f"ro-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"


def start_rollout(db: Path, release_path: Path, keyring: list[Path], spec_fields: dict[str, Any], *,
                  base_url: str | None = None, now: float | None = None) -> Rollout:
    """Verify a release and record a rollout of it for the controller to carry out.

    Args:
        db: the controller's database.
        release_path: ``release.json`` (its ``release.json.sig`` beside it; the bundles there too).
        keyring: trusted keys (the release must be signed by one of them).
        spec_fields: the :class:`RolloutSpec` fields other than the ids and release.
        base_url: where devices download the bundles (None: the controller serves them).
        now: epoch seconds (default: now).

    Returns:
        The recorded rollout (status ``new``).

    Raises:
        SignatureError, ManifestError: the release is unsigned, tampered or not trusted.
        RolloutError: a bad spec, or another rollout is active on the fleet.
    """
    release, data, sig = read_release(release_path, load_keyring(keyring))
    fields = dict(spec_fields)
    rid = fields.pop("rollout_id", None) or new_rollout_id()
    spec = RolloutSpec(rollout_id=rid, release_id=release.release_id, **fields)
    if not release.bundles:
        raise RolloutError(f"release {release.release_id} has no bundles")
    rollout = Rollout(spec, bundle_refs(release), created=time.time() if now is None else now)
    with FleetStore(db) as store:
        store.add_rollout(rollout, data=data, sig=sig, directory=release_path.resolve().parent,
                          base_url=base_url)
    return rollout


def request(db: Path, rollout_id: str, command: str, reason: str = "") -> int:
    """Queue ``pause``, ``resume`` or ``abort`` for the controller; returns the command's id.

    Raises:
        RolloutError: an unknown command or rollout.
    """
    if command not in COMMANDS:
        raise RolloutError(f"unknown rollout command {command!r} ({', '.join(COMMANDS)})")
    with FleetStore(db) as store:
        return store.add_command(rollout_id, command, reason)


def status(db: Path, rollout_id: str | None = None, *, fleet: str | None = None) -> dict[str, Any]:
    """The ``rollout status --json`` document: one rollout (default: the latest) with its waves,
    totals, history and, per device, state and reason, profile, and the gate figures ``before``
    (its baseline) and ``after`` (on the new bundle): ``decode_tok_s``, ``ttft_ms``,
    ``peak_rss_mb``, ``agreement`` (None when not measured).

    Raises:
        RolloutError: no such rollout, or none at all.
    """
    with FleetStore(db) as store:
        if rollout_id is None:
            ids = store.rollout_ids(fleet=fleet)
            if not ids:
                raise RolloutError("no rollouts recorded yet", hint="edgepack rollout start RELEASE")
            rollout_id = ids[-1]
        r = store.load(rollout_id)
    doc = r.status_report()
    doc["devices"] = {d: {"state": t.state, "wave": t.wave + 1 if t.wave is not None else None,
                          "attempt": t.attempt, "reason": t.reason, "code": t.code,
                          "regression": t.regression, "agreement": t.agreement,
                          "baseline": t.baseline_source, "rollback": t.rollback, "profile": t.profile,
                          "before": _figures(t.baseline), "after": _figures(t.figures)}
                      for d, t in sorted(r.targets.items())}
    return doc


def _figures(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    fidelity = report.get("fidelity")  # a gate report; a baseline carries "agreement" itself
    return {"decode_tok_s": report.get("decode_tok_s"), "ttft_ms": report.get("ttft_ms"),
            "peak_rss_mb": report.get("peak_rss_mb"),
            "agreement": fidelity.get("agreement") if isinstance(fidelity, dict) else report.get("agreement")}


def list_rollouts(db: Path, fleet: str | None = None) -> list[dict[str, Any]]:
    """One summary per rollout, oldest first."""
    with FleetStore(db) as store:
        return store.summaries(fleet)


__all__ = ["COMMANDS", "list_rollouts", "new_rollout_id", "request", "start_rollout", "status"]
