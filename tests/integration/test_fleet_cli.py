"""fleet CLI and FleetClient against real peers: a real mosquitto, real MqttTransport "devices"
publishing retained status and answering commands, and ``edgepack serve`` as a real process.

The device side here is a small responder built from the protocol helpers (not the daemon), so
these tests pin the client's side of the protocol; the lead's end-to-end test runs the daemon.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerkit import Broker, free_port

from agent.errors import EdgepackError, TransportError
from agent.protocol import (
    InferChunk,
    InferRequest,
    Reply,
    Topics,
    birth_payload,
    event_payload,
    health_payload,
    parse_command,
    state_payload,
)
from agent.transport.mqtt import Message, MqttTransport
from fleet import cli
from fleet.client import DeviceBusyError, DeviceInferenceError, DeviceInstallError, FleetClient, bundle_info

pytestmark = pytest.mark.integration

FLEET = "lab"
REPO = Path(__file__).resolve().parents[2]
Handler = Callable[[str, Any, Message], None]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Parse with a throwaway parser holding only our commands and run the handler."""
    p = argparse.ArgumentParser(prog="edgepack")
    cli.add_commands(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(list(argv))
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


class FakeDevice:
    """A real MQTT peer speaking the device side: retained status, and commands answered by
    ``on_command(name, request, msg)`` (default: status -> a fixed result)."""

    def __init__(self, broker: Broker, device: str, on_command: Handler | None = None) -> None:
        self.topics = Topics(FLEET, device)
        self.on_command = on_command
        self.received: list[str] = []
        password = broker.users.get(device)  # a secure broker: the device's own account
        self.t = MqttTransport(broker.url, device, session_expiry=0,
                               username=device if password else None, password=password)
        self.t.subscribe(self.topics.cmd_filter, handler=self._on)
        self.t.start()
        self.t.wait_connected(10)

    def announce(self, *, ts: float) -> None:
        body: dict[str, Any] = {"agent_version": "9.9.9", "device": self.topics.device, "fleet": FLEET,
                "facts": {"arch": "x86_64", "cpu_model": "Test CPU", "ram_bytes": 8 << 30},
                "profile": "x86-64-cpu", "bundles": [], "current": None}
        health = {"cpu_percent": 7.0, "rss_bytes": 123 << 20, "temperature_c": None,
                  "disk_free_bytes": 5 << 30, "last_decode_tok_s": 42.5, "last_ttft_ms": 20.0,
                  "current": {"slot": "a", "digest": "d" * 64, "model": "gemma3", "version": 3,
                              "quant": "q4_k_m"}, "errors": {}, "busy": False, "queue": 0}
        # timeout=: wait for the broker's ack so the retained messages are in place.
        self.t.publish(self.topics.birth, birth_payload(body), retain=True, timeout=5)
        self.t.publish(self.topics.state, state_payload("online", ts=ts), retain=True, timeout=5)
        self.t.publish(self.topics.health, health_payload(health, ts=ts), retain=True, timeout=5)

    def send(self, msg: Message, payload: bytes) -> None:
        assert msg.response_topic
        self.t.publish(msg.response_topic, payload, correlation_data=msg.correlation_data)

    def event(self, job: str, stage: str, **detail: Any) -> None:
        self.t.publish(self.topics.events, event_payload(job, stage, ts=time.time(), detail=detail))

    def _on(self, msg: Message) -> None:
        name = msg.topic.rsplit("/", 1)[-1]
        self.received.append(name)
        req = parse_command(name, msg.payload)
        if self.on_command is not None:
            self.on_command(name, req, msg)
        elif name == "status":
            self.send(msg, Reply.success({"device": self.topics.device, "current": None,
                                          "busy": False, "queue": 0}).to_bytes())
        elif name == "rollback":
            self.send(msg, Reply.failure("store", "nothing to roll back to").to_bytes())
        else:
            self.send(msg, Reply.failure("unknown_command", f"no {name} here").to_bytes())

    def close(self) -> None:
        self.t.stop()


@pytest.fixture
def device(broker: Broker) -> Iterator[FakeDevice]:
    d = FakeDevice(broker, "sim-01")
    try:
        yield d
    finally:
        d.close()


def fleet_args(broker: Broker) -> tuple[str, ...]:
    return ("--broker", broker.url, "--fleet", FLEET, "--timeout", "5")


# --- fleet devices ---------------------------------------------------------------------------------


def test_fleet_devices_sees_a_device_by_its_retained_status(broker: Broker, device: FakeDevice,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    device.announce(ts=time.time())
    rc, out, _ = run_cli(capsys, "fleet", *fleet_args(broker), "devices", "--wait", "0.5", "--json")
    assert rc == 0
    [d] = json.loads(out)
    assert (d["device"], d["fleet"], d["state"], d["profile"], d["agent_version"]) == (
        "sim-01", FLEET, "online", "x86-64-cpu", "9.9.9")
    assert (d["arch"], d["cpu_model"], d["ram_bytes"]) == ("x86_64", "Test CPU", 8 << 30)
    assert d["current"]["version"] == 3 and d["last_decode_tok_s"] == 42.5
    assert 0 <= d["health_age_s"] < 30

    rc, out, _ = run_cli(capsys, "fleet", "devices", *fleet_args(broker), "--wait", "0.5")
    assert rc == 0
    header, row = out.splitlines()
    assert header.startswith("DEVICE") and row.split()[:6] == ["sim-01", "online", "x86-64-cpu", "gemma3",
                                                              "v3", "q4_k_m"]


def test_fleet_devices_in_another_fleet_or_with_none_is_empty(broker: Broker, device: FakeDevice,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    device.announce(ts=time.time())
    rc, out, err = run_cli(capsys, "fleet", "--broker", broker.url, "--fleet", "elsewhere", "devices",
                           "--wait", "0.3")
    assert rc == 0 and out == "" and "no devices" in err
    # The positive control: the same query in the device's own fleet lists it.
    rc, out, _ = run_cli(capsys, "fleet", "--broker", broker.url, "--fleet", FLEET, "devices",
                         "--wait", "0.3", "--json")
    assert rc == 0 and [d["device"] for d in json.loads(out)] == ["sim-01"]


def test_a_client_sees_the_retained_set_on_every_call_and_clears(broker: Broker, device: FakeDevice) -> None:
    device.announce(ts=time.time())
    with FleetClient(broker.url, FLEET) as c:
        assert [r.device for r in c.devices(wait=0.3)] == ["sim-01"]
        # A decommissioned device: its retained topics are cleared with empty payloads.
        for topic in (device.topics.state, device.topics.birth, device.topics.health):
            device.t.publish(topic, b"", retain=True, timeout=5)
        assert c.devices(wait=0.3) == []


# --- commands against a real responder -----------------------------------------------------------------


def test_fleet_status_gets_the_devices_reply(broker: Broker, device: FakeDevice,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "fleet", *fleet_args(broker), "status", "sim-01", "--json")
    assert rc == 0 and json.loads(out) == {"device": "sim-01", "current": None, "busy": False, "queue": 0}
    rc, out, _ = run_cli(capsys, "fleet", *fleet_args(broker), "status", "sim-01")
    assert rc == 0 and "sim-01" in out
    assert device.received == ["status", "status"]


def test_a_device_error_raises_with_its_code(broker: Broker, device: FakeDevice,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DeviceInstallError) as e:
        run_cli(capsys, "fleet", *fleet_args(broker), "rollback", "sim-01")
    assert (e.value.code, e.value.device, e.value.rolled_back) == ("store", "sim-01", False)
    assert "nothing to roll back to" in str(e.value)


def test_status_over_tls_with_controller_credentials_from_the_environment(
        secure_broker: Broker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPACK_BROKER", secure_broker.tls_url)
    monkeypatch.setenv("EDGEPACK_FLEET", FLEET)
    monkeypatch.setenv("EDGEPACK_MQTT_USERNAME", "controller")
    monkeypatch.setenv("EDGEPACK_MQTT_PASSWORD", secure_broker.users["controller"])
    monkeypatch.setenv("EDGEPACK_MQTT_CA", str(secure_broker.ca_file))
    d = FakeDevice(secure_broker, "dev-a")
    try:
        d.announce(ts=time.time())
        rc, out, _ = run_cli(capsys, "fleet", "status", "dev-a", "--json")
        assert rc == 0 and json.loads(out)["device"] == "dev-a"
        rc, out, _ = run_cli(capsys, "fleet", "devices", "--wait", "0.3", "--json")
        assert [r["device"] for r in json.loads(out)] == ["dev-a"]
    finally:
        d.close()
    monkeypatch.setenv("EDGEPACK_MQTT_PASSWORD", "wrong")
    with pytest.raises(TransportError, match="refused"):
        run_cli(capsys, "fleet", "status", "dev-a")


def test_an_absent_device_times_out_with_a_transport_error(broker: Broker, device: FakeDevice,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # The positive control: with the same flags a device that is there answers.
    rc, _, _ = run_cli(capsys, "fleet", "--broker", broker.url, "--fleet", FLEET, "status", "sim-01",
                       "--timeout", "0.5")
    assert rc == 0 and device.received == ["status"]
    # The message names the wait: --timeout was applied to the reply.
    with pytest.raises(TransportError, match=r"no reply within 0\.5s"):
        run_cli(capsys, "fleet", "--broker", broker.url, "--fleet", FLEET, "status", "nobody",
                "--timeout", "0.5")


def test_no_broker_is_a_transport_error() -> None:
    client = FleetClient(f"mqtt://127.0.0.1:{free_port()}", FLEET, connect_timeout=0.5)
    with pytest.raises(TransportError), client:
        pass


def test_install_shows_this_jobs_events_then_the_result(broker: Broker,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def on_command(name: str, req: Any, msg: Message) -> None:
        job = (msg.correlation_data or b"").hex()[:32]
        d.event("someone-elses-job", "downloading", bytes=1, total=2)
        d.event(job, "downloading", url=req.url, total=req.size)
        d.event(job, "downloading", bytes=req.size, total=req.size)
        d.event(job, "verified", model="gemma3", version=4)
        d.event(job, "committed", slot="b")
        d.send(msg, Reply.success({"installed": {"model": "gemma3", "version": 4, "quant": "q4_k_m"},
                                   "previous": None, "already_installed": False,
                                   "check": {"load_ms": 12.0, "ttft_ms": 30.0}}).to_bytes())

    d = FakeDevice(broker, "sim-02", on_command)
    try:
        rc, out, err = run_cli(capsys, "fleet", *fleet_args(broker), "install", "sim-02",
                               "http://127.0.0.1:1/m.bundle", "--sha256", "a" * 64, "--size", "2048")
    finally:
        d.close()
    assert rc == 0 and "installed: gemma3 v4 q4_k_m on sim-02" in out
    lines = [ln.strip() for ln in err.splitlines()]
    assert [ln.split()[0] for ln in lines[1:]] == ["downloading", "downloading", "verified", "committed"]
    assert "2.0 KiB / 2.0 KiB (100%)" in err


def test_install_failure_with_rollback_exits_with_the_reason(broker: Broker,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    def on_command(name: str, req: Any, msg: Message) -> None:
        job = (msg.correlation_data or b"").hex()[:32]
        d.event(job, "rolled_back", reason="load check failed")
        d.event(job, "failed", code="install_failed", reason="load check failed", rolled_back=True)
        d.send(msg, Reply.failure("install_failed", "load check failed").to_bytes())

    d = FakeDevice(broker, "sim-03", on_command)
    try:
        with pytest.raises(DeviceInstallError) as e:
            run_cli(capsys, "fleet", *fleet_args(broker), "install", "sim-03", "http://127.0.0.1:1/m.bundle",
                    "--sha256", "a" * 64, "--size", "10")
    finally:
        d.close()
    assert (e.value.code, e.value.rolled_back) == ("install_failed", True)
    assert "load check failed" in str(e.value) and "rolled back" in e.value.diagnostics()


def test_infer_streams_tokens_in_order_and_usage_to_stderr(broker: Broker,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []

    def on_command(name: str, req: Any, msg: Message) -> None:
        seen.append(req)
        # Out of order and with a duplicate: the client must put them right.
        for c in (InferChunk(1, " world"), InferChunk(0, "Hello"), InferChunk(0, "Hello"),
                  InferChunk(2, "!", True, {"completion_tokens": 3, "ttft_ms": 9.0, "decode_tok_s": 50.0,
                                            "finish_reason": "stop"})):
            d.send(msg, c.to_bytes())

    d = FakeDevice(broker, "sim-04", on_command)
    try:
        rc, out, err = run_cli(capsys, "fleet", *fleet_args(broker), "infer", "sim-04", "Say hi",
                               "--max-tokens", "8", "--temperature", "0", "--stop", "\n", "--seed", "1")
        rc2, out2, _ = run_cli(capsys, "fleet", *fleet_args(broker), "infer", "sim-04", "Say hi", "--json",
                               "--request-id", "r-9")
    finally:
        d.close()
    assert rc == 0 and out == "Hello world!\n"
    assert "3 tokens" in err and "50.0 tok/s" in err and "stop" in err
    req = seen[0]
    assert (req.prompt, req.max_tokens, req.temperature, req.stop, req.seed) == ("Say hi", 8, 0.0, ("\n",), 1)
    assert req.top_k == 40 and req.request_id.startswith("cli-")  # protocol default; auto id for cancel
    assert rc2 == 0 and json.loads(out2)["text"] == "Hello world!" and seen[1].request_id == "r-9"


@pytest.mark.parametrize("code, cls", [("busy", DeviceBusyError), ("no_model", DeviceInferenceError)])
def test_an_error_chunk_raises(broker: Broker, code: str, cls: type[EdgepackError]) -> None:
    def on_command(name: str, req: Any, msg: Message) -> None:
        d.send(msg, InferChunk(0, "par").to_bytes())
        d.send(msg, InferChunk.failure(1, code, "sorry").to_bytes())

    d = FakeDevice(broker, "sim-05", on_command)
    try:
        with FleetClient(broker.url, FLEET) as c:
            got: list[str] = []
            with pytest.raises(cls, match="sorry"):
                for chunk in c.infer("sim-05", InferRequest("x"), timeout=5):
                    got.append(chunk.text)
            assert got == ["par"]
    finally:
        d.close()


# --- edgepack serve ------------------------------------------------------------------------------------


_SERVE = """
import argparse, sys
from fleet.cli import add_commands
p = argparse.ArgumentParser(prog="edgepack")
add_commands(p.add_subparsers(dest="cmd", required=True))
a = p.parse_args(sys.argv[1:])
sys.exit(a.func(a))
"""


def test_edgepack_serve_prints_urls_and_serves_index_json(tmp_path: Path) -> None:
    served = tmp_path / "bundles"
    served.mkdir()
    data = secrets.token_bytes(300_000)
    (served / "tiny v1.bundle").write_bytes(data)
    (served / "notes.txt").write_text("not a bundle")
    (served / ".hidden.bundle").write_bytes(b"hidden")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, "serve", str(served), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/tiny%20v1.bundle"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.json", timeout=5) as r:
            index = json.loads(r.read())
        assert index == {"bundles": [{"name": "tiny v1.bundle", "size": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}]}
        # The client resolves a served URL through that index, without downloading the bundle.
        assert bundle_info(url) == (hashlib.sha256(data).hexdigest(), len(data))
        # A replaced file is hashed again (the cache is keyed by mtime and size).
        (served / "tiny v1.bundle").write_bytes(b"new")
        assert bundle_info(url) == (hashlib.sha256(b"new").hexdigest(), 3)
        with pytest.raises(TransportError, match="does not list"):
            bundle_info(f"http://127.0.0.1:{port}/notes.txt")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bundle_info_without_an_index_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(TransportError) as e:
        bundle_info(f"http://127.0.0.1:{free_port()}/x.bundle", timeout=2)
    assert "--sha256" in e.value.diagnostics()
