"""Enrolled devices, for real: `edgepack fleet enroll` / `revoke` on a running mosquitto's own
password and ACL files, and the real agent started from the config file the enrollment wrote.

An enrolled device connects and is confined to its subtree; its credentials are its own (not a
host's: it cannot send commands); once revoked it is disconnected and refused.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentkit import AgentProcess, Host
from brokerkit import Broker, mosquitto_binary
from need import need

from agent.bundle import Keyring
from agent.errors import TransportError
from agent.protocol import StatusRequest, Topics
from agent.transport.mqtt import MqttTransport

pytestmark = pytest.mark.integration

FLEET = "test"
DEV = "dev-e"
WAIT = 30.0
EDGEPACK = str(Path(sys.executable).parent / "edgepack")


def ok(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p.stdout


def _connect(url: str, user: str, password: str, client_id: str) -> MqttTransport:
    t = MqttTransport(url, client_id, username=user, password=password, session_expiry=0,
                      reconnect_max_delay=1)
    t.start()
    try:
        t.wait_connected(5)
    except TransportError:
        t.stop()
        raise
    return t


def _eventually_connect(url: str, user: str, password: str) -> MqttTransport:
    deadline = time.monotonic() + WAIT
    while True:  # the broker re-reads its files on SIGHUP, a moment after it
        try:
            return _connect(url, user, password, f"{user}-probe-{secrets.token_hex(3)}")
        except TransportError:
            assert time.monotonic() < deadline, "the enrolled device was never let in"
            time.sleep(0.2)


def test_an_enrolled_device_connects_confined_and_a_revoked_one_is_refused(
        tmp_path: Path, keyring: Keyring) -> None:
    need(mosquitto_binary() is not None, "mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path / "broker", users={"controller": secrets.token_urlsafe(12)},
               controllers=("controller",))
    b.start()
    ring = tmp_path / "keyring.json"
    ring.write_bytes(keyring.to_bytes())
    files = ("--passwd", str(b.workdir / "passwd"), "--reload-pid", str(b.workdir / "mosquitto.pid"))
    host = agent = None
    try:
        cfg_path = tmp_path / "dev-e.json"
        ok(EDGEPACK, "fleet", "--broker", b.url, "--fleet", FLEET, "enroll", DEV, *files,
           "--acl", str(b.workdir / "acl"), "--device-keyring", str(ring), "-o", str(cfg_path))
        cfg = json.loads(cfg_path.read_text())
        assert (cfg["device"], cfg["username"], cfg["fleet"]) == (DEV, DEV, FLEET)
        assert cfg_path.stat().st_mode & 0o077 == 0  # it holds a secret
        assert cfg["password"] != b.users["controller"]
        probe = _eventually_connect(b.url, DEV, cfg["password"])
        try:
            # Confined: not another device's topics, not a command (a host's job), its own yes.
            for topic in (Topics(FLEET, "dev-other").state, Topics(FLEET, "dev-other").cmd("status"),
                          Topics(FLEET, DEV).cmd("install")):
                with pytest.raises(TransportError, match=r"(?i)not authorized"):
                    probe.publish(topic, b"{}", qos=1, timeout=10)
            probe.publish(Topics(FLEET, DEV).health, b"{}", qos=1, timeout=10)
        finally:
            probe.stop()

        # install-service takes the same config: the service's env file carries it.
        env = tmp_path / "etc" / "agent.env"
        ok(str(Path(sys.executable).parent / "edgepack-agent"), "install-service", "--config",
           str(cfg_path), "--exec-path", "/bin/true", "--unit-dir", str(tmp_path / "units"),
           "--env-file", str(env))
        values = dict(line.split("=", 1) for line in env.read_text().splitlines()
                      if line and not line.startswith("#"))
        values = {k: v.strip('"') for k, v in values.items()}
        assert (values["EDGEPACK_DEVICE"], values["EDGEPACK_FLEET"], values["EDGEPACK_BROKER"],
                values["EDGEPACK_MQTT_USERNAME"], values["EDGEPACK_MQTT_PASSWORD"],
                values["EDGEPACK_KEYRING"]) == (DEV, FLEET, b.url, DEV, cfg["password"], str(ring))

        # The real agent from the enrollment's config alone (broker, fleet, device, credentials).
        host = Host(b.url, FLEET, username="controller", password=b.users["controller"])
        agent = AgentProcess(tmp_path / "dev" / "state", ring, "mqtt://127.0.0.1:1", device="ignored",
                             fleet="ignored", extra=("--config", str(cfg_path)))
        agent.start()
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=WAIT)
        reply = host.requests.call(DEV, "status", StatusRequest(), timeout=WAIT)
        assert reply.ok and reply.result is not None and reply.result["device"] == DEV

        # Revoked: the broker drops the connected agent and refuses it from then on, and the
        # inventory says so (the broker sends no last will for a client a reload dropped).
        ok(EDGEPACK, "fleet", "--broker", b.url, "--fleet", FLEET, "--username", "controller",
           "--password", b.users["controller"], "revoke", DEV, *files)
        host.wait_for(DEV, "state", lambda m: m["state"] == "revoked", timeout=WAIT)
        agent.wait_log("broker refused connection", timeout=WAIT)
        with pytest.raises(TransportError, match="refused"):
            _connect(b.url, DEV, cfg["password"], "dev-e-after")
        with pytest.raises(TransportError, match="no reply"):
            host.requests.call(DEV, "status", StatusRequest(), timeout=2.0)
    finally:
        if agent is not None:
            agent.stop()
        if host is not None:
            host.close()
        b.stop()
