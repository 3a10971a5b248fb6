"""The root-signed keyring's trust decisions (agent/bundle/trust.py): pure, over bytes and keys.

Attack tests are named after the attack and go through the real verifier; documents are made by
the host side's own functions (packager/keys.py), as `edgepack keys` makes them.
"""

from __future__ import annotations

import json

import pytest
from bundlekit import make_manifest

from agent.bundle import FileEntry, Keyring, SigningKey, sign_manifest, verify_manifest
from agent.bundle.trust import (
    MAX_TRUST_BYTES,
    TrustedKeyring,
    keyring_bytes,
    sign_keyring,
    signer_revoked,
    verify_keyring_update,
)
from agent.errors import DowngradeError, KeyringError, SignatureError
from packager.keys import next_keyring, sign_with

ROOT = SigningKey.generate("root")
ROOT2 = SigningKey.generate("root-2")
REL1 = SigningKey.generate("release-1")
REL2 = SigningKey.generate("release-2")
EVIL = SigningKey.generate("attacker")


def first() -> tuple[bytes, TrustedKeyring]:
    ring = next_keyring(None, add=[REL1.public], roots=[ROOT.public])
    doc = sign_with(ring, [ROOT])
    return doc, verify_keyring_update(doc, None, trust_on_first_use=True)


def signed(ring: TrustedKeyring, *keys: SigningKey) -> bytes:
    data = keyring_bytes(ring)
    return sign_keyring(data, [(k.key_id, k.sign(data)) for k in keys])


def test_the_first_keyring_needs_a_local_operator_and_its_own_roots_signature() -> None:
    doc, v1 = first()
    assert (v1.version, v1.threshold) == (1, 1)
    assert [k.key_id for k in v1.release_keys] == [REL1.key_id]
    assert v1.document == doc
    with pytest.raises(KeyringError, match="no root-signed keyring"):
        verify_keyring_update(doc, None)  # over the network: never trust-on-first-use
    with pytest.raises(SignatureError, match="its own root"):
        verify_keyring_update(signed(v1, EVIL), None, trust_on_first_use=True)


def test_a_rotation_signed_by_the_root_adds_and_removes_release_keys() -> None:
    _, v1 = first()
    v2 = verify_keyring_update(signed(next_keyring(v1, add=[REL2.public], remove=[REL1.key_id]), ROOT), v1)
    assert v2.version == 2 and [k.key_id for k in v2.release_keys] == [REL2.key_id]
    assert REL1.key_id not in v2.release_keyring() and REL2.key_id in v2.release_keyring()
    assert not v2.revoked  # removed is not revoked: a later version may trust it again


def test_keyring_update_signed_by_a_release_key_is_refused() -> None:
    _, v1 = first()
    with pytest.raises(SignatureError, match="0 of the current root keys"):
        verify_keyring_update(signed(next_keyring(v1, add=[EVIL.public]), REL1), v1)


def test_keyring_update_by_an_attacker_who_names_himself_root_is_refused() -> None:
    _, v1 = first()
    evil = next_keyring(v1, add=[EVIL.public], roots=[EVIL.public])
    with pytest.raises(SignatureError, match="current root"):
        verify_keyring_update(signed(evil, EVIL), v1)


def test_keyring_rollback_to_an_older_version_is_refused() -> None:
    doc1, v1 = first()
    v2 = verify_keyring_update(signed(next_keyring(v1, revoke=[REL1.key_id]), ROOT), v1)
    with pytest.raises(DowngradeError, match="not newer") as e:
        verify_keyring_update(doc1, v2)  # replay of the old, validly signed v1 (REL1 trusted)
    assert (e.value.offered, e.value.installed) == (1, 2)


def test_keyring_same_version_other_contents_is_refused_and_the_same_bytes_are_a_no_op() -> None:
    doc1, v1 = first()
    assert verify_keyring_update(doc1, v1) is v1
    other = TrustedKeyring(1, v1.root_keys, 1, (REL1.public, EVIL.public), frozenset())
    with pytest.raises(DowngradeError):
        verify_keyring_update(signed(other, ROOT), v1)


def test_keyring_tampered_after_signing_is_refused() -> None:
    _, v1 = first()
    doc = json.loads(signed(next_keyring(v1, add=[REL2.public]), ROOT))
    doc["signed"] = doc["signed"].replace(REL2.public.raw.hex(), EVIL.public.raw.hex())
    with pytest.raises(SignatureError):
        verify_keyring_update(json.dumps(doc).encode(), v1)


