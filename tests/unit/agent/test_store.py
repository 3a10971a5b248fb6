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
    """The A/B pointers, without the high-water marks that share their file."""
    doc = json.loads((store.state_dir / "pointers.json").read_bytes())
    doc.pop("versions", None)
    return doc


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


def test_opening_while_another_process_installs_reads_without_recovering(tmp_path: Path,
                                                                         keyring: Keyring, make_bundle):
    store = make_store(tmp_path, keyring)
    v1 = store.install(make_bundle(version=1)).bundle
    partial = store.staging_dir / "in-progress"
    partial.mkdir()
    fd = os.open(store.state_dir / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # an install streaming its download elsewhere
        reader = make_store(tmp_path, keyring)  # e.g. `edgepack-agent status` meanwhile
        assert reader.current().slot == v1.slot  # type: ignore[union-attr]
        assert partial.is_dir() and reader.recovered is None  # its staging is not a crash's
    finally:
        os.close(fd)
    make_store(tmp_path, keyring)
    assert not partial.exists()  # once nobody holds the lock, leftovers are wiped


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


# --- the high-water mark commits with the pointers (issue 12, item 2) ----------------------------


def state_doc(store: Store) -> dict:
    return json.loads((store.state_dir / "pointers.json").read_bytes())


def test_the_high_water_mark_is_written_in_the_commit_of_the_pointers(store: Store, make_bundle):
    v1 = store.install(make_bundle(version=1)).bundle
    assert state_doc(store)["versions"] == {"tiny": {"version": 1, "digest": v1.digest}}
    assert not (store.state_dir / "versions.json").exists()  # one file, one rename

    seen: list[dict] = []

    def look(_b):  # during the load check the switch is pending and the mark not yet raised
        seen.append(state_doc(store))

    v2 = store.install(make_bundle(version=2), load_check=look).bundle
    assert seen[0]["pending"] and seen[0]["versions"]["tiny"]["version"] == 1
    assert state_doc(store) == {"current": v2.slot, "previous": v1.slot, "pending": False,
                                "versions": {"tiny": {"version": 2, "digest": v2.digest}}}


def test_an_old_stores_versions_file_is_read_then_merged(tmp_path: Path, keyring: Keyring,
                                                         make_bundle):
    store = make_store(tmp_path, keyring)
    v1 = store.install(make_bundle(version=1)).bundle
    # What an older agent wrote: pointers without versions, and versions.json beside them.
    (store.state_dir / "pointers.json").write_text(json.dumps(
        {"current": v1.slot, "previous": None, "pending": False}))
    (store.state_dir / "versions.json").write_text(json.dumps(
        {"tiny": {"version": 1, "digest": v1.digest}, "other": {"version": 7, "digest": "d" * 64}}))
    again = make_store(tmp_path, keyring)
    assert again.high_water("other") == (7, "d" * 64) and again.high_water("tiny") == (1, v1.digest)
    assert not (again.state_dir / "versions.json").exists()  # merged into pointers.json
    assert state_doc(again)["versions"]["other"]["version"] == 7


def test_an_old_store_killed_between_commit_and_versions_is_repaired_and_refuses_the_replay(
        tmp_path: Path, keyring: Keyring, make_bundle):
    """The window of older agents: v2 committed, versions.json still says v1."""
    from agent.errors import DowngradeError

    store = make_store(tmp_path, keyring)
    first = make_bundle(version=1)
    v1 = store.install(first).bundle
    v2 = store.install(make_bundle(version=2)).bundle
    (store.state_dir / "pointers.json").write_text(json.dumps(
        {"current": v2.slot, "previous": v1.slot, "pending": False}))
    (store.state_dir / "versions.json").write_text(json.dumps(
        {"tiny": {"version": 1, "digest": v1.digest}}))
    again = make_store(tmp_path, keyring)
    assert again.high_water("tiny") == (2, v2.digest)
    again.rollback()  # the local way back is still open ...
    with pytest.raises(DowngradeError):  # ... a replay of v1 from outside is not
        again.install(make_bundle(version=1))


def test_temp_files_and_unreferenced_slots_are_removed_on_start(tmp_path: Path, keyring: Keyring,
                                                                make_bundle):
    store = make_store(tmp_path, keyring)
    v1 = store.install(make_bundle(version=1)).bundle
    (store.state_dir / ".pointers.json.x1.tmp").write_text("{")
    (v1.path / ".gate.json.x2.tmp").write_text("{")
    orphan = store.slots_dir / "0123456789abcdef"  # renamed into place, never switched to
    (orphan / "payload").mkdir(parents=True)
    again = make_store(tmp_path, keyring)
    assert slots(again) == {v1.slot}
    assert not list(again.state_dir.glob(".*.tmp")) and not list(v1.path.glob(".*.tmp"))
    assert again.current().slot == v1.slot  # type: ignore[union-attr]


# --- every install/rollback error says what serves now (issue 12, item 10) ------------------------


def broken_check(_b):
    raise RuntimeError("does not load")


def test_a_failed_first_install_does_not_claim_a_previous_model(store: Store, make_bundle):
    with pytest.raises(InstallError) as e:
        store.install(make_bundle(version=1), load_check=broken_check)
    assert e.value.rolled_back
    hint = e.value.diagnostics()
    assert "previous model is still" not in hint and "first install" in hint
    assert e.value.serving == "nothing (no model is installed)"
    assert hint.endswith("Serving now: nothing (no model is installed).")


def test_a_failed_upgrade_names_the_model_serving_again(store: Store, make_bundle):
    v1 = store.install(make_bundle(version=1)).bundle
    with pytest.raises(InstallError) as e:
        store.install(make_bundle(version=2), load_check=broken_check)
    assert e.value.serving == f"tiny v1 (slot {v1.slot})"
    assert f"Serving now: tiny v1 (slot {v1.slot})." in e.value.diagnostics()


def test_refused_bundles_and_rollbacks_name_what_serves(store: Store, make_bundle, tmp_path: Path):
    from agent.bundle import SigningKey
    from agent.errors import DowngradeError, SignatureError

    with pytest.raises(SignatureError) as sig:
        store.install(make_bundle(version=1, key=SigningKey.generate("stranger")))
    assert "Serving now: nothing (no model is installed)." in sig.value.diagnostics()
    with pytest.raises(StoreError) as rb:
        store.rollback()
    assert rb.value.serving == "nothing (no model is installed)"
    v2 = store.install(make_bundle(version=2)).bundle
    with pytest.raises(DowngradeError) as dg:
        store.install(make_bundle(version=1))
    assert dg.value.serving == f"tiny v2 (slot {v2.slot})"
    with pytest.raises(StoreError, match="no previous") as rb2:
        store.rollback()
    assert f"Serving now: tiny v2 (slot {v2.slot})." in rb2.value.diagnostics()
    with pytest.raises(InstallError) as missing:
        store.install(tmp_path / "absent.bundle")
    assert missing.value.serving == f"tiny v2 (slot {v2.slot})"
