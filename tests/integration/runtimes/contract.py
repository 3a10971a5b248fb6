"""The one contract suite every runtime plugin passes, on a real model.

A runtime's test module defines ``class TestX(RuntimeContract)`` with ``runtime_class`` set and
two fixtures: ``model_path`` (a model in the runtime's format) and ``load_options`` (LoadOptions
with a chat template the model understands). The suite skips with the reason from ``check()`` when
the runtime is not viable here (and fails in CI, which installs every runtime: tests/need.py). The
class name does not start with ``Test``, so pytest does not
collect it on its own.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from need import need

from agent.errors import InferenceError, RuntimeUnavailableError
from agent.runtimes import Chunk, GenerationParams, LoadOptions, Runtime
from agent.runtimes.base import FINISH_REASONS

# Gemma's chat format (<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n) as a
# Hugging Face Jinja template; the sample GGUF is a base model and carries no template of its own.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

PROMPT = "The capital of France is"
# Greedy plus a repeat penalty: deterministic, and coherent English from a base model.
GREEDY = GenerationParams(max_tokens=32, temperature=0.0, repeat_penalty=1.2)
EVAL_TEXT = (
    "The river rises in the hills north of the town and flows south through farmland before it "
    "reaches the sea. In spring the water is high and fast; in late summer it is low enough to "
    "cross on foot. The old mill by the bridge has been turned into a small museum, and every "
    "year in June the town holds a market on the river bank, with music, food and boats."
)


def _collect(chunks: Iterator[Chunk]) -> tuple[str, list[Chunk]]:
    got = list(chunks)
    return "".join(c.text for c in got), got


class RuntimeContract:
    """Behaviour every Runtime must have. Subclasses set ``runtime_class`` and the two fixtures."""

    runtime_class: ClassVar[type[Runtime]]

    @pytest.fixture(autouse=True)
    def _viable(self) -> None:
        try:
            self.runtime_class.check()
        except RuntimeUnavailableError as e:
            need(False, f"{self.runtime_class.name} not viable here: {e}")

    @pytest.fixture
    def runtime(self, model_path: Path, load_options: LoadOptions) -> Iterator[Runtime]:
        rt = self.runtime_class()
        rt.load(model_path, load_options)
        yield rt
        rt.close()

    # --- generation ------------------------------------------------------------------------------

    def test_completion_is_english_and_ends_with_one_done_chunk(self, runtime: Runtime) -> None:
        text, chunks = _collect(runtime.stream(PROMPT, GREEDY))

        assert text.strip(), "no text generated"
        ascii_share = sum(ch.isascii() for ch in text) / len(text)
        assert ascii_share > 0.9, text
        assert sum(ch.isalpha() for ch in text) > 10, text
        assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert all(c.text for c in chunks[:-1]), "empty text chunks are not forwarded"
        last = chunks[-1]
        assert last.text == ""
        assert last.usage is not None
        assert last.usage.prompt_tokens > 0
        assert 0 < last.usage.completion_tokens <= GREEDY.max_tokens
        assert last.usage.ttft_ms > 0
        assert last.usage.decode_tok_s > 0
        assert last.usage.finish_reason in FINISH_REASONS
        assert all(c.usage is None for c in chunks[:-1])

    def test_greedy_is_deterministic(self, runtime: Runtime) -> None:
        first, _ = _collect(runtime.stream(PROMPT, GREEDY))
        second, _ = _collect(runtime.stream(PROMPT, GREEDY))
        assert first == second

    def test_dropping_the_prompt_cache_keeps_the_answer_and_a_busy_drop_is_refused(
        self, runtime: Runtime
    ) -> None:
        first, _ = _collect(runtime.stream(PROMPT, GREEDY))
        runtime.drop_prompt_cache()
        again, _ = _collect(runtime.stream(PROMPT, GREEDY))
        assert again == first  # the whole prompt evaluated afresh gives the same greedy text
        gen = runtime.stream(PROMPT, GREEDY)
        next(gen)
        with pytest.raises(InferenceError, match="busy"):
            runtime.drop_prompt_cache()  # never under a running generation
        gen.close()
        runtime.drop_prompt_cache()
        self.runtime_class().drop_prompt_cache()  # nothing loaded: nothing to drop

    def test_max_tokens_is_respected(self, runtime: Runtime) -> None:
        _, chunks = _collect(runtime.stream(PROMPT, GenerationParams(max_tokens=4, temperature=0.0)))
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.completion_tokens <= 4
        assert usage.finish_reason in ("length", "stop")

    def test_stop_string_ends_generation_and_is_not_returned(self, runtime: Runtime) -> None:
        reference, _ = _collect(runtime.stream(PROMPT, GREEDY))
        words = reference.split()
        assert len(words) >= 4, reference
        stop = words[2]
        expected = reference[: reference.index(stop)]

        params = GenerationParams(max_tokens=32, temperature=0.0, repeat_penalty=1.2, stop=(stop,))
        text, chunks = _collect(runtime.stream(PROMPT, params))

        assert text == expected
        assert stop not in text
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.finish_reason == "stop"

    def test_cancel_from_another_thread_stops_early(self, runtime: Runtime) -> None:
        params = GenerationParams(max_tokens=400, temperature=0.0, repeat_penalty=1.2)
        chunks: list[Chunk] = []
        canceller: threading.Thread | None = None
        for chunk in runtime.stream(PROMPT, params):
            chunks.append(chunk)
            if canceller is None and not chunk.done:
                canceller = threading.Thread(target=runtime.cancel)
                canceller.start()
        assert canceller is not None
        canceller.join()

        usage = chunks[-1].usage
        assert chunks[-1].done and usage is not None
        assert usage.finish_reason == "cancelled"
        assert usage.completion_tokens < 100
        # The runtime stays usable after a cancel, and a stale cancel does not leak into it.
        _, after = _collect(runtime.stream(PROMPT, GREEDY))
        assert after[-1].usage is not None
        assert after[-1].usage.finish_reason != "cancelled"

    def test_chat_with_template_returns_text(self, runtime: Runtime) -> None:
        params = GenerationParams(max_tokens=24, temperature=0.0, repeat_penalty=1.2)
        text, chunks = _collect(runtime.stream("What is the capital of France?", params, chat=True))
        assert text.strip()
        usage = chunks[-1].usage
        assert usage is not None
        # The template's turn markers count as prompt tokens.
        plain = _plain_prompt_tokens(runtime, "What is the capital of France?")
        assert usage.prompt_tokens > plain

    # --- quality -------------------------------------------------------------------------------

    def test_evaluate_nll_is_finite_and_deterministic(self, runtime: Runtime) -> None:
        first = runtime.evaluate_nll(EVAL_TEXT, window=32)
        second = runtime.evaluate_nll(EVAL_TEXT, window=32)

        assert first == second
        assert first.tokens > 32, "several windows expected"
        assert math.isfinite(first.mean_nll) and first.mean_nll > 0
        assert first.perplexity == pytest.approx(math.exp(first.mean_nll))
        assert first.top1 is not None and len(first.top1) == first.tokens
        # English under an English model: far better than uniform over a large vocabulary.
        assert first.mean_nll < 8

    def test_evaluate_nll_leaves_generation_unchanged(self, runtime: Runtime) -> None:
        before, _ = _collect(runtime.stream(PROMPT, GREEDY))
        runtime.evaluate_nll(EVAL_TEXT)
        after, _ = _collect(runtime.stream(PROMPT, GREEDY))
        assert before == after

    def test_window_larger_than_context_is_refused(self, runtime: Runtime, load_options: LoadOptions) -> None:
        with pytest.raises(InferenceError):
            runtime.evaluate_nll(EVAL_TEXT, window=load_options.context)

    # --- lifecycle -----------------------------------------------------------------------------

    def test_second_load_replaces_the_first(
        self, runtime: Runtime, model_path: Path, load_options: LoadOptions
    ) -> None:
        first, _ = _collect(runtime.stream(PROMPT, GREEDY))
        runtime.load(model_path, load_options)
        assert runtime.loaded and runtime.model_path == model_path
        second, _ = _collect(runtime.stream(PROMPT, GREEDY))
        assert first == second
        runtime.close()
        assert not runtime.loaded

    def test_stream_before_load_raises(self) -> None:
        rt = self.runtime_class()
        with pytest.raises(InferenceError, match="no model loaded"):
            rt.stream(PROMPT, GREEDY)
        with pytest.raises(InferenceError, match="no model loaded"):
            rt.evaluate_nll(EVAL_TEXT)

    def test_loading_a_non_model_file_raises_inference_error(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(bytes(range(256)) * 64)
        rt = self.runtime_class()
        with pytest.raises(InferenceError):
            rt.load(bad, LoadOptions(threads=1))
        assert not rt.loaded
        with pytest.raises(InferenceError):
            rt.load(tmp_path / "missing.gguf", LoadOptions(threads=1))

    def test_failed_load_leaves_nothing_resident(self, runtime: Runtime, tmp_path: Path) -> None:
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"\0" * 4096)
        with pytest.raises(InferenceError):
            runtime.load(bad, LoadOptions(threads=1))
        assert not runtime.loaded
        with pytest.raises(InferenceError, match="no model loaded"):
            runtime.stream(PROMPT, GREEDY)

    def test_context_manager_closes(self, model_path: Path, load_options: LoadOptions) -> None:
        with self.runtime_class() as rt:
            rt.load(model_path, load_options)
            assert rt.loaded
        assert not rt.loaded

    def test_bad_generation_params_raise_inference_error(self) -> None:
        for bad in ({"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_k": -1},
                    {"repeat_penalty": 0.0}, {"stop": ("",)}, {"seed": -1}):
            with pytest.raises(InferenceError):
                GenerationParams(**bad)

    def test_describe_reports_version_and_devices(self) -> None:
        facts = self.runtime_class.describe()
        assert facts["version"]
        assert "cpu" in facts["devices"]


def _plain_prompt_tokens(runtime: Runtime, prompt: str) -> int:
    """Prompt tokens of ``prompt`` as a plain completion (one token generated)."""
    _, chunks = _collect(runtime.stream(prompt, GenerationParams(max_tokens=1, temperature=0.0)))
    assert chunks[-1].usage is not None
    return chunks[-1].usage.prompt_tokens
