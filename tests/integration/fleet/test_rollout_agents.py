"""Rollouts to REAL agents: ``edgepack-agent run`` processes with the real sample model (Gemma 3
270M), a real mosquitto, the real controller serving the release's bundles over HTTP, releases
written by the real ``build``. What a device does is the agent's own behaviour: download, verify,
install, the post-install gate on this host, commit or roll back.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from agentkit import AGENT_PROFILE, AgentProcess, Host
from fleetkit import ControllerProcess, ControllerThread, wait_status

from agent.bundle import Keyring, SigningKey
from agent.protocol import StatusRequest
from fleet.rollout import order_key
from fleet.rollout_ops import request, start_rollout
from fleet.rollout_spec import Waves
from fleet.serve import BundleServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = "test"
PROFILE = "x86-64-int4-test"  # the agents match it: their profiles folder holds only it


def _profile(slo: dict[str, float] | None = None) -> dict:
    p = copy.deepcopy(AGENT_PROFILE)
    if slo:
        p["slo"] = slo
    return p


def _toml(p: dict) -> str:
    def val(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f'name = "{p["name"]}"', f'description = "{p["description"]}"', f'class = "{p["class"]}"']
    for section in ("match", "target", "budget", "slo"):
        if section in p:
            lines += ["", f"[{section}]", *(f"{k} = {val(v)}" for k, v in p[section].items())]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def releases(tmp_path_factory, sample_model) -> dict[str, Path]:
    """Three signed releases of the sample for one profile, each by the real build: v1, v2, and a
    v3 whose SLO no machine meets (min decode 100,000 tok/s)."""
    from agent.profiles import DeviceProfile
    from packager.build import build
    from packager.cache import default_cache_dir
    from packager.model import resolve_source

    d = tmp_path_factory.mktemp("releases")
    key = SigningKey.generate("rollout-tests")
    cache = default_cache_dir()
    model = resolve_source(str(sample_model.gguf), cache_dir=cache)
    out: dict[str, Path] = {}
    for name, version, slo in (("v1", 1, None), ("v2", 2, None),
                               ("slow_v3", 3, {"min_decode_tok_s": 100000.0})):
        report = build(model, [DeviceProfile.from_dict(_profile(slo))], key, d / name, cache_dir=cache,
                       bundle_version=version, speed=False)
        assert report.release, report.to_dict()
        out[name] = Path(report.release)
    out["keyring"] = d / "keyring.json"
    out["keyring"].write_bytes(Keyring([key.public]).to_bytes())
    profiles = d / "profiles"
    profiles.mkdir()
    (profiles / f"{PROFILE}.toml").write_text(_toml(_profile()))
    out["profiles"] = profiles
    return out


@pytest.fixture
def host(broker):
    h = Host(broker.url, FLEET)
    yield h
    h.close()


def _agents(tmp_path: Path, broker, releases, host, names: list[str]) -> list[AgentProcess]:
    agents = []
    for n in names:
        a = AgentProcess(tmp_path / n / "state", releases["keyring"], broker.url, device=n, fleet=FLEET,
                         env={"EDGEPACK_PROFILES_DIR": str(releases["profiles"])}).start()
        agents.append(a)
    for n, a in zip(names, agents, strict=True):
        try:
            host.wait_for(n, "birth", lambda m: m.get("profile") == PROFILE, timeout=60)
        except AssertionError:
            raise AssertionError(a.tail()) from None
    return agents


def _start(db: Path, releases, name: str, *, base_url: str | None = None, **fields) -> str:
    spec = {"fleet": FLEET, "device_timeout": 300.0, "retries": 1, **fields}
    return start_rollout(db, releases[name], [releases["keyring"]], spec,
                         base_url=base_url).spec.rollout_id


def _installs(host: Host, device: str, rollout: str) -> int:
    """Installs the agent executed for this rollout: its own committed events, not replays."""
    return sum(1 for e in host.status.get((device, "events"), [])
               if e.get("stage") == "committed" and not e.get("replayed")
               and str(e.get("job", "")).startswith(rollout + "."))


def _current_version(host: Host, device: str) -> int:
    r = host.requests.call(device, "status", StatusRequest(), timeout=30)
    assert r.ok, r.error
    return int(r.result["current"]["version"])


def test_three_waves_to_the_end_then_a_release_too_slow_for_the_canary_aborts(
        tmp_path, broker, host, releases):
    names = ["dev-1", "dev-2", "dev-3"]
    agents = _agents(tmp_path, broker, releases, host, names)
    db = tmp_path / "fleet.db"
    try:
        with ControllerThread(db, broker.url, FLEET, releases["keyring"]):
            rid = _start(db, releases, "v1", waves=Waves.parse("1,2,3"))
            doc = wait_status(db, rid, ("finished", "aborted"), 600)
            assert doc["status"] == "finished", doc
            assert [w["size"] for w in doc["wave_reports"]] == [1, 1, 1]
            assert doc["totals"]["committed"] == 3
            for n in names:
                assert _installs(host, n, rid) == 1
                assert _current_version(host, n) == 1
            # v3's SLO cannot be met here: the canary's gate fails, it rolls back by itself, the
            # rollout aborts in wave 1 and nobody else is touched.
            rid3 = _start(db, releases, "slow_v3", waves=Waves.parse("1,100%"))
            doc3 = wait_status(db, rid3, ("aborted", "finished"), 600)
        assert doc3["status"] == "aborted" and doc3["reason"].startswith("wave 1:"), doc3
        canary = [d for d, t in doc3["devices"].items() if t["state"] != "pending"]
        assert len(canary) == 1
        t = doc3["devices"][canary[0]]
        assert t["state"] == "rolled_back" and t["code"] == "slo_failed", t
        for n in names:
            assert _current_version(host, n) == 1, "every device still serves v1"
        assert doc3["wave_reports"][1]["counts"]["pending"] == 2
    finally:
        for a in agents:
            a.stop()


def test_kill_9_of_the_controller_and_a_broker_restart_mid_rollout_install_each_device_once(
        tmp_path, broker, host, releases):
    names = ["dev-k1", "dev-k2", "dev-k3"]
    agents = _agents(tmp_path, broker, releases, host, names)
    db = tmp_path / "fleet.db"
    ctl = ControllerProcess(db, broker.url, FLEET, releases["keyring"])
    # The bundles come from a server that outlives the controller (as a CDN or `edgepack serve`
    # would): a download in progress is not cut by the controller's death.
    server = BundleServer(releases["v1"].parent).start()
    try:
        rid = _start(db, releases, "v1", waves=Waves.parse("1,100%"), base_url=server.url_for(""))
        ctl.start()
        # Kill -9 the controller as soon as wave 2 has been dispatched ...
        wait_status(db, rid, ("running",), 600, pred=lambda d: d["wave"] == 2 and (
            d["totals"]["dispatched"] + d["totals"]["downloading"] + d["totals"]["installed"]) >= 1)
        ctl.kill()
        # ... and crash the broker while the installs go on (sessions persist across it).
        broker.wait_saved()
        broker.restart(crash=True)
        ctl.start()
        doc = wait_status(db, rid, ("finished", "aborted"), 600)
        assert doc["status"] == "finished", (doc, ctl.tail())
        assert doc["totals"]["committed"] == 3
        for n in names:
            assert _installs(host, n, rid) == 1, f"{n} installed more than once"
            assert _current_version(host, n) == 1
        assert "controller restarted" in " ".join(h["text"] for h in doc["history"])
    finally:
        ctl.stop()
        server.stop()
        for a in agents:
            a.stop()


def test_an_offline_device_waits_and_a_device_that_joins_gets_its_bundle(
        tmp_path, broker, host, releases):
    agents = _agents(tmp_path, broker, releases, host, ["dev-o1", "dev-o2", "dev-gone"])
    agents[2].stop()  # known to the fleet (retained birth) but offline at dispatch
    host.wait_for("dev-gone", "state", lambda m: m["state"] == "offline", timeout=30)
    db = tmp_path / "fleet.db"
    joiner: AgentProcess | None = None
    try:
        with ControllerThread(db, broker.url, FLEET, releases["keyring"]):
            # The canary is the first device in the order hashed from the rollout id: take an id
            # whose canary is online, so wave 2 (which waits 45 s for dev-gone) is where it joins.
            rid = next(f"ro-join-{i}" for i in range(100)
                       if min(("dev-o1", "dev-o2", "dev-gone"),
                              key=lambda d, i=i: order_key(f"ro-join-{i}", d)) != "dev-gone")
            _start(db, releases, "v1", waves=Waves.parse("1,100%"), device_timeout=45.0, rollout_id=rid)
            wait_status(db, rid, ("running",), 300, pred=lambda d: d["totals"]["committed"] >= 1)
            # A new machine is provisioned mid-rollout: nobody names it, it gets its bundle. The
            # rollout is paused meanwhile so that it cannot end before the new agent is up (a
            # slow start on a loaded machine would otherwise outlast dev-gone's 45 s).
            request(db, rid, "pause")
            wait_status(db, rid, ("paused",), 60)
            joiner = _agents(tmp_path, broker, releases, host, ["dev-new"])[0]
            wait_status(db, rid, ("paused",), 60, pred=lambda d: "dev-new" in d["devices"])
            request(db, rid, "resume")
            doc = wait_status(db, rid, ("finished", "aborted"), 600)
        assert doc["status"] == "finished", doc
        assert doc["devices"]["dev-gone"]["state"] == "offline"
        assert doc["devices"]["dev-new"]["state"] == "committed"
        assert doc["totals"]["committed"] == 3 and doc["totals"]["failed"] == 0
        assert _current_version(host, "dev-new") == 1
    finally:
        for a in [*agents, *([joiner] if joiner else [])]:
            a.stop()
