"""The rollout controller's systemd unit, checked by systemd's own tools (as the agent's is):
``systemd-analyze verify`` (any stderr fails: unknown keys only warn) and the offline hardening
score."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from need import need

pytestmark = pytest.mark.integration

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "edgepack-controller.service"
MAX_EXPOSURE = 5.0  # systemd's scale: below 5 is "OK"/"MEDIUM"


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    need(exe, "systemd-analyze not installed (apt-get install systemd)")
    assert exe is not None
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def _rendered(tmp_path: Path) -> Path:
    # verify wants ExecStart's binary to exist: the venv's entry point.
    exe = Path(sys.executable).parent / "edgepack"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edgepack", str(exe)))
    return unit


def test_the_controller_unit_verifies(tmp_path: Path) -> None:
    r = _analyze("verify", str(_rendered(tmp_path)))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # Positive control: a typo is caught.
    bad = tmp_path / "bad" / UNIT.name
    bad.parent.mkdir()
    bad.write_text(_rendered(tmp_path).read_text().replace("Restart=", "Restrat="))
    assert _analyze("verify", str(bad)).stderr.strip()


def test_the_controller_unit_is_hardened(tmp_path: Path) -> None:
    r = _analyze("security", "--offline=yes", str(_rendered(tmp_path)))
    m = re.search(r"Overall exposure level for .*: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout[-500:] + r.stderr[-500:]
    assert float(m.group(1)) < MAX_EXPOSURE, r.stdout[-2000:]
    assert "Type=notify" in UNIT.read_text() and "WatchdogSec=" in UNIT.read_text()
