"""The planner against real model shapes (Phi-3.5-mini-instruct, Gemma 3 270M) and profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.errors import PlanError
from agent.profiles.schema import DeviceProfile, load_profiles
from packager.model import ModelInfo, shape_from_hf_config
from packager.plan import GIB, Override, Variant, estimate_bytes, plan, plan_profile

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


# --- precision overrides (--precision, --quant, --override; --force, --max-loss) -----------------

PI = profile("pi", min_ram_gb=4, ram_budget_gb=3.3, fallbacks=("Q4_0",))
PHONE = profile("phone", min_ram_gb=6, runtime="ortgenai", fmt="onnx", quant="",
                options={"block_size": 32, "accuracy_level": 4})


def test_a_quant_override_replaces_the_profiles_quant_and_fallbacks() -> None:
    pp = plan_profile(PI, GEMMA, override=Override("Q5_K_M"))
    assert pp.variant == Variant("llamacpp", "gguf", "int4", "Q5_K_M", "cpu")
    assert pp.choice.by == "user" and pp.choice.requested == "Q5_K_M"
    assert pp.choice.profile_variant is not None and pp.choice.profile_variant.quant == "Q4_K_M"
    d = pp.choice.to_dict()
    assert d["profile_choice"]["quant"] == "Q4_K_M" and d["forced"] is False
    assert d["profile_choice"]["estimate_bytes"] == estimate_bytes(GEMMA, "Q4_K_M", 2048).total_bytes
    assert any("Q5_K_M chosen by the user; the profile would choose Q4_K_M" in r for r in pp.reasons)
    assert pp.max_loss_pct == 10.0  # the profile's quality budget still applies


def test_a_precision_override_on_gguf_takes_the_profiles_quant_of_it_or_the_default() -> None:
    assert plan_profile(PI, GEMMA, override=Override("int8")).variant.quant == "Q8_0"
    assert plan_profile(PI, GEMMA, override=Override("fp32")).variant.quant == "F32"
    q4_0 = profile("q4-0", min_ram_gb=4, quant="Q4_0")
    assert plan_profile(q4_0, GEMMA, override=Override("int4")).variant.quant == "Q4_0"


def test_a_precision_override_on_onnx_keeps_the_profiles_runtime_device_and_options() -> None:
    pp = plan_profile(PHONE, GEMMA, override=Override("int8"))
    v = pp.variant
    assert (v.runtime, v.format, v.precision, v.quant, v.device) == ("ortgenai", "onnx", "int8",
                                                                     "int8", "cpu")
    assert dict(v.options) == {"block_size": 32, "accuracy_level": 4}
    assert pp.choice.profile_variant is not None and pp.choice.profile_variant.precision == "int4"


def test_a_gguf_quant_for_an_onnx_profile_is_refused_asking_for_a_precision() -> None:
    with pytest.raises(PlanError, match=r"Q5_K_M is a llama\.cpp \(GGUF\) quant") as e:
        plan_profile(PHONE, GEMMA, override=Override("Q5_K_M"))
    assert "int4, int8, fp16, fp32" in e.value.diagnostics()


def test_fp16_onnx_on_cpu_for_a_gqa_model_is_refused_with_the_converters_reason() -> None:
    with pytest.raises(PlanError, match=r"grouped-query attention \(1 KV heads < 4 heads\)"):
        plan_profile(PHONE, GEMMA, override=Override("fp16"))
    # DirectML builds fp16, but the quality is scored on the CPU build, which cannot run it
    dml = profile("dml-pc", min_ram_gb=16, runtime="ortgenai", fmt="onnx", quant="", device="dml")
    with pytest.raises(PlanError, match="the cpu build its quality is scored on") as e:
        plan_profile(dml, GEMMA, override=Override("fp16"))
    assert "fp16 ONNX on CPU is refused" in str(e.value) and e.value.diagnostics()
    # Phi-3.5 has as many KV heads as heads: the builder's own limit is the reason (forced: its
    # fp16 is also over the phone's RAM budget, which is checked first)
    with pytest.raises(PlanError, match="fp16 only for cuda and dml"):
        plan_profile(PHONE, PHI, override=Override("fp16"), force=True)
    cuda = profile("cuda-box", min_ram_gb=32, runtime="ortgenai", fmt="onnx", quant="",
                   device="cuda")
    with pytest.raises(PlanError, match="scored on"):  # int8 cuda builds; its CPU proxy is fine
        plan_profile(cuda, GEMMA, override=Override("fp16"))
    assert plan_profile(cuda, GEMMA, override=Override("int8")).variant.key == "ortgenai-onnx-int8-cuda"


def test_an_openvino_override_the_options_do_not_fit_is_refused_with_the_exporters_reason() -> None:
    pc = profile("ai-pc", min_ram_gb=16, runtime="openvino", fmt="openvino-ir", quant="",
                 options={"group_size": 64})
    assert plan_profile(pc, GEMMA, override=Override("int4")).variant.precision == "int4"
    with pytest.raises(PlanError, match="group_size do not apply to fp16 weights"):
        plan_profile(pc, GEMMA, override=Override("fp16"))


def test_an_override_over_the_ram_budget_is_refused_with_the_numbers_unless_forced() -> None:
    with pytest.raises(PlanError) as e:
        plan_profile(IOT_4GB, PHI, override=Override("F16"))
    msg, hint = str(e.value), e.value.diagnostics()
    assert msg.startswith(f"F16 needs {estimate_bytes(PHI, 'F16', 2048)} (chosen by the user)")
    assert "over the RAM budget of 3.30 GiB (ram_budget_gb 3.3) of profile iot-4gb" in msg
    assert "--force" in hint and "the profile itself would choose Q4_K_M" in hint
    pp = plan_profile(IOT_4GB, PHI, override=Override("F16"), force=True)
    assert pp.variant.quant == "F16" and pp.choice.forced
    assert pp.estimate.total_bytes > 3.3 * GIB  # the manifest's RAM requirement stays honest
    assert pp.choice.to_dict()["ram_budget_bytes"] == int(3.3 * GIB)
    assert any("built anyway (forced)" in r for r in pp.reasons)
    # an override that fits is not "forced" just because --force was given
    assert not plan_profile(IOT_4GB, PHI, override=Override("Q4_0"), force=True).choice.forced


def test_an_override_of_a_profile_that_fits_nothing_says_the_profile_would_refuse() -> None:
    f16_only = profile("f16-4gb", min_ram_gb=4, precision="fp16", quant="F16")
    pp = plan_profile(f16_only, PHI, override=Override("int4"))
    assert pp.variant.quant == "Q4_K_M"
    assert pp.choice.profile_variant is None and "does not fit" in pp.choice.profile_refused
    assert pp.choice.to_dict()["profile_choice"] is None


def test_per_profile_overrides_leave_the_other_profiles_to_their_own_choice() -> None:
    bp = plan([PI, PC_16GB, IOT_4GB], GEMMA,
              overrides={"pi": Override("Q8_0"), "iot-4gb": Override("Q5_K_M")})
    assert bp.refused == {}
    assert bp.profiles["pi"].variant.quant == "Q8_0"
    assert bp.profiles["iot-4gb"].variant.quant == "Q5_K_M"
    own = bp.profiles["x86-pc-16gb"]
    assert own.variant.quant == "Q8_0" and own.choice.by == "profile" and not own.choice.recorded
    assert own.choice.to_dict() == {"by": "profile"}
    # the user's Q8_0 for the Pi and the PC's own Q8_0 are one build (same variant)
    assert [v.quant for v in bp.variants] == ["Q8_0", "Q5_K_M"]


def test_a_refused_override_is_collected_with_its_hint() -> None:
    bp = plan([IOT_4GB, PC_16GB], PHI, overrides={"iot-4gb": Override("F16")})
    assert "x86-pc-16gb" in bp.profiles
    assert "over the RAM budget" in bp.refused["iot-4gb"] and "--force" in bp.refused["iot-4gb"]


def test_max_loss_replaces_the_quality_budget_for_every_profile_and_is_recorded() -> None:
    bp = plan([PI, PC_16GB], GEMMA, overrides={"pi": Override("Q5_K_M")}, max_loss_pct=30.0)
    for pp in bp.profiles.values():
        assert pp.max_loss_pct == 30.0 and pp.choice.recorded
        assert pp.choice.to_dict()["max_loss_pct"] == 30.0
        assert pp.choice.to_dict()["profile_max_loss_pct"] == 10.0
    assert bp.profiles["x86-pc-16gb"].choice.to_dict()["by"] == "profile"
    with pytest.raises(PlanError, match=">= 0"):
        plan([PI], GEMMA, max_loss_pct=-1.0)


def test_an_override_for_a_profile_not_built_and_force_without_override_are_errors() -> None:
    with pytest.raises(PlanError, match="override for raspberry-pi-5, which is not being built"):
        plan([PI], GEMMA, overrides={"raspberry-pi-5": Override("Q5_K_M")})
    with pytest.raises(PlanError, match="--force lifts the RAM refusal of a precision override"):
        plan([PI], GEMMA, force=True)


def test_override_values_and_pairs_are_validated() -> None:
    assert Override.parse_pair("raspberry-pi-5=Q5_K_M") == ("raspberry-pi-5", Override("Q5_K_M"))
    assert Override.parse_pair("x86-64-cpu=fp32") == ("x86-64-cpu", Override("fp32"))
    assert Override("int8").is_quant is False and Override("Q8_0").is_quant is True
    with pytest.raises(PlanError, match="neither a precision"):
        Override("Q3_K_XL")
    for bad in ("raspberry-pi-5", "=Q5_K_M"):
        with pytest.raises(PlanError, match="PROFILE=PRECISION_OR_QUANT"):
            Override.parse_pair(bad)


def test_the_report_and_bundle_inspect_describe_the_users_choice() -> None:
    from packager.build import describe_choice

    forced = plan_profile(IOT_4GB, PHI, override=Override("F16"), force=True).choice
    assert describe_choice(forced.to_dict()) == (
        "F16 chosen by the user; the profile would have chosen Q4_K_M (int4); over the RAM budget "
        "of 3.30 GiB, built with --force")
    f16_only = profile("f16-4gb", min_ram_gb=4, precision="fp16", quant="F16")
    rescued = plan_profile(f16_only, PHI, override=Override("int4"), max_loss_pct=12.5).choice
    text = describe_choice(rescued.to_dict())
    assert text.startswith("int4 chosen by the user; the profile would have chosen nothing (")
    assert "does not fit" in text and text.endswith("quality budget 12.5% (--max-loss; the "
                                                    "profile's 10%)")
