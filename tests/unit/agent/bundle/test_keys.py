"""Keys, key ids and the device keyring (agent/bundle/keys.py): what is trusted, and what is refused.

Each refusal of ``Keyring.from_bytes`` starts from a valid document and breaks one thing, so the
valid document is the positive control.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import Keyring, PublicKey, SigningKey, key_id_of, load_keyring
from agent.bundle.keys import MAX_KEYRING_BYTES
from agent.errors import KeyringError


@pytest.fixture
def doc(signing_key: SigningKey) -> dict:
    """A valid one-key keyring document, to break one field at a time."""
    return json.loads(Keyring([signing_key.public]).to_bytes())


def test_key_id_is_the_sha256_of_the_raw_public_key(signing_key):
    raw = signing_key.public.raw
    assert key_id_of(raw) == hashlib.sha256(raw).hexdigest() == signing_key.key_id


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_a_public_key_is_32_bytes(length):
    with pytest.raises(KeyringError, match=f"not {length}"):
        PublicKey(b"\1" * length)
    assert PublicKey(b"\1" * 32).raw == b"\1" * 32


def test_verify_is_true_only_for_this_keys_signature_over_exactly_these_bytes(signing_key):
    sig = signing_key.sign(b"manifest")
    pub = signing_key.public
    assert pub.verify(sig, b"manifest")
    assert not pub.verify(sig, b"manifest ")
    assert not pub.verify(SigningKey.generate().sign(b"manifest"), b"manifest")
    assert not pub.verify(sig[:-1], b"manifest")  # a malformed signature is a no, not an error


def test_private_key_pem_round_trip(signing_key):
    again = SigningKey.from_pem(signing_key.to_pem(), name="again")
    assert (again.key_id, again.name) == (signing_key.key_id, "again")


@pytest.mark.parametrize("pem", [
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    b"not a pem at all",
])
def test_from_pem_refuses_what_is_not_a_pem_private_key(pem):
    with pytest.raises(KeyringError, match="not an unencrypted PEM"):
        SigningKey.from_pem(pem)


def test_from_pem_refuses_an_encrypted_key():
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"))
    with pytest.raises(KeyringError, match="not an unencrypted PEM"):
        SigningKey.from_pem(encrypted)


def test_from_pem_refuses_a_key_that_is_not_ed25519():
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(KeyringError, match="not Ed25519"):
        SigningKey.from_pem(ec_pem)


# --- Keyring --------------------------------------------------------------------------------------------


def test_keyring_round_trip_keeps_ids_and_names(signing_key):
    other = SigningKey.generate("other")
    ring = Keyring.from_bytes(Keyring([signing_key.public, other.public]).to_bytes())
    assert len(ring) == 2 and signing_key.key_id in ring and other.key_id in ring
    assert ring.get(other.key_id) == other.public and ring.get(other.key_id).name == "other"
    assert ring.get("0" * 64) is None and "0" * 64 not in ring


def test_a_key_listed_twice_is_one_trusted_key(signing_key):
    assert len(Keyring([signing_key.public, signing_key.public])) == 1


def test_merged_is_the_union_and_leaves_both_alone(signing_key):
    a, b = Keyring([signing_key.public]), Keyring([SigningKey.generate().public])
    both = a.merged(b)
    assert sorted(k.key_id for k in both.public_keys()) == sorted(
        [k.key_id for k in a.public_keys()] + [k.key_id for k in b.public_keys()])
    assert len(a) == len(b) == 1
    assert len(both.merged(a)) == 2  # a key in both is trusted once


def test_from_bytes_accepts_the_valid_document(doc, signing_key):
    assert signing_key.key_id in Keyring.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize("break_it, match", [
    (lambda d: d.update(format="edgepack-keyring/2"), "not a keyring"),
    (lambda d: d.pop("format"), "not a keyring"),
    (lambda d: d.update(keys={}), "must be a list"),
    (lambda d: d["keys"].append("k"), "must be ed25519 keys"),
    (lambda d: d["keys"][0].update(algorithm="rsa"), "must be ed25519 keys"),
    (lambda d: d["keys"][0].update(public="zz"), "not hex"),
    (lambda d: d["keys"][0].update(public="00" * 31), "32 bytes"),
    (lambda d: d["keys"][0].update(key_id="0" * 64), "does not match its key"),
    (lambda d: d["keys"][0].update(public=SigningKey.generate().public.raw.hex()),
     "does not match its key"),
])
def test_from_bytes_refuses_a_broken_document(doc, break_it, match):
    break_it(doc)
    with pytest.raises(KeyringError, match=match):
        Keyring.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize("data, match", [
    (b"\xff", "not valid JSON"), (b"{", "not valid JSON"), (b"[]", "not a keyring"),
])
def test_from_bytes_refuses_what_is_not_a_json_object(data, match):
    with pytest.raises(KeyringError, match=match):
        Keyring.from_bytes(data)


def test_from_bytes_caps_the_size_before_parsing(doc):
    data = json.dumps(doc).encode()
    padded = data + b" " * (MAX_KEYRING_BYTES - len(data))
    assert len(Keyring.from_bytes(padded)) == 1
    with pytest.raises(KeyringError, match="limit"):
        Keyring.from_bytes(padded + b" ")


# --- load_keyring ---------------------------------------------------------------------------------------


def test_load_keyring_merges_files_and_trusts_nothing_without_any(tmp_path: Path, signing_key):
    other = SigningKey.generate()
    a, b = tmp_path / "a.pub.json", tmp_path / "b.pub.json"
    a.write_bytes(Keyring([signing_key.public]).to_bytes())
    b.write_bytes(Keyring([other.public, signing_key.public]).to_bytes())
    ring = load_keyring([a, b])
    assert len(ring) == 2 and signing_key.key_id in ring and other.key_id in ring
    assert len(load_keyring([])) == 0


def test_load_keyring_names_a_missing_file_and_says_how_to_pass_one(tmp_path: Path, signing_key):
    good = tmp_path / "a.pub.json"
    good.write_bytes(Keyring([signing_key.public]).to_bytes())
    with pytest.raises(KeyringError, match=r"cannot read keyring .*missing\.json") as e:
        load_keyring([good, tmp_path / "missing.json"])
    assert "--keyring" in e.value.diagnostics()


def test_load_keyring_refuses_a_malformed_file(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "edgepack-keyring/1", "keys": "x"}')
    with pytest.raises(KeyringError, match="must be a list"):
        load_keyring([bad])
