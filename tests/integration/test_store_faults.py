"""Faults during install, for real: the agent killed with SIGKILL at many points, and a full disk.

After each fault the device must serve either the old or the new bundle, whole (every file's sha256
matches its manifest), with no staging leftovers, and say why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from need import need

from agent.bundle import Keyring
from agent.errors import InstallError, InsufficientResourcesError
from agent.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGENT = str(Path(sys.executable).parent / "edgepack-agent")


def _keyring(agent_bundles) -> Keyring:
    return Keyring.from_bytes(agent_bundles["keyring"].read_bytes())


def assert_whole(store: Store, versions: set[int]) -> int:
    cur = store.current()
    assert cur is not None and cur.manifest.version in versions
    for f in cur.manifest.files:
        h = hashlib.sha256()
        with open(cur.payload_dir / f.path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        assert h.hexdigest() == f.sha256
    assert list(store.staging_dir.iterdir()) == []
    assert not json.loads((store.state_dir / "pointers.json").read_text())["pending"]
    return cur.manifest.version


def test_sigkill_at_any_point_of_an_install_leaves_old_or_new_whole(tmp_path, agent_bundles):
    base = tmp_path / "base"
    Store(base, _keyring(agent_bundles)).install(agent_bundles["v1"])
    outcomes = []
    # From "still verifying" through "staging", "switched, load check running" to "committed".
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 1.6, 2.0, 2.5, 3.5, None):
        state = tmp_path / f"s{delay}"
        shutil.copytree(base, state)
        p = subprocess.Popen([AGENT, "--state-dir", str(state), "--keyring",
                              str(agent_bundles["keyring"]), "install", str(agent_bundles["v2"])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if delay is None:  # the control: the same install, not interrupted, commits v2
            assert p.wait(timeout=300) == 0
        else:
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
        store = Store(state, _keyring(agent_bundles))  # a restart: recovery runs here
        v = assert_whole(store, {1, 2})
        outcomes.append((delay, v, store.recovered is not None))
        if v == 1:
            # The interrupted install can simply be retried.
            assert store.install(agent_bundles["v2"]).bundle.manifest.version == 2
    # Early kills leave v1 (later ones may too on a loaded machine); the uninterrupted run commits.
    assert outcomes[0][1] == 1 and outcomes[-1][1] == 2, outcomes


@pytest.fixture
def small_disk(tmp_path):
    """A real 400 MiB filesystem: room for one sample bundle, not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    need(r.returncode == 0, f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_refused_before_anything_is_written(small_disk, agent_bundles):
    store = Store(small_disk / "state", _keyring(agent_bundles))
    store.install(agent_bundles["v1"])
    with pytest.raises(InsufficientResourcesError) as e:
        store.install(agent_bundles["v2"])
    assert e.value.resource == "disk" and "MiB free" in str(e.value)
    assert assert_whole(store, {1}) == 1


def test_disk_filling_up_during_staging_keeps_the_previous_model(small_disk, agent_bundles):
    """Something else eats the space after the check: the write fails with ENOSPC mid-stream."""
    store = Store(small_disk / "state", _keyring(agent_bundles))
    store.install(agent_bundles["v1"])
    liar = Store(small_disk / "state", _keyring(agent_bundles), disk_free=lambda _p: 1 << 40)
    with pytest.raises(InstallError) as e:
        liar.install(agent_bundles["v2"])
    assert e.value.step == "stage" and "No space left" in str(e.value)
    assert assert_whole(liar, {1}) == 1
    assert shutil.disk_usage(small_disk).free > 100 << 20  # the partial copy was removed
