"""The README's demo command does what it says (run as a user would, in its own process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_installs_over_mqtt_and_streams_an_answer(tmp_path, sample_model):
    exe = Path(sys.executable).parent / "edgepack"
    r = subprocess.run([str(exe), "demo", "--state-dir", str(tmp_path / "state"),
                        "--prompt", "The best way to learn a language is"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "committed" in r.stderr and "[8/8]" in r.stderr
    answer = r.stdout.split("The best way to learn a language is", 1)[1]
    assert len(answer.split()) >= 10, r.stdout
    assert "demo-device" in r.stdout and "online" in r.stdout  # the inventory table
