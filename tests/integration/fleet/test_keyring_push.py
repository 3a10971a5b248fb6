"""The controller pushes the fleet's keyring to REAL agents behind a real mosquitto.

Keys and keyrings come from the real ``edgepack keys`` CLI, each device is given v1 by its
operator (``edgepack-agent keyring update --init``), the desired v2 is recorded with the real
``edgepack fleet keyring push``; the agents verify what the controller sends them as they would
any ``cmd/keyring``. A device that is down when v2 is recorded gets it when it returns.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from agentkit import AGENT, AgentProcess, Host
from fleetkit import EDGEPACK, ControllerProcess, ControllerThread

from agent.bundle import SigningKey
from agent.bundle.trust import keyring_bytes, sign_keyring, verify_keyring_update
from fleet.keyring_ops import keyring_status
from packager.keys import next_keyring

pytestmark = pytest.mark.integration

FLEET = "test"
WAIT = 30.0


def ok(*cmd: str | Path) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p.stdout


def refused(*cmd: str | Path) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, f"{cmd} was accepted: {p.stdout}{p.stderr}"
    return p.stderr


def wait_outcome(db: Path, device: str, outcome: str, timeout: float = WAIT) -> dict[str, Any]:
    """Poll what the controller committed until ``device``'s push is ``outcome``; bounded."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = keyring_status(db, FLEET)[FLEET]
        if doc["devices"].get(device, {}).get("outcome") == outcome:
            return doc
        time.sleep(0.2)
    raise AssertionError(f"{device} not {outcome!r} within {timeout}s: {doc}")


