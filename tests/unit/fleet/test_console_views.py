"""The console's pure views: device rows, wave bars, before -> after per profile, the config."""

from __future__ import annotations

import pytest

from fleet.console import (
    ConsoleConfig,
    ConsoleError,
    _mentions,
    compare,
    device_row,
    is_loopback,
    release_profile,
    wave_progress,
    with_health,
)
from fleet.inventory import DeviceRecord

GATE = {"ok": True, "decode_tok_s": 20.0, "ttft_ms": 300.0, "failures": [], "ts": 5.0}


def _target(state: str, profile: str, before: float | None, after: float | None,
            agreement: tuple[float | None, float | None] = (None, None)) -> dict:
    return {"state": state, "profile": profile,
            "before": None if before is None else {"decode_tok_s": before, "agreement": agreement[0]},
            "after": None if after is None else {"decode_tok_s": after, "agreement": agreement[1]}}


def test_compare_takes_the_medians_of_committed_devices_per_profile():
    devices = {
        "a": _target("committed", "pi", 10.0, 8.0, (0.97, 0.96)),
        "b": _target("committed", "pi", 12.0, 6.0, (0.99, 0.94)),
        "c": _target("committed", "pi", 14.0, 7.0),
        "d": _target("failed", "pi", 10.0, 1.0),  # not committed: not in the chart
        "e": _target("committed", "x86", None, 40.0),  # a first install: no figures before
        "f": _target("pending", "x86", None, None),
    }
    pi, x86 = compare(devices)
    assert pi["profile"] == "pi" and pi["devices"] == 3
    assert pi["decode_tok_s"] == {"before": 12.0, "after": 7.0, "n_before": 3, "n_after": 3,
                                  "min": 6.0, "max": 14.0}
    assert pi["agreement"]["before"] == 0.98 and pi["agreement"]["after"] == 0.95
    assert x86["devices"] == 1
    assert x86["decode_tok_s"]["before"] is None and x86["decode_tok_s"]["after"] == 40.0
    assert x86["agreement"] == {"before": None, "after": None, "n_before": 0, "n_after": 0,
                                "min": None, "max": None}
    assert compare({}) == []


def test_a_wave_bar_groups_the_target_states():
    counts = {"pending": 3, "dispatched": 1, "downloading": 2, "installed": 1, "committed": 5,
              "rolled_back": 1, "failed": 2, "timed_out": 1, "offline": 4}
    w = wave_progress({"wave": 2, "phase": "running", "size": 20, "counts": counts,
                       "median_regression": {"decode": 0.1}, "median_agreement": 0.97})
    assert (w["committed"], w["failed"], w["in_flight"], w["offline"], w["pending"]) == (5, 4, 4, 4, 3)
    assert w["wave"] == 2 and w["size"] == 20 and w["median_agreement"] == 0.97


def test_a_device_row_finds_its_gate_in_the_birth_when_health_has_none():
    bundle = {"digest": "d1", "model": "m", "version": 2, "quant": "Q4_K_M", "gate": GATE, "role": "current"}
    rec = DeviceRecord(device="pi-1", fleet="f", state="online", profile="pi",
                       current={"digest": "d1", "model": "m", "version": 2, "quant": "Q4_K_M"},
                       bundles=(bundle,), rss_bytes=1 << 28, temperature_c=51.0, health_age_s=3.0,
                       health={"last_gate": None})
    latest = {"rollout": "ro-1", "devices": {"pi-1": {"state": "committed"}}}
    row = device_row(rec, latest)
    assert row["bundle"] == "m v2 Q4_K_M" and row["decode_tok_s"] == 20.0 and row["ttft_ms"] == 300.0
    assert row["last_gate"]["ok"] is True and row["rollout"] == "ro-1" and row["rollout_state"] == "committed"
    # A measured inference and a later gate report win over the bundle's install-time figures.
    failed = {"ok": False, "failures": ["decode 3 < 5 tok/s"], "decode_tok_s": 3.0, "ts": 9.0}
    row = device_row(DeviceRecord(device="pi-1", fleet="f", current={"digest": "d1"}, bundles=(bundle,),
                                  last_decode_tok_s=18.5, health={"last_gate": failed}), None)
    assert row["decode_tok_s"] == 18.5 and row["last_gate"]["ok"] is False
    assert row["state"] == "unknown" and row["rollout"] is None and row["bundle"] is None


def test_health_is_merged_from_its_own_table():
    rec = DeviceRecord(device="a", fleet="f", state="online", profile="pi")
    health = DeviceRecord(device="a", fleet="f", health={"ts": 1.0}, rss_bytes=5, temperature_c=40.0,
                          health_age_s=2.0, profile="ignored")
    merged = with_health(rec, health)
    assert (merged.rss_bytes, merged.temperature_c, merged.health_age_s) == (5, 40.0, 2.0)
    assert merged.profile == "pi" and merged.state == "online"
    assert with_health(rec, None) is rec


def test_release_profile_reads_quality_and_expected_speed():
    b = {"profile": "pi", "file": "m-pi-v2.bundle", "model": "m", "version": 2, "runtime": "llamacpp",
         "precision": "int4", "quant": "Q4_K_M", "size": 10, "quality": {"delta_pct": 1.5},
         "expected": None, "fidelity_threshold": 0.9}
    p = release_profile(b)
    assert p["delta_ppl_pct"] == 1.5 and p["expected_decode_tok_s"] is None and p["precision"] == "int4"


def test_history_lines_name_a_device_exactly():
    assert _mentions("sim-0001 joined wave 2", "sim-0001")
    assert not _mentions("sim-00010 joined wave 2", "sim-0001")
    assert _mentions("sim-00010, sim-0001: retrying", "sim-0001")


def test_beyond_loopback_the_console_needs_a_key():
    assert ConsoleConfig().host == "127.0.0.1"
    for host in ("0.0.0.0", "::", "10.1.2.3", "fleet.example"):
        assert not is_loopback(host)
        with pytest.raises(ConsoleError, match="without a key"):
            ConsoleConfig(host=host)
        assert ConsoleConfig(host=host, key="k").key == "k"
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert is_loopback(host) and ConsoleConfig(host=host).key is None
    with pytest.raises(ConsoleError):
        ConsoleConfig(port=70000)
