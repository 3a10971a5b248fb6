"""Key rotation and revocation through the real CLIs and the real agent behind a real mosquitto.

The host makes a root key and the first keyring (`edgepack keys generate --root`), the device is
given it once by its operator (`edgepack-agent keyring update FILE --init`); every later keyring
comes over MQTT (`cmd/keyring`) and is checked against the one the device holds. Revoking a
release key refuses its bundles for new installs; the bundle already serving says it was signed
by a revoked key; the keyring version is in birth, health and status, and survives a restart.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from agentkit import AGENT, AgentProcess, Host

from agent._fs import file_digest
from agent.bundle import SigningKey
from agent.bundle.trust import keyring_bytes, sign_keyring, verify_keyring_update
from agent.protocol import InstallRequest, KeyringRequest, StatusRequest
from fleet.client import FleetClient
from packager.keys import next_keyring

pytestmark = pytest.mark.integration

FLEET = "test"
DEV = "dev-k"
WAIT = 30.0
EDGEPACK = str(Path(sys.executable).parent / "edgepack")


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def ok(*cmd: str) -> str:
    p = run(*cmd)
    assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p.stdout


def install_req(bundle: Path) -> InstallRequest:
    digest, size = file_digest(bundle)
    return InstallRequest(url=bundle.as_uri(), sha256=digest, size=size)


def test_rotation_and_revocation_reach_the_agent_over_mqtt(tmp_path: Path, broker, make_bundle) -> None:
    keys, state = tmp_path / "keys", tmp_path / "dev" / "state"
    for name in ("rel1", "rel2"):
        ok(EDGEPACK, "keys", "generate", "--name", name, "-o", str(keys))
    v1 = json.loads(ok(EDGEPACK, "keys", "generate", "--root", "--name", "root", "-o", str(keys),
                       "--release", str(keys / "rel1.pub.json"), "--json"))
    signed = keys / "keyring.signed.json"
    assert v1["version"] == 1 and len(v1["release_keys"]) == 1
    v1_doc = signed.read_bytes()
    rel1 = SigningKey.from_pem((keys / "rel1.key").read_bytes(), "rel1")
    rel2 = SigningKey.from_pem((keys / "rel2.key").read_bytes(), "rel2")

    # The device: its operator installs the first keyring; a network-style update would refuse.
    agent_cli = (AGENT, "--state-dir", str(state))
    refused = run(*agent_cli, "keyring", "update", str(signed))
    assert refused.returncode == 1 and "--init" in refused.stderr
    ok(*agent_cli, "keyring", "update", str(signed), "--init")
    # A bundle by rel1 installs and serves (locally, without the load check: a made-up model).
    old = make_bundle(key=rel1, version=1)
    ok(*agent_cli, "install", "--no-load-check", str(old))

    # A stale plain keyring that still lists rel1 is given too: the signed keyring supersedes it.
    stale = tmp_path / "stale.pub.json"
    stale.write_bytes((keys / "rel1.pub.json").read_bytes())
    host = Host(broker.url, FLEET)
    agent = AgentProcess(state, stale, broker.url, device=DEV, fleet=FLEET)
    try:
        agent.start()
        host.wait_for(DEV, "birth", lambda m: (m.get("keyring") or {}).get("version") == 1, timeout=WAIT)
        host.wait_for(DEV, "health", lambda m: m.get("keyring_version") == 1, timeout=WAIT)

        # (1) The host rotates: rel2 in, rel1 revoked (v2), signed by the root.
        ok(EDGEPACK, "keys", "rotate", "--keyring", str(signed), "--root-key", str(keys / "root.key"),
           "--add", str(keys / "rel2.pub.json"))
        v3 = json.loads(ok(EDGEPACK, "keys", "revoke", rel1.key_id[:12], "--keyring", str(signed),
                           "--root-key", str(keys / "root.key"), "--json"))
        assert v3["version"] == 3 and v3["revoked"] == [rel1.key_id]
        with FleetClient(broker.url, FLEET) as fleet:  # what `edgepack fleet` uses
            result = fleet.keyring(DEV, signed.read_bytes(), timeout=WAIT)
        assert result["changed"] and result["keyring"]["version"] == 3
        host.wait_for(DEV, "birth", lambda m: (m.get("keyring") or {}).get("version") == 3, timeout=WAIT)
        health = host.wait_for(DEV, "health", lambda m: m.get("keyring_version") == 3, timeout=WAIT)
        assert health["current"]["signer_revoked"] is True  # the serving bundle says so
        status = host.requests.call(DEV, "status", StatusRequest(), timeout=WAIT).result or {}
        assert status["current_signer_revoked"] is True and status["current"]["version"] == 1

        # (2) Refused: the old keyring replayed, one signed by a release key, and garbage.
        replay = host.requests.call(DEV, "keyring", KeyringRequest(v1_doc.decode()), timeout=WAIT)
        assert not replay.ok and replay.error["code"] == "downgrade", replay.error
        # rel2's holder makes himself root of a v9 that trusts his key, signed by himself.
        current = verify_keyring_update(signed.read_bytes(), None, trust_on_first_use=True)
        evil = next_keyring(current, roots=[rel2.public], add=[rel2.public])
        evil = dataclasses.replace(evil, version=9)
        data = keyring_bytes(evil)
        forged = sign_keyring(data, [(rel2.key_id, rel2.sign(data))])
        bad = host.requests.call(DEV, "keyring", KeyringRequest(forged.decode()), timeout=WAIT)
        assert not bad.ok and bad.error["code"] == "signature", bad.error
        assert "current root" in bad.error["message"]
        junk = host.requests.call(DEV, "keyring", KeyringRequest('{"format": "nope"}'), timeout=WAIT)
        assert not junk.ok and junk.error["code"] == "bad_keyring", junk.error

        # (3) New installs: rel1's bundle is refused as revoked; rel2's passes verification (and
        # then fails the load check: the model is made up), so it was trusted.
        r1 = host.requests.call(DEV, "install", install_req(make_bundle(key=rel1, version=2)),
                                timeout=WAIT)
        assert not r1.ok and r1.error["code"] == "signature" and "revoked" in r1.error["message"]
        r2 = host.requests.call(DEV, "install", install_req(make_bundle(key=rel2, version=3)),
                                timeout=WAIT)
        assert not r2.ok and r2.error["code"] != "signature", r2.error

        # (4) It survives a restart, byte for byte.
        agent.stop()
        assert (state / "trust.json").read_bytes() == signed.read_bytes()
        agent.start()
        host.wait_for(DEV, "health", lambda m: m.get("keyring_version") == 3, timeout=WAIT)
        shown = json.loads(ok(*agent_cli, "keyring", "show", "--json"))
        assert shown["version"] == 3 and shown["revoked"] == [rel1.key_id]
    finally:
        agent.stop()
        host.close()
