"""Manifest round trip and validation (agent/bundle/manifest.py).

The verifier and the keys have their own files: test_verify.py and test_keys.py.
"""

from __future__ import annotations

import json

import pytest
from bundlekit import make_manifest

from agent.bundle import FileEntry, Manifest, SigningKey, check_member_path
from agent.errors import ManifestError

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


def test_choice_round_trips_and_is_absent_when_the_profile_chose(signing_key):
    import dataclasses

    m = manifest(signing_key)
    assert "choice" not in m.to_dict()  # older manifests keep their exact bytes
    chosen = {"by": "user", "requested": "Q5_K_M", "forced": True,
              "profile_choice": {"quant": "Q4_K_M", "precision": "int4"}}
    m2 = Manifest.from_bytes(dataclasses.replace(m, choice=chosen).to_bytes())
    assert m2.choice == chosen and m2.unrecognized == {}
    d = m.to_dict()
    d["choice"] = "user"
    with pytest.raises(ManifestError, match=r"manifest\.choice must be an object"):
        Manifest.from_dict(d)
