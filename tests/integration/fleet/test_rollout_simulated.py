"""The rollout controller at fleet scale: 1,000 simulated devices on a real mosquitto, the real
controller and its real SQLite database. The simulator speaks the agent's protocol (births,
install events, replies with gate figures); what is under test is the controller's decisions.
The real agents' side is tests/integration/fleet/test_rollout_agents.py.
"""

from __future__ import annotations

import sqlite3
import time

import pytest
from fleetkit import ControllerProcess, ControllerThread, begin, fake_release, wait_status, write_keyring

from agent.bundle import SigningKey
from agent.errors import SignatureError
from fleet.broker import Broker
from fleet.controller import Controller, ControllerConfig
from fleet.rollout_ops import start_rollout
from fleet.rollout_spec import FailureThreshold, RegressionLimits, Waves
from fleet.simulator import Simulator
from fleet.store import FleetStore, StoreError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = "sim"
PROFILES = ("raspberry-pi-5", "intel-core-ultra", "x86-64-cpu")
N = 1000


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("release")


@pytest.fixture
def world(tmp_path, key):
    release = fake_release(tmp_path / "release", key, PROFILES)
    keyring = write_keyring(tmp_path / "keyring.json", key)
    return {"db": tmp_path / "fleet.db", "release": release, "keyring": keyring}


def _sim(broker, **kw) -> Simulator:
    return Simulator(broker.url, FLEET, devices=kw.pop("devices", N), release=kw.pop("release", None),
                     health_interval=600, **kw)


def _run(world, broker, sim_kw: dict, **spec) -> tuple[dict, Simulator]:
    with _sim(broker, release=world["release"], **sim_kw) as sim:
        assert sim.wait_online(120), sim.last_error
        with ControllerThread(world["db"], broker.url, FLEET, world["keyring"]):
            rid = begin(world["db"], world["release"], world["keyring"], FLEET, **spec)
            doc = wait_status(world["db"], rid, ("finished", "aborted"), 240)
        return doc, sim


@pytest.mark.parametrize("fail_rate, outcome", [(0.02, "finished"), (0.10, "aborted")])
def test_failures_under_the_threshold_finish_over_it_abort(world, broker, fail_rate, outcome):
    doc, sim = _run(world, broker, {"fail_rate": fail_rate, "seed": 3},
                    waves=Waves.parse("10%,50%,100%"), max_failures=FailureThreshold.parse("5%"))
    assert doc["status"] == outcome, doc["reason"]
    installs = sim.installs()
    assert max(installs.values()) <= 1, "no device installed twice"
    if outcome == "finished":
        assert doc["totals"]["committed"] + doc["totals"]["failed"] + doc["totals"]["rolled_back"] == N
        assert doc["totals"]["failed"] + doc["totals"]["rolled_back"] == round(fail_rate * N)
    else:
        first = doc["reason"].split(":")[0]
        assert doc["reason"].startswith("wave ") and "failed (threshold 5%" in doc["reason"]
        crossed = int(first.split()[1])
        for w in doc["wave_reports"][: crossed - 1]:  # the waves before it stayed under 5%
            bad = w["counts"]["failed"] + w["counts"]["rolled_back"]
            assert bad <= 0.05 * w["size"]
        later = doc["wave_reports"][crossed:]
        assert all(w["counts"]["dispatched"] == 0 and w["counts"]["committed"] == 0 for w in later)
        assert sum(installs.values()) < N  # it stopped: the rest never got the bundle


@pytest.mark.parametrize("slow_rate, outcome", [(0.05, "finished"), (0.60, "aborted")])
def test_slow_devices_abort_when_the_median_regression_passes_the_limit(world, broker, slow_rate,
                                                                       outcome):
    doc, _ = _run(world, broker, {"slow_rate": slow_rate, "slow_factor": 0.5, "seed": 5},
                  waves=Waves.parse("10%,100%"), max_regression=RegressionLimits.parse("decode=10%"))
    assert doc["status"] == outcome, doc["reason"]
    if outcome == "aborted":
        assert "median decode regression" in doc["reason"] and "exceeds 10%" in doc["reason"]
    else:
        med = doc["wave_reports"][-1]["median_regression"]["decode"]
        assert med is not None and med < 0.10


def test_garbage_output_devices_are_rolled_back_by_their_gate(world, broker):
    doc, sim = _run(world, broker, {"garbage_rate": 0.01, "seed": 7}, waves=Waves.parse("20%,100%"))
    assert doc["status"] == "finished", doc["reason"]
    garbage = set(sim.devices_with("garbage"))
    assert len(garbage) == 10
    for d in garbage:
        t = doc["devices"][d]
        assert t["state"] == "rolled_back" and t["code"] == "fidelity_failed", t
    assert doc["totals"]["committed"] == N - 10


