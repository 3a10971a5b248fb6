"""The build's signed release and the device's fidelity check, for real, on the tiny Phi-3.

``edgepack build`` writes release.json + release.json.sig beside the bundles; ``release verify``
checks the signature and every bundle file; the post-install gate scores the fidelity probe with
the installed model and compares its top-1 ids with the manifest's (same host: they agree), and a
bundle whose table names other ids (signed, so only the device's computation could explain it)
is rolled back with ``fidelity_failed`` while the previous bundle keeps serving.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from tinymodel import TinyModel, build_tiny_bundles

from agent.bundle import Keyring, Manifest, SigningKey
from agent.bundle.release import RELEASE_NAME, read_release
from agent.cli import main as agent_cli
from agent.fidelity import PROBE_POSITIONS
from edgepack.cli import main as edgepack
from packager.bundler import write_bundle
from packager.release import verify_release_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, tiny_phi3: TinyModel) -> dict[str, Any]:
    key = SigningKey.generate("release-fidelity")
    d = tmp_path_factory.mktemp("release")
    bundles = build_tiny_bundles(tiny_phi3, d, (1, 2), key)
    ring = d / "keyring.json"
    ring.write_bytes(Keyring([key.public]).to_bytes())
    return {"v1": bundles[1], "v2": bundles[2], "keyring": ring, "key": key}


def _resign(src: Path, out: Path, key: SigningKey, **changes: object) -> Path:
    """The bundle ``src`` with its manifest changed and signed again by ``key``."""
    payload = out.parent / (out.name + ".files")
    with tarfile.open(src) as tar:
        m = Manifest.from_bytes(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        files: dict[str, Path] = {}
        for f in m.files:
            dst = payload / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(f.path).read())  # type: ignore[union-attr]
            files[f.path] = dst
    write_bundle(out, dataclasses.replace(m, **changes), key, files)
    return out


def test_build_writes_a_signed_release_that_lists_each_bundle(build, capsys) -> None:
    folder = build["v2"].parent
    rel, _, _ = read_release(folder / RELEASE_NAME, Keyring.from_bytes(build["keyring"].read_bytes()))
    (entry,) = rel.bundles.values()
    assert entry.file == build["v2"].name and entry.size == build["v2"].stat().st_size
    assert rel.version == 2 and entry.runtime == "llamacpp" and entry.quant == "Q8_0"
    assert entry.fidelity_threshold is not None and 0 < entry.fidelity_threshold <= 1
    assert set(entry.quality) >= {"delta_pct", "top1_agreement", "reference"}

    assert edgepack(["release", "verify", str(folder), "--keyring", str(build["keyring"]),
                     "--bundles", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True and doc["release_id"] == rel.release_id
    assert edgepack(["release", "inspect", str(folder)]) == 0
    assert entry.profile in capsys.readouterr().out


def test_a_changed_bundle_or_release_byte_is_caught(build, tmp_path, capsys) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in build["v1"].parent.iterdir():
        if p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    ring = Keyring.from_bytes(build["keyring"].read_bytes())
    bundle = folder / build["v1"].name
    data = bytearray(bundle.read_bytes())
    data[-4096] ^= 0x01
    bundle.write_bytes(bytes(data))
    _, checks = verify_release_dir(folder, ring, bundles=True)
    assert [c.ok for c in checks] == [False] and "does not match" in checks[0].reason
    assert edgepack(["release", "verify", str(folder), "--keyring", str(build["keyring"]),
                     "--bundles"]) != 0
    capsys.readouterr()

    rel = folder / RELEASE_NAME
    rel.write_bytes(rel.read_bytes().replace(b'"version":1', b'"version":7', 1))
    assert edgepack(["release", "verify", str(folder), "--keyring", str(build["keyring"])]) != 0
    assert "signature" in capsys.readouterr().err.lower()


def test_the_gate_checks_fidelity_and_rolls_back_a_bundle_that_computes_other_tokens(
        build, tmp_path, capsys) -> None:
    state, ring = tmp_path / "state", str(build["keyring"])

    def cli(*args: str) -> int:
        return agent_cli(["--state-dir", str(state), "--keyring", ring, *args])

    assert cli("install", str(build["v1"]), "--gate-tokens", "8", "--json") == 0
    fid = json.loads(capsys.readouterr().out)["check"]["fidelity"]
    assert fid["checked"] is True and fid["ok"] is True
    assert fid["positions"] == PROBE_POSITIONS and fid["agreement"] == 1.0, fid  # same host

    # v2 with ids this model does not compute, correctly signed: only the gate can tell.
    key = build["key"]
    with tarfile.open(build["v2"]) as tar:
        m = Manifest.from_bytes(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert m.fidelity is not None
    wrong = dataclasses.replace(m.fidelity, top1=tuple(t + 1 for t in m.fidelity.top1))
    bad = _resign(build["v2"], tmp_path / "wrong-ids.bundle", key, fidelity=wrong)
    assert cli("install", str(bad), "--gate-tokens", "8", "--json") == 1
    err = capsys.readouterr().err
    assert "fidelity: top-1 agreement 0.000" in err and "rolled back" in err, err
    assert cli("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["current"]["version"] == 1

    # The operator may lower the bar for one install (0 turns the check off, reported so).
    assert cli("install", str(bad), "--gate-tokens", "8", "--slo", "min_agreement=0", "--json") == 0
    fid = json.loads(capsys.readouterr().out)["check"]["fidelity"]
    assert fid["checked"] is False and "threshold 0" in fid["reason"]
