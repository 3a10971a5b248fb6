"""`edgepack-agent install-service` writes a unit systemd accepts and a private env file."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest
from need import need

from agent.cli import main

pytestmark = pytest.mark.integration


def test_install_service_writes_a_verifiable_unit_and_a_private_env(tmp_path):
    units, env = tmp_path / "units", tmp_path / "etc" / "agent.env"
    rc = main(["install-service", "--broker", "mqtts://broker.example:8883", "--device", "pi-07",
               "--fleet", "lab", "--username", "pi-07", "--password", "s3cret",
               "--exec-path", "/bin/true", "--unit-dir", str(units), "--env-file", str(env)])
    assert rc == 0
    unit = units / "edgepack-agent.service"
    text = unit.read_text()
    assert "Type=notify" in text and f"ExecStart={os.path.realpath('/bin/true')} run" in text
    assert stat.S_IMODE(env.stat().st_mode) == 0o600  # it holds the broker password
    # systemd EnvironmentFile syntax: values are double-quoted.
    values = {k: v.strip('"') for k, v in (line.split("=", 1) for line in env.read_text().splitlines()
                                           if line and not line.startswith("#"))}
    assert values["EDGEPACK_DEVICE"] == "pi-07" and values["EDGEPACK_MQTT_PASSWORD"] == "s3cret"
    need(shutil.which("systemd-analyze"), "systemd-analyze is not installed (apt-get install systemd)")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    # Typos only warn: any output is a failure.
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
