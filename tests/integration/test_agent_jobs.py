"""Named jobs (a rollout's installs and rollbacks) run once: sent again — by a host that lost the
answer, or after the agent itself restarted — they are answered from the agent's job journal.
The real daemon as a process, a real mosquitto, the real sample bundles over HTTP.
"""

from __future__ import annotations

import os
import time

import pytest
from agentkit import AgentProcess, Host
from bundlekit import partial_offset

from agent._fs import file_digest
from agent.protocol import InstallRequest, RollbackRequest, StatusRequest
from fleet.serve import BundleServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEV = "dev-j"
MIB = 1 << 20


@pytest.fixture
def host(broker):
    h = Host(broker.url)
    yield h
    h.close()


@pytest.fixture
def server(tmp_path, agent_bundles):
    d = tmp_path / "served"
    d.mkdir()
    for key in ("v1", "v2"):
        os.link(agent_bundles[key], d / agent_bundles[key].name)
    with BundleServer(d) as s:
        yield s


def _req(server: BundleServer, bundle, job: str) -> InstallRequest:
    digest, size = file_digest(bundle)
    return InstallRequest(url=server.url_for(bundle.name), sha256=digest, size=size, job=job)


def _start(tmp_path, broker, agent_bundles, host) -> AgentProcess:
    a = AgentProcess(tmp_path / "state", agent_bundles["keyring"], broker.url, device=DEV).start()
    host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=30)
    return a


def test_a_job_sent_again_is_answered_from_the_journal_even_after_a_restart(
        tmp_path, broker, host, server, agent_bundles):
    agent = _start(tmp_path, broker, agent_bundles, host)
    try:
        first = host.requests.call(DEV, "install", _req(server, agent_bundles["v1"], "ro-1.dev-j.1"),
                                   timeout=180)
        assert first.ok, first.error
        again = host.requests.call(DEV, "install", _req(server, agent_bundles["v1"], "ro-1.dev-j.1"),
                                   timeout=60)
        assert again.ok and again.result == first.result  # the recorded answer, word for word
        status = host.requests.call(DEV, "status", StatusRequest(), timeout=15).result
        assert status["counters"]["replayed"] == 1
        assert status["last_install"]["slot"] == first.result["installed"]["slot"]
        # The gate's figures are kept beside the bundle: birth carries them as the baseline.
        birth = host.wait_for(DEV, "birth", lambda m: (m.get("current") or {}).get("gate"))
        assert birth["current"]["gate"]["decode_tok_s"] == first.result["check"]["decode_tok_s"]
    finally:
        agent.stop()
    agent = _start(tmp_path, broker, agent_bundles, host)
    try:
        host.clear(DEV, "events")
        replay = host.requests.call(DEV, "install", _req(server, agent_bundles["v1"], "ro-1.dev-j.1"),
                                    timeout=60)
        assert replay.ok and replay.result == first.result
        ev = host.wait_for(DEV, "events", lambda m: m["job"] == "ro-1.dev-j.1" and m.get("replayed"))
        assert ev["stage"] == "committed"
        # Positive control: a new job name runs (and v2 is newer, so it installs).
        second = host.requests.call(DEV, "install", _req(server, agent_bundles["v2"], "ro-2.dev-j.1"),
                                    timeout=180)
        assert second.ok and second.result["installed"]["version"] == 2
        stages = [e["stage"] for e in host.status.get((DEV, "events"), []) if e["job"] == "ro-2.dev-j.1"]
        assert "verified" in stages and "committed" in stages
    finally:
        agent.stop()


