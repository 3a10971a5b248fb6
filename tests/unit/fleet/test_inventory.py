"""fleet.inventory: a pure fold of retained status messages into the device table."""

from __future__ import annotations

from typing import Any

import pytest

from agent.protocol import Topics, birth_payload, event_payload, health_payload, state_payload
from fleet.inventory import Inventory

FLEET = "lab"
NOW = 1_800_000_000.0


def birth(device: str = "pi-01", **over: Any) -> bytes:
    body: dict[str, Any] = {
        "agent_version": "0.3.0", "device": device, "fleet": FLEET, "profile": "raspberry-pi-5",
        "facts": {"arch": "aarch64", "cpu_model": "Cortex-A76", "ram_bytes": 8 << 30},
        "bundles": [{"slot": "a", "model": "gemma3", "version": 1, "quant": "q4_k_m"}],
        "current": {"slot": "a", "model": "gemma3", "version": 1, "quant": "q4_k_m"},
    }
    body.update(over)
    return birth_payload(body)


def health(ts: float = NOW - 5, **over: Any) -> bytes:
    body: dict[str, Any] = {
        "cpu_percent": 12.5, "rss_bytes": 300 << 20, "temperature_c": 51.0, "disk_free_bytes": 9 << 30,
        "current": {"slot": "a", "model": "gemma3", "version": 1, "quant": "q4_k_m"},
        "last_decode_tok_s": 55.2, "last_ttft_ms": 31.0, "errors": {"install_errors": 0},
        "busy": False, "queue": 0,
    }
    body.update(over)
    return health_payload(body, ts=ts)


def full(inv: Inventory, device: str = "pi-01") -> None:
    t = Topics(FLEET, device)
    inv.apply(t.state, state_payload("online", ts=NOW - 60), now=NOW)
    inv.apply(t.birth, birth(device), now=NOW)
    inv.apply(t.health, health(), now=NOW)


def test_a_device_is_folded_from_state_birth_and_health() -> None:
    inv = Inventory(FLEET)
    full(inv)
    [r] = inv.devices()
    assert (r.device, r.fleet, r.state, r.state_ts) == ("pi-01", FLEET, "online", NOW - 60)
    assert (r.agent_version, r.profile) == ("0.3.0", "raspberry-pi-5")
    assert (r.arch, r.cpu_model, r.ram_bytes) == ("aarch64", "Cortex-A76", 8 << 30)
    assert r.current == {"slot": "a", "model": "gemma3", "version": 1, "quant": "q4_k_m"}
    assert len(r.bundles) == 1
    assert (r.cpu_percent, r.rss_bytes, r.temperature_c, r.disk_free_bytes) == (
        12.5, 300 << 20, 51.0, 9 << 30)
    assert (r.last_decode_tok_s, r.last_ttft_ms, r.busy, r.queue) == (55.2, 31.0, False, 0)
    assert r.errors == {"install_errors": 0}
    assert r.health_ts == NOW - 5 and r.health_age_s == pytest.approx(5.0)
    assert inv.rejected == 0
    assert r.to_dict()["bundles"] == list(r.bundles)


def test_devices_are_sorted_and_health_age_follows_the_given_clock() -> None:
    inv = Inventory(FLEET)
    full(inv, "zz-9")
    full(inv, "aa-1")
    assert [r.device for r in inv.devices()] == ["aa-1", "zz-9"]
    assert inv.devices(now=NOW + 100)[0].health_age_s == pytest.approx(105.0)
    # A device clock ahead of ours must not give a negative age.
    inv.apply(Topics(FLEET, "aa-1").health, health(ts=NOW + 30), now=NOW)
    assert inv.devices()[0].health_age_s == 0.0


def test_the_last_will_sets_lost_without_a_timestamp() -> None:
    inv = Inventory(FLEET)
    full(inv)
    inv.apply(Topics(FLEET, "pi-01").state, state_payload("lost"), now=NOW + 1)
    [r] = inv.devices()
    assert (r.state, r.state_ts) == ("lost", None)
    assert r.profile == "raspberry-pi-5"  # birth is kept: the device is still known


def test_an_empty_retained_payload_forgets_that_part_and_then_the_device() -> None:
    inv = Inventory(FLEET)
    full(inv)
    t = Topics(FLEET, "pi-01")
    inv.apply(t.health, b"", now=NOW)
    [r] = inv.devices()
    assert r.health is None and r.cpu_percent is None and r.health_age_s is None
    assert r.current is not None  # still known from the birth
    inv.apply(t.birth, b"", now=NOW)
    inv.apply(t.state, b"", now=NOW)
    assert inv.devices() == [] and len(inv) == 0
    inv.apply(Topics(FLEET, "never-seen").state, b"", now=NOW)  # clearing the unknown is a no-op
    assert inv.rejected == 0


