"""The store's own logic (agent/store.py) on a tmp dir with small signed bundles: pointers,
recovery of an interrupted switch, rollback, removal, garbage collection, the resource checks and
the state-file guards. No model; kills and full disks are in tests/integration/test_store_faults.py.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path

import pytest

from agent.bundle import Keyring
from agent.errors import InstallError, InsufficientResourcesError, StoreError
from agent.store import DISK_MARGIN_BYTES, Store

GIB = 1 << 30


def make_store(root: Path, keyring: Keyring, **kw) -> Store:
    return Store(root / "state", keyring, ram_total=lambda: 8 * GIB, **kw)


def pointers(store: Store) -> dict:
    return json.loads((store.state_dir / "pointers.json").read_bytes())


def slots(store: Store) -> set[str]:
    return {d.name for d in store.slots_dir.iterdir()}


@pytest.fixture
def store(tmp_path: Path, keyring: Keyring) -> Store:
    return make_store(tmp_path, keyring)


def test_a_new_store_is_empty(store: Store):
    assert store.current() is None and store.previous() is None and store.list() == []
    assert store.high_water("tiny") == (None, None) and store.recovered is None
    with pytest.raises(StoreError, match="no previous bundle"):
        store.rollback()


def test_install_switches_pointers_and_records_the_high_water_mark(store: Store, make_bundle):
    events: list[str] = []
    first = store.install(make_bundle(version=1), on_event=lambda e, _d: events.append(e))
    assert events == ["verified", "staged", "switched", "committed"]
    assert first.previous is None and not first.already_installed
    second = store.install(make_bundle(version=2), load_check=lambda b: {"load_ms": 1.0})
    assert second.previous is not None and second.previous.slot == first.bundle.slot
    assert second.check == {"load_ms": 1.0}
    assert pointers(store) == {"current": second.bundle.slot, "previous": first.bundle.slot,
                               "pending": False}
    assert store.high_water("tiny") == (2, second.bundle.digest)
    assert second.bundle.slot == second.bundle.digest[:16]
    assert {(b.manifest.version, role) for b, role in store.list()} == {(1, "previous"), (2, "current")}


def test_installing_the_current_bundle_again_changes_nothing(store: Store, make_bundle):
    bundle = make_bundle(version=1)
    first = store.install(bundle)
    events: list[str] = []
    again = store.install(bundle, on_event=lambda e, _d: events.append(e))
    assert again.already_installed and again.bundle.slot == first.bundle.slot
    assert events == ["verified"]  # nothing staged or switched
    assert pointers(store)["current"] == first.bundle.slot


def test_install_reads_a_stream_as_well_as_a_path(store: Store, make_bundle):
    data = make_bundle(version=1).read_bytes()
    assert store.install(io.BytesIO(data)).bundle.manifest.version == 1


def test_an_unreadable_bundle_path_is_an_install_error(store: Store, tmp_path: Path):
    with pytest.raises(InstallError, match="cannot read bundle") as e:
        store.install(tmp_path / "absent.bundle")
    assert e.value.step == "read"


def test_only_current_and_previous_are_kept(store: Store, make_bundle):
    results = [store.install(make_bundle(version=v)) for v in (1, 2, 3)]
    assert slots(store) == {results[2].bundle.slot, results[1].bundle.slot}


def test_rollback_swaps_current_and_previous_both_ways(store: Store, make_bundle):
    v1 = store.install(make_bundle(version=1)).bundle
    v2 = store.install(make_bundle(version=2)).bundle
    assert store.rollback().slot == v1.slot
    assert (store.current().slot, store.previous().slot) == (v1.slot, v2.slot)  # type: ignore[union-attr]
    assert store.rollback().slot == v2.slot  # and forward again
    # The high-water mark is untouched: rollback is the local way back, not a downgrade.
    assert store.high_water("tiny")[0] == 2


def test_a_failed_load_check_restores_both_pointers_and_drops_the_slot(store: Store, make_bundle):
    v1 = store.install(make_bundle(version=1)).bundle
    v2 = store.install(make_bundle(version=2)).bundle

    def broken(_b):
        raise RuntimeError("does not load")

    events: list[str] = []
    with pytest.raises(InstallError, match="does not load") as e:
        store.install(make_bundle(version=3), load_check=broken, on_event=lambda n, _d: events.append(n))
    assert e.value.rolled_back and e.value.step == "load_check"
    assert events[-1] == "rolled_back"
    assert pointers(store) == {"current": v2.slot, "previous": v1.slot, "pending": False}
    assert slots(store) == {v1.slot, v2.slot} and store.high_water("tiny")[0] == 2


# --- recovery on start ------------------------------------------------------------------------------


def test_leftover_staging_is_wiped_on_start(tmp_path: Path, keyring: Keyring):
    store = make_store(tmp_path, keyring)
    partial = store.staging_dir / "abc.partial"
    (partial / "payload").mkdir(parents=True)
    (partial / "payload" / "model.bin").write_bytes(b"half")
    again = make_store(tmp_path, keyring)
    assert list(again.staging_dir.iterdir()) == [] and again.recovered is None


class Killed(BaseException):
    """Stands in for SIGKILL during the load check: no ``except Exception`` clause runs, so the
    state on disk is what a killed agent leaves (the flock goes with the process either way)."""


def killed(_bundle):
    raise Killed


def test_a_switch_killed_during_its_load_check_is_undone_on_start(tmp_path: Path, keyring: Keyring,
                                                                    make_bundle):
    store = make_store(tmp_path, keyring)
    v1 = store.install(make_bundle(version=1)).bundle
    v2 = store.install(make_bundle(version=2)).bundle
    with pytest.raises(Killed):
        store.install(make_bundle(version=3), load_check=killed)
    [v3] = slots(store) - {v1.slot, v2.slot}
    assert pointers(store) == {"current": v3, "previous": v2.slot, "pending": True}
    restarted = make_store(tmp_path, keyring)
    assert pointers(restarted) == {"current": v2.slot, "previous": v1.slot, "pending": False}
    assert v3 in (restarted.recovered or "") and slots(restarted) == {v1.slot, v2.slot}
    assert restarted.high_water("tiny")[0] == 2  # v3 never committed
    assert restarted.rollback().slot == v1.slot  # both pointers restored, so rollback still works


def test_a_first_install_killed_during_its_load_check_leaves_nothing_current(
        tmp_path: Path, keyring: Keyring, make_bundle):
    store = make_store(tmp_path, keyring)
    with pytest.raises(Killed):
        store.install(make_bundle(version=1), load_check=killed)
    restarted = make_store(tmp_path, keyring)
    assert restarted.current() is None and restarted.previous() is None
    assert restarted.recovered is not None and slots(restarted) == set()
    assert restarted.install(make_bundle(version=1)).bundle.manifest.version == 1


def test_a_committed_state_is_left_alone_on_start(tmp_path: Path, keyring: Keyring, make_bundle):
    store = make_store(tmp_path, keyring)
    v1 = store.install(make_bundle(version=1)).bundle
    v2 = store.install(make_bundle(version=2)).bundle
    restarted = make_store(tmp_path, keyring)
    assert restarted.recovered is None
    assert pointers(restarted) == {"current": v2.slot, "previous": v1.slot, "pending": False}


# --- remove -------------------------------------------------------------------------------------------


def test_remove_deletes_the_previous_bundle_and_its_pointer(store: Store, make_bundle):
    v1 = store.install(make_bundle(version=1)).bundle
    v2 = store.install(make_bundle(version=2)).bundle
    with pytest.raises(StoreError, match="is the current bundle"):
        store.remove(v2.slot[:8])
    store.remove(v1.slot[:8])  # a unique prefix is enough
    assert slots(store) == {v2.slot} and pointers(store)["previous"] is None
    with pytest.raises(StoreError, match="no single installed bundle"):
        store.remove(v1.slot)


def test_remove_refuses_an_ambiguous_prefix(store: Store, make_bundle):
    store.install(make_bundle(version=1))
    store.install(make_bundle(version=2))
    with pytest.raises(StoreError, match="no single installed bundle"):
        store.remove("")


# --- resource checks (before anything is written) -----------------------------------------------------


def test_arch_spellings_are_normalized(tmp_path: Path, keyring: Keyring, make_bundle):
    store = make_store(tmp_path, keyring, arch="amd64")
    assert store.install(make_bundle(version=1, arch=("x86_64",))).bundle.manifest.version == 1
    with pytest.raises(InstallError, match="this device is x86_64") as e:
        store.install(make_bundle(version=2, arch=("aarch64",)))
    assert e.value.step == "check"


def test_ram_check_allows_exactly_enough(tmp_path: Path, keyring: Keyring, make_bundle):
    store = make_store(tmp_path, keyring)
    assert store.install(make_bundle(version=1, min_ram=8 * GIB)).bundle.manifest.version == 1
    with pytest.raises(InsufficientResourcesError) as e:
        store.install(make_bundle(version=2, min_ram=8 * GIB + 1))
    assert (e.value.resource, e.value.needed, e.value.available) == ("ram", 8 * GIB + 1, 8 * GIB)


def test_disk_check_wants_the_payload_plus_a_margin(tmp_path: Path, keyring: Keyring, make_bundle):
    bundle = make_bundle(version=1)
    free = {"bytes": 0}
    store = make_store(tmp_path, keyring, disk_free=lambda _p: free["bytes"])
    need = len(b"weights v1" * 1000) + DISK_MARGIN_BYTES  # the factory's default payload
    free["bytes"] = need - 1
    with pytest.raises(InsufficientResourcesError) as e:
        store.install(bundle)
    assert (e.value.resource, e.value.needed, e.value.available) == ("disk", need, need - 1)
    assert list(store.slots_dir.iterdir()) == [] and list(store.staging_dir.iterdir()) == []
    free["bytes"] = need
    assert store.install(bundle).bundle.manifest.version == 1


# --- guards on the state files ------------------------------------------------------------------------


def test_a_second_operation_while_one_holds_the_lock_is_refused(store: Store, make_bundle):
    store.install(make_bundle(version=1))
    store.install(make_bundle(version=2))
    fd = os.open(store.state_dir / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's install, as far as the store can tell
        with pytest.raises(StoreError, match="another install or rollback"):
            store.rollback()
    finally:
        os.close(fd)
    assert store.rollback().manifest.version == 1  # the lock released: it goes through


def test_a_damaged_pointers_file_is_a_store_error(tmp_path: Path, keyring: Keyring, make_bundle):
    store = make_store(tmp_path, keyring)
    store.install(make_bundle(version=1))
    (store.state_dir / "pointers.json").write_text('{"current": ')
    with pytest.raises(StoreError, match="unreadable") as e:
        store.current()
    assert "atomically" in e.value.diagnostics()


@pytest.mark.parametrize("slot", ["../../etc", ".hidden", "a/b"])
def test_a_pointer_cannot_name_a_path_outside_the_slots(tmp_path: Path, keyring: Keyring, slot: str):
    store = make_store(tmp_path, keyring)
    (store.state_dir / "pointers.json").write_text(json.dumps(
        {"current": slot, "previous": None, "pending": False}))
    with pytest.raises(StoreError, match="bad slot id"):
        store.current()


def test_a_pointer_to_a_missing_slot_is_a_store_error(tmp_path: Path, keyring: Keyring):
    store = make_store(tmp_path, keyring)
    (store.state_dir / "pointers.json").write_text(json.dumps(
        {"current": "0123456789abcdef", "previous": None, "pending": False}))
    with pytest.raises(StoreError, match="missing or damaged"):
        store.current()
