"""Manifest round trip and validation, keys and the pure verifier."""

from __future__ import annotations

import json

import pytest
from bundlekit import make_manifest

from agent.bundle import (
    FileEntry,
    Keyring,
    Manifest,
    SigningKey,
    check_member_path,
    parse_signatures,
    sign_manifest,
    verify_manifest,
)
from agent.errors import DowngradeError, KeyringError, ManifestError, SignatureError

SHA = "a" * 64


def manifest(key: SigningKey, **kw) -> Manifest:
    return make_manifest([FileEntry("model.gguf", 10, SHA)], key, **kw)


def test_round_trip_is_exact_and_keeps_unknown_fields(signing_key):
    m = manifest(signing_key)
    d = m.to_dict()
    d["future_field"] = {"x": 1}
    d["format_version"] = "1.7"  # a newer minor version is readable
    m2 = Manifest.from_dict(d)
    assert m2.unrecognized == {"future_field": {"x": 1}}
    assert Manifest.from_bytes(m2.to_bytes()).to_bytes() == m2.to_bytes()
    assert m2.to_dict()["future_field"] == {"x": 1}


def test_canonical_bytes_are_sorted_and_compact(signing_key):
    b = manifest(signing_key).to_bytes()
    assert b == json.dumps(json.loads(b), sort_keys=True, separators=(",", ":")).encode()


def test_other_major_format_is_refused(signing_key):
    d = manifest(signing_key).to_dict()
    d["format_version"] = "2.0"
    with pytest.raises(ManifestError, match="not supported"):
        Manifest.from_dict(d)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("files"), "missing 'files'"),
        (lambda d: d.update(files=[]), "at least one file"),
        (lambda d: d["model"].update(version=True), "wrong type"),
        (lambda d: d["model"].update(version=-1), "non-negative"),
        (lambda d: d["model"].update(version="3"), "wrong type"),
        (lambda d: d["files"][0].update(sha256="XYZ"), "sha256"),
        (lambda d: d["files"][0].update(size=-5), "size"),
        (lambda d: d["files"].append(dict(d["files"][0])), "listed twice"),
        (lambda d: d["files"].append({"path": "model.gguf/x", "size": 1, "sha256": SHA}),
         "both files"),
        (lambda d: d["target"].update(entrypoint="nope.gguf"), "entrypoint"),
        (lambda d: d["model"].update(name="../x"), "model name"),
        (lambda d: d.update(requirements={"arch": "x86_64"}), "list of strings"),
        (lambda d: d.update(quality=[1]), "must be an object"),
    ],
)
def test_invalid_manifests_are_refused(signing_key, mutate, match):
    d = manifest(signing_key).to_dict()
    mutate(d)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(d)


@pytest.mark.parametrize(
    "bad", ["", "/abs", "a/../b", "..", "./a", "a//b", "a\\b", "a/\x00", "manifest.json"])
def test_unsafe_paths_are_refused(bad):
    with pytest.raises(ManifestError):
        check_member_path(bad)


def test_oversized_manifest_is_refused_before_parsing(signing_key, keyring):
    big = b" " * (2 << 20)
    with pytest.raises(ManifestError, match="limit"):
        verify_manifest(big, sign_manifest(big, signing_key), keyring)


def test_verify_accepts_genuine_and_refuses_every_change(signing_key, keyring):
    mb = manifest(signing_key).to_bytes()
    sig = sign_manifest(mb, signing_key)
    assert verify_manifest(mb, sig, keyring).version == 1
    for i in range(0, len(mb), max(1, len(mb) // 50)):
        flipped = bytearray(mb)
        flipped[i] ^= 0x20
        with pytest.raises((SignatureError, ManifestError)):
            verify_manifest(bytes(flipped), sig, keyring)


def test_signer_named_in_manifest_must_be_the_key_that_signed(signing_key):
    other = SigningKey.generate()
    mb = manifest(other).to_bytes()  # names `other` as signer
    with pytest.raises(ManifestError, match="names signer"):
        verify_manifest(mb, sign_manifest(mb, signing_key),
                        Keyring([signing_key.public, other.public]))


def test_empty_keyring_trusts_nothing(signing_key):
    mb = manifest(signing_key).to_bytes()
    with pytest.raises(SignatureError, match="keyring is empty"):
        verify_manifest(mb, sign_manifest(mb, signing_key), Keyring())


def test_downgrade_rules(signing_key, keyring):
    mb = manifest(signing_key, version=3).to_bytes()
    sig = sign_manifest(mb, signing_key)
    assert verify_manifest(mb, sig, keyring, installed_version=2).version == 3
    assert verify_manifest(mb, sig, keyring, 3, "d", "d").version == 3  # same bundle again
    with pytest.raises(DowngradeError):
        verify_manifest(mb, sig, keyring, installed_version=4)
    with pytest.raises(DowngradeError):
        verify_manifest(mb, sig, keyring, 3, "d1", "d2")


@pytest.mark.parametrize("sig", [
    b"", b"{}", b"not json", b'{"format":"edgepack-signature/1","signatures":[]}',
    b'{"format":"edgepack-signature/1","signatures":[{"key_id":"x","sig":"zz"}]}',
])
def test_malformed_signatures_are_refused(sig):
    with pytest.raises(SignatureError):
        parse_signatures(sig)


def test_keyring_round_trip_and_tamper(signing_key):
    kr = Keyring([signing_key.public])
    assert signing_key.key_id in Keyring.from_bytes(kr.to_bytes())
    doc = json.loads(kr.to_bytes())
    doc["keys"][0]["public"] = SigningKey.generate().public.raw.hex()
    with pytest.raises(KeyringError, match="does not match"):
        Keyring.from_bytes(json.dumps(doc).encode())


def test_private_key_pem_round_trip(signing_key):
    again = SigningKey.from_pem(signing_key.to_pem())
    assert again.key_id == signing_key.key_id
    with pytest.raises(KeyringError):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
