"""The matcher maps each device class's probe facts to its profile and explains every verdict."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from agent.profiles import Candidate, DeviceProfile, MatchResult, load_profiles, match_profile

ROOT = Path(__file__).resolve().parents[4]
FACTS_DIR = ROOT / "tests" / "data" / "facts"
FACT_FILES = sorted(FACTS_DIR.glob("*.json"))
PROBE_KEYS = {
    "schema", "os", "arch", "cpu_model", "cpu_flags", "cores_logical", "cores_physical",
    "ram_bytes", "disk_free_bytes", "disk_path", "accelerators", "runtimes", "hostname", "python",
}  # fmt: skip
GIB = 1024**3


@pytest.fixture(scope="module")
def profiles() -> dict[str, DeviceProfile]:
    return load_profiles(ROOT / "profiles")


def facts_for(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FACTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return data


def candidate(result: MatchResult, name: str) -> Candidate:
    return next(c for c in result.candidates if c.name == name)


def tiny_profile(name: str, *, priority: int = 0, **match: Any) -> DeviceProfile:
    return DeviceProfile.from_dict(
        {
            "name": name,
            "priority": priority,
            "match": match,
            "target": {"runtime": "llamacpp", "format": "gguf", "precision": "int4", "quant": "Q4_0"},
        }
    )


def test_there_is_a_fixture_for_every_shipped_profile(profiles: dict[str, DeviceProfile]) -> None:
    assert {f.stem for f in FACT_FILES} == set(profiles)


@pytest.mark.parametrize("path", FACT_FILES, ids=lambda p: p.stem)
def test_fixture_has_the_probe_shape(path: Path) -> None:
    facts = json.loads(path.read_text(encoding="utf-8"))
    assert set(facts) == PROBE_KEYS
    assert set(facts["runtimes"]) == {"llamacpp", "ortgenai", "openvino"}


@pytest.mark.parametrize("path", FACT_FILES, ids=lambda p: p.stem)
def test_each_device_class_maps_to_its_profile(path: Path, profiles: dict[str, DeviceProfile]) -> None:
    result = match_profile(json.loads(path.read_text(encoding="utf-8")), profiles)
    assert result.best == path.stem, "\n".join(result.explain())
    win = result.candidates[0]
    assert win.name == path.stem and win.eligible and win.reasons


def test_reasons_say_why_it_matched(profiles: dict[str, DeviceProfile]) -> None:
    result = match_profile(facts_for("x86-64-cpu"), profiles)
    assert result.candidates[0].reasons == (
        "arch x86_64 in [x86_64]",
        "has avx2",
        "RAM 251.5 GiB >= 4.0 GiB",
    )


def test_losers_say_why_they_lost(profiles: dict[str, DeviceProfile]) -> None:
    result = match_profile(facts_for("x86-64-cpu"), profiles)
    rtx = candidate(result, "nvidia-rtx")
    assert not rtx.eligible
    assert rtx.reasons == ("needs accelerator nvidia-gpu; device has none",)
    assert "os linux not in [android]" in candidate(result, "android-arm64").reasons


def test_specific_profile_outranks_the_generic_one(profiles: dict[str, DeviceProfile]) -> None:
    result = match_profile(facts_for("nvidia-rtx"), profiles)
    assert [c.name for c in result.candidates[:2]] == ["nvidia-rtx", "x86-64-cpu"]
    generic = result.candidates[1]
    assert generic.eligible and generic.score < result.candidates[0].score
    assert generic.reasons[-1].startswith("outranked by nvidia-rtx (")
    # Eligible candidates come before every ineligible one.
    flags = [c.eligible for c in result.candidates]
    assert flags == sorted(flags, reverse=True)


def test_discrete_nvidia_beats_core_ultra_igpu(profiles: dict[str, DeviceProfile]) -> None:
    facts = facts_for("intel-core-ultra")
    facts["accelerators"].append({"kind": "nvidia-gpu", "name": "RTX 4060 Laptop", "source": "x"})
    result = match_profile(facts, profiles)
    assert result.best == "nvidia-rtx"
    assert any("has accelerator nvidia-gpu" in r for r in candidate(result, "intel-core-ultra").reasons)


def test_too_little_ram_makes_a_profile_ineligible(profiles: dict[str, DeviceProfile]) -> None:
    facts = facts_for("raspberry-pi-5")
    facts["ram_bytes"] = 2 * GIB - 150 * 1024**2  # a 2 GB Pi 5
    result = match_profile(facts, profiles)
    assert result.best is None
    assert "RAM 1.9 GiB < 3.5 GiB" in candidate(result, "raspberry-pi-5").reasons
    assert result.explain()[0] == "no profile matches this device"


def test_missing_isa_flag_is_a_reason(profiles: dict[str, DeviceProfile]) -> None:
    facts = facts_for("x86-64-cpu")
    facts["cpu_flags"] = [f for f in facts["cpu_flags"] if f != "avx2"]
    result = match_profile(facts, profiles)
    assert result.best is None
    assert candidate(result, "x86-64-cpu").reasons == ("lacks cpu flag avx2",)


@pytest.mark.parametrize("facts", [{}, dict.fromkeys(PROBE_KEYS)], ids=["empty", "all-none"])
def test_unknown_facts_do_not_crash(facts: dict[str, Any], profiles: dict[str, DeviceProfile]) -> None:
    result = match_profile(facts, profiles)
    assert result.best is None
    for c in result.candidates:
        assert not c.eligible
        assert c.reasons and all(r.endswith("unknown") for r in c.reasons), c
    assert "needs a RAM size; RAM unknown" in candidate(result, "x86-64-cpu").reasons
    json.dumps(result.to_dict())


def test_unknown_fact_only_matters_to_rules_that_need_it(
    profiles: dict[str, DeviceProfile],
) -> None:
    facts = facts_for("x86-64-cpu")
    facts["os"] = None
    facts["cpu_model"] = None
    result = match_profile(facts, profiles)
    # x86-64-cpu has no os or cpu-model rule; nvidia-rtx needs the os.
    assert result.best == "x86-64-cpu"
    assert "needs os in [linux, windows]; os unknown" in candidate(result, "nvidia-rtx").reasons


def test_malformed_facts_are_treated_as_unknown(profiles: dict[str, DeviceProfile]) -> None:
    facts = facts_for("apple-silicon")
    facts["accelerators"] = [{"kind": "apple-gpu"}, "garbage", {"name": "no kind"}]
    facts["ram_bytes"] = "16 GB"
    result = match_profile(facts, profiles)
    assert result.best is None
    assert candidate(result, "apple-silicon").reasons == ("needs a RAM size; RAM unknown",)


def test_arch_spellings_are_normalized(profiles: dict[str, DeviceProfile]) -> None:
    facts = facts_for("x86-64-cpu")
    facts["arch"] = "AMD64"
    assert match_profile(facts, profiles).best == "x86-64-cpu"


def test_result_is_deterministic(profiles: dict[str, DeviceProfile]) -> None:
    facts = facts_for("intel-core-ultra")
    expected = match_profile(facts, profiles)
    names = list(profiles)
    for seed in range(5):
        random.Random(seed).shuffle(names)
        shuffled = {n: profiles[n] for n in names}
        assert match_profile(copy.deepcopy(facts), shuffled) == expected


def test_equal_scores_are_broken_by_name() -> None:
    a = tiny_profile("b-board", arch=["aarch64"])
    b = tiny_profile("a-board", arch=["aarch64"])
    result = match_profile({"arch": "aarch64"}, {"b-board": a, "a-board": b})
    assert result.best == "a-board"
    assert result.candidates[1].reasons[-1] == "outranked by a-board (tie broken by name)"


def test_priority_adds_to_specificity() -> None:
    plain = tiny_profile("plain", arch=["aarch64"])
    preferred = tiny_profile("preferred", priority=1, arch=["aarch64"])
    result = match_profile({"arch": "aarch64"}, {"plain": plain, "preferred": preferred})
    assert result.best == "preferred"
    assert [c.score for c in result.candidates] == [4, 3]


def test_a_profile_without_rules_matches_anything() -> None:
    result = match_profile({}, {"any": tiny_profile("any")})
    assert result.best == "any"
    assert result.explain() == ["best profile: any (score 0)", "  + any (score 0): no rules"]


def test_no_profiles_means_no_match() -> None:
    assert match_profile({"arch": "x86_64"}, {}) == MatchResult(best=None, candidates=())


def test_to_dict_and_explain(profiles: dict[str, DeviceProfile]) -> None:
    result = match_profile(facts_for("jetson-orin"), profiles)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["best"] == "jetson-orin"
    assert [c["name"] for c in d["candidates"]] == [c.name for c in result.candidates]
    assert d["candidates"][0]["reasons"] == list(result.candidates[0].reasons)
    lines = result.explain()
    assert lines[0] == f"best profile: jetson-orin (score {result.candidates[0].score})"
    assert lines[1].startswith("  + jetson-orin (score ")
    assert "has accelerator nvidia-gpu" in lines[1]
    assert any(line.startswith("  - nvidia-rtx: arch aarch64 not in [x86_64]") for line in lines)
    assert len(lines) == 1 + len(profiles)
