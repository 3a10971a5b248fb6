"""The planner against real model shapes (Phi-3.5-mini-instruct, Gemma 3 270M) and profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.errors import PlanError
from agent.profiles.schema import DeviceProfile, load_profiles
from packager.model import ModelInfo, shape_from_hf_config
from packager.plan import GIB, Variant, estimate_bytes, plan, plan_profile

# microsoft/Phi-3.5-mini-instruct config.json (the values the planner reads)
PHI35_CONFIG = {
    "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32064, "max_position_embeddings": 131072, "tie_word_embeddings": False,
}
# the sample's config.json as transformers 5.23 saves it
GEMMA3_270M_CONFIG = {
    "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "vocab_size": 262144, "max_position_embeddings": 32768, "tie_word_embeddings": True,
}


def model_from(config: dict[str, Any], name: str) -> ModelInfo:
    return ModelInfo(name=name, **shape_from_hf_config(config), has_chat_template=True,
                     source_kind="hf", path=Path("/nonexistent") / name,
                     source_digest="sha256:" + "0" * 64)


PHI = model_from(PHI35_CONFIG, "Phi-3.5-mini-instruct")
GEMMA = model_from(GEMMA3_270M_CONFIG, "gemma-3-270m")


def profile(name: str, *, min_ram_gb: float, runtime: str = "llamacpp", fmt: str = "gguf",
            precision: str = "int4", quant: str = "Q4_K_M", context: int = 2048,
            ram_budget_gb: float = 0.0, fallbacks: tuple[str, ...] = (),
            device: str = "cpu", options: dict[str, Any] | None = None) -> DeviceProfile:
    target: dict[str, Any] = {"runtime": runtime, "format": fmt, "precision": precision,
                              "device": device, "context": context,
                              "ram_budget_gb": ram_budget_gb, "fallbacks": list(fallbacks),
                              "options": options or {}}
    if quant:
        target["quant"] = quant
    return DeviceProfile.from_dict({"name": name, "match": {"min_ram_gb": min_ram_gb},
                                    "target": target, "budget": {"max_ppl_increase_pct": 10.0}})


IOT_4GB = profile("iot-4gb", min_ram_gb=3.5, ram_budget_gb=3.3)
PC_16GB = profile("x86-pc-16gb", min_ram_gb=16, precision="int8", quant="Q8_0", context=4096,
                  fallbacks=("Q4_K_M",))


def test_n_params_of_phi35_mini_from_config_is_3_82_billion() -> None:
    assert PHI.n_params == pytest.approx(3.82e9, rel=0.02)
    assert (PHI.n_layers, PHI.n_kv_heads, PHI.head_dim) == (32, 32, 96)


def test_n_params_of_gemma3_270m_from_config_matches_transformers() -> None:
    # Gemma3ForCausalLM.num_parameters() of the sample: 268,098,176
    assert GEMMA.n_params == pytest.approx(268_098_176, rel=0.001)


def test_estimate_phi35_q4_k_m_weights_about_2_3_gb_and_f16_7_6_gb() -> None:
    q4 = estimate_bytes(PHI, "Q4_K_M", 2048)
    f16 = estimate_bytes(PHI, "F16", 2048)
    assert 2.2e9 < q4.weights_bytes < 2.4e9
    assert 7.4e9 < f16.weights_bytes < 7.8e9
    # K and V, 32 layers x 2048 tokens x 32 heads x 96 dims, f16
    assert q4.kv_cache_bytes == 2 * 32 * 2048 * 32 * 96 * 2
    assert q4.total_bytes == q4.weights_bytes + q4.kv_cache_bytes + q4.overhead_bytes


def test_estimate_accepts_onnx_precisions() -> None:
    int4 = estimate_bytes(PHI, "int4", 2048, fmt="onnx")
    assert int4.weights_bytes == int(PHI.n_params * 4.5 / 8)


def test_estimate_unknown_quant_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="Q3_K_XL"):
        estimate_bytes(PHI, "Q3_K_XL", 2048)


def test_4gb_iot_board_gets_q4_k_m_for_phi35_never_f16() -> None:
    pp = plan_profile(IOT_4GB, PHI)
    assert pp.variant == Variant("llamacpp", "gguf", "int4", "Q4_K_M", "cpu")
    assert pp.variant.quant != "F16"
    assert pp.estimate.total_bytes <= 3.3 * GIB
    assert pp.context == 2048
    assert any("within 3.30 GiB" in r for r in pp.reasons)


def test_f16_only_profile_with_4gb_is_refused_naming_the_numbers() -> None:
    f16_only = profile("f16-4gb", min_ram_gb=4, precision="fp16", quant="F16")
    with pytest.raises(PlanError) as e:
        plan_profile(f16_only, PHI)
    msg = str(e.value)
    assert "f16-4gb" in msg and "F16 needs" in msg
    assert "3.82 B params" in msg
    assert "budget is 3.20 GiB" in msg  # 80% of min_ram_gb 4
    assert "80% of min_ram_gb 4" in msg
    assert e.value.diagnostics()  # tells the user what to change


def test_fallbacks_are_taken_in_order() -> None:
    # Phi-3.5 at 2048 tokens: Q8_0 ~4.7 GiB, Q5_K_M ~3.4 GiB, Q4_K_M ~3.05 GiB, Q4_0 ~2.9 GiB
    p = profile("tight", min_ram_gb=8, precision="int8", quant="Q8_0", ram_budget_gb=3.2,
                fallbacks=("Q5_K_M", "Q4_K_M", "Q4_0"))
    pp = plan_profile(p, PHI)
    assert pp.variant.quant == "Q4_K_M"  # the first that fits, not the smallest
    assert pp.variant.precision == "int4"  # the precision follows the chosen quant
    assert any("Q8_0 needs" in r and "Q5_K_M needs" in r and "fell back to Q4_K_M" in r
               for r in pp.reasons)


def test_16gb_x86_pc_gets_q8_0() -> None:
    pp = plan_profile(PC_16GB, PHI)
    assert pp.variant.quant == "Q8_0"
    assert pp.context == 4096


def test_context_is_clipped_to_the_models_maximum() -> None:
    long_ctx = profile("long", min_ram_gb=16, context=65536)
    pp = plan_profile(long_ctx, GEMMA)
    assert pp.context == 32768
    assert any("clipped" in r for r in pp.reasons)


def test_profiles_sharing_a_variant_build_it_once_in_stable_order() -> None:
    another_iot = profile("iot-8gb", min_ram_gb=8)
    bp = plan([IOT_4GB, PC_16GB, another_iot], PHI)
    assert list(bp.profiles) == ["iot-4gb", "x86-pc-16gb", "iot-8gb"]
    assert [v.quant for v in bp.variants] == ["Q4_K_M", "Q8_0"]
    assert bp.profiles["iot-4gb"].variant == bp.profiles["iot-8gb"].variant == bp.variants[0]
    assert bp.refused == {}


def test_onnx_and_openvino_profiles_build_their_precision_with_their_options() -> None:
    phone = profile("phone", min_ram_gb=6, runtime="ortgenai", fmt="onnx", quant="",
                    options={"block_size": 32, "accuracy_level": 4})
    pc = profile("ai-pc", min_ram_gb=16, runtime="openvino", fmt="openvino-ir", quant="",
                 precision="int8", device="gpu")
    bp = plan([phone, pc, IOT_4GB], PHI)
    assert bp.refused == {}
    onnx = bp.profiles["phone"].variant
    assert (onnx.runtime, onnx.format, onnx.precision, onnx.quant) == ("ortgenai", "onnx", "int4", "int4")
    assert dict(onnx.options) == {"block_size": 32, "accuracy_level": 4}
    assert bp.profiles["ai-pc"].variant.quant == "int8"
    assert bp.profiles["ai-pc"].variant.key == "openvino-openvino-ir-int8-gpu"


def test_options_are_part_of_the_variant_so_different_builds_are_not_shared() -> None:
    a = profile("a", min_ram_gb=6, runtime="ortgenai", fmt="onnx", quant="", options={"block_size": 32})
    b = profile("b", min_ram_gb=6, runtime="ortgenai", fmt="onnx", quant="", options={"block_size": 128})
    c = profile("c", min_ram_gb=8, runtime="ortgenai", fmt="onnx", quant="", options={"block_size": 32})
    bp = plan([a, b, c], GEMMA)
    assert len(bp.variants) == 2
    assert bp.profiles["a"].variant == bp.profiles["c"].variant
    assert bp.profiles["a"].variant.key != bp.profiles["b"].variant.key
    assert bp.profiles["a"].variant.key.startswith("ortgenai-onnx-int4-cpu-")


def test_plan_collects_refusals_instead_of_stopping() -> None:
    f16_only = profile("f16-4gb", min_ram_gb=4, precision="fp16", quant="F16")
    bp = plan([f16_only, IOT_4GB], PHI)
    assert "f16-4gb" in bp.refused and "does not fit" in bp.refused["f16-4gb"]
    assert [v.quant for v in bp.variants] == ["Q4_K_M"]


def test_sample_fits_every_constructed_profile() -> None:
    tiny = profile("tiny-2gb", min_ram_gb=2, precision="fp16", quant="F16")
    bp = plan([IOT_4GB, PC_16GB, tiny], GEMMA)
    assert bp.refused == {}
    assert {v.quant for v in bp.variants} == {"Q4_K_M", "Q8_0", "F16"}


def test_sample_fits_every_shipped_profile() -> None:
    profiles = load_profiles()
    bp = plan(profiles.values(), GEMMA)
    assert bp.refused == {}
    assert set(bp.profiles) == set(profiles)
    assert {v.format for v in bp.variants} == {"gguf", "onnx", "openvino-ir"}


def test_a_device_the_converter_cannot_target_is_refused_with_the_buildable_ones() -> None:
    qnn = profile("npu-pc", min_ram_gb=16, runtime="ortgenai", fmt="onnx", quant="", device="qnn")
    with pytest.raises(PlanError, match=r"onnx cannot be built for device qnn \(buildable: cpu, cuda, dml\)"):
        plan_profile(qnn, GEMMA)
