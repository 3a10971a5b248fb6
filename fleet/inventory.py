"""The fleet's device table, folded from the retained ``state``/``birth``/``health`` messages.

Pure: no networking and no clock. The caller feeds every message it receives to
:meth:`Inventory.apply` with the time it read (``now``) and asks :meth:`Inventory.devices` for the
table. Invariants:

- :meth:`Inventory.apply` never raises: a malformed payload, a topic outside our tree, another
  fleet, or a wrong ``schema`` is counted in :attr:`Inventory.rejected` (with the reason in
  :attr:`Inventory.last_rejection`) and changes nothing. Payloads are read tolerantly (unknown
  fields ignored, a field of the wrong type read as unknown) so an older host reads a newer agent.
- An empty payload on a retained topic means it was cleared (a decommissioned device): that part
  of the record is forgotten, and a device with no part left disappears from the table.
- ``events``, ``cmd`` and reply topics are ours but say nothing about inventory: they are counted
  in :attr:`Inventory.ignored`, not rejected.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.protocol import ProtocolError, parse_state, parse_status, parse_topic

__all__ = ["DeviceRecord", "Inventory"]

_STATUS_KINDS = ("state", "birth", "health")


@dataclass(frozen=True)
class DeviceRecord:
    """What the fleet knows about one device. ``None`` means unknown (not reported, or the
    field had a wrong type).

    Attributes:
        device, fleet: the ids from the topic.
        state: ``online``, ``offline``, ``lost`` (the last will) or ``revoked`` (``fleet
            revoke``); None if no state was seen.
        state_ts: when the device set that state (its clock, epoch seconds); the last will has none.
        agent_version, profile: from the birth message.
        current: summary of the serving bundle (``slot``, ``digest``, ``model``, ``version``,
            ``quant``, ...), from whichever of birth and health arrived last.
        bundles: summaries of every installed bundle (birth).
        arch, cpu_model, ram_bytes: from the birth's probe facts.
        health: the last health payload as received (all fields, for ``--json``).
        health_ts: the device's timestamp of that health message.
        health_age_s: seconds between ``health_ts`` and the table's ``now`` (>= 0; a device clock
            ahead of ours reads as 0).
        cpu_percent, rss_bytes, temperature_c, disk_free_bytes, last_decode_tok_s, last_ttft_ms,
        busy, queue, errors: the health fields of the same name.
        keyring_version: the version of its root-signed keyring, from whichever of birth and
            health arrived last (None: it has none, or does not say).
    """

    device: str
    fleet: str
    state: str | None = None
    state_ts: float | None = None
    agent_version: str | None = None
    profile: str | None = None
    current: dict[str, Any] | None = None
    bundles: tuple[dict[str, Any], ...] = ()
    arch: str | None = None
    cpu_model: str | None = None
    ram_bytes: int | None = None
    health: dict[str, Any] | None = None
    health_ts: float | None = None
    health_age_s: float | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    temperature_c: float | None = None
    disk_free_bytes: int | None = None
    last_decode_tok_s: float | None = None
    last_ttft_ms: float | None = None
    busy: bool | None = None
    queue: int | None = None
    errors: dict[str, Any] = field(default_factory=dict)
    keyring_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every attribute (``bundles`` as a list)."""
        d = asdict(self)
        d["bundles"] = list(self.bundles)
        return d


@dataclass
class _Entry:
    """The raw parts of one device as last received, and when (the caller's ``now``)."""

    state: str | None = None
    state_ts: float | None = None
    birth: dict[str, Any] | None = None
    birth_at: float = 0.0
    health: dict[str, Any] | None = None
    health_at: float = 0.0

    def empty(self) -> bool:
        return self.state is None and self.birth is None and self.health is None