def test_unsigned_and_malformed_keyrings_are_refused() -> None:
    _, v1 = first()
    data = keyring_bytes(next_keyring(v1, add=[EVIL.public]))
    with pytest.raises(SignatureError):
        verify_keyring_update(sign_keyring(data, []), v1)
    for junk in (b"", b"{}", b"[1]", b'{"format": "edgepack-keyring/1", "keys": []}', b"\xff" * 10,
                 b" " * (MAX_TRUST_BYTES + 1)):
        with pytest.raises(KeyringError):
            verify_keyring_update(junk, v1)


def test_root_rotation_needs_the_old_and_the_new_root() -> None:
    _, v1 = first()
    rotated = next_keyring(v1, roots=[ROOT2.public])
    with pytest.raises(SignatureError, match="its own root"):
        verify_keyring_update(signed(rotated, ROOT), v1)  # the old root alone
    with pytest.raises(SignatureError, match="current root"):
        verify_keyring_update(signed(rotated, ROOT2), v1)  # the new root alone
    v2 = verify_keyring_update(signed(rotated, ROOT, ROOT2), v1)
    assert [k.key_id for k in v2.root_keys] == [ROOT2.key_id]
    # From now on only the new root counts.
    with pytest.raises(SignatureError, match="current root"):
        verify_keyring_update(signed(next_keyring(v2, add=[EVIL.public]), ROOT), v2)
    v3 = verify_keyring_update(signed(next_keyring(v2, add=[REL2.public]), ROOT2), v2)
    assert v3.version == 3


def test_a_threshold_of_two_roots_needs_two_distinct_signatures() -> None:
    _, v1 = first()
    v2 = verify_keyring_update(signed(next_keyring(v1, roots=[ROOT.public, ROOT2.public], threshold=2),
                                      ROOT, ROOT2), v1)
    assert v2.threshold == 2
    nxt = next_keyring(v2, add=[REL2.public])
    data = keyring_bytes(nxt)
    twice = sign_keyring(data, [(ROOT.key_id, ROOT.sign(data))] * 2)
    with pytest.raises(SignatureError, match="1 of the current root keys, 2 needed"):
        verify_keyring_update(twice, v2)
    assert verify_keyring_update(signed(nxt, ROOT, ROOT2), v2).version == 3


def test_a_revoked_key_is_never_trusted_again() -> None:
    _, v1 = first()
    v2 = verify_keyring_update(signed(next_keyring(v1, revoke=[REL1.key_id[:12]], add=[REL2.public]),
                                      ROOT), v1)
    assert v2.revoked == {REL1.key_id} and REL1.key_id not in v2.release_keyring()
    assert signer_revoked(REL1.key_id, v2) and not signer_revoked(REL2.key_id, v2)
    # Un-revoking, even by the root, is refused; so is listing a revoked key as trusted.
    back = TrustedKeyring(3, v2.root_keys, 1, v2.release_keys, frozenset())
    with pytest.raises(KeyringError, match="un-revokes"):
        verify_keyring_update(signed(back, ROOT), v2)
    with pytest.raises(KeyringError, match="revoked"):
        TrustedKeyring(3, v2.root_keys, 1, (REL1.public,), frozenset({REL1.key_id}))


def test_bundle_signed_by_a_revoked_key_is_refused_as_revoked() -> None:
    _, v1 = first()
    v2 = verify_keyring_update(signed(next_keyring(v1, revoke=[REL1.key_id], add=[REL2.public]), ROOT),
                               v1)
    m = make_manifest([FileEntry("model.gguf", 4, "0" * 64)], REL1, version=1, model="tiny")
    data = m.to_bytes()
    sig = sign_manifest(data, REL1)
    assert verify_manifest(data, sig, v1.release_keyring()).version == 1  # trusted before
    with pytest.raises(SignatureError, match="revoked key"):
        verify_manifest(data, sig, v2.release_keyring())
    # A plain keyring file that still lists the key does not bring it back.
    merged = v2.release_keyring().merged(Keyring([REL1.public]))
    assert REL1.key_id not in merged


def test_unknown_fields_are_kept_and_roots_can_revoke_the_root_with_a_new_one() -> None:
    _, v1 = first()
    ring = next_keyring(v1, revoke=[ROOT.key_id], roots=[ROOT2.public])
    v2 = verify_keyring_update(signed(ring, ROOT, ROOT2), v1)
    assert ROOT.key_id in v2.revoked and [k.key_id for k in v2.root_keys] == [ROOT2.key_id]
    body = {**v2.body(), "expires": "2030-01-01"}
    data = json.dumps(body, sort_keys=True).encode()
    body["version"] = 3
    data = json.dumps(body, sort_keys=True).encode()
    v3 = verify_keyring_update(sign_keyring(data, [(ROOT2.key_id, ROOT2.sign(data))]), v2)
    assert v3.extra == {"expires": "2030-01-01"}