def test_a_tampered_release_is_refused_at_start_and_by_the_controller(world, broker, key, tmp_path):
    # (1) the file: one flipped byte and the CLI refuses it.
    bad = tmp_path / "bad"
    bad.mkdir()
    data = world["release"].read_bytes()
    (bad / "release.json").write_bytes(data.replace(b'"version":2', b'"version":3'))
    (bad / "release.json.sig").write_bytes(world["release"].with_name("release.json.sig").read_bytes())
    with pytest.raises(SignatureError):
        start_rollout(world["db"], bad / "release.json", [world["keyring"]], {"fleet": FLEET})
    (bad / "release.json.sig").unlink()
    with pytest.raises(SignatureError, match=r"release\.json\.sig"):
        start_rollout(world["db"], bad / "release.json", [world["keyring"]], {"fleet": FLEET})
    # (2) the database: a release changed after it was recorded is refused by the controller.
    with _sim(broker, devices=20, release=world["release"]) as sim:
        assert sim.wait_online(60)
        rid = begin(world["db"], world["release"], world["keyring"], FLEET, waves=Waves.parse("100%"))
        with sqlite3.connect(world["db"]) as db:
            (data,) = db.execute("SELECT data FROM releases").fetchone()
            db.execute("UPDATE releases SET data=?", (bytes(data).replace(b'"quant":"Q4_K_M"',
                                                                          b'"quant":"Q2_K"'),))
        with ControllerThread(world["db"], broker.url, FLEET, world["keyring"]):
            doc = wait_status(world["db"], rid, ("aborted",), 60)
        assert "does not verify" in doc["reason"]
        assert sum(sim.installs().values()) == 0


def test_the_database_survives_kill_9_and_the_rollout_finishes_each_device_once(world, broker):
    with _sim(broker, release=world["release"], install_seconds=0.5, seed=11) as sim:
        assert sim.wait_online(120)
        # --max-parallel 50 at 0.5 s an install: ~10 s of rollout, so each kill lands mid-run at
        # a known progress mark (the committed count), not at a guessed delay.
        rid = begin(world["db"], world["release"], world["keyring"], FLEET,
                    waves=Waves.parse("5%,30%,100%"), max_parallel=50)
        ctl = ControllerProcess(world["db"], broker.url, FLEET, world["keyring"])
        marks = (30, 200, 450, 800)  # inside wave 1, wave 2, and twice in wave 3
        try:
            for mark in marks:
                ctl.start()
                wait_status(world["db"], rid, ("running",), 120,
                            pred=lambda d, m=mark: d["totals"]["committed"] >= m)
                ctl.kill()
                with FleetStore(world["db"]) as store:  # readable after every kill
                    assert store.load(rid).spec.rollout_id == rid
            ctl.start()
            doc = wait_status(world["db"], rid, ("finished",), 180)
        finally:
            ctl.stop()
        assert doc["totals"]["committed"] == N, (doc["totals"], ctl.tail())
        installs = sim.installs()
        assert all(n == 1 for n in installs.values()), {d: n for d, n in installs.items() if n != 1}
        history = " ".join(h["text"] for h in doc["history"])
        assert history.count("controller restarted") >= 1, history


def test_a_second_controller_on_the_same_database_is_refused(world, broker):
    with ControllerThread(world["db"], broker.url, FLEET, world["keyring"]), \
            pytest.raises(StoreError, match="another controller"):
        Controller(ControllerConfig(db=world["db"], broker_url=broker.url, fleet=FLEET,
                                    keyring=[world["keyring"]]))
    # Positive control: once the first one stopped, a second one starts.
    with ControllerThread(world["db"], broker.url, FLEET, world["keyring"]) as c:
        assert c.store.path == world["db"]


def test_devices_on_two_bridged_brokers_are_reached_from_the_central_one(world, tmp_path):
    with Broker(tmp_path / "central") as central, \
            Broker(tmp_path / "edge-a", bridges=(central.url,)) as edge_a, \
            Broker(tmp_path / "edge-b", bridges=(central.url,)) as edge_b, \
            Simulator(edge_a.url, FLEET, devices=30, prefix="a", release=world["release"],
                      health_interval=600) as sim_a, \
            Simulator(edge_b.url, FLEET, devices=30, prefix="b", release=world["release"],
                      health_interval=600) as sim_b:
        assert sim_a.wait_online(60) and sim_b.wait_online(60)
        with ControllerThread(world["db"], central.url, FLEET, world["keyring"]) as c:
            for _ in range(240):  # bounded: 60 s
                if len(c.inventory) >= 60:
                    break
                time.sleep(0.25)
            assert len(c.inventory) == 60, "retained births crossed both bridges"
            rid = begin(world["db"], world["release"], world["keyring"], FLEET, waves=Waves.parse("10%,100%"))
            doc = wait_status(world["db"], rid, ("finished",), 120)
        assert doc["totals"]["committed"] == 60
        assert set(sim_a.installs().values()) == {1} and set(sim_b.installs().values()) == {1}

