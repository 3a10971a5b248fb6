"""The fleet simulator's pure parts: mixes, facts, bundles, figures, config, and one device's
command handling against a recording host (no network)."""

from __future__ import annotations

import collections
import hashlib
import resource
from collections.abc import Callable
from typing import Any

import pytest

from agent.dispatch import CONTROL_QUEUE
from agent.profiles import load_profiles, match_profile
from agent.protocol import InstallRequest, Reply, StatusRequest, Topics, parse_status
from agent.transport.mqtt import Message
from fleet._simdata import (
    HARDWARE,
    Catalog,
    SimulatorError,
    apportion,
    baseline,
    facts,
    gate_report,
    parse_mix,
)
from fleet._simdevice import SimDevice
from fleet.simulator import Simulator, raise_fd_limit

PROFILES = load_profiles()
URL = "mqtt://127.0.0.1:1"


def test_mix_parses_percentages_weights_and_bare_names() -> None:
    assert parse_mix("raspberry-pi-5:60%,x86-64-cpu:40%", PROFILES) == {"raspberry-pi-5": 0.6,
                                                                         "x86-64-cpu": 0.4}
    assert parse_mix("raspberry-pi-5:3, x86-64-cpu", PROFILES) == {"raspberry-pi-5": 0.75, "x86-64-cpu": 0.25}
    for bad in ("nokia-3310:10%", "raspberry-pi-5:-1", "raspberry-pi-5:x", ""):
        with pytest.raises(SimulatorError):
            parse_mix(bad, PROFILES)


def test_apportion_gives_exact_counts() -> None:
    mix = parse_mix("raspberry-pi-5:60%,intel-core-ultra:30%,x86-64-cpu:10%", PROFILES)
    assert collections.Counter(apportion(mix, 50)) == {"raspberry-pi-5": 30, "intel-core-ultra": 15,
                                                       "x86-64-cpu": 5}
    assert len(apportion(mix, 7)) == 7 and apportion(mix, 0) == []


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_each_simulated_device_matches_its_profile_with_the_real_matcher(name: str) -> None:
    import random

    f = facts(name, HARDWARE[name], "d1", random.Random(1))
    assert match_profile(f, PROFILES).best == name


def test_fake_bundles_have_one_digest_per_file_and_release_bundles_their_own() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    cat = Catalog(PROFILES)
    a, known = cat.lookup(sha, 10, "raspberry-pi-5")
    assert not known and a.digest == cat.lookup(sha, 10, "x86-64-cpu")[0].digest
    assert a.digest != cat.initial("raspberry-pi-5").digest and a.version == 2
    rel = Catalog(PROFILES, {"bundles": {"x86-64-cpu": {"sha256": sha, "size": 5, "manifest_digest": "d" * 64,
                                                        "model": "m", "version": 4, "quant": "Q8_0"}}})
    b, known = rel.lookup(sha, 5, "x86-64-cpu")
    assert known and b.digest == "d" * 64 and b.version == 4 and b.model == "m"
    assert rel.initial("x86-64-cpu").version == 3  # one behind the release
    with pytest.raises(SimulatorError):
        Catalog(PROFILES, {"bundles": {"x86-64-cpu": {"size": 1}}})


def test_gate_report_slow_and_garbage() -> None:
    import random

    prof = PROFILES["raspberry-pi-5"]
    base = baseline(HARDWARE["raspberry-pi-5"], random.Random(1))
    ok = gate_report(base, prof, random.Random(2))
    slow = gate_report(base, prof, random.Random(2), slow_factor=0.5)
    garbage = gate_report(base, prof, random.Random(2), garbage=True)
    assert ok["ok"] and slow["ok"] and not garbage["ok"]
    assert slow["decode_tok_s"] == pytest.approx(ok["decode_tok_s"] * 0.5, rel=0.01)
    assert slow["ttft_ms"] == pytest.approx(ok["ttft_ms"] * 2, rel=0.01)
    assert garbage["fidelity"]["agreement"] < 0.2 and not garbage["fidelity"]["ok"]
    too_slow = gate_report(base, prof, random.Random(2), slow_factor=0.05)  # below the SLO
    assert not too_slow["ok"] and too_slow["failures"]


