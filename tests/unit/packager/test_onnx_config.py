"""The ONNX build's pure parts: config adaptation for the builder, request checks, folder finish."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from need import need_module

from agent.errors import ConvertError, PackagingError
from packager.model import ModelInfo
from packager.onnx import (
    DEFAULT_MAX_LENGTH,
    adapt_config,
    chat_template_of,
    check_request,
    finish_folder,
    stage_checkpoint,
)

# The sample's config.json (Gemma 3 270M dequantized and saved by transformers 5.23), trimmed to
# the keys that matter here; the RoPE section is verbatim.
SAMPLE_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "head_dim": 256,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "vocab_size": 262144,
    "transformers_version": "5.23.0",
}
GEMMA_TEMPLATE = "{{ bos_token }}<start_of_turn>user\n{{ messages[0]['content'] }}<end_of_turn>\n"


def sample_info(path: Path = Path("/nonexistent"), **kw: Any) -> ModelInfo:
    fields: dict[str, Any] = dict(
        name="Gemma 3 270m", architecture="gemma3_text", n_params=268_098_176, n_layers=18,
        hidden_size=640, n_heads=4, n_kv_heads=1, head_dim=256, vocab_size=262144,
        max_context=32768, has_chat_template=True, source_kind="hf", path=path,
        source_digest="sha256:" + "ab" * 32,
    )
    fields.update(kw)
    return ModelInfo(**fields)


# --- adapt_config ---------------------------------------------------------------------------


def test_gemma3_rope_gets_flat_keys_the_builder_reads() -> None:
    adapted, changes = adapt_config(SAMPLE_CONFIG)
    rope = adapted["rope_parameters"]
    assert rope["rope_type"] == "default"
    assert rope["rope_theta"] == 1000000.0  # global layers
    assert rope["rope_local_base_freq"] == 10000.0  # sliding layers
    # The nested entries stay, so transformers still builds the same model from the file.
    assert rope["full_attention"] == SAMPLE_CONFIG["rope_parameters"]["full_attention"]
    assert rope["sliding_attention"] == SAMPLE_CONFIG["rope_parameters"]["sliding_attention"]
    assert len(changes) == 3 and any("rope_local_base_freq = 10000.0" in c for c in changes)
    assert {k: v for k, v in adapted.items() if k != "rope_parameters"} == {
        k: v for k, v in SAMPLE_CONFIG.items() if k != "rope_parameters"}


def test_adapt_config_does_not_modify_its_input_and_is_idempotent() -> None:
    before = json.dumps(SAMPLE_CONFIG, sort_keys=True)
    once, _ = adapt_config(SAMPLE_CONFIG)
    assert json.dumps(SAMPLE_CONFIG, sort_keys=True) == before
    twice, changes = adapt_config(once)
    assert twice == once and changes == []


def test_scaled_global_rope_is_carried_to_the_top_level() -> None:
    # Gemma 3 4B+ scale the global layers' RoPE linearly; the builder reads rope_type + factor.
    config = json.loads(json.dumps(SAMPLE_CONFIG))
    config["rope_parameters"]["full_attention"] = {"rope_type": "linear", "factor": 8.0,
                                                   "rope_theta": 1000000.0}
    rope = adapt_config(config)[0]["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("linear", 8.0, 1000000.0)


def test_scaled_sliding_rope_is_refused() -> None:
    config = json.loads(json.dumps(SAMPLE_CONFIG))
    config["rope_parameters"]["sliding_attention"]["rope_type"] = "yarn"
    with pytest.raises(PackagingError, match="sliding-window layers"):
        adapt_config(config)


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "default", "rope_theta": 10000.0},  # flat, as Llama-style configs have it
    {"rope_type": "yarn", "factor": 4.0},
])
def test_configs_without_per_layer_rope_are_left_alone(rope: dict[str, Any] | None) -> None:
    config = {"model_type": "llama", "hidden_size": 64, "rope_parameters": rope}
    adapted, changes = adapt_config(config)
    assert adapted == config and changes == []


def test_transformers_loads_the_adapted_config_with_what_the_builder_needs(tmp_path: Path) -> None:
    transformers = need_module("transformers", "transformers not installed (the packager extra)")
    (tmp_path / "config.json").write_text(json.dumps(adapt_config(SAMPLE_CONFIG)[0]))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    # transformers 5 keeps RoPE nested per layer type; the builder copies the top-level keys of
    # rope_parameters onto the config (Model.make_config_init) and then reads these.
    rope = config.rope_parameters
    assert rope["rope_type"] == "default"
    assert rope["rope_theta"] == 1000000.0 and rope["rope_local_base_freq"] == 10000.0
    assert rope["sliding_attention"]["rope_theta"] == 10000.0


def test_stage_checkpoint_links_files_and_rewrites_only_the_config(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(SAMPLE_CONFIG))
    (hf / "model.safetensors").write_bytes(b"weights")
    (hf / "tokenizer.json").write_text("{}")
    staged = tmp_path / "staged"
    staged.mkdir()
    changes = stage_checkpoint(hf, staged)
    assert changes
    assert (staged / "model.safetensors").is_symlink()
    assert (staged / "model.safetensors").resolve() == (hf / "model.safetensors").resolve()
    assert not (staged / "config.json").is_symlink()
    assert "rope_local_base_freq" in json.loads((staged / "config.json").read_text())["rope_parameters"]
    assert json.loads((hf / "config.json").read_text()) == SAMPLE_CONFIG  # the source is untouched


# --- check_request ----------------------------------------------------------------------------


def test_int4_cpu_with_profile_options_is_accepted() -> None:
    opts = check_request(sample_info(), "int4", "cpu", {"block_size": 32, "accuracy_level": 4})
    assert opts == {"accuracy_level": 4, "block_size": 32}


def test_k_quant_mixed_is_accepted_for_int4() -> None:
    opts = check_request(sample_info(), "int4", "cpu", {"block_size": 16,
                                                        "algo_config": "k_quant_mixed"})
    assert opts == {"algo_config": "k_quant_mixed", "block_size": 16}


def test_options_are_dropped_for_float_precisions() -> None:
    assert check_request(sample_info(), "fp32", "cpu", {"block_size": 32}) == {}


def test_qnn_is_refused_with_a_hint() -> None:
    with pytest.raises(PackagingError, match="QNN") as e:
        check_request(sample_info(), "int4", "qnn", {})
    assert "cpu" in e.value.diagnostics()


def test_fp16_on_cpu_is_refused_for_a_gqa_model_naming_the_reason() -> None:
    with pytest.raises(PackagingError, match="grouped-query attention") as e:
        check_request(sample_info(), "fp16", "cpu", {})
    assert "cuda" in e.value.diagnostics()


def test_fp16_on_cpu_is_refused_without_gqa_too() -> None:
    with pytest.raises(PackagingError, match="fp16 ONNX on CPU"):
        check_request(sample_info(n_kv_heads=4), "fp16", "cpu", {})


@pytest.mark.parametrize(("precision", "device"), [("fp16", "cuda"), ("fp16", "dml"),
                                                   ("int4", "dml"), ("int8", "cuda")])
def test_gpu_pairs_the_builder_makes_are_accepted(precision: str, device: str) -> None:
    check_request(sample_info(), precision, device, {})


@pytest.mark.parametrize(("precision", "device", "match"), [
    ("int8", "dml", "does not make int8 models for dml"),
    ("fp32", "dml", "does not make fp32 models for dml"),
    ("int3", "cpu", "unknown ONNX precision"),
    ("int4", "npu", "unknown ONNX device"),
])
def test_other_pairs_are_refused(precision: str, device: str, match: str) -> None:
    with pytest.raises(PackagingError, match=match):
        check_request(sample_info(), precision, device, {})


@pytest.mark.parametrize(("options", "match"), [
    ({"group_size": 128}, "unknown ONNX build option"),
    ({"block_size": 48}, "block_size=48"),
    ({"accuracy_level": True}, "accuracy_level=True"),
    ({"block_size": "32"}, "block_size='32'"),
    ({"algo_config": "gptq"}, "algo_config='gptq'"),
])
def test_bad_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(PackagingError, match=match):
        check_request(sample_info(), "int4", "cpu", options)


def test_a_gguf_source_is_refused() -> None:
    with pytest.raises(PackagingError, match="HF checkpoint"):
        check_request(sample_info(source_kind="gguf", native_quant="Q4_K_M"), "int4", "cpu", {})


# --- finish_folder ----------------------------------------------------------------------------


def builder_output(tmp_path: Path, *, window: int | None = 512, context: int = 32768) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    decoder: dict[str, Any] = {"filename": "model.onnx", "head_size": 256}
    if window is not None:
        decoder["sliding_window"] = {"window_size": window, "layers": [0, 1]}
    (out / "genai_config.json").write_text(json.dumps({
        "model": {"context_length": context, "decoder": decoder},
        "search": {"max_length": context, "past_present_share_buffer": True},
    }))
    (out / "model.onnx").write_bytes(b"onnx")
    return out


def test_finish_bounds_max_length_and_keeps_the_rest(tmp_path: Path) -> None:
    out = builder_output(tmp_path)
    finish_folder(out, tmp_path)
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["max_length"] == DEFAULT_MAX_LENGTH
    assert genai["search"]["past_present_share_buffer"] is True
    assert genai["model"]["context_length"] == 32768


@pytest.mark.parametrize(("window", "context", "max_length", "expected"), [
    (512, 32768, 256, 512),  # never below the sliding window
    (None, 1024, 2048, 1024),  # never above the model's context
    (None, 32768, 4096, 4096),
])
def test_finish_max_length_rules(tmp_path: Path, window: int | None, context: int, max_length: int,
                                 expected: int) -> None:
    out = builder_output(tmp_path, window=window, context=context)
    finish_folder(out, tmp_path, max_length=max_length)
    assert json.loads((out / "genai_config.json").read_text())["search"]["max_length"] == expected


def test_finish_copies_the_chat_template_from_the_tokenizer_config(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": GEMMA_TEMPLATE}))
    out = builder_output(tmp_path)
    finish_folder(out, hf)
    assert (out / "chat_template.jinja").read_text() == GEMMA_TEMPLATE
    assert chat_template_of(out) == GEMMA_TEMPLATE


def test_finish_keeps_the_builders_template_and_writes_none_when_there_is_none(tmp_path: Path) -> None:
    out = builder_output(tmp_path)
    finish_folder(out, tmp_path)  # tmp_path has no template
    assert not (out / "chat_template.jinja").exists()
    (out / "chat_template.jinja").write_text("builder's")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "chat_template.jinja").write_text("source's")
    finish_folder(out, hf)
    assert (out / "chat_template.jinja").read_text() == "builder's"


def test_finish_refuses_an_output_without_model_or_config(tmp_path: Path) -> None:
    out = builder_output(tmp_path)
    (out / "model.onnx").unlink()
    with pytest.raises(ConvertError, match=r"no model\.onnx"):
        finish_folder(out, tmp_path)
    (out / "genai_config.json").unlink()
    with pytest.raises(ConvertError, match=r"genai_config\.json"):
        finish_folder(out, tmp_path)