def test_a_conditional_rollback_runs_once_and_only_from_the_named_bundle(
        tmp_path, broker, host, server, agent_bundles):
    agent = _start(tmp_path, broker, agent_bundles, host)
    try:
        v1 = host.requests.call(DEV, "install", _req(server, agent_bundles["v1"], "a"), timeout=180)
        v2 = host.requests.call(DEV, "install", _req(server, agent_bundles["v2"], "b"), timeout=180)
        assert v1.ok and v2.ok
        v2_digest = v2.result["installed"]["digest"]
        back = host.requests.call(DEV, "rollback", RollbackRequest(job="rb-1", from_digest=v2_digest),
                                  timeout=60)
        assert back.ok and back.result["rolled_back"] is True
        assert back.result["current"]["version"] == 1
        # Sent again (a resend): the journal answers; a second swap would have put v2 back.
        again = host.requests.call(DEV, "rollback", RollbackRequest(job="rb-1", from_digest=v2_digest),
                                   timeout=60)
        assert again.result == back.result
        # A new job that names the bundle that is no longer current changes nothing.
        stale = host.requests.call(DEV, "rollback", RollbackRequest(job="rb-2", from_digest=v2_digest),
                                   timeout=60)
        assert stale.ok and stale.result["rolled_back"] is False
        status = host.requests.call(DEV, "status", StatusRequest(), timeout=15).result
        assert status["current"]["version"] == 1
    finally:
        agent.stop()


def test_an_agent_killed_mid_download_says_so_when_back_and_resumes_the_install_sent_again(
        tmp_path, broker, host, agent_bundles):
    """The real daemon, SIGKILLed while the real sample streams into its staging: back up, it
    tells the host the job was interrupted (a rollout retries at once), and the install sent again
    downloads only what was not checkpointed, then loads and gates the model as usual."""
    bundle = agent_bundles["v1"]
    size = bundle.stat().st_size
    d = tmp_path / "served"
    d.mkdir()
    os.link(bundle, d / bundle.name)
    stall = size * 3 // 5
    with BundleServer(d, stall_after_bytes=stall) as server:
        agent = _start(tmp_path, broker, agent_bundles, host)
        try:
            pending = host.requests.request(DEV, "install", _req(server, bundle, "ro-9.dev-j.1"),
                                            timeout=180)
            assert server.wait_stalled(60)
            staging = tmp_path / "state" / "staging"
            deadline = time.monotonic() + 60
            while partial_offset(staging) < stall - 17 * MIB and time.monotonic() < deadline:
                time.sleep(0.05)  # the agent checkpoints every 16 MiB: the last one before the stall
            kept = partial_offset(staging)
            assert kept >= stall - 17 * MIB, (kept, stall)
            agent.kill()  # SIGKILL: no cancel, no reply, nothing flushed
            pending.close()
        finally:
            agent.stop()
        server.release()
        assert server.wait_requests(1)
        host.clear(DEV, "events")
        agent = _start(tmp_path, broker, agent_bundles, host)
        try:
            told = host.wait_for(DEV, "events", lambda m: m["job"] == "ro-9.dev-j.1", timeout=30)
            assert told["stage"] == "failed" and told["code"] == "interrupted"
            assert "nothing" in told["serving"]
            status = host.requests.call(DEV, "status", StatusRequest(), timeout=15).result
            assert status["partial_install"] == {"sha256": file_digest(bundle).sha256, "size": size,
                                                 "resumes_at_byte": kept}
            before = server.bytes_served
            again = host.requests.call(DEV, "install", _req(server, bundle, "ro-9.dev-j.2"),
                                       timeout=240)
            assert again.ok, again.error
            assert again.result["installed"]["version"] == 1 and again.result["check"]["decode_tok_s"] > 0
            assert server.requests[-1].range == f"bytes={kept}-"
            assert server.bytes_served - before == size - kept  # the staged part never came again
            resumed = [e for e in host.status.get((DEV, "events"), [])
                       if e["job"] == "ro-9.dev-j.2" and e["stage"] == "downloading" and "from_byte" in e]
            assert resumed and resumed[0]["from_byte"] == kept
            assert list(staging.iterdir()) == []
            status = host.requests.call(DEV, "status", StatusRequest(), timeout=15).result
            assert status["partial_install"] is None
        finally:
            agent.stop()