class Inventory:
    """A fold of status messages into a device table.

    Args:
        fleet: only accept this fleet's topics (others are rejected); None accepts any fleet.
    """

    def __init__(self, fleet: str | None = None) -> None:
        self.fleet = fleet
        self.rejected = 0
        self.ignored = 0
        self.last_rejection = ""
        self._now: float | None = None
        self._entries: dict[tuple[str, str], _Entry] = {}

    def apply(self, topic: str, payload: bytes, *, now: float) -> None:
        """Fold one received message into the table. Never raises.

        Args:
            topic: the topic it arrived on.
            payload: its raw payload; empty = the retained message was cleared.
            now: the caller's clock (epoch seconds) when it arrived.
        """
        self._now = now if self._now is None else max(self._now, now)
        try:
            info = parse_topic(topic)
            if self.fleet is not None and info.fleet != self.fleet:
                raise ProtocolError(f"topic of fleet {info.fleet!r}, want {self.fleet!r}",
                                    code="bad_field", field="fleet")
            if info.kind not in _STATUS_KINDS:
                self.ignored += 1
                return
            key = (info.fleet, info.device)
            if not payload:
                self._clear(key, info.kind)
                return
            # Parse fully before touching the entry, so a bad message changes nothing.
            if info.kind == "state":
                state = parse_state(payload)
                ts = _num(parse_status(payload), "ts")
                e = self._entries.setdefault(key, _Entry())
                e.state, e.state_ts = state, ts
            elif info.kind == "birth":
                body = parse_status(payload)
                e = self._entries.setdefault(key, _Entry())
                e.birth, e.birth_at = body, now
            else:
                body = parse_status(payload)
                e = self._entries.setdefault(key, _Entry())
                e.health, e.health_at = body, now
        except ProtocolError as err:
            # Tolerated by design: one bad device or a stray publisher must not blind the host.
            self.rejected += 1
            self.last_rejection = f"{topic[:200]}: {err}"

    def devices(self, now: float | None = None) -> list[DeviceRecord]:
        """The table, sorted by fleet then device.

        Args:
            now: the time to measure health age against; default the latest ``now`` given to
                :meth:`apply`.

        Returns:
            One :class:`DeviceRecord` per device that has at least one part known.
        """
        at = now if now is not None else self._now
        return [_record(fleet, device, e, at) for (fleet, device), e in sorted(self._entries.items())]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """``(fleet, device) in inventory``: whether anything of that device is known."""
        return key in self._entries

    def record(self, fleet: str, device: str, now: float | None = None) -> DeviceRecord | None:
        """One device's record (as :meth:`devices` would give it), or None if unknown."""
        e = self._entries.get((fleet, device))
        return _record(fleet, device, e, now if now is not None else self._now) if e else None

    def _clear(self, key: tuple[str, str], kind: str) -> None:
        e = self._entries.get(key)
        if e is None:
            return
        if kind == "state":
            e.state, e.state_ts = None, None
        elif kind == "birth":
            e.birth = None
        else:
            e.health = None
        if e.empty():
            del self._entries[key]


def _record(fleet: str, device: str, e: _Entry, now: float | None) -> DeviceRecord:
    birth = e.birth or {}
    health = e.health or {}
    facts = _dict(birth, "facts") or {}
    # The serving bundle changes on install/rollback; birth and health both carry it, and the one
    # received last is the fresher (health is periodic, birth is re-sent after each change).
    current = _dict(birth, "current")
    if e.health is not None and "current" in health and (e.birth is None or e.health_at >= e.birth_at):
        current = _dict(health, "current")
    keyring_version = _int(_dict(birth, "keyring") or {}, "version")
    if e.health is not None and "keyring_version" in health and (e.birth is None
                                                                 or e.health_at >= e.birth_at):
        keyring_version = _int(health, "keyring_version")
    health_ts = _num(health, "ts")
    age = max(0.0, now - health_ts) if now is not None and health_ts is not None else None
    bundles = birth.get("bundles")
    return DeviceRecord(
        device=device,
        fleet=fleet,
        state=e.state,
        state_ts=e.state_ts,
        agent_version=_str(birth, "agent_version"),
        profile=_str(birth, "profile"),
        current=current,
        bundles=tuple(b for b in bundles if isinstance(b, dict)) if isinstance(bundles, list) else (),
        arch=_str(facts, "arch"),
        cpu_model=_str(facts, "cpu_model"),
        ram_bytes=_int(facts, "ram_bytes"),
        health=e.health,
        health_ts=health_ts,
        health_age_s=age,
        cpu_percent=_num(health, "cpu_percent"),
        rss_bytes=_int(health, "rss_bytes"),
        temperature_c=_num(health, "temperature_c"),
        disk_free_bytes=_int(health, "disk_free_bytes"),
        last_decode_tok_s=_num(health, "last_decode_tok_s"),
        last_ttft_ms=_num(health, "last_ttft_ms"),
        busy=v if isinstance(v := health.get("busy"), bool) else None,
        queue=_int(health, "queue"),
        errors=_dict(health, "errors") or {},
        keyring_version=keyring_version,
    )


def _str(d: dict[str, Any], k: str) -> str | None:
    v = d.get(k)
    return v if isinstance(v, str) else None


def _int(d: dict[str, Any], k: str) -> int | None:
    v = d.get(k)
    return v if type(v) is int else None  # bool is an int subclass; JSON true is not a count


def _num(d: dict[str, Any], k: str) -> float | None:
    v = d.get(k)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:  # a JSON integer beyond float range
        return None
    return f if math.isfinite(f) else None


def _dict(d: dict[str, Any], k: str) -> dict[str, Any] | None:
    v = d.get(k)
    return v if isinstance(v, dict) else None
