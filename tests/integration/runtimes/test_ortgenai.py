"""The runtime contract on onnxruntime-genai with the sample (Gemma 3 270M base) built to ONNX int4.

The int4 folder is built from the sample's HF checkpoint by the packager (~20 s once) and cached
under $EDGEPACK_CACHE, so later sessions reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from integration.runtimes.contract import GEMMA_CHAT_TEMPLATE, GREEDY, PROMPT, RuntimeContract
from need import need_module

from agent.errors import InferenceError, RuntimeUnavailableError
from agent.runtimes import GenerationParams, LoadOptions, Runtime, get_runtime
from packager.sample import SampleModel

# The android-arm64 profile's options: int4 blocks of 32, int8 activations.
INT4_OPTIONS = (("accuracy_level", 4), ("block_size", 32))


@pytest.fixture(scope="session")
def model_path(sample_model: SampleModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample built to ONNX int4 for CPU (cached by the packager)."""
    need_module("onnxruntime_genai", "onnxruntime-genai not installed (the ortgenai extra)")
    from packager.cache import default_cache_dir
    from packager.model import resolve_source
    from packager.onnx import build_onnx_variant
    from packager.plan import Variant

    cache = default_cache_dir()
    model = resolve_source(str(sample_model.hf_dir), cache_dir=cache)
    variant = Variant("ortgenai", "onnx", "int4", "int4", "cpu", INT4_OPTIONS)
    return build_onnx_variant(model, variant, tmp_path_factory.mktemp("onnx"), cache_dir=cache,
                              threads=2)


@pytest.fixture
def load_options() -> LoadOptions:
    return LoadOptions(context=1024, threads=2, chat_template=GEMMA_CHAT_TEMPLATE)


def _copy_with_config(src: Path, dst: Path, edit: dict[str, object]) -> Path:
    """Link ``src``'s files into ``dst`` with genai_config.json's decoder updated by ``edit``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "genai_config.json":
            os.link(f, dst / f.name)
    genai = json.loads((src / "genai_config.json").read_text())
    genai["model"]["decoder"].update(edit)
    (dst / "genai_config.json").write_text(json.dumps(genai))
    return dst


@pytest.mark.slow
@pytest.mark.integration
class TestOrtGenAI(RuntimeContract):
    runtime_class = get_runtime("ortgenai")

    def test_chat_uses_the_folders_own_template(self, model_path: Path) -> None:
        # The packager copied the checkpoint's Gemma 3 template into the folder.
        assert "<start_of_turn>" in (model_path / "chat_template.jinja").read_text()
        params = GenerationParams(max_tokens=8, temperature=0.0, repeat_penalty=1.2)
        with self.runtime_class() as rt:
            rt.load(model_path, LoadOptions(context=512, threads=2))
            chunks = list(rt.stream("What is the capital of France?", params, chat=True))
            plain = list(rt.stream("What is the capital of France?", params))
        assert chunks[-1].usage is not None and plain[-1].usage is not None
        # <bos><start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n: 8 more tokens.
        assert chunks[-1].usage.prompt_tokens == plain[-1].usage.prompt_tokens + 8

    def test_chat_without_any_template_is_refused(self, model_path: Path, tmp_path: Path) -> None:
        bare = tmp_path / "bare"
        bare.mkdir()
        for f in model_path.iterdir():
            if f.name != "chat_template.jinja":
                os.link(f, bare / f.name)
        with self.runtime_class() as rt:
            rt.load(bare, LoadOptions(context=512, threads=2))
            with pytest.raises(InferenceError, match="chat template"):
                list(rt.stream("Hi", GenerationParams(max_tokens=4, temperature=0.0), chat=True))

    def test_prompt_longer_than_context_is_refused(self, model_path: Path) -> None:
        with self.runtime_class() as rt:
            rt.load(model_path, LoadOptions(context=64, threads=2))
            with pytest.raises(InferenceError, match="does not fit"):
                list(rt.stream("word " * 200, GenerationParams(max_tokens=4)))

    def test_context_below_the_sliding_window_still_generates(self, model_path: Path) -> None:
        # ORT GenAI's windowed KV cache needs max_length >= 512; the runtime raises it and keeps
        # the context limit itself.
        with self.runtime_class() as rt:
            rt.load(model_path, LoadOptions(context=64, threads=2))
            chunks = list(rt.stream(PROMPT, GenerationParams(max_tokens=200, temperature=0.0)))
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens > 0
        assert usage.prompt_tokens + usage.completion_tokens <= 64

    def test_sampling_with_a_seed_is_reproducible(self, runtime: Runtime) -> None:
        params = GenerationParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=7)
        first = "".join(c.text for c in runtime.stream(PROMPT, params))
        second = "".join(c.text for c in runtime.stream(PROMPT, params))
        assert first == second and first.strip()

    def test_a_folder_built_for_a_missing_ep_is_unavailable(self, model_path: Path,
                                                            tmp_path: Path) -> None:
        cuda = _copy_with_config(model_path, tmp_path / "cuda", {"session_options": {
            "log_id": "onnxruntime-genai", "provider_options": [{"cuda": {}}]}})
        rt = self.runtime_class()
        if "cuda" in rt.describe()["devices"]:
            # Hardware this machine may have, not a missing part: a plain skip, in CI too.
            pytest.skip("this machine has CUDA")
        with pytest.raises(RuntimeUnavailableError, match="cuda execution provider") as e:
            rt.load(cuda, LoadOptions(context=512, threads=2, device="cuda"))
        assert "onnxruntime-genai-cuda" in e.value.diagnostics()
        assert not rt.loaded

    def test_device_must_match_the_folders_ep(self, model_path: Path) -> None:
        with pytest.raises(InferenceError, match="built for the cpu execution provider"):
            self.runtime_class().load(model_path, LoadOptions(context=512, threads=2, device="cuda"))

    def test_a_directory_without_genai_config_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(InferenceError, match=r"genai_config\.json"):
            self.runtime_class().load(tmp_path, LoadOptions(threads=1))

    def test_a_folder_with_a_broken_model_raises_inference_error(self, model_path: Path,
                                                                 tmp_path: Path) -> None:
        broken = tmp_path / "broken"
        shutil.copytree(model_path, broken, ignore=shutil.ignore_patterns("model.onnx*"))
        (broken / "model.onnx").write_bytes(b"\0" * 4096)
        with pytest.raises(InferenceError):
            self.runtime_class().load(broken, LoadOptions(context=512, threads=2))

    def test_stream_matches_raw_onnxruntime_genai(self, runtime: Runtime, model_path: Path) -> None:
        import onnxruntime_genai as og

        ours = "".join(c.text for c in runtime.stream(PROMPT, GREEDY))
        model = og.Model(str(model_path))
        tokenizer = og.Tokenizer(model)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=1024, repetition_penalty=GREEDY.repeat_penalty)
        gen = og.Generator(model, params)
        gen.append_tokens([2, *tokenizer.encode(PROMPT)])
        stream = tokenizer.create_stream()
        raw = ""
        for _ in range(GREEDY.max_tokens):
            gen.generate_next_token()
            raw += stream.decode(int(gen.get_next_tokens()[0]))
        assert ours == raw
