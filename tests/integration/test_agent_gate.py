"""The post-install benchmark gate for real: the sample model, the CLI, and the daemon over MQTT.

A bundle that misses its SLO on this device (forced with an override no machine can meet) is
rolled back with the measured numbers in the error, the events and health, and the previous
bundle keeps serving; a normal install commits with the figures in its result.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from agentkit import AgentProcess, Host

from agent._fs import file_digest
from agent.cli import main as agent_cli
from agent.protocol import InferChunk, InferRequest, InstallRequest, Reply, StatusRequest
from fleet.serve import BundleServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEV = "dev-gate"
FIGURES = ("ttft_ms", "decode_tok_s", "peak_rss_mb")


def cli(state: Path, keyring: Path, *args: str) -> int:
    return agent_cli(["--state-dir", str(state), "--keyring", str(keyring), *args])


# --- edgepack-agent install ----------------------------------------------------------------------


def test_cli_install_commits_with_figures_then_an_slo_miss_rolls_back(tmp_path, agent_bundles, capsys):
    state, ring = tmp_path / "state", agent_bundles["keyring"]
    # (b) a normal install passes the gate (the test profile sets no SLO) and reports the figures.
    assert cli(state, ring, "install", str(agent_bundles["v1"]), "--gate-tokens", "8", "--json") == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["ok"] is True and check["failures"] == [] and check["tokens"] == 8
    assert all(check[k] > 0 for k in FIGURES), check

    # (a) no device decodes 100,000 tok/s: measured, refused, rolled back.
    assert cli(state, ring, "install", str(agent_bundles["v2"]), "--gate-tokens", "8",
               "--slo", "min_decode_tok_s=100000") == 1
    err = capsys.readouterr().err
    assert "rolled back" in err
    m = re.search(r"decode ([\d.]+) tok/s < override 100000\.0 tok/s", err)
    assert m and float(m.group(1)) > 0, err
    assert cli(state, ring, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["current"]["version"] == 1 and status["previous"] is None
    assert cli(state, ring, "infer", "The sky is", "--max-tokens", "6", "--temperature", "0",
               "--json") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[-1]["done"] and lines[-1]["usage"]["completion_tokens"] > 0  # v1 still serves


def test_cli_refuses_a_malformed_slo_before_touching_the_store(tmp_path, agent_bundles, capsys):
    state = tmp_path / "state"
    assert cli(state, agent_bundles["keyring"], "install", str(agent_bundles["v1"]),
               "--slo", "min_speed=3") == 1
    assert "bad SLO override" in capsys.readouterr().err
    assert not (state / "pointers.json").exists()


# --- the daemon over MQTT ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, agent_bundles) -> Path:
    d = tmp_path_factory.mktemp("gate-served")
    for key in ("v1", "v2"):
        os.link(agent_bundles[key], d / agent_bundles[key].name)
    return d


@pytest.fixture
def host(broker):
    h = Host(broker.url)
    yield h
    h.close()


def start_agent(tmp_path: Path, agent_bundles, broker, host: Host, **env: str) -> AgentProcess:
    a = AgentProcess(tmp_path / "state", agent_bundles["keyring"], broker.url, device=DEV,
                     extra=("--gate-tokens", "8"), env=env).start()
    try:
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=30)
    except AssertionError:
        a.stop()
        raise AssertionError(a.tail()) from None
    return a


def install(host: Host, served: Path, bundle: Path) -> Reply:
    digest, size = file_digest(bundle)
    with BundleServer(served) as server:
        req = InstallRequest(url=server.url_for(bundle.name), sha256=digest, size=size)
        return host.requests.call(DEV, "install", req, timeout=120)


def events(host: Host, stage: str) -> list[dict]:
    return [e for e in host.status.get((DEV, "events"), []) if e["stage"] == stage]


def infer_ok(host: Host) -> bool:
    req = InferRequest(prompt="The sky is", max_tokens=6, temperature=0.0)
    chunks: list[InferChunk] = list(host.requests.stream(DEV, req, timeout=60))
    return chunks[-1].done and not chunks[-1].error and chunks[-1].usage["completion_tokens"] > 0


def test_mqtt_install_commits_with_figures_in_the_reply_events_and_health(
        tmp_path, agent_bundles, broker, host, served):
    a = start_agent(tmp_path, agent_bundles, broker, host)
    try:
        r = install(host, served, agent_bundles["v1"])
        assert r.ok, r.error
        assert r.result["check"]["ok"] is True and all(r.result["check"][k] > 0 for k in FIGURES)
        (bench,) = events(host, "benchmarked")
        assert bench["ok"] is True and bench["tokens"] == 8
        (committed,) = events(host, "committed")
        assert committed["check"]["decode_tok_s"] == r.result["check"]["decode_tok_s"]
        health = host.wait_for(DEV, "health", lambda m: m.get("last_gate"), timeout=15)
        gate = health["last_gate"]
        assert gate["ok"] is True and gate["failures"] == [] and all(gate[k] > 0 for k in FIGURES)
    finally:
        a.stop()


def test_mqtt_slo_miss_rolls_back_and_the_previous_bundle_keeps_serving(
        tmp_path, agent_bundles, broker, host, served, capsys):
    # v1 is installed before the agent starts (gate off), so there is something to fall back to.
    assert cli(tmp_path / "state", agent_bundles["keyring"], "install", str(agent_bundles["v1"]),
               "--no-gate") == 0
    capsys.readouterr()
    # No model produces its first token in a microsecond: every install misses this SLO.
    a = start_agent(tmp_path, agent_bundles, broker, host, EDGEPACK_SLO="max_ttft_ms=0.001")
    try:
        assert infer_ok(host)  # v1 resident before the install
        r = install(host, served, agent_bundles["v2"])
        assert not r.ok and r.error["code"] == "slo_failed", r.error
        assert re.search(r"TTFT [\d.]+ ms > override 0\.001 ms", r.error["message"]), r.error
        (rolled,) = events(host, "rolled_back")
        assert rolled["gate"]["ok"] is False and rolled["gate"]["ttft_ms"] > 0.001
        assert all(k in rolled["gate"] for k in FIGURES) and rolled["gate"]["failures"]
        (failed,) = events(host, "failed")
        assert failed["code"] == "slo_failed" and failed["rolled_back"] is True
        st = host.requests.call(DEV, "status", StatusRequest(), timeout=30).result
        assert st["current"]["version"] == 1
        assert infer_ok(host)  # the old model was loaded back and serves
        health = host.wait_for(DEV, "health",
                               lambda m: m.get("last_gate") and m["last_gate"]["ok"] is False,
                               timeout=15)
        gate = health["last_gate"]
        assert gate["ttft_ms"] > 0 and gate["decode_tok_s"] > 0 and gate["peak_rss_mb"] > 0
        assert gate["thresholds"] == {"max_ttft_ms": 0.001} and "TTFT" in gate["failures"][0]
    finally:
        a.stop()
