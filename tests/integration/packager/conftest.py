"""Session fixtures for the GGUF pipeline on the real sample model (Gemma 3 270M).

Everything is cached under $EDGEPACK_CACHE (default ~/.cache/edgepack) by the packager itself, so
a second run reuses the HF checkpoint, the F16 reference and the quantized variants.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from packager.model import ModelInfo
from packager.sample import SampleModel


@pytest.fixture
def forbid(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``forbid(module, *names)``: calling any of them fails the test — how a cache hit is proven
    (the converter did not run), rather than by how long the call took."""

    def apply(module: ModuleType, *names: str) -> None:
        for name in names:
            def refuse(*_a: object, _name: str = name, **_kw: object) -> None:
                raise AssertionError(f"{module.__name__}.{_name} ran: not a cache hit")

            monkeypatch.setattr(module, name, refuse)

    return apply


@pytest.fixture(scope="session")
def packager_cache() -> Path:
    from packager.cache import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def sample_hf(sample_model: SampleModel, packager_cache: Path) -> ModelInfo:
    """The sample's dequantized HF checkpoint as a model source."""
    from packager.model import resolve_source

    return resolve_source(str(sample_model.hf_dir), cache_dir=packager_cache)


@pytest.fixture(scope="session")
def f16_reference(sample_hf: ModelInfo, packager_cache: Path) -> Path:
    """HF -> F16 GGUF with llama.cpp's converter (built once per machine)."""
    from packager.gguf import reference_gguf

    return reference_gguf(sample_hf, packager_cache)


@pytest.fixture(scope="session")
def variants_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("variants")


@pytest.fixture(scope="session")
def q4_k_m_gguf(sample_hf: ModelInfo, f16_reference: Path, variants_dir: Path,
                packager_cache: Path) -> Path:
    from packager.gguf import build_gguf_variant

    return build_gguf_variant(sample_hf, "Q4_K_M", variants_dir, cache_dir=packager_cache,
                              threads=2)
