"""The runtime contract on openvino-genai with the sample (Gemma 3 270M base) exported to OpenVINO int8.

The IR is made once per machine by the packager (``build_openvino_variant``, cached under
$EDGEPACK_CACHE); on a device-only install without the packager's tools the suite skips (and
fails in CI, which has them: tests/need.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from integration.runtimes.contract import GEMMA_CHAT_TEMPLATE, PROMPT, RuntimeContract
from need import need_module

from agent.errors import InferenceError, RuntimeUnavailableError
from agent.runtimes import GenerationParams, LoadOptions, get_runtime
from agent.runtimes.openvino import OpenVINORuntime


@pytest.fixture(scope="session")
def model_path(sample_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's int8 IR folder (exported once per machine, then reused from the cache)."""
    need_module("openvino_genai", "openvino-genai not installed (the openvino extra)")
    from packager.cache import default_cache_dir
    from packager.model import resolve_source
    from packager.openvino import build_openvino_variant
    from packager.plan import Variant

    cache = default_cache_dir()
    model = resolve_source(str(sample_model.hf_dir), cache_dir=cache)
    variant = Variant("openvino", "openvino-ir", "int8", "int8", "cpu")
    return build_openvino_variant(model, variant, tmp_path_factory.mktemp("ov"), cache_dir=cache,
                                  threads=2)


@pytest.fixture
def load_options() -> LoadOptions:
    # Two threads as on the smallest device class; an explicit template as for the other runtimes.
    return LoadOptions(context=1024, threads=2, chat_template=GEMMA_CHAT_TEMPLATE)


@pytest.mark.slow
@pytest.mark.integration
class TestOpenVINO(RuntimeContract):
    runtime_class = get_runtime("openvino")

    def test_registry_names_the_openvino_runtime(self) -> None:
        assert self.runtime_class is OpenVINORuntime

    def test_ir_folder_has_model_tokenizer_and_detokenizer(self, model_path: Path) -> None:
        for name in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
                     "openvino_detokenizer.xml"):
            assert (model_path / name).is_file(), name

    def test_chat_uses_the_template_carried_in_the_ir(self, model_path: Path) -> None:
        # The packager's export carries the checkpoint's chat template: no LoadOptions template.
        with self.runtime_class() as rt:
            rt.load(model_path, LoadOptions(context=512, threads=2))
            params = GenerationParams(max_tokens=8, temperature=0.0, repeat_penalty=1.2)
            chat = list(rt.stream("What is the capital of France?", params, chat=True))
            plain = list(rt.stream("What is the capital of France?", params))
        assert chat[-1].usage is not None and plain[-1].usage is not None
        # <bos><start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n: one BOS, 8 template tokens.
        assert chat[-1].usage.prompt_tokens == plain[-1].usage.prompt_tokens + 8

    def test_greedy_completion_names_paris(self, runtime) -> None:
        # Plain greedy, as the packager checks the sample: the answer is " The capital of France
        # is Paris." (a repeat penalty steers this base model elsewhere).
        params = GenerationParams(max_tokens=16, temperature=0.0, repeat_penalty=1.0)
        text = "".join(c.text for c in runtime.stream("Q: What is the capital of France?\nA:", params))
        assert "Paris" in text, text

    def test_sampling_with_a_seed_is_reproducible(self, runtime) -> None:
        params = GenerationParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=7)
        first = "".join(c.text for c in runtime.stream(PROMPT, params))
        second = "".join(c.text for c in runtime.stream(PROMPT, params))
        assert first == second and first.strip()

    def test_prompt_longer_than_context_is_refused(self, model_path: Path) -> None:
        with self.runtime_class() as rt:
            rt.load(model_path, LoadOptions(context=64, threads=2))
            with pytest.raises(InferenceError, match="does not fit"):
                list(rt.stream("word " * 200, GenerationParams(max_tokens=4)))

    def test_abandoned_stream_stops_generating_and_frees_the_runtime(self, runtime) -> None:
        stream = runtime.stream(PROMPT, GenerationParams(max_tokens=400, temperature=0.0))
        next(stream)
        stream.close()  # the consumer walks away mid-generation
        _, *rest = list(runtime.stream(PROMPT, GenerationParams(max_tokens=4, temperature=0.0)))
        assert rest[-1].done

    def test_a_folder_without_an_ir_is_refused(self, tmp_path: Path) -> None:
        with self.runtime_class() as rt, pytest.raises(InferenceError, match=r"openvino_model\.xml"):
            rt.load(tmp_path, LoadOptions(threads=1))

    def test_a_corrupt_ir_raises_inference_error(self, model_path: Path, tmp_path: Path) -> None:
        for f in model_path.iterdir():
            (tmp_path / f.name).symlink_to(f)
        (tmp_path / "openvino_model.xml").unlink()
        (tmp_path / "openvino_model.xml").write_text("<net><broken")
        with self.runtime_class() as rt:
            with pytest.raises(InferenceError):
                rt.load(tmp_path, LoadOptions(threads=1))
            assert not rt.loaded

    @pytest.mark.parametrize("device", ["gpu", "npu"])
    def test_a_missing_device_is_unavailable_with_the_reason(self, device: str,
                                                             model_path: Path) -> None:
        import openvino

        ov_name = device.upper()
        if any(d.startswith(ov_name) for d in openvino.Core().available_devices):
            # Hardware this machine may have, not a missing part: a plain skip, in CI too.
            pytest.skip(f"this machine has an OpenVINO {ov_name}")
        with pytest.raises(RuntimeUnavailableError, match=f"{ov_name} is not available") as e:
            OpenVINORuntime.check(device)
        assert e.value.diagnostics()
        with self.runtime_class() as rt, pytest.raises(RuntimeUnavailableError):
            rt.load(model_path, LoadOptions(threads=1, device=device))

    def test_unknown_device_is_refused(self, model_path: Path) -> None:
        with self.runtime_class() as rt, pytest.raises(InferenceError, match="device"):
            rt.load(model_path, LoadOptions(threads=1, device="cuda"))