def keyrings(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """With the real CLI: release keys rel1 and rel2, a root whose v1 keyring trusts rel1, and v2
    (rotated by the root) that adds rel2. Returns (keys folder, fleet db path, v1, v2)."""
    keys, db = tmp_path / "keys", tmp_path / "fleet.db"
    for name in ("rel1", "rel2"):
        ok(EDGEPACK, "keys", "generate", "--name", name, "-o", keys)
    ok(EDGEPACK, "keys", "generate", "--root", "--name", "root", "-o", keys,
       "--release", keys / "rel1.pub.json")
    v1, v2 = keys / "keyring.signed.json", tmp_path / "keyring.v2.json"
    ok(EDGEPACK, "keys", "rotate", "--keyring", v1, "--root-key", keys / "root.key",
       "--add", keys / "rel2.pub.json", "-o", v2)
    return keys, db, v1, v2


def test_the_controller_pushes_v2_to_the_fleet_and_a_device_that_was_down_gets_it_on_return(
        tmp_path: Path, broker) -> None:
    keys, db, v1, v2 = keyrings(tmp_path)
    # rel2's holder makes himself root of a v9 that trusts his key, signed by himself.
    rel2 = SigningKey.from_pem((keys / "rel2.key").read_bytes(), "rel2")
    evil = dataclasses.replace(
        next_keyring(verify_keyring_update(v1.read_bytes(), None, trust_on_first_use=True),
                     roots=[rel2.public], add=[rel2.public]), version=9)
    forged = tmp_path / "forged.json"
    forged.write_bytes(sign_keyring(keyring_bytes(evil), [(rel2.key_id, rel2.sign(keyring_bytes(evil)))]))

    agents = {}
    for dev in ("kr-a", "kr-b"):
        state = tmp_path / dev / "state"
        ok(AGENT, "--state-dir", state, "keyring", "update", v1, "--init")
        agents[dev] = AgentProcess(state, keys / "rel1.pub.json", broker.url, device=dev, fleet=FLEET)
    host = Host(broker.url, FLEET)
    try:
        for dev, a in agents.items():
            a.start()
            host.wait_for(dev, "birth", lambda m: (m.get("keyring") or {}).get("version") == 1,
                          timeout=WAIT)
        agents["kr-b"].stop()
        host.wait_for("kr-b", "state", lambda m: m["state"] == "offline", timeout=WAIT)

        # Refused at the command line, before anything is recorded: a keyring by another root.
        push = (EDGEPACK, "fleet", "keyring", "push", "--db", db, "--fleet", FLEET)
        assert "current root" in refused(*push, forged, "--keyring", v1)
        assert keyring_status(db, FLEET)[FLEET]["version"] is None

        with ControllerThread(db, broker.url, FLEET, keys / "rel1.pub.json", tick=0.2):
            recorded = json.loads(ok(*push, v2, "--keyring", v1, "--json"))
            assert recorded["version"] == 2
            # ... and, once v2 is recorded, v1 again (a rollback) and the forgery.
            assert "not newer" in refused(*push, v1)
            assert "current root" in refused(*push, forged)

            host.wait_for("kr-a", "birth", lambda m: (m.get("keyring") or {}).get("version") == 2,
                          timeout=WAIT)
            host.wait_for("kr-a", "health", lambda m: m.get("keyring_version") == 2, timeout=WAIT)
            doc = wait_outcome(db, "kr-a", "updated")
            assert doc["devices"]["kr-a"]["reported"] == 2 and doc["devices"]["kr-a"]["attempts"] == 1
            doc = wait_outcome(db, "kr-b", "offline")
            assert doc["devices"]["kr-b"]["reported"] == 1 and doc["devices"]["kr-b"]["attempts"] == 0

            agents["kr-b"].start()  # back: its birth brings it v2
            host.wait_for("kr-b", "birth", lambda m: (m.get("keyring") or {}).get("version") == 2,
                          timeout=WAIT)
            doc = wait_outcome(db, "kr-b", "updated")
            assert doc["devices"]["kr-b"]["attempts"] == 1
        assert (tmp_path / "kr-b" / "state" / "trust.json").read_bytes() == v2.read_bytes()
        status = json.loads(ok(EDGEPACK, "fleet", "keyring", "status", "--db", db, "--json"))
        assert status[FLEET]["version"] == 2
        assert status[FLEET]["counts"] == {"updated": 2}, status
        assert "kr-b" in ok(EDGEPACK, "fleet", "keyring", "status", "--db", db)
    finally:
        for a in agents.values():
            a.stop()
        host.close()


def test_a_controller_killed_before_a_device_returns_pushes_the_keyring_after_its_restart(
        tmp_path: Path, broker) -> None:
    """The desired keyring and each device's outcome are in the database, not in the process:
    a SIGKILLed controller's successor sends v2 to the device that was down."""
    keys, db, v1, v2 = keyrings(tmp_path)
    state = tmp_path / "kr-c" / "state"
    ok(AGENT, "--state-dir", state, "keyring", "update", v1, "--init")
    agent = AgentProcess(state, keys / "rel1.pub.json", broker.url, device="kr-c", fleet=FLEET)
    host = Host(broker.url, FLEET)
    controller = ControllerProcess(db, broker.url, FLEET, keys / "rel1.pub.json")
    try:
        agent.start()
        host.wait_for("kr-c", "birth", lambda m: (m.get("keyring") or {}).get("version") == 1,
                      timeout=WAIT)
        agent.stop()
        host.wait_for("kr-c", "state", lambda m: m["state"] == "offline", timeout=WAIT)
        controller.start()
        ok(EDGEPACK, "fleet", "keyring", "push", "--db", db, "--fleet", FLEET, v2, "--keyring", v1)
        wait_outcome(db, "kr-c", "offline")
        controller.kill()  # SIGKILL: nothing of its memory survives
        controller = ControllerProcess(db, broker.url, FLEET, keys / "rel1.pub.json")
        controller.start()
        agent.start()
        host.wait_for("kr-c", "birth", lambda m: (m.get("keyring") or {}).get("version") == 2,
                      timeout=WAIT)
        doc = wait_outcome(db, "kr-c", "updated")
        assert doc["devices"]["kr-c"]["attempts"] == 1
        assert (state / "trust.json").read_bytes() == v2.read_bytes()
    finally:
        controller.stop()
        agent.stop()
        host.close()