def test_config_is_validated() -> None:
    for bad in ({"fail_rate": 2.0}, {"slow_factor": 0}, {"fail_rate": 0.6, "slow_rate": 0.6},
                {"behaviours": {"sim-00001": "sulky"}}, {"health_interval": 0}, {"profiles": "mars-rover"}):
        with pytest.raises(SimulatorError):
            Simulator(URL, "lab", 3, **bad)
    with pytest.raises(SimulatorError):
        Simulator("http://broker", "lab", 3)


def test_behaviours_are_exact_counts_chosen_by_the_seed() -> None:
    def roles(seed: int) -> dict[str, list[str]]:
        sim = Simulator(URL, "lab", 100, fail_rate=0.02, garbage_rate=0.01, slow_rate=0.05, offline_rate=0.1,
                        seed=seed)
        assert len(sim.offline_at_start) == 10
        return {b: sim.devices_with(b) for b in ("fail", "garbage", "slow")}

    r = roles(1)
    assert {b: len(v) for b, v in r.items()} == {"fail": 2, "garbage": 1, "slow": 5}
    assert r == roles(1) and r != roles(2)


def test_fd_limit_is_raised_towards_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_fd_limit(64) == soft  # enough already: unchanged
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(SimulatorError):
            raise_fd_limit(hard + 1)


# --- one device, no network ------------------------------------------------------------------------


class _Recorder:
    """A Host that records what a device publishes and runs its timers on demand."""

    install_seconds = 1.0
    slow_factor = 0.5

    def __init__(self) -> None:
        self.catalog = Catalog(PROFILES)
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.timers: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.tally: collections.Counter[str] = collections.Counter()

    def later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any:
        self.timers.append((fn, args))
        return None

    def run_timers(self) -> None:
        while self.timers:
            fn, args = self.timers.pop(0)
            fn(*args)

    def publish(self, dev: SimDevice, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> None:
        self.sent.append((topic, payload, correlation_data))

    def count(self, name: str, n: int = 1) -> None:
        self.tally[name] += n

    def epoch(self) -> float:
        return 1_700_000_000.0

    def replies(self) -> list[Reply]:
        return [Reply.from_bytes(p) for t, p, _ in self.sent if "/reply/" in t]


def _device(host: _Recorder, behaviour: str = "ok") -> SimDevice:
    p = PROFILES["raspberry-pi-5"]
    return SimDevice(host, "lab", "pi-1", p, HARDWARE[p.name], behaviour, 0)


def _msg(name: str, payload: bytes, corr: bytes) -> Message:
    return Message(Topics("lab", "pi-1").cmd(name), payload, Topics("lab", "pi-1").reply("host"), corr)


def test_commands_behind_a_running_install_wait_then_busy() -> None:
    host = _Recorder()
    dev = _device(host)
    install = InstallRequest(url="http://h/b", sha256="a" * 64, size=10).to_bytes()
    dev.on_command(_msg("install", install, b"i"))
    for n in range(CONTROL_QUEUE + 1):
        dev.on_command(_msg("status", StatusRequest().to_bytes(), b"s%d" % n))
    assert [r.error["code"] for r in host.replies() if r.error] == ["busy"]
    host.run_timers()
    replies = host.replies()
    assert len(replies) == CONTROL_QUEUE + 2 and all(r.ok for r in replies[1:])
    assert replies[1].result is not None and replies[1].result["installed"]["version"] == 2
    stages = [parse_status(p)["stage"] for t, p, _ in host.sent if t.endswith("/events")]
    assert stages == ["downloading", "downloading", "verified", "installed", "benchmarked", "committed"]


def test_a_known_older_release_bundle_is_refused_as_a_downgrade() -> None:
    host = _Recorder()
    sha = hashlib.sha256(b"old").hexdigest()
    host.catalog = Catalog(PROFILES, {"bundles": {"raspberry-pi-5": {
        "sha256": sha, "size": 5, "manifest_digest": "e" * 64, "model": "gemma-3-270m-it", "version": 1}}})
    dev = _device(host)
    dev.high_water["gemma-3-270m-it"] = (5, "f" * 64)  # it once ran v5
    dev.on_command(_msg("install", InstallRequest(url="http://h/b", sha256=sha, size=5).to_bytes(), b"i"))
    host.run_timers()
    (reply,) = host.replies()
    assert reply.error is not None and reply.error["code"] == "downgrade"
    assert dev.installs == 1 and dev.current == host.catalog.initial("raspberry-pi-5").slot
