"""The rollout state machine, pure: a made-up fleet, events in, actions out, no clock, no I/O.

Each scenario plays the devices' side by hand (replies with gate figures), as the controller
would feed it from MQTT, and checks what the machine decides and why.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from fleet.rollout import (
    ABORTED,
    FINISHED,
    OPEN,
    PAUSED,
    BundleRef,
    DeviceInfo,
    Dispatch,
    FailureThreshold,
    RegressionLimits,
    Rollback,
    Rollout,
    RolloutError,
    RolloutSpec,
    Selection,
    Waves,
    parse_job,
    regression_of,
)

PI = BundleRef("raspberry-pi-5", "pi.bundle", "a" * 64, 100, "d" * 64,
               {"decode_tok_s": 20.0, "ttft_ms": 200.0, "peak_rss_mb": 500.0})
PC = BundleRef("x86-64-cpu", "pc.bundle", "b" * 64, 200, "e" * 64, None)
BASE = {"decode_tok_s": 40.0, "ttft_ms": 100.0, "peak_rss_mb": 600.0, "tokens": 32}


def fleet(n: int, profile: str = "raspberry-pi-5", *, online: bool = True, gate: dict | None = BASE,
          prefix: str = "d") -> list[DeviceInfo]:
    return [DeviceInfo(f"{prefix}{i:04d}", profile, online, "0" * 64, gate) for i in range(n)]


def make(n: int = 10, *, now: float = 0.0, devices: list[DeviceInfo] | None = None,
         **spec: Any) -> tuple[Rollout, list[Any]]:
    s = RolloutSpec(rollout_id="ro-1", release_id="gemma-v2", fleet="lab", **spec)
    r = Rollout(s, {"raspberry-pi-5": PI, "x86-64-cpu": PC}, created=now)
    return r, r.start(devices if devices is not None else fleet(n), now)


def ok(r: Rollout, a: Dispatch, now: float, *, slower: float = 1.0,
       agreement: float = 1.0) -> list[Any]:
    check = {"ok": True, "decode_tok_s": BASE["decode_tok_s"] * slower, "ttft_ms": BASE["ttft_ms"],
             "peak_rss_mb": BASE["peak_rss_mb"], "tokens": 32,
             "fidelity": {"agreement": agreement, "positions": 64, "threshold": 0.9, "ok": True}}
    return r.install_reply(a.device, a.job, True, {"check": check}, None, now)


def fail(r: Rollout, a: Dispatch, now: float, code: str = "install_failed") -> list[Any]:
    return r.install_reply(a.device, a.job, False, None, {"code": code, "message": "boom"}, now)


def drive(r: Rollout, actions: list[Any], now: float, outcome) -> int:
    """Answer every dispatch (and the dispatches those answers cause) with outcome(action)."""
    n = 0
    queue = list(actions)
    while queue:
        a = queue.pop(0)
        if isinstance(a, Dispatch):
            n += 1
            queue += outcome(a)
    return n


def test_three_waves_to_the_end_each_device_once():
    r, first = make(10, waves=Waves.parse("1,50%,100%"))
    assert [type(a) for a in first] == [Dispatch], "the canary goes alone"
    seen: list[str] = []

    def commit(a: Dispatch) -> list[Any]:
        seen.append(a.device)
        return ok(r, a, 1.0)

    assert drive(r, first, 1.0, commit) == 10
    assert sorted(seen) == sorted({d.device for d in fleet(10)}) and len(set(seen)) == 10
    assert r.status == FINISHED and r.status_report()["totals"]["committed"] == 10
    sizes = [w["size"] for w in r.status_report()["wave_reports"]]
    assert sizes == [1, 4, 5] and all(w["phase"] == "done" for w in r.status_report()["wave_reports"])
    assert all(parse_job(t.job or "") == ("ro-1", t.device) for t in r.targets.values())


def test_a_failing_canary_aborts_in_wave_one_and_nothing_else_is_sent():
    r, first = make(10, waves=Waves.parse("1,50%,100%"))
    assert fail(r, first[0], 1.0, "slo_failed") == []
    assert r.status == ABORTED and "wave 1: 1 of " in r.reason and "slo_failed" in r.reason
    t = r.targets[first[0].device]
    assert t.state == "rolled_back" and t.code == "slo_failed"
    assert sum(t.state == "pending" for t in r.targets.values()) == 9
    assert r.tick(1000.0) == []  # an aborted rollout sends nothing more


@pytest.mark.parametrize("failing, aborted", [(2, False), (10, True)])
def test_failures_under_the_threshold_finish_over_it_abort_in_the_first_wave(failing, aborted):
    r, first = make(100, waves=Waves.parse("10%,50%,100%"),
                    max_failures=FailureThreshold.parse("5%"))
    bad = {d.device for d in fleet(100)[::100 // failing]}

    def outcome(a: Dispatch) -> list[Any]:
        return fail(r, a, 1.0) if a.device in bad else ok(r, a, 1.0)

    drive(r, first, 1.0, outcome)
    if aborted:
        assert r.status == ABORTED and r.reason.startswith(f"wave {r.wave + 1}:"), r.reason
        for w in r.status_report()["wave_reports"][: r.wave]:  # the waves before stayed under it
            assert w["counts"]["failed"] <= 0.05 * w["size"]
    else:
        assert r.status == FINISHED and r.status_report()["totals"]["failed"] == failing


@pytest.mark.parametrize("slow_share, aborted", [(0.05, False), (0.6, True)])
def test_a_median_speed_regression_over_the_limit_aborts(slow_share, aborted):
    r, first = make(100, waves=Waves.parse("20%,100%"),
                    max_regression=RegressionLimits.parse("decode=10%"))
    slow = {d.device for i, d in enumerate(fleet(100)) if i % 100 < slow_share * 100}
    drive(r, first, 1.0, lambda a: ok(r, a, 1.0, slower=0.5 if a.device in slow else 1.0))
    if aborted:
        m = re.search(r"median decode regression \+([\d.]+)% over \d+ device", r.reason)
        assert r.status == ABORTED and m and float(m.group(1)) > 10, r.reason
    else:
        assert r.status == FINISHED


def test_a_first_install_is_compared_with_the_release_expected_figures():
    devices = fleet(3, gate=None)
    r, first = make(devices=devices, waves=Waves.parse("100%"))
    ok(r, first[0], 1.0)
    t = r.targets[first[0].device]
    assert t.baseline_source == "expected" and t.regression == pytest.approx(
        {"decode": -1.0, "ttft": -0.5, "rss": 0.2})


def test_low_fidelity_agreement_aborts_when_a_minimum_is_asked():
    r, first = make(10, waves=Waves.parse("100%"), min_agreement=0.9, min_executed=3)
    drive(r, first, 1.0, lambda a: ok(r, a, 1.0, agreement=0.5))
    assert r.status == ABORTED and "median fidelity agreement 0.500" in r.reason


def test_a_timeout_is_retried_under_a_new_job_name_then_fails():
    r, first = make(1, waves=Waves.parse("100%"), retries=1, device_timeout=60)
    a1 = first[0]
    again = r.tick(61.0)
    assert len(again) == 1 and again[0].job != a1.job and again[0].job.endswith(".2")
    assert ok(r, a1, 62.0) == [] and r.targets[a1.device].state == "dispatched", "stale job ignored"
    r.tick(200.0)
    t = r.targets[a1.device]
    assert t.state == "timed_out" and r.status == ABORTED


def test_an_agent_that_died_mid_install_is_sent_it_again_at_once_not_at_its_timeout():
    """Back up, the agent says the job was ``interrupted``: retried now (it resumes the download)."""
    r, first = make(1, waves=Waves.parse("100%"), retries=1, device_timeout=600)
    a1 = first[0]
    r.install_event(a1.device, a1.job, "downloading", {"bytes": 1 << 20}, 1.0)
    again = r.install_event(a1.device, a1.job, "failed",
                            {"code": "interrupted", "reason": "the agent stopped"}, 5.0)
    assert [a.job for a in again if isinstance(a, Dispatch)] == [a1.job[:-2] + ".2"]
    assert r.targets[a1.device].state == "dispatched" and r.status == "running"
    assert ok(r, again[0], 9.0) is not None and r.targets[a1.device].state == "committed"


def test_an_offline_device_waits_for_its_timeout_and_is_not_a_failure():
    devices = [*fleet(3), DeviceInfo("late", "raspberry-pi-5", False, "0" * 64, BASE)]
    r, first = make(devices=devices, waves=Waves.parse("100%"), device_timeout=100,
                    max_failures=FailureThreshold.parse("0"))
    assert {a.device for a in first} == {"d0000", "d0001", "d0002"}
    for a in first:
        ok(r, a, 1.0)
    assert r.status == "running" and r.targets["late"].state == "pending"
    r.tick(150.0)
    assert r.targets["late"].state == "offline" and r.status == FINISHED


def test_an_offline_device_that_returns_in_time_is_installed():
    devices = [*fleet(2), DeviceInfo("late", "raspberry-pi-5", False, "0" * 64, BASE)]
    r, _ = make(devices=devices, waves=Waves.parse("100%"), device_timeout=100)
    back = r.device(DeviceInfo("late", "raspberry-pi-5", True, "0" * 64, BASE), 50.0)
    assert [a.device for a in back] == ["late"]


def test_a_device_that_joins_mid_rollout_gets_the_bundle_of_its_profile():
    r, first = make(4, waves=Waves.parse("1,100%"))
    joined = r.device(DeviceInfo("new-pc", "x86-64-cpu", True, None, None), 1.0)
    assert joined == [] and r.targets["new-pc"].wave == 1  # the next wave, not the canary's
    rest = ok(r, first[0], 2.0)
    assert {a.device: a.bundle.profile for a in rest}["new-pc"] == "x86-64-cpu"


def test_a_joining_device_whose_state_comes_before_its_birth_waits_for_the_birth():
    r, _ = make(4, waves=Waves.parse("1,100%"))
    assert r.device(DeviceInfo("new-pc", None, True, None, None), 1.0) == []  # state only
    assert "new-pc" not in r.targets, "not incompatible: its profile is not known yet"
    r.device(DeviceInfo("new-pc", "x86-64-cpu", True, None, None), 1.5)  # then its birth
    assert r.targets["new-pc"].state == "pending" and r.targets["new-pc"].wave == 1


def test_a_dynamic_rollout_stays_open_and_provisions_devices_that_join_later():
    r, first = make(2, waves=Waves.parse("100%"), dynamic=True)
    drive(r, first, 1.0, lambda a: ok(r, a, 1.0))
    assert r.status == OPEN
    acts = r.device(DeviceInfo("ai-pc-7", "x86-64-cpu", True, None, None), 10.0)
    assert [(a.device, a.bundle.file) for a in acts] == [("ai-pc-7", "pc.bundle")]
    ok(r, acts[0], 11.0)
    assert r.status == OPEN and r.targets["ai-pc-7"].state == "committed"
    r.command("abort", 12.0)
    assert r.status == ABORTED


def test_incompatible_and_already_installed_are_not_in_waves():
    devices = [*fleet(2), DeviceInfo("phone", "android-arm64", True, None, None),
               DeviceInfo("done", "raspberry-pi-5", True, PI.manifest_digest, BASE)]
    r, first = make(devices=devices, waves=Waves.parse("100%"))
    assert r.targets["phone"].state == "incompatible" and r.targets["phone"].wave is None
    assert r.targets["done"].state == "already_installed"
    assert {a.device for a in first} == {"d0000", "d0001"}


def test_pause_stops_dispatching_and_resume_continues():
    r, first = make(10, waves=Waves.parse("1,100%"))
    r.command("pause", 1.0)
    assert ok(r, first[0], 2.0) == [] and r.status == PAUSED
    rest = r.command("resume", 3.0)
    assert len(rest) == 9
    with pytest.raises(RolloutError):
        r.command("resume", 4.0)


def test_abort_with_rollback_sends_conditional_rollbacks_to_the_wave():
    r, first = make(10, waves=Waves.parse("1,100%"), rollback_on_abort=True)
    wave2 = ok(r, first[0], 1.0)
    ok(r, wave2[0], 2.0)
    acts = r.command("abort", 3.0)
    assert [type(a) for a in acts] == [Rollback] and acts[0].device == wave2[0].device
    assert acts[0].from_digest == PI.manifest_digest and acts[0].job.endswith(".rb1")
    # A device of that wave still in flight that commits after the abort is rolled back too.
    late = ok(r, wave2[1], 4.0)
    assert [type(a) for a in late] == [Rollback]
    r.rollback_reply(acts[0].device, True, {"rolled_back": True}, None, 5.0)
    assert r.targets[acts[0].device].state == "rolled_back"


def test_a_restored_rollout_resends_what_was_in_flight_under_the_same_jobs():
    r, first = make(10, waves=Waves.parse("1,100%"))
    wave2 = ok(r, first[0], 1.0)
    saved = r.to_dict(), [t.to_dict() for t in r.targets.values()]
    back = Rollout.from_dict(*saved)
    for info in fleet(10):
        back.device(info, 2.0)
    resent = back.resume(2.0)
    assert sorted(a.job for a in resent) == sorted(a.job for a in wave2)
    drive(back, resent, 3.0, lambda a: ok(back, a, 3.0))
    assert back.status == FINISHED


def test_soak_holds_the_next_wave():
    r, first = make(4, waves=Waves.parse("1,100%"), soak=30)
    assert ok(r, first[0], 1.0) == [] and r.soak_until == 31.0
    assert r.tick(20.0) == [] and len(r.tick(32.0)) == 3


def test_spec_parsing():
    assert Waves.parse("1,10%,50%,100%").sizes(200) == [1, 20, 100, 200]
    assert Waves.parse("5,10").sizes(7) == [5, 7]
    assert Waves.parse("10%").sizes(3) == [1, 3]
    assert FailureThreshold.parse("3").exceeded(4, 10) and not FailureThreshold.parse("3").exceeded(3, 3)
    assert FailureThreshold.parse("5%").exceeded(6, 100) and not FailureThreshold.parse("5%").exceeded(5, 100)
    assert RegressionLimits.parse("decode=5%,rss=off") == RegressionLimits(decode=0.05, ttft=0.25, rss=None)
    sel = Selection.parse("profile=raspberry-pi-5|jetson-orin,device=pi-*")
    assert sel.matches("pi-3", "jetson-orin") and not sel.matches("pc-3", "jetson-orin")
    for bad in ("", "1,x", "10,5"):
        with pytest.raises(RolloutError):
            Waves.parse(bad)
    for bad in ("-1", "five", "101%"):
        with pytest.raises(RolloutError):
            FailureThreshold.parse(bad)
    with pytest.raises(RolloutError):
        RegressionLimits.parse("speed=10%")
    with pytest.raises(RolloutError):
        Selection.parse("owner=me")
    assert regression_of({"decode_tok_s": 30, "ttft_ms": 150}, {"decode_tok_s": 40, "ttft_ms": 100}) \
        == {"decode": 0.25, "ttft": 0.5}


def test_the_spec_round_trips():
    s = RolloutSpec("ro-9", "r", "f", Selection.parse("profile=a"), Waves.parse("2,100%"), 5, 60, 1,
                    FailureThreshold.parse("3"), 4, RegressionLimits.parse("ttft=50%"), 0.8, True,
                    True, 10, True)
    assert RolloutSpec.from_dict(s.to_dict()) == s
