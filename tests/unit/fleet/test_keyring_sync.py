"""Pushing the fleet's keyring, pure: which device gets ``cmd/keyring`` and when, how its answer
is recorded, and which documents may become the desired keyring at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.bundle import SigningKey
from agent.bundle.trust import TrustedKeyring, keyring_bytes, sign_keyring
from agent.errors import DowngradeError, KeyringError, SignatureError
from fleet.keyring_ops import format_keyring_status, keyring_status, push_keyring
from fleet.keyring_push import (
    CURRENT,
    MAX_ATTEMPTS,
    NEEDS_INIT,
    OFFLINE,
    PENDING,
    REPLY_TIMEOUT,
    SENT,
    UPDATED,
    DesiredKeyring,
    KeyringDevice,
    KeyringSync,
    KeyringTarget,
    answered,
    check_push,
    decide,
    job_name,
    parse_job,
)
from fleet.store import FleetStore

ROOT = SigningKey.generate("root")
REL = SigningKey.generate("rel")


def signed(version: int, root: SigningKey = ROOT, signers: list[SigningKey] | None = None) -> bytes:
    k = TrustedKeyring(version, (root.public,), 1, (REL.public,), frozenset())
    data = keyring_bytes(k)
    return sign_keyring(data, [(s.key_id, s.sign(data)) for s in signers or [root]])


def desired(version: int = 2, fleet: str = "lab") -> DesiredKeyring:
    return DesiredKeyring(fleet, version, signed(version), 0.0)


def online(name: str = "d1", reported: int | None = 1) -> KeyringDevice:
    return KeyringDevice(name, True, reported)


def offline(name: str = "d1", reported: int | None = 1) -> KeyringDevice:
    return KeyringDevice(name, False, reported)


# --- decide ------------------------------------------------------------------------------------


def test_an_online_device_on_an_older_version_is_sent_it_once() -> None:
    t, push = decide(None, online(), 2, 10.0)
    assert push is not None and push.device == "d1" and push.version == 2
    assert t.outcome == SENT and t.attempts == 1 and t.reported == 1
    assert parse_job(push.job) == (2, "d1")
    again, push2 = decide(t, online(), 2, 20.0)  # another birth while it is in flight
    assert push2 is None and again is t


def test_a_device_on_the_version_or_a_newer_one_is_current_and_gets_nothing() -> None:
    for reported in (2, 5):
        t, push = decide(None, online(reported=reported), 2, 0.0)
        assert push is None and t.outcome == CURRENT


def test_a_device_without_a_root_signed_keyring_needs_init_and_is_never_sent_one() -> None:
    t, push = decide(None, online(reported=None), 2, 0.0)
    assert push is None and t.outcome == NEEDS_INIT
    # Its operator installs v1 with --init: its next birth says so, and v2 follows.
    t, push = decide(t, online(reported=1), 2, 5.0)
    assert push is not None and t.outcome == SENT


def test_an_offline_device_waits_and_is_sent_it_on_its_next_birth() -> None:
    t, push = decide(None, offline(), 2, 0.0)
    assert push is None and t.outcome == OFFLINE and t.attempts == 0
    t, push = decide(t, offline(), 2, 1.0)
    assert push is None
    t, push = decide(t, online(), 2, 2.0)
    assert push is not None and t.attempts == 1


def test_a_device_that_goes_offline_before_answering_is_sent_it_again_when_back() -> None:
    t, _ = decide(None, online(), 2, 0.0)
    t, push = decide(t, offline(), 2, 1.0)
    assert push is None and t.outcome == OFFLINE
    t, push = decide(t, online(), 2, 2.0)
    assert push is not None and t.attempts == 2


def test_the_device_reporting_the_version_is_updated_whatever_the_reply_says_later() -> None:
    t, _ = decide(None, online(), 2, 0.0)
    t, push = decide(t, online(reported=2), 2, 1.0)  # its birth after the update came first
    assert push is None and t.outcome == UPDATED and t.reported == 2
    assert answered(t, True, {"keyring": {"version": 2}}, None, 2.0) is t


def test_resends_are_bounded_then_it_fails() -> None:
    t: KeyringTarget | None = None
    sends = 0
    for i in range(20):  # the device flaps: online, offline, online ... and never answers
        t, push = decide(t, online() if i % 2 == 0 else offline(), 2, float(i))
        sends += push is not None
    assert t is not None
    assert sends == MAX_ATTEMPTS
    assert t.outcome.startswith("failed: not updated")
    assert decide(t, online(), 2, 100.0) == (t, None)


def test_an_unanswered_push_to_an_online_device_is_resent_after_the_reply_timeout() -> None:
    t, _ = decide(None, online(), 2, 0.0)
    assert decide(t, online(), 2, REPLY_TIMEOUT - 1)[1] is None
    t, push = decide(t, online(), 2, REPLY_TIMEOUT)
    assert push is not None and t.attempts == 2


# --- answers -----------------------------------------------------------------------------------


def test_a_refusal_is_recorded_with_its_code_and_never_retried_for_that_version() -> None:
    t, _ = decide(None, online(), 2, 0.0)
    t = answered(t, False, None, {"code": "signature", "message": "signed by 0 of the root keys"}, 1.0)
    assert t.outcome == "refused: signature signed by 0 of the root keys" and t.final
    for i in range(5):
        assert decide(t, offline() if i % 2 else online(), 2, 2.0 + i)[1] is None
    # A newer version is a new decision.
    t3, push = decide(t, online(), 3, 10.0)
    assert push is not None and t3.version == 3 and t3.attempts == 1


def test_busy_is_not_a_refusal_the_push_is_sent_again() -> None:
    t, _ = decide(None, online(), 2, 0.0)
    t = answered(t, False, None, {"code": "busy", "message": "the agent is busy"}, 1.0)
    assert t.outcome == PENDING and not t.final
    t, push = decide(t, online(), 2, 2.0)
    assert push is not None and t.attempts == 2


def test_success_records_the_version_the_device_now_holds() -> None:
    t, _ = decide(None, online(), 2, 0.0)
    t = answered(t, True, {"keyring": {"version": 2}, "changed": True}, None, 1.0)
    assert t.outcome == UPDATED and t.reported == 2


# --- the fleet's sync --------------------------------------------------------------------------


def test_sync_sends_to_each_device_once_and_marks_what_changed() -> None:
    s = KeyringSync()
    assert s.device(online("a"), 0.0) == []  # nothing desired yet
    assert s.device(offline("b"), 0.0) == []
    pushes = s.want(desired(2), 1.0)
    assert [p.device for p in pushes] == ["a"]
    assert s.dirty == {"a", "b"} and s.targets["b"].outcome == OFFLINE
    s.dirty.clear()
    assert s.want(desired(2), 2.0) == []  # the same desired version on every tick: nothing
    assert s.tick(3.0) == [] and not s.dirty
    s.reply("a", pushes[0].job, True, {"keyring": {"version": 2}}, None, 4.0)
    assert s.targets["a"].outcome == UPDATED and s.dirty == {"a"}
    # A device that joins later gets it.
    assert [p.device for p in s.device(online("c"), 5.0)] == ["c"]


def test_sync_ignores_a_reply_for_another_device_or_version() -> None:
    s = KeyringSync()
    s.want(desired(2), 0.0)
    [push] = s.device(online("a"), 0.0)
    s.reply("b", push.job, True, None, None, 1.0)
    s.reply("a", job_name(1, "a", 1), False, None, {"code": "downgrade", "message": "old"}, 1.0)
    s.reply("a", "ro-1.a.i0", True, None, None, 1.0)
    assert s.targets["a"].outcome == SENT


def test_a_newer_desired_version_considers_every_device_again() -> None:
    s = KeyringSync()
    s.want(desired(2), 0.0)
    s.device(online("a", reported=2), 0.0)
    assert s.targets["a"].outcome == CURRENT
    assert [p.version for p in s.want(desired(3), 1.0)] == [3]


def test_after_a_restart_a_push_left_in_flight_is_sent_again_when_the_device_is_seen() -> None:
    before = KeyringTarget("a", 2, SENT, reported=1, attempts=1, sent_at=0.0)
    s = KeyringSync(desired(2), [before])
    assert not s.dirty
    [push] = s.device(online("a"), 1.0)
    assert push.job == job_name(2, "a", 2)


def test_busy_answers_are_sent_again_on_the_tick_within_the_attempts() -> None:
    s = KeyringSync()
    s.want(desired(2), 0.0)
    s.device(online("a"), 0.0)
    sends = 1
    for i in range(10):
        t = s.targets["a"]
        s.reply("a", job_name(2, "a", t.attempts), False, None, {"code": "busy", "message": ""}, i + 0.5)
        sends += len(s.tick(i + 1.0))
    assert sends == MAX_ATTEMPTS and s.targets["a"].outcome.startswith("failed: not updated")


# --- which documents may be recorded -----------------------------------------------------------


def test_check_push_accepts_a_newer_keyring_signed_by_the_recorded_root() -> None:
    assert check_push(signed(3), desired(2)).version == 3
    assert check_push(signed(1), None).version == 1  # nothing recorded: only self-consistency


def test_check_push_refuses_an_older_or_the_same_version() -> None:
    for v in (1, 2):
        with pytest.raises(DowngradeError):
            check_push(signed(v), desired(2))


def test_check_push_refuses_a_keyring_signed_by_another_root() -> None:
    other = SigningKey.generate("attacker")
    with pytest.raises(SignatureError):
        check_push(signed(9, root=other), desired(2))
    trusted = check_push(signed(1), None)
    with pytest.raises(SignatureError):  # the first push is checked against --keyring
        check_push(signed(9, root=other), None, [trusted])


def test_check_push_refuses_a_document_that_is_not_a_consistent_signed_keyring() -> None:
    other = SigningKey.generate("other")
    for doc in (b"{}", b"not json", signed(3, signers=[other])):  # the last: not by its own root
        with pytest.raises((KeyringError, SignatureError)):
            check_push(doc, None)


def test_push_records_and_status_reads_and_a_refused_push_records_nothing(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    for v in (2, 3):
        (tmp_path / f"v{v}.json").write_bytes(signed(v))
    assert push_keyring(db, tmp_path / "v2.json", "lab", now=1.0).version == 2
    with pytest.raises(DowngradeError):
        push_keyring(db, tmp_path / "v2.json", "lab")
    (tmp_path / "evil.json").write_bytes(signed(7, root=SigningKey.generate("evil")))
    with pytest.raises(SignatureError):
        push_keyring(db, tmp_path / "evil.json", "lab")
    with FleetStore(db) as store:
        assert store.desired_keyring("lab") == DesiredKeyring("lab", 2, signed_bytes(tmp_path, 2), 1.0)
        with store.transaction() as tx:
            store.save_keyring_targets(tx, "lab", [KeyringTarget("a", 2, UPDATED, reported=2, attempts=1),
                                                   KeyringTarget("b", 2, NEEDS_INIT)])
    doc = keyring_status(db)
    assert doc["lab"]["version"] == 2 and doc["lab"]["counts"] == {"updated": 1, "needs_init": 1}
    assert doc["lab"]["devices"]["a"] == {"reported": 2, "outcome": UPDATED, "attempts": 1,
                                          "updated": 0.0}
    assert "desired keyring v2" in format_keyring_status(doc)
    assert keyring_status(db, "other")["other"]["version"] is None


def signed_bytes(d: Path, v: int) -> bytes:
    return (d / f"v{v}.json").read_bytes()
