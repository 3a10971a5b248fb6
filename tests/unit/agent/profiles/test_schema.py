"""The shipped profiles load through the schema, and malformed profiles are refused with a reason."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ProfileError
from agent.profiles import DeviceProfile, load_profile, load_profiles
from agent.profiles.schema import ACCELERATORS

PROFILES_DIR = Path(__file__).resolve().parents[4] / "profiles"
REQUIRED = {
    "raspberry-pi-5",
    "android-arm64",
    "jetson-orin",
    "intel-core-ultra",
    "snapdragon-x",
    "nvidia-rtx",
    "apple-silicon",
    "x86-64-cpu",
}


@pytest.fixture(scope="module")
def shipped() -> dict[str, DeviceProfile]:
    return load_profiles(PROFILES_DIR)


@pytest.fixture()
def valid() -> dict[str, Any]:
    """A known-good profile table to break one field at a time."""
    return tomllib.loads((PROFILES_DIR / "x86-64-cpu.toml").read_text(encoding="utf-8"))


def test_every_required_device_class_ships(shipped: dict[str, DeviceProfile]) -> None:
    assert set(shipped) >= REQUIRED


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_each_profile_loads_and_is_named_after_its_file(path: Path) -> None:
    p = load_profile(path)
    assert p.name == path.stem
    assert p.description and p.device_class
    assert p.budget.max_ppl_increase_pct > 0
    # Every shipped profile is gated after install: all three SLOs are set.
    assert p.slo.min_decode_tok_s > 0 and p.slo.max_ttft_ms > 0 and p.slo.max_rss_mb > 0


def test_profiles_round_trip_through_to_dict(shipped: dict[str, DeviceProfile]) -> None:
    for p in shipped.values():
        d = p.to_dict()
        d["match"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["match"].items()}
        d["target"]["fallbacks"] = list(d["target"]["fallbacks"])
        assert DeviceProfile.from_dict(d) == p


def test_seed_precision_rule(shipped: dict[str, DeviceProfile]) -> None:
    """INT4 on phones and IoT; INT8/FP16 on AI PCs (snapdragon-x's NPU is the documented exception)."""
    for p in shipped.values():
        if p.device_class in ("phone", "iot"):
            assert p.target.precision == "int4", p.name
        elif p.device_class in ("ai-pc", "mac", "server") and p.name != "snapdragon-x":
            assert p.target.precision in ("int8", "fp16", "fp32"), p.name


def test_budgets_are_looser_on_small_devices(shipped: dict[str, DeviceProfile]) -> None:
    small = [p.budget.max_ppl_increase_pct for p in shipped.values() if p.device_class in ("phone", "iot")]
    pcs = [p.budget.max_ppl_increase_pct for p in shipped.values() if p.device_class == "ai-pc"]
    assert min(small) > max(pcs)


def test_x86_cpu_slo_is_modest_enough_for_the_sample_on_a_small_vm(
    shipped: dict[str, DeviceProfile],
) -> None:
    # The sample (Gemma 3 270M) decodes ~60 tok/s on this 2-core VM; the gate must let it pass.
    slo = shipped["x86-64-cpu"].slo
    assert slo.min_decode_tok_s <= 10 and slo.max_ttft_ms >= 1000 and slo.max_rss_mb >= 1024


# --- malformed profiles ----------------------------------------------------------------------------


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ProfileError) as ei:
        DeviceProfile.from_dict(data)
    return str(ei.value)


def test_unknown_top_level_key_is_refused(valid: dict[str, Any]) -> None:
    valid["prority"] = 3
    assert "unknown top-level keys: prority" in _error(valid)


def test_unknown_key_in_a_section_is_refused(valid: dict[str, Any]) -> None:
    valid["target"]["thread"] = 4
    msg = _error(valid)
    assert "[target]" in msg and "thread" in msg


def test_format_must_fit_runtime(valid: dict[str, Any]) -> None:
    valid["target"]["format"] = "onnx"
    msg = _error(valid)
    assert "'onnx'" in msg and "'llamacpp'" in msg and "'gguf'" in msg


def test_unknown_runtime_is_refused(valid: dict[str, Any]) -> None:
    valid["target"]["runtime"] = "mlx"
    assert "target.runtime 'mlx'" in _error(valid)


def test_quant_must_fit_precision(valid: dict[str, Any]) -> None:
    valid["target"]["quant"] = "Q4_K_M"  # precision stays int8
    msg = _error(valid)
    assert "Q4_K_M is int4, not int8" in msg


def test_unknown_gguf_fallback_is_refused(valid: dict[str, Any]) -> None:
    valid["target"]["fallbacks"] = ["Q3_K_S"]
    assert "'Q3_K_S'" in _error(valid)


@pytest.mark.parametrize("rule", ["accelerators_all", "accelerators_none"])
def test_bad_accelerator_kind_is_refused(valid: dict[str, Any], rule: str) -> None:
    valid["match"][rule] = ["nvidia"]
    msg = _error(valid)
    assert "'nvidia'" in msg and all(k in msg for k in ACCELERATORS)


def test_bad_exec_device_is_refused(valid: dict[str, Any]) -> None:
    valid["target"]["device"] = "tpu"
    assert "target.device 'tpu'" in _error(valid)


def test_missing_target_is_refused(valid: dict[str, Any]) -> None:
    del valid["target"]
    assert _error(valid)


def test_match_list_of_wrong_type_is_refused(valid: dict[str, Any]) -> None:
    valid["match"]["arch"] = "x86_64"  # a string, not a list
    assert "match.arch must be a list of strings" in _error(valid)


def test_bad_name_is_refused(valid: dict[str, Any]) -> None:
    valid["name"] = "x86 64/cpu"
    assert "profile name" in _error(valid)


def test_load_profile_names_the_file(tmp_path: Path, valid: dict[str, Any]) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "broken"\n[target]\nruntime = "llamacpp"\nformat = "onnx"\n')
    with pytest.raises(ProfileError, match=r"broken\.toml"):
        load_profile(bad)
    garbled = tmp_path / "garbled.toml"
    garbled.write_text("name = \n")
    with pytest.raises(ProfileError, match=r"garbled\.toml.*invalid TOML"):
        load_profile(garbled)


def test_load_profiles_refuses_duplicates_and_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no profiles found"):
        load_profiles(tmp_path)
    text = (PROFILES_DIR / "x86-64-cpu.toml").read_text(encoding="utf-8")
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text(text)
    with pytest.raises(ProfileError, match="two profiles are named 'x86-64-cpu'"):
        load_profiles(tmp_path)


def test_valid_fixture_itself_loads(valid: dict[str, Any]) -> None:
    # Guards the tests above: each failure must come from the one field they break.
    assert DeviceProfile.from_dict(copy.deepcopy(valid)).name == "x86-64-cpu"
