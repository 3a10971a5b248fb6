"""The tiny random-weight Phi-3 (packager/tiny.py) as pytest fixtures, for fast tests of real paths.

Import the fixtures into a conftest (or a test module) to use them::

    from tinymodel import tiny_bundles, tiny_phi3, tiny_phi3_eos_first  # noqa: F401

- ``tiny_phi3`` (session): the :class:`~packager.tiny.TinyModel` — an HF checkpoint of ~11 MB,
  made once per machine in ~2 s under $EDGEPACK_CACHE (default ~/.cache/edgepack), then reused.
  Greedy or sampled, it always generates every token asked for (its stop tokens are suppressed).
- ``tiny_phi3_eos_first`` (session): the same shape whose first generated token is EOS — a model
  that "stops at once", for tests of what a benchmark gate does with zero generated tokens.
- ``tiny_bundles`` (session): signed GGUF Q8_0 bundles of ``tiny_phi3`` for a profile this host
  matches (:data:`TINY_PROFILE`): ``v1``, ``v2``, ``v3`` (same model, same key, versions 1-3),
  ``stops_v4`` (version 4 of the same model name, but the EOS-first weights: every ``infer`` of it
  ends at once with 0 tokens; what the post-install gate makes of it is the gate's business), and
  ``keyring`` (the devices' keyring file).
  Each bundle is ~3 MB; all five take a few seconds once the GGUF variants are cached.

:func:`build_tiny_bundles` is the factory behind ``tiny_bundles`` for tests that need other
versions, keys or profiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import Keyring, SigningKey
from packager.tiny import EOS_STOPS_AT_ONCE, TinyModel

# A profile this host matches (x86_64 or aarch64, any RAM): the x86-64-cpu target (GGUF Q8_0 on
# llama.cpp) with no SLO, so a busy CI machine cannot fail the gate by being slow.
TINY_PROFILE: dict[str, Any] = {
    "name": "tiny-host-q8", "description": "test: this host, GGUF Q8_0 of the tiny Phi-3",
    "class": "server",
    "match": {"arch": ["x86_64", "aarch64"]},
    "target": {"runtime": "llamacpp", "format": "gguf", "precision": "int8", "quant": "Q8_0",
               "context": 1024, "threads": 2, "ram_budget_gb": 1.0},
    "budget": {"max_ppl_increase_pct": 5.0},
}


def _cache() -> Path:
    from packager.cache import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def tiny_phi3() -> TinyModel:
    """The tiny random-weight Phi-3 (seed 0), made once per machine."""
    from packager.tiny import ensure_tiny_phi3

    return ensure_tiny_phi3(_cache())


@pytest.fixture(scope="session")
def tiny_phi3_eos_first() -> TinyModel:
    """The tiny Phi-3 whose first generated token is EOS (zero tokens generated)."""
    from packager.tiny import ensure_tiny_phi3

    return ensure_tiny_phi3(_cache(), eos_bias=EOS_STOPS_AT_ONCE)


def build_tiny_bundles(model: TinyModel, out_dir: Path, versions: Iterable[int], key: SigningKey, *,
                       profile: dict[str, Any] | None = None, model_name: str = "") -> dict[int, Path]:
    """Signed bundles of ``model`` for ``profile`` (default :data:`TINY_PROFILE`), one per version.

    Args:
        model: the tiny model to package.
        out_dir: where the bundles go (one subfolder per version).
        versions: the bundle versions to write.
        key: the signing key.
        profile: a profile as a dict (``DeviceProfile.from_dict``).
        model_name: the manifest's model name (default: the model's own, e.g. ``tiny-phi3``);
            give another model's name to make a "new version" of it with these weights.

    Returns:
        version -> bundle path.
    """
    from agent.profiles import DeviceProfile
    from packager.build import build
    from packager.model import resolve_source

    cache = _cache()
    info = resolve_source(str(model.hf_dir), cache_dir=cache)
    if model_name:
        info = dataclasses.replace(info, name=model_name)
    prof = DeviceProfile.from_dict(profile or TINY_PROFILE)
    out: dict[int, Path] = {}
    for v in versions:
        report = build(info, [prof], key, out_dir / f"v{v}", cache_dir=cache, bundle_version=v,
                       speed=False)
        if not report.bundles:
            raise AssertionError(f"no bundle built for v{v}: {report.refused} {report.over_budget}")
        out[v] = report.bundles[0].path
    return out


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_phi3: TinyModel,
                 tiny_phi3_eos_first: TinyModel) -> dict[str, Path]:
    """Signed Q8_0 bundles of the tiny Phi-3 for this host: v1, v2, v3, stops_v4 and keyring."""
    key = SigningKey.generate("tiny-tests")
    d = tmp_path_factory.mktemp("tiny-bundles")
    built = build_tiny_bundles(tiny_phi3, d, (1, 2, 3), key)
    out = {f"v{v}": p for v, p in built.items()}
    out["stops_v4"] = build_tiny_bundles(tiny_phi3_eos_first, d / "stops", (4,), key,
                                         model_name=tiny_phi3.name)[4]
    out["keyring"] = d / "keyring.json"
    out["keyring"].write_bytes(Keyring([key.public]).to_bytes())
    return out
