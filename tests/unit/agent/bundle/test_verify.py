"""The pure verifier (agent/bundle/verify.py): signature envelope, signature check, versions, files.

Every refusal is paired with the same input made valid, so a refusal cannot pass because the
input was broken in some other way.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from bundlekit import make_manifest

from agent.bundle import (
    FileEntry,
    Keyring,
    Manifest,
    SigningKey,
    check_file,
    check_version,
    parse_signatures,
    sign_manifest,
    verify_manifest,
)
from agent.bundle.manifest import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES
from agent.bundle.verify import SIGNATURE_FORMAT
from agent.errors import DigestMismatchError, DowngradeError, ManifestError, SignatureError

SHA = "a" * 64


def manifest(key: SigningKey, **kw) -> Manifest:
    return make_manifest([FileEntry("model.gguf", 10, SHA)], key, **kw)


def envelope(*entries: object) -> bytes:
    return json.dumps({"format": SIGNATURE_FORMAT, "signatures": list(entries)}).encode()


# --- parse_signatures --------------------------------------------------------------------------------


def test_parse_signatures_reads_every_entry_in_order(signing_key):
    other = SigningKey.generate("other")
    data = envelope({"key_id": signing_key.key_id, "sig": "00ff"}, {"key_id": other.key_id, "sig": ""})
    sigs = parse_signatures(data)
    assert [(s.key_id, s.sig) for s in sigs] == [(signing_key.key_id, b"\x00\xff"), (other.key_id, b"")]


def test_sign_manifest_writes_an_envelope_parse_signatures_reads(signing_key):
    mb = manifest(signing_key).to_bytes()
    [sig] = parse_signatures(sign_manifest(mb, signing_key))
    assert sig.key_id == signing_key.key_id and signing_key.public.verify(sig.sig, mb)


@pytest.mark.parametrize("data, match", [
    (b"", "no signature"),
    (b"\xff\xfe", "not valid JSON"),
    (b"not json", "not valid JSON"),
    (b"[]", "is not 'edgepack-signature/1'"),
    (b'{"format": "edgepack-signature/2", "signatures": []}', "is not 'edgepack-signature/1'"),
    (b'{"format": "edgepack-signature/1"}', "lists no signatures"),
    (b'{"format": "edgepack-signature/1", "signatures": {}}', "lists no signatures"),
    (envelope(), "lists no signatures"),
    (envelope("00ff"), "malformed signature entry"),
    (envelope({"sig": "00"}), "malformed signature entry"),
    (envelope({"key_id": 7, "sig": "00"}), "malformed signature entry"),
    (envelope({"key_id": "k", "sig": "zz"}), "not hex"),
])
def test_parse_signatures_refuses_malformed_envelopes(data, match):
    with pytest.raises(SignatureError, match=match):
        parse_signatures(data)


def test_signature_file_size_is_capped_before_parsing():
    pad = " " * (MAX_SIGNATURE_BYTES - len(envelope({"key_id": "k", "sig": "00"})))
    at_limit = envelope({"key_id": "k", "sig": "00"}) + pad.encode()
    assert len(parse_signatures(at_limit)) == 1  # exactly at the limit: read
    with pytest.raises(SignatureError, match="limit"):
        parse_signatures(at_limit + b" ")


# --- verify_manifest ----------------------------------------------------------------------------------


def test_verify_returns_the_parsed_manifest_of_the_signed_bytes(signing_key, keyring):
    mb = manifest(signing_key, version=7).to_bytes()
    m = verify_manifest(mb, sign_manifest(mb, signing_key), keyring)
    assert (m.version, m.signer_key_id) == (7, signing_key.key_id)


def test_verify_accepts_genuine_and_refuses_every_change(signing_key, keyring):
    mb = manifest(signing_key).to_bytes()
    sig = sign_manifest(mb, signing_key)
    assert verify_manifest(mb, sig, keyring).version == 1
    for i in range(0, len(mb), max(1, len(mb) // 50)):
        flipped = bytearray(mb)
        flipped[i] ^= 0x20
        with pytest.raises((SignatureError, ManifestError)):
            verify_manifest(bytes(flipped), sig, keyring)


def test_manifest_size_is_capped_before_the_signature_is_read(signing_key, keyring):
    big = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ManifestError, match="limit"):
        verify_manifest(big, b"", keyring)  # not "no signature": the size check comes first


def test_empty_keyring_trusts_nothing(signing_key):
    mb = manifest(signing_key).to_bytes()
    sig = sign_manifest(mb, signing_key)
    with pytest.raises(SignatureError, match="keyring is empty") as e:
        verify_manifest(mb, sig, Keyring())
    assert "--keyring" in e.value.diagnostics()
    assert verify_manifest(mb, sig, Keyring([signing_key.public])).version == 1


def test_untrusted_signer_is_named_with_the_trusted_keys(signing_key, keyring):
    attacker = SigningKey.generate("attacker")
    mb = manifest(attacker).to_bytes()
    with pytest.raises(SignatureError, match="untrusted key") as e:
        verify_manifest(mb, sign_manifest(mb, attacker), keyring)
    assert attacker.key_id[:16] in str(e.value) and signing_key.key_id[:16] in str(e.value)


def test_a_trusted_key_id_with_a_bad_signature_says_the_bytes_changed(signing_key, keyring):
    mb = manifest(signing_key).to_bytes()
    forged = envelope({"key_id": signing_key.key_id, "sig": (b"\0" * 64).hex()})
    with pytest.raises(SignatureError, match="does not match the manifest bytes"):
        verify_manifest(mb, forged, keyring)


def test_any_trusted_signature_among_several_is_enough(signing_key, keyring):
    mb = manifest(signing_key).to_bytes()
    stranger = SigningKey.generate("stranger")
    good = json.loads(sign_manifest(mb, signing_key))["signatures"][0]
    both = envelope({"key_id": stranger.key_id, "sig": stranger.sign(mb).hex()}, good)
    assert verify_manifest(mb, both, keyring).version == 1
    with pytest.raises(SignatureError, match="untrusted key"):
        verify_manifest(mb, envelope(json.loads(both)["signatures"][0]), keyring)


def test_signer_named_in_manifest_must_be_the_key_that_signed(signing_key):
    other = SigningKey.generate()
    mb = manifest(other).to_bytes()  # names `other` as signer
    both = Keyring([signing_key.public, other.public])
    with pytest.raises(ManifestError, match="names signer"):
        verify_manifest(mb, sign_manifest(mb, signing_key), both)
    assert verify_manifest(mb, sign_manifest(mb, other), both).signer_key_id == other.key_id


def test_a_manifest_naming_no_signer_is_accepted_from_a_trusted_key(signing_key, keyring):
    d = manifest(signing_key).to_dict()
    d.pop("signer")
    mb = Manifest.from_dict(d).to_bytes()
    assert verify_manifest(mb, sign_manifest(mb, signing_key), keyring).signer_key_id == ""


def test_verify_applies_the_version_rule_after_the_signature(signing_key, keyring):
    mb = manifest(signing_key, version=3).to_bytes()
    sig = sign_manifest(mb, signing_key)
    assert verify_manifest(mb, sig, keyring, installed_version=2).version == 3
    with pytest.raises(DowngradeError):
        verify_manifest(mb, sig, keyring, installed_version=4)
    # A bad signature is reported as such even when the version would also be refused.
    with pytest.raises(SignatureError):
        verify_manifest(mb, sign_manifest(mb, SigningKey.generate()), keyring, installed_version=4)


# --- check_version ------------------------------------------------------------------------------------


@pytest.mark.parametrize("installed, installed_digest, offered_digest", [
    (None, None, None),  # nothing installed yet
    (2, "d1", "d2"),  # newer
    (3, "d", "d"),  # the same bundle again
    (3, None, "d"),  # same version, digest unknown: cannot tell, allowed
    (3, "d", None),
])
def test_check_version_allows(signing_key, installed, installed_digest, offered_digest):
    check_version(manifest(signing_key, version=3), installed, installed_digest, offered_digest)


def test_check_version_refuses_older_with_both_versions(signing_key):
    with pytest.raises(DowngradeError, match="older than v4") as e:
        check_version(manifest(signing_key, version=3), 4)
    assert (e.value.offered, e.value.installed) == (3, 4)


def test_check_version_refuses_a_reused_version_with_other_content(signing_key):
    with pytest.raises(DowngradeError, match="never reused") as e:
        check_version(manifest(signing_key, version=3), 3, "d1", "d2")
    assert (e.value.offered, e.value.installed) == (3, 3)


# --- check_file -----------------------------------------------------------------------------------------


def test_check_file_accepts_the_listed_length_and_digest():
    data = b"weights"
    entry = FileEntry("model.gguf", len(data), hashlib.sha256(data).hexdigest())
    check_file(entry, len(data), hashlib.sha256(data).hexdigest())


def test_check_file_refuses_another_length_before_the_digest():
    entry = FileEntry("model.gguf", 7, SHA)
    with pytest.raises(DigestMismatchError, match="8 bytes, manifest says 7") as e:
        check_file(entry, 8, SHA)
    assert (e.value.path, e.value.expected, e.value.actual) == ("model.gguf", "7", "8")


def test_check_file_refuses_another_digest():
    entry = FileEntry("model.gguf", 7, SHA)
    with pytest.raises(DigestMismatchError, match="does not match") as e:
        check_file(entry, 7, "b" * 64)
    assert (e.value.expected, e.value.actual) == (SHA, "b" * 64)
