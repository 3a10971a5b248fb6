"""How a variant's precision, device and profile options become optimum-intel export arguments."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConvertError, PackagingError
from agent.profiles.schema import default_profiles_dir, load_profile
from packager import openvino as ov
from packager.openvino import ExportSpec, export_command, export_spec, judge_check
from packager.plan import Variant

INTEL = load_profile(default_profiles_dir() / "intel-core-ultra.toml")


def args_of(precision: str, device: str = "cpu", **options: Any) -> list[str]:
    return export_spec(precision, device, options).args()


def test_intel_profile_int8_on_gpu_ignores_the_npu_options() -> None:
    options = INTEL.target.options
    assert set(options) <= set(ov.NPU_OPTION_KEYS)  # the profile only sets npu_* keys
    spec = export_spec(INTEL.target.precision, INTEL.target.device, options)
    assert spec == ExportSpec("int8")
    assert spec.args() == ["--task", "text-generation-with-past", "--weight-format", "int8"]


def test_intel_profile_on_npu_is_int4_symmetric_group_128() -> None:
    spec = export_spec(INTEL.target.precision, "npu", INTEL.target.options)
    assert spec == ExportSpec("int4", sym=True, group_size=128, ratio=1.0, group_size_fallback="adjust")
    assert spec.args() == ["--task", "text-generation-with-past", "--weight-format", "int4", "--sym",
                           "--group-size", "128", "--ratio", "1", "--group-size-fallback", "adjust"]
    assert spec.tag == "int4-sym-g128-r1"


def test_npu_defaults_apply_without_options() -> None:
    assert export_spec("int8", "npu", {}) == export_spec("int8", "npu", INTEL.target.options)


def test_npu_refuses_asymmetric_int4() -> None:
    with pytest.raises(PackagingError, match="symmetric") as e:
        export_spec("int8", "npu", {"npu_sym": False})
    assert "npu_sym" in e.value.diagnostics()


def test_int4_defaults_are_explicit_and_asymmetric() -> None:
    assert args_of("int4") == ["--task", "text-generation-with-past", "--weight-format", "int4",
                               "--group-size", "128", "--ratio", "1",
                               "--group-size-fallback", "adjust"]


def test_int4_options_become_arguments() -> None:
    args = args_of("int4", group_size=256, sym=True, ratio=0.8, group_size_fallback="error")
    assert args[args.index("--group-size") + 1] == "256"
    assert args[args.index("--ratio") + 1] == "0.8"
    assert args[args.index("--group-size-fallback") + 1] == "error"
    assert "--sym" in args


def test_per_channel_int4_group_size() -> None:
    assert "-1" in args_of("int4", group_size=-1)


@pytest.mark.parametrize("precision", ["int8", "fp16", "fp32"])
def test_plain_precisions_take_no_int4_options(precision: str) -> None:
    assert args_of(precision) == ["--task", "text-generation-with-past", "--weight-format", precision]
    with pytest.raises(PackagingError, match="group_size") as e:
        export_spec(precision, "cpu", {"group_size": 64})
    assert "int4" in str(e.value) + e.value.diagnostics()


def test_int8_symmetric() -> None:
    assert args_of("int8", sym=True)[-1] == "--sym"


def test_sym_does_not_apply_to_float_weights() -> None:
    with pytest.raises(PackagingError, match="sym"):
        export_spec("fp16", "cpu", {"sym": True})


@pytest.mark.parametrize("options", [
    {"group_size": 0}, {"group_size": -2}, {"group_size": True}, {"group_size": "128"},
    {"ratio": 0}, {"ratio": 1.5}, {"ratio": "1"}, {"sym": "yes"},
    {"group_size_fallback": "shrink"},
])
def test_bad_option_values_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(PackagingError):
        export_spec("int4", "cpu", options)


def test_unknown_option_is_refused_with_the_known_keys() -> None:
    with pytest.raises(PackagingError, match="groupsize") as e:
        export_spec("int4", "cpu", {"groupsize": 64})
    assert "group_size" in e.value.diagnostics()


@pytest.mark.parametrize("precision,device", [("int3", "cpu"), ("int8", "tpu")])
def test_unknown_precision_or_device_is_refused(precision: str, device: str) -> None:
    with pytest.raises(PackagingError):
        export_spec(precision, device, {})


def test_variant_options_are_read_from_the_plan_variant() -> None:
    v = Variant("openvino", "openvino-ir", "int4", "int4", "cpu", (("group_size", 64), ("sym", True)))
    assert ov.variant_spec(v) == ExportSpec("int4", sym=True, group_size=64, ratio=1.0,
                                            group_size_fallback="adjust")


def test_tags_and_cache_keys_tell_specs_apart() -> None:
    specs = [export_spec("int8", "cpu", {}), export_spec("int8", "cpu", {"sym": True}),
             export_spec("int4", "cpu", {}), export_spec("int4", "cpu", {"group_size": 64}),
             export_spec("int4", "cpu", {"group_size_fallback": "ignore"}),
             export_spec("fp16", "cpu", {}), export_spec("fp32", "cpu", {})]
    assert len({s.tag for s in specs}) == len(specs)
    assert len({s.cache_key() for s in specs}) == len(specs)
    assert export_spec("int8", "gpu", {}).cache_key() == export_spec("int8", "cpu", {}).cache_key()


def test_cache_key_changes_with_the_converter_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = export_spec("int8", "cpu", {})
    before, env_before = spec.cache_key(), ov.converter_env_dir(Path("/c"))
    monkeypatch.setattr(ov, "CONVERTER_PINS", (*ov.CONVERTER_PINS[:-1], "openvino-tokenizers==0"))
    assert spec.cache_key() != before
    assert ov.converter_env_dir(Path("/c")) != env_before
    assert ov.converter_env_dir(Path("/c")).parent == Path("/c/envs")


def test_export_command_runs_the_wrapper_isolated_then_optimum_arguments() -> None:
    spec = export_spec("int4", "cpu", {})
    cmd = export_command(Path("/env/bin/python"), Path("/m/hf"), Path("/out/tmp"), spec, threads=2)
    assert cmd[:4] == ["/env/bin/python", "-I", "-u", str(ov.WRAPPER)]
    assert ov.WRAPPER.is_file()
    sep = cmd.index("--")
    assert cmd[sep + 1:] == ["--model", "/m/hf", *spec.args(), "/out/tmp"]
    ours = cmd[4:sep]
    assert ours[ours.index("--threads") + 1] == "2"
    assert ours[ours.index("--check-hf") + 1] == "/m/hf"
    assert ours[ours.index("--check-out") + 1] == "/out/tmp"


def test_wrapper_without_separator_prints_usage() -> None:
    r = subprocess.run([sys.executable, "-I", str(ov.WRAPPER)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


# --- the export check ---------------------------------------------------------------------------

GOOD = {"tokenizer_match": True, "top1_agreement": 0.91, "ov_nll": 2.99, "ref_nll": 2.94,
        "generated": " the capital of the country of France."}


def test_a_good_check_passes() -> None:
    assert judge_check("int8", GOOD) == []


@pytest.mark.parametrize("change,expect", [
    ({"tokenizer_match": False}, "tokenizer"),
    ({"top1_agreement": 0.05}, "agreement"),
    ({"ov_nll": 11.8}, "NLL"),
    ({"ov_nll": math.nan}, "non-finite"),
    ({"ov_nll": None}, "non-finite"),
    ({"generated": "  "}, "no text"),
])
def test_a_broken_conversion_fails_the_check(change: dict[str, Any], expect: str) -> None:
    problems = judge_check("int8", {**GOOD, **change})
    assert problems and any(expect in p for p in problems), problems


def test_bounds_are_looser_for_int4_than_fp32() -> None:
    figures = {**GOOD, "top1_agreement": 0.64, "ov_nll": 3.31}  # measured: the sample at int4
    assert judge_check("int4", figures) == []
    assert judge_check("fp32", figures)


# --- the converter environment, with the tools faked ---------------------------------------------


def test_converter_env_is_stamped_last_and_a_failed_build_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake(cmd: list[str], *, what: str, prefix: str, hint: str = "") -> str:
        calls.append(cmd)
        env = ov.converter_env_dir(tmp_path)
        (env / "bin").mkdir(parents=True, exist_ok=True)
        assert not (env / ov.ENV_STAMP).exists()  # never stamped before every step succeeded
        if what == "pip uninstall":
            raise ConvertError("pip uninstall failed", returncode=1)
        return json.dumps({"torch": "2.13.0+cpu"})

    monkeypatch.setattr(ov, "_run_checked", fake)
    with pytest.raises(ConvertError):
        ov.ensure_converter_env(tmp_path)
    assert not ov.converter_env_dir(tmp_path).exists()
    install = next(c for c in calls if "install" in c)
    assert set(ov.CONVERTER_PINS) <= set(install)  # torch in the same pip command as the rest

    def works(cmd: list[str], *, what: str, prefix: str, hint: str = "") -> str:
        ov.converter_env_dir(tmp_path).mkdir(parents=True, exist_ok=True)
        return json.dumps({"torch": "2.13.0+cpu"})

    monkeypatch.setattr(ov, "_run_checked", works)
    py = ov.ensure_converter_env(tmp_path)
    assert py == ov.converter_env_dir(tmp_path) / "bin" / "python"
    assert ov.converter_versions(tmp_path) == {"torch": "2.13.0+cpu"}


def test_an_unstamped_env_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = ov.converter_env_dir(tmp_path)
    (env / "half-installed").mkdir(parents=True)
    seen: list[str] = []

    def fake(cmd: list[str], *, what: str, prefix: str, hint: str = "") -> str:
        seen.append(what)
        env.mkdir(parents=True, exist_ok=True)
        return "{}"

    monkeypatch.setattr(ov, "_run_checked", fake)
    ov.ensure_converter_env(tmp_path)
    assert not (env / "half-installed").exists()
    assert seen[0] == "python -m venv" and (env / ov.ENV_STAMP).is_file()
    seen.clear()
    ov.ensure_converter_env(tmp_path)  # stamped: reused without running anything
    assert seen == []


def test_non_hf_sources_are_refused(tmp_path: Path) -> None:
    from packager.model import ModelInfo

    gguf = ModelInfo(name="m", architecture="gemma3", n_params=1, n_layers=1, hidden_size=8,
                     n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=10, max_context=64,
                     has_chat_template=False, source_kind="gguf", path=tmp_path / "m.gguf",
                     source_digest="sha256:" + "0" * 64)
    with pytest.raises(PackagingError, match="HF checkpoint"):
        ov.build_openvino_variant(gguf, Variant("openvino", "openvino-ir", "int8", "int8", "cpu"),
                                  tmp_path / "out", cache_dir=tmp_path, threads=1)
    assert not (tmp_path / "out").exists()
