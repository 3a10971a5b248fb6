"""Faults during install, for real: the agent killed with SIGKILL at chosen steps, and a full disk.

After each fault the device must serve either the old or the new bundle, whole (every file's sha256
matches its manifest), with no staging leftovers, and say why. The hundreds of steps of a small
made-up bundle are killed in tests/integration/test_crash_points.py; here the real sample is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
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


def test_sigkill_at_chosen_steps_of_a_real_install_leaves_old_or_new_whole(tmp_path, agent_bundles):
    """The real agent installing the real sample, killed at numbered steps (agent/_crashpoint.py):
    in the middle of staging, after it, during the load check and gate, on each side of the commit.
    The step decides the outcome: v2 from the commit's rename on, v1 before it."""
    base = tmp_path / "base"
    keys = _keyring(agent_bundles)
    Store(base, keys).install(agent_bundles["v1"])

    def install(state: Path, **env: str) -> int:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_TEST_")}, **env}
        return subprocess.run([AGENT, "--state-dir", str(state), "--keyring",
                               str(agent_bundles["keyring"]), "install", str(agent_bundles["v2"])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              timeout=600).returncode

    # The control: the same install, not interrupted, commits v2; its steps are listed.
    shutil.copytree(base, tmp_path / "trace")
    log = tmp_path / "trace.log"
    assert install(tmp_path / "trace", EDGEPACK_TEST_CRASH_TRACE=str(log)) == 0
    steps = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    staging = [i for i, s in enumerate(steps, 1) if s.startswith("stage ") and "bytes written" in s]
    commit = max(i for i, s in enumerate(steps, 1) if s == "pointers.json: renamed")
    chosen = sorted({staging[len(staging) // 2], steps.index("staged") + 1,
                     steps.index("load check starts") + 1, steps.index("load check passed") + 1,
                     commit - 1, commit})
    for n in chosen:
        state = tmp_path / f"s{n}"
        shutil.copytree(base, state)
        assert install(state, EDGEPACK_TEST_CRASH_AT=str(n)) == -signal.SIGKILL
        store = Store(state, keys)  # a restart: recovery runs here
        want = 2 if n >= commit else 1
        assert assert_whole(store, {want}) == want, (n, steps[n - 1])
        hw = store.high_water(store.current().manifest.model_name)  # type: ignore[union-attr]
        assert hw[0] == want
        assert len(list(store.slots_dir.iterdir())) == want  # v1 alone, or v2 and v1 (no debris)
        if want == 1:
            # The interrupted install can simply be retried.
            assert store.install(agent_bundles["v2"]).bundle.manifest.version == 2
        shutil.rmtree(state)


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