def test_the_fresher_of_birth_and_health_says_what_is_serving() -> None:
    inv = Inventory(FLEET)
    t = Topics(FLEET, "pi-01")
    inv.apply(t.health, health(), now=NOW)
    v2 = {"slot": "b", "model": "gemma3", "version": 2, "quant": "q4_k_m"}
    inv.apply(t.birth, birth(current=v2), now=NOW + 1)  # re-sent after an install
    assert inv.devices()[0].current == v2
    inv.apply(t.health, health(current=None), now=NOW + 2)  # then everything was rolled back
    assert inv.devices()[0].current is None


@pytest.mark.parametrize("topic, payload", [
    ("edgepack/v1/lab/pi-01/state", b"{not json"),
    ("edgepack/v1/lab/pi-01/state", b'{"schema":1,"state":"sleeping"}'),
    ("edgepack/v1/lab/pi-01/state", b'{"schema":2,"state":"online"}'),
    ("edgepack/v1/lab/pi-01/birth", b'{"schema":2}'),
    ("edgepack/v1/lab/pi-01/birth", b"[1,2]"),
    ("edgepack/v1/lab/pi-01/health", b'{"schema":true}'),
    ("edgepack/v1/lab/pi-01/health", b"\xff\xfe"),
    ("edgepack/v1/other/pi-01/state", state_payload("online")),  # another fleet
    ("edgepack/v1/lab/_sneaky/state", state_payload("online")),  # reserved device id
    ("edgepack/v1/lab/pi 01/state", state_payload("online")),
    ("edgepack/v2/lab/pi-01/state", state_payload("online")),
    ("somewhere/else", state_payload("online")),
    ("edgepack/v1/lab/pi-01/health/extra", health()),
])
def test_malformed_or_foreign_messages_are_counted_and_change_nothing(topic: str, payload: bytes) -> None:
    inv = Inventory(FLEET)
    full(inv)
    before = inv.devices()
    inv.apply(topic, payload, now=NOW)
    assert inv.rejected == 1 and inv.last_rejection
    assert inv.devices() == before


def test_commands_events_and_replies_are_ignored_not_rejected() -> None:
    inv = Inventory(FLEET)
    t = Topics(FLEET, "pi-01")
    inv.apply(t.events, event_payload("job1", "downloading", ts=NOW), now=NOW)
    inv.apply(t.cmd("status"), b"{}", now=NOW)
    inv.apply(t.reply("host-1"), b'{"ok":true}', now=NOW)
    assert (inv.ignored, inv.rejected, inv.devices()) == (3, 0, [])


def test_wrongly_typed_fields_read_as_unknown() -> None:
    inv = Inventory(None)  # any fleet
    t = Topics(FLEET, "pi-01")
    inv.apply(t.birth, birth(agent_version=3, profile=None, facts="x86", bundles={"a": 1}, current=[1]),
              now=NOW)
    inv.apply(t.health, health(ts=NOW, cpu_percent="high", rss_bytes=True, queue=1.5, busy="no",
                               errors=[], last_decode_tok_s=10**400, temperature_c=None, current="a"),
              now=NOW)
    [r] = inv.devices()
    assert (r.agent_version, r.profile, r.arch, r.bundles, r.current) == (None, None, None, (), None)
    assert (r.cpu_percent, r.rss_bytes, r.queue, r.busy, r.errors) == (None, None, None, None, {})
    assert (r.last_decode_tok_s, r.temperature_c) == (None, None)
    assert inv.rejected == 0


def test_a_state_with_a_huge_timestamp_does_not_raise() -> None:
    inv = Inventory(FLEET)
    inv.apply(Topics(FLEET, "pi-01").state, b'{"schema":1,"state":"online","ts":1' + b"0" * 400 + b"}",
              now=NOW)
    [r] = inv.devices()
    assert (r.state, r.state_ts) == ("online", None)


def test_the_keyring_version_comes_from_the_fresher_of_birth_and_health() -> None:
    inv = Inventory(FLEET)
    t = Topics(FLEET, "pi-01")
    inv.apply(t.birth, birth(), now=NOW)
    assert inv.devices()[0].keyring_version is None  # no root-signed keyring (or an older agent)
    inv.apply(t.birth, birth(keyring={"version": 1, "threshold": 1}), now=NOW + 1)
    assert inv.devices()[0].keyring_version == 1
    inv.apply(t.health, health(keyring_version=2), now=NOW + 2)
    assert inv.devices()[0].keyring_version == 2
    inv.apply(t.birth, birth(keyring={"error": "damaged"}), now=NOW + 3)
    assert inv.devices()[0].keyring_version is None
