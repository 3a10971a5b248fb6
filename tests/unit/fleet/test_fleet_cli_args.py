"""fleet.cli: argument parsing through a throwaway parser, env defaults, and pure helpers."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest

from agent.errors import InferenceError, InstallError, TransportError
from fleet import cli
from fleet.client import (
    DeviceBusyError,
    DeviceCommandError,
    DeviceInferenceError,
    DeviceInstallError,
    bundle_info,
    remote_error,
)
from fleet.inventory import DeviceRecord

ENV = ("EDGEPACK_BROKER", "EDGEPACK_FLEET", "EDGEPACK_MQTT_USERNAME", "EDGEPACK_MQTT_PASSWORD",
       "EDGEPACK_MQTT_CA")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ENV:
        monkeypatch.delenv(k, raising=False)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edgepack")
    cli.add_commands(p.add_subparsers(dest="cmd", required=True))
    return p.parse_args(list(argv))


def test_defaults_of_the_common_options() -> None:
    a = parse("fleet", "devices")
    assert (a.broker, a.fleet, a.username, a.password, a.ca_file, a.timeout) == (
        "mqtt://127.0.0.1:1883", "default", None, None, None, None)
    assert (a.wait, a.json, a.func) == (1.0, False, cli.cmd_devices)


def test_common_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPACK_BROKER", "mqtts://broker:8883")
    monkeypatch.setenv("EDGEPACK_FLEET", "lab")
    monkeypatch.setenv("EDGEPACK_MQTT_USERNAME", "controller")
    monkeypatch.setenv("EDGEPACK_MQTT_PASSWORD", "s3cret")
    monkeypatch.setenv("EDGEPACK_MQTT_CA", "/etc/ca.pem")
    a = parse("fleet", "status", "pi-01")
    assert (a.broker, a.fleet, a.username, a.password, a.ca_file) == (
        "mqtts://broker:8883", "lab", "controller", "s3cret", "/etc/ca.pem")


@pytest.mark.parametrize("argv", [
    ("fleet", "--broker", "mqtt://h:1", "--fleet", "lab", "--timeout", "3", "status", "pi-01"),
    ("fleet", "status", "pi-01", "--broker", "mqtt://h:1", "--fleet", "lab", "--timeout", "3"),
    ("fleet", "--broker", "mqtt://other:9", "status", "pi-01", "--broker", "mqtt://h:1", "--fleet", "lab",
     "--timeout", "3"),
])
def test_common_options_before_or_after_the_subcommand(argv: tuple[str, ...]) -> None:
    a = parse(*argv)
    assert (a.broker, a.fleet, a.timeout, a.device, a.func) == ("mqtt://h:1", "lab", 3.0, "pi-01",
                                                                cli.cmd_status)


def test_infer_options() -> None:
    a = parse("fleet", "infer", "pi-01", "Why is the sky blue?", "--max-tokens", "16", "--temperature", "0",
              "--top-p", "0.5", "--top-k", "3", "--repeat-penalty", "1.0", "--stop", "\n", "--stop", "END",
              "--chat", "--seed", "7", "--request-id", "r-1", "--json")
    assert (a.device, a.prompt, a.max_tokens, a.temperature, a.top_p, a.top_k, a.repeat_penalty) == (
        "pi-01", "Why is the sky blue?", 16, 0.0, 0.5, 3, 1.0)
    assert (a.stop, a.chat, a.seed, a.request_id, a.json) == (["\n", "END"], True, 7, "r-1", True)
    b = parse("fleet", "infer", "pi-01", "hi")
    # Unset sampling options stay None so the protocol's defaults apply.
    assert (b.max_tokens, b.temperature, b.stop, b.chat, b.seed, b.request_id) == (
        None, None, None, False, None, None)


def test_install_probe_rollback_cancel_and_serve() -> None:
    a = parse("fleet", "install", "pi-01", "http://h:8080/x.bundle", "--sha256", "ab" * 32, "--size", "12")
    assert (a.device, a.bundle, a.sha256, a.size, a.func) == (
        "pi-01", "http://h:8080/x.bundle", "ab" * 32, 12, cli.cmd_install)
    assert parse("fleet", "probe", "pi-01", "--runtimes").runtimes is True
    assert parse("fleet", "rollback", "pi-01").func is cli.cmd_rollback
    c = parse("fleet", "cancel", "pi-01", "cli-123")
    assert (c.request_id, c.func) == ("cli-123", cli.cmd_cancel)
    s = parse("serve", "bundles")
    assert (s.directory, s.host, s.port, s.func) == ("bundles", "127.0.0.1", 8080, cli.cmd_serve)


@pytest.mark.parametrize("argv", [
    ("fleet",), ("fleet", "status"), ("fleet", "bogus"), ("fleet", "infer", "pi-01"),
    ("fleet", "install", "pi-01", "x.bundle", "--size", "big"), ("serve",),
])
def test_bad_usage_exits_2(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_table_shows_one_line_per_device() -> None:
    recs = [
        DeviceRecord("pi-01", "lab", state="online", profile="raspberry-pi-5",
                     current={"model": "gemma3", "version": 2, "quant": "q4_k_m"}, last_decode_tok_s=55.25,
                     cpu_percent=12.0, rss_bytes=300 << 20, health_age_s=4.2),
        DeviceRecord("jetson", "lab"),
    ]
    lines = cli.format_table(recs).splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "STATE", "PROFILE"]
    assert lines[1].split() == ["pi-01", "online", "raspberry-pi-5", "gemma3", "v2", "q4_k_m", "55.2", "12",
                                "300.0", "MiB", "4s"]
    assert lines[2].split() == ["jetson", "?", "-", "-", "-", "-", "-", "-"]


def test_remote_errors_map_to_our_classes() -> None:
    e = remote_error("pi-01", "install", {"code": "downgrade", "message": "v1 <= v2"}, rolled_back=False)
    assert isinstance(e, DeviceInstallError) and isinstance(e, InstallError)
    assert (e.code, e.device, e.command, e.rolled_back) == ("downgrade", "pi-01", "install", False)
    assert "v1 <= v2" in str(e)
    r = remote_error("pi-01", "install", {"code": "install_failed", "message": "load"}, rolled_back=True)
    assert isinstance(r, DeviceInstallError) and r.rolled_back and "rolled back" in r.diagnostics()
    i = remote_error("pi-01", "infer", {"code": "inference_failed", "message": "boom"})
    assert isinstance(i, DeviceInferenceError) and isinstance(i, InferenceError)
    b = remote_error("pi-01", "infer", {"code": "busy", "message": "full"})
    assert isinstance(b, DeviceBusyError) and isinstance(b, TransportError) and b.diagnostics()
    p = remote_error("pi-01", "status", {"code": "unknown_field", "message": "x"})
    assert type(p) is DeviceCommandError and "versions" in p.diagnostics()
    n = remote_error("pi-01", "cancel", {"code": "not_found", "message": "no such request"})
    assert type(n) is DeviceCommandError and n.code == "not_found"


def test_a_local_bundle_is_hashed_and_sent_as_a_file_url(tmp_path: Path) -> None:
    f = tmp_path / "m v1.bundle"
    f.write_bytes(b"x" * 1000)
    sha, size = bundle_info(str(f))
    assert (sha, size) == (hashlib.sha256(b"x" * 1000).hexdigest(), 1000)
    url, sha2, size2 = cli.resolve_bundle(str(f), None, None)
    assert url == f.resolve().as_uri() and url.startswith("file:///") and "%20" in url
    assert (sha2, size2) == (sha, size) == bundle_info(url)
    # Given values are not looked up (the file need not exist here).
    assert cli.resolve_bundle("http://h/x.bundle", "ab" * 32, 5) == ("http://h/x.bundle", "ab" * 32, 5)
