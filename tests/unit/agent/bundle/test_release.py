"""The release document: canonical bytes, signature over the exact bytes, refusals that say why."""

from __future__ import annotations

import json

import pytest

from agent.bundle import Keyring, SigningKey
from agent.bundle.release import (
    MAX_RELEASE_BYTES,
    RELEASE_NAME,
    Release,
    ReleaseBundle,
    check_release_file,
    read_release,
    sign_release,
    verify_release,
)
from agent.errors import DigestMismatchError, ReleaseError, SignatureError

HEX = "ab" * 32


def entry(profile: str = "raspberry-pi-5", **over: object) -> ReleaseBundle:
    d: dict[str, object] = dict(
        profile=profile, file=f"m-v3-{profile}.bundle", sha256=HEX, size=1234,
        manifest_digest="cd" * 32, model="m", version=3, runtime="llamacpp", format="gguf",
        precision="int4", quant="Q4_K_M", device="cpu",
        quality={"delta_pct": 4.2, "top1_agreement": 0.93, "reference": "f16"},
        expected={"decode_tok_s": 40.0, "ttft_ms": 50.0, "peak_rss_mb": 300.0},
        fidelity_threshold=0.8)
    d.update(over)
    return ReleaseBundle(**d)  # type: ignore[arg-type]


def release(key: SigningKey, *profiles: str) -> Release:
    return Release(model="m", version=3, created="2026-12-03T00:00:00Z",
                   bundles={p: entry(p) for p in (profiles or ("raspberry-pi-5", "x86-64-cpu"))},
                   signer_key_id=key.public.key_id)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("release-tests")


def test_a_signed_release_round_trips_and_keeps_unknown_fields(key) -> None:
    r = release(key)
    doc = r.to_dict()
    doc["future"] = {"x": 1}
    doc["bundles"]["x86-64-cpu"]["later"] = True
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    got = verify_release(data, sign_release(data, key), Keyring([key.public]))
    assert got.release_id == "m-v3" and set(got.bundles) == {"raspberry-pi-5", "x86-64-cpu"}
    assert got.to_bytes() == data, "unknown fields survive, the bytes are canonical"
    assert got.bundles["x86-64-cpu"].unrecognized == {"later": True}


def test_one_changed_byte_unsigned_or_an_unknown_key_is_refused(key) -> None:
    data = release(key).to_bytes()
    sig = sign_release(data, key)
    ring = Keyring([key.public])
    tampered = data.replace(b'"size":1234', b'"size":1235', 1)
    assert tampered != data
    with pytest.raises(SignatureError):
        verify_release(tampered, sig, ring)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_release(data, b"", ring)
    other = SigningKey.generate("someone-else")
    with pytest.raises(SignatureError):
        verify_release(data, sign_release(data, other), ring)
    with pytest.raises(ReleaseError, match="limit"):
        verify_release(b" " * (MAX_RELEASE_BYTES + 1), sig, ring)


def test_a_release_naming_another_signer_than_the_one_that_signed_is_refused(key) -> None:
    other = SigningKey.generate("second")
    data = release(other).to_bytes()  # names `other`, signed by `key`
    with pytest.raises(ReleaseError, match="names signer"):
        verify_release(data, sign_release(data, key), Keyring([key.public, other.public]))


def test_read_release_refuses_a_missing_signature_file_with_a_hint(key, tmp_path) -> None:
    data = release(key).to_bytes()
    (tmp_path / RELEASE_NAME).write_bytes(data)
    with pytest.raises(SignatureError, match="unsigned") as e:
        read_release(tmp_path, Keyring([key.public]))
    assert "release.json.sig" in (e.value.hint or "")
    (tmp_path / (RELEASE_NAME + ".sig")).write_bytes(sign_release(data, key))
    got, raw, _ = read_release(tmp_path, Keyring([key.public]))
    assert raw == data and got.version == 3


@pytest.mark.parametrize("field, value, match", [
    ("file", "../evil.bundle", "bare file name"),
    ("file", "sub/evil.bundle", "bare file name"),
    ("sha256", "AB" * 32, "hex"),
    ("size", -1, "non-negative"),
    ("version", True, "non-negative"),
    ("quality", {"delta_pct": 1.0}, "quality"),
    ("quality", {"delta_pct": float("nan"), "top1_agreement": None, "reference": "f16"}, "numbers"),
    ("expected", {"decode_tok_s": "fast"}, "expected"),
    ("fidelity_threshold", 1.5, "fidelity_threshold"),
])
def test_a_malformed_bundle_entry_says_which_field(field, value, match) -> None:
    with pytest.raises(ReleaseError, match=match):
        entry(**{field: value})


def test_a_release_of_mixed_versions_or_another_major_format_is_refused(key) -> None:
    with pytest.raises(ReleaseError, match="a bundle of m v4"):
        Release(model="m", version=3, created="", bundles={"p": entry("p", version=4)},
                signer_key_id=key.public.key_id)
    doc = release(key).to_dict()
    doc["format"] = "edgepack-release/2"
    with pytest.raises(ReleaseError, match="not supported"):
        Release.from_dict(doc)
    with pytest.raises(ReleaseError, match="UTF-8 JSON"):
        Release.from_bytes(b"{not json")


def test_a_bundle_file_is_checked_against_its_entry() -> None:
    e = entry()
    check_release_file(e, 1234, HEX)
    with pytest.raises(DigestMismatchError, match="1233 bytes"):
        check_release_file(e, 1233, HEX)
    with pytest.raises(DigestMismatchError, match="does not match"):
        check_release_file(e, 1234, "00" * 32)


@pytest.mark.parametrize("parse", ["release", "manifest", "keyring"])
def test_json_nested_deeper_than_the_parser_is_our_error_not_a_crash(parse) -> None:
    from agent.bundle import Keyring, Manifest
    from agent.errors import EdgepackError

    deep = b"[" * 100_000 + b"]" * 100_000  # under every cap (256 KiB+), over the parser's stack
    fn = {"release": Release.from_bytes, "manifest": Manifest.from_bytes,
          "keyring": Keyring.from_bytes}[parse]
    with pytest.raises(EdgepackError):
        fn(deep)
