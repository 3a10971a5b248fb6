"""SIGKILL at every step of an install and a rollback, at deterministic points (issue 12, item 8).

The store numbers each step that changes the disk (agent/_crashpoint.py): every payload file
created, every MiB written, every fsync and rename, every pointer write, the load check, the garbage
collection. A first run of each scenario lists its steps (``EDGEPACK_TEST_CRASH_TRACE``); then one
child process per step (tests/crashchild.py, a real process) is killed for real at that step
(``EDGEPACK_TEST_CRASH_AT``), and the store is opened again as a restarted agent would. After each
restart:

- exactly the old or the new state serves, and which one is decided by the step: the new one from
  the commit's rename on, the old one before it (a failed load check: always the old one);
- the current and previous bundles are complete and verifiable (signature over the slot's manifest,
  every file's length and sha256, no extra file), the high-water mark is right, nothing is pending;
- no debris: the state folder holds exactly the two slots, the pointers and the lock (and for a
  streamed install, the one partial of its download, kept to resume: agent/partial.py);
- the interrupted operation can simply be run again — a streamed one continues from the byte its
  journal reached — and a replay of an older version is refused.

Scenarios use a small made-up bundle of five files (a few MiB, so each MiB is a step), read from a
file or streamed from a loopback HTTP server as the MQTT installer does; the real model (the tiny
Phi-3 through the real ``edgepack-agent`` and llama.cpp) is killed at a few steps, and the real
sample in tests/integration/test_store_faults.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bundlekit import make_manifest, partial_offset

from agent._fs import file_digest
from agent.bundle import Keyring, SigningKey, verify_manifest
from agent.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME
from agent.errors import DowngradeError
from agent.store import Store
from fleet.serve import BundleServer
from packager.bundler import file_entries, write_bundle

pytestmark = pytest.mark.integration

CHILD = str(Path(__file__).parents[1] / "crashchild.py")
AGENT = str(Path(sys.executable).parent / "edgepack-agent")
MIB = 1 << 20
SLOT_FILES = {MANIFEST_NAME, SIGNATURE_NAME, "previous.json", "gate.json"}


# --- the made-up bundles ------------------------------------------------------------------------


def payload(version: int) -> dict[str, bytes]:
    rnd = random.Random(version)
    return {
        "model.bin": rnd.randbytes(3 * MIB + 123),  # four MiB steps, the last one short
        "weights/extra.bin": rnd.randbytes(2 * MIB),
        "tokenizer.json": rnd.randbytes(2048),
        "config.json": b'{"v": %d}' % version,
        "nested/deep/vocab.txt": rnd.randbytes(5000),
    }


@dataclass(frozen=True)
class Kit:
    bundles: dict[int, Path]  # version -> bundle
    keyring: Path
    keys: Keyring
    server: BundleServer | None = None  # serves the bundles over HTTP on loopback


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    key = SigningKey.generate("crash-tests")
    d = tmp_path_factory.mktemp("crash-bundles")
    bundles = {}
    for v in (1, 2, 3):
        files = {}
        for name, data in payload(v).items():
            p = d / f"src{v}" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            files[name] = p
        m = make_manifest(file_entries(files), key, version=v)
        bundles[v] = d / f"tiny-v{v}.bundle"
        write_bundle(bundles[v], m, key, files)
    keys = Keyring([key.public])
    keyring = d / "keyring.json"
    keyring.write_bytes(keys.to_bytes())
    with BundleServer(d) as server:
        yield Kit(bundles, keyring, keys, server)


def open_store(state: Path, kit: Kit) -> Store:
    return Store(state, kit.keys, ram_total=lambda: 1 << 34)


def passing_check(bundle: Any) -> dict[str, Any]:
    return {}


# --- base states, built without faults ----------------------------------------------------------


def base_empty(state: Path, kit: Kit) -> None:
    open_store(state, kit)


def base_v1_v2(state: Path, kit: Kit) -> None:
    s = open_store(state, kit)
    s.install(kit.bundles[1])
    s.install(kit.bundles[2])


def base_rolled_back(state: Path, kit: Kit) -> None:
    base_v1_v2(state, kit)
    open_store(state, kit).rollback()  # current v1, previous v2, high-water 2


def base_legacy(state: Path, kit: Kit) -> None:
    """v1, v2 as an older agent left them: pointers without versions, and versions.json."""
    import json

    base_v1_v2(state, kit)
    doc = json.loads((state / "pointers.json").read_bytes())
    (state / "versions.json").write_text(json.dumps(doc.pop("versions")))
    (state / "pointers.json").write_text(json.dumps(doc))


def base_legacy_window(state: Path, kit: Kit) -> None:
    """An older agent killed between its commit of v2 and its versions.json write."""
    import json

    base_legacy(state, kit)
    v1 = json.loads((state / "pointers.json").read_bytes())["previous"]
    digest = file_digest(state / "slots" / v1 / MANIFEST_NAME).sha256
    (state / "versions.json").write_text(json.dumps({"tiny": {"version": 1, "digest": digest}}))


# --- scenarios ----------------------------------------------------------------------------------

State = tuple[int | None, int | None, int | None]  # current version, previous version, high-water


@dataclass(frozen=True)
class Scenario:
    name: str
    base: Callable[[Path, Kit], None]
    op: str  # install | stream | rollback | open (tests/crashchild.py)
    version: int | None  # the bundle an install installs
    old: State
    new: State | None  # None: the operation never commits (its load check fails)
    fail_check: bool = False

    def args(self, state: Path, kit: Kit) -> list[str]:
        a = [sys.executable, CHILD, str(state), str(kit.keyring), self.op]
        if self.op == "stream":
            assert kit.server is not None and self.version is not None
            bundle = kit.bundles[self.version]
            a += [kit.server.url_for(bundle.name), file_digest(bundle).sha256, str(bundle.stat().st_size)]
        elif self.version is not None:
            a.append(str(kit.bundles[self.version]))
        return a + (["--fail-check"] if self.fail_check else [])


SCENARIOS = [
    Scenario("first install", base_empty, "install", 1, (None, None, None), (1, None, 1)),
    Scenario("first install, load check fails", base_empty, "install", 1, (None, None, None), None,
             fail_check=True),
    Scenario("upgrade v2 -> v3, v1 collected", base_v1_v2, "install", 3, (2, 1, 2), (3, 2, 3)),
    # As the MQTT installer does it: the download streamed into the stager, one copy on disk.
    Scenario("upgrade v2 -> v3 streamed over HTTP", base_v1_v2, "stream", 3, (2, 1, 2), (3, 2, 3)),
    Scenario("upgrade v2 -> v3, load check fails", base_v1_v2, "install", 3, (2, 1, 2), None,
             fail_check=True),
    Scenario("rollback v2 -> v1", base_v1_v2, "rollback", None, (2, 1, 2), (1, 2, 2)),
    Scenario("reinstall of the previous bundle", base_rolled_back, "install", 2, (1, 2, 2), (2, 1, 2)),
    Scenario("reinstall of the previous bundle, load check fails", base_rolled_back, "install", 2,
             (1, 2, 2), None, fail_check=True),
    Scenario("upgrade of an older agent's store", base_legacy, "install", 3, (2, 1, 2), (3, 2, 3)),
    # Opening a store an older agent left in its downgrade window raises the mark; no kill undoes it.
    Scenario("repair of an older agent's window", base_legacy_window, "open", None, (2, 1, 2),
             (2, 1, 2)),
]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_TEST_CRASH")}
    tests = str(Path(__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def trace(sc: Scenario, base: Path, work: Path, kit: Kit) -> list[str]:
    """The scenario's numbered steps, from one uninterrupted run."""
    state = work / "trace"
    shutil.copytree(base, state)
    log = work / "trace.log"
    r = subprocess.run(sc.args(state, kit), env=child_env(EDGEPACK_TEST_CRASH_TRACE=str(log)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == (3 if sc.fail_check else 0), r.stderr
    steps = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    check_state(open_store(state, kit), kit, sc.new or sc.old)
    shutil.rmtree(state)
    return steps


def commit_index(sc: Scenario, steps: list[str]) -> int:
    """The 1-based step from which on the new state must serve (len+1: never)."""
    if sc.new is None:
        return len(steps) + 1
    if sc.op == "open":
        return 0
    return max(i for i, s in enumerate(steps, 1) if s == "pointers.json: renamed")


# --- what must hold after every restart ---------------------------------------------------------


def version_of(store: Store, which: str) -> int | None:
    b = store.current() if which == "current" else store.previous()
    return b.manifest.version if b else None


def check_bundle(store: Store, kit: Kit, slot: str) -> set[Path]:
    """The slot verifies and is complete; returns the files it may hold."""
    d = store.slots_dir / slot
    manifest = verify_manifest((d / MANIFEST_NAME).read_bytes(), (d / SIGNATURE_NAME).read_bytes(),
                               kit.keys)
    allowed = {d / name for name in SLOT_FILES}
    for f in manifest.files:
        got = file_digest(d / "payload" / f.path)
        assert (got.sha256, got.size) == (f.sha256, f.size), f"{slot}: {f.path} is damaged"
        allowed.add(d / "payload" / f.path)
    return allowed


def kept_partial(store: Store) -> Path | None:
    """The partial a streamed install keeps to resume from (agent/partial.py), if any."""
    dirs = [d for d in store.staging_dir.iterdir() if d.is_dir()]
    assert len(dirs) <= 1, f"more than one partial kept: {dirs}"
    return dirs[0] if dirs else None


def check_state(store: Store, kit: Kit, want: State, *, partial_of: Path | None = None) -> None:
    """``partial_of``: the bundle a streamed install was killed on; its partial may be kept."""
    cur, prev = store.current(), store.previous()
    got = (version_of(store, "current"), version_of(store, "previous"), store.high_water("tiny")[0])
    assert got == want, f"(current, previous, high-water) is {got}, expected {want}"
    allowed = {store.state_dir / "pointers.json", store.state_dir / "lock"}
    for b in (cur, prev):
        if b is not None:
            allowed |= check_bundle(store, kit, b.slot)
    part = kept_partial(store) if partial_of is not None else None
    if part is not None:
        # Only the partial of the download that was killed, and its journal: nothing else grows.
        assert part.name == f"partial-{file_digest(partial_of).sha256}", part.name  # type: ignore[arg-type]
        allowed |= {p for p in part.rglob("*")} | {part.with_name(part.name + ".journal.json")}
        assert {p.name for p in store.staging_dir.iterdir()} <= {part.name, part.name + ".journal.json"}
    files = {p for p in store.state_dir.rglob("*") if p.is_file()}
    assert files <= allowed, f"debris: {sorted(str(p.relative_to(store.state_dir)) for p in files - allowed)}"
    if part is None:
        assert list(store.staging_dir.iterdir()) == []
    assert {d.name for d in store.slots_dir.iterdir()} == {b.slot for b in (cur, prev) if b}
    assert not store._pointers_get().get("pending")


def retry(sc: Scenario, store: Store, kit: Kit) -> int:
    """Run the interrupted operation again, as an operator (or the rollout) would; returns the
    byte a streamed install's download started at (it resumes from the kept partial)."""
    if sc.op == "stream":
        from agent.fetch import open_download

        assert kit.server is not None and sc.version is not None
        bundle = kit.bundles[sc.version]
        digest, size = file_digest(bundle).sha256, bundle.stat().st_size
        starts: list[int] = []

        def open_stream(start: int, prefix: Any) -> Any:
            starts.append(start)
            assert kit.server is not None
            return open_download(kit.server.url_for(bundle.name), sha256=digest, size=size,
                                 timeout=10.0, start=start, prefix=prefix)

        store.install_download(digest, size, open_stream, load_check=passing_check)
        return starts[0]
    if sc.op == "install" and not sc.fail_check:
        store.install(kit.bundles[sc.version or 0], load_check=passing_check)
    elif sc.op == "rollback":
        store.rollback()
    return 0


@dataclass
class Point:
    scenario: str
    n: int
    step: str
    outcome: str = ""
    resumed_from: int = 0  # a streamed install's retry started its download at this byte
    error: str = ""
    seconds: float = 0.0


# A child forked by one thread holds copies of the other thread's descriptors until it execs, the
# store's flock among them: spawning and the parent's own store calls take turns.
_FORK = threading.Lock()


def spawn(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    with _FORK:
        p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def run_point(sc: Scenario, base: Path, work: Path, kit: Kit, n: int, step: str, cut: int) -> Point:
    pt = Point(sc.name, n, step)
    t0 = time.monotonic()
    state = work / f"p{n}"
    shutil.copytree(base, state)
    try:
        r = spawn(sc.args(state, kit), child_env(EDGEPACK_TEST_CRASH_AT=str(n)))
        assert r.returncode == -signal.SIGKILL, f"not killed at step {n}: rc={r.returncode} {r.stderr}"
        with _FORK:
            check_restart(sc, state, kit, n, cut, pt)
    except (Exception, pytest.fail.Exception) as e:  # recorded: the test reports every failed point
        pt.error = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(state, ignore_errors=True)
        pt.seconds = time.monotonic() - t0
    return pt


def check_restart(sc: Scenario, state: Path, kit: Kit, n: int, cut: int, pt: Point) -> None:
    """Open the killed store as a restarted agent would, and check everything that must hold."""
    store = open_store(state, kit)  # the restart: recovery runs here
    want = sc.new if (sc.new is not None and n >= cut) else sc.old
    streamed = kit.bundles[sc.version] if sc.op == "stream" and sc.version else None
    check_state(store, kit, want, partial_of=streamed)
    pt.outcome = "new" if want is sc.new and sc.new != sc.old else "old"
    if want is sc.old and sc.new is not None:
        part = kept_partial(store) if streamed else None
        expect = partial_offset(store.staging_dir) if part is not None else 0
        pt.resumed_from = retry(sc, store, kit)
        # The retry continues from the last checkpoint the kill left, not from byte 0.
        assert pt.resumed_from == expect, (pt.resumed_from, expect)
    final = sc.new or sc.old
    store = open_store(state, kit)
    check_state(store, kit, final)
    hw = final[2]
    if hw is not None and hw >= 2:
        # The high-water mark holds across the kill: an older version from outside is refused.
        with pytest.raises(DowngradeError):
            store.install(kit.bundles[hw - 1])


def test_sigkill_at_every_step_of_install_and_rollback_leaves_old_or_new_whole(tmp_path, kit):
    t0 = time.monotonic()
    jobs = []
    for i, sc in enumerate(SCENARIOS):
        work = tmp_path / f"s{i}"
        base = work / "base"
        sc.base(base, kit)
        steps = trace(sc, base, work, kit)
        assert steps, sc.name
        cut = commit_index(sc, steps)
        jobs += [(sc, base, work, n, step, cut) for n, step in enumerate(steps, 1)]
    # Two children at a time: the machine is shared, and each point is one short process.
    with ThreadPoolExecutor(max_workers=2) as pool:
        points = list(pool.map(lambda j: run_point(j[0], j[1], j[2], kit, *j[3:]), jobs))
    failed = [p for p in points if p.error]
    summary = {sc.name: sum(1 for p in points if p.scenario == sc.name) for sc in SCENARIOS}
    print(f"{len(points)} crash points in {time.monotonic() - t0:.1f}s: {summary}")
    assert not failed, "\n".join(f"{p.scenario} step {p.n} ({p.step}): {p.error}" for p in failed[:10])
    assert len(points) >= 200, summary
    # Every phase was hit: staging each MiB, each fsync and rename, the load check, the commit, gc.
    names = {p.step for p in points}
    for phase in ("verified", "stage model.bin: 2097152 bytes written", "stage model.bin: fsynced",
                  "fsync folder payload/nested/deep", "staging renamed to its slot", "staged",
                  "previous.json: temp fsynced", "load check starts", "load check passed",
                  "switched back", "pointers.json: temp written", "pointers.json: renamed",
                  "rollback starts", "rolled back", "committed"):
        assert phase in names, phase
    assert any(n.startswith("removing unused slot") for n in names)
    # Both outcomes occur in the committing scenarios: the cut is real, not all-old or all-new.
    assert {p.outcome for p in points if p.scenario == "first install"} == {"old", "new"}
    # A streamed install killed mid-download resumes: from inside a file (the child checkpoints
    # every MiB) and from a file boundary, at many distinct bytes.
    resumed = {p.resumed_from for p in points if p.scenario.endswith("over HTTP")}
    size = kit.bundles[3].stat().st_size
    assert len(resumed - {0}) >= 5 and max(resumed) > size // 2, sorted(resumed)


def test_a_kill_right_after_the_commit_keeps_the_new_high_water_mark(tmp_path, kit):
    """The downgrade window of item 2: the commit's rename is the last thing before the kill."""
    sc = SCENARIOS[2]  # v2 -> v3
    base = tmp_path / "base"
    sc.base(base, kit)
    steps = trace(sc, base, tmp_path, kit)
    cut = commit_index(sc, steps)
    assert steps[cut - 2] == "pointers.json: temp fsynced"
    for n, want in ((cut - 1, sc.old), (cut, sc.new)):
        state = tmp_path / f"k{n}"
        shutil.copytree(base, state)
        r = subprocess.run(sc.args(state, kit), env=child_env(EDGEPACK_TEST_CRASH_AT=str(n)),
                           capture_output=True, timeout=120)
        assert r.returncode == -signal.SIGKILL
        store = open_store(state, kit)
        check_state(store, kit, want)  # type: ignore[arg-type]
        with pytest.raises(DowngradeError):  # v2 offered again after v3's commit: a replay
            store.install(kit.bundles[2]) if want == sc.new else store.install(kit.bundles[1])


def test_a_kill_during_recovery_is_recovered_on_the_next_start(tmp_path, kit):
    """A start that is itself killed while undoing an interrupted switch: the next start finishes."""
    sc = SCENARIOS[2]
    base = tmp_path / "base"
    sc.base(base, kit)
    steps = trace(sc, base, tmp_path, kit)
    pending_at = steps.index("load check starts") + 1  # switched, pending, load check not done
    crashed = tmp_path / "crashed"
    shutil.copytree(base, crashed)
    r = subprocess.run(sc.args(crashed, kit), env=child_env(EDGEPACK_TEST_CRASH_AT=str(pending_at)),
                       capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    opener = Scenario("recovery", base_empty, "open", None, sc.old, sc.old)
    log = tmp_path / "recovery.log"
    probe = tmp_path / "probe"
    shutil.copytree(crashed, probe)
    subprocess.run(opener.args(probe, kit), env=child_env(EDGEPACK_TEST_CRASH_TRACE=str(log)),
                   check=True, timeout=120)
    n_steps = len(log.read_text().splitlines())
    assert n_steps >= 4  # the pointer write's steps and the removal of the failed slot
    for n in range(1, n_steps + 1):
        state = tmp_path / f"r{n}"
        shutil.copytree(crashed, state)
        r = subprocess.run(opener.args(state, kit), env=child_env(EDGEPACK_TEST_CRASH_AT=str(n)),
                           capture_output=True, timeout=120)
        assert r.returncode == -signal.SIGKILL
        check_state(open_store(state, kit), kit, sc.old)
        shutil.rmtree(state)


# --- the real model, the real agent, a few points ------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_the_real_agent_installing_the_real_model(tmp_path, tiny_bundles):
    """``edgepack-agent install`` with llama.cpp's load and the gate, killed at chosen steps."""
    keys = Keyring.from_bytes(tiny_bundles["keyring"].read_bytes())
    base = tmp_path / "base"
    Store(base, keys).install(tiny_bundles["v1"])

    def run(state: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AGENT, "--state-dir", str(state), "--keyring", str(tiny_bundles["keyring"]),
                               "install", str(tiny_bundles["v2"])], env=child_env(**env),
                              capture_output=True, text=True, timeout=300)

    log = tmp_path / "trace.log"
    shutil.copytree(base, tmp_path / "trace")
    assert run(tmp_path / "trace", EDGEPACK_TEST_CRASH_TRACE=str(log)).returncode == 0
    steps = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    commit = max(i for i, s in enumerate(steps, 1) if s == "pointers.json: renamed")
    chosen = {
        next(i for i, s in enumerate(steps, 1) if s.startswith("stage ") and "bytes written" in s),
        steps.index("staged") + 1,
        steps.index("load check starts") + 1,  # llama.cpp loading, the gate running
        steps.index("load check passed") + 1,
        commit - 1, commit, len(steps),
    }
    for n in sorted(chosen):
        state = tmp_path / f"p{n}"
        shutil.copytree(base, state)
        r = run(state, EDGEPACK_TEST_CRASH_AT=str(n))
        assert r.returncode == -signal.SIGKILL, r.stderr
        store = Store(state, keys)
        cur = store.current()
        want = 2 if n >= commit else 1
        assert cur is not None and cur.manifest.version == want, (n, steps[n - 1])
        assert store.high_water(cur.manifest.model_name)[0] == want
        for b in (cur, store.previous()):
            if b is not None:
                for f in b.manifest.files:
                    assert file_digest(b.payload_dir / f.path).sha256 == f.sha256
        assert list(store.staging_dir.iterdir()) == []
        assert len(list(store.slots_dir.iterdir())) == (2 if want == 2 else 1)
        if want == 1:
            assert run(state).returncode == 0  # retried: it goes through
        shutil.rmtree(state)
