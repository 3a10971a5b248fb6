"""The post-install gate: the pure judge (each SLO, unchecked zeros, overrides, messages), its
configuration and override parsing, and measure/run_gate on an in-process fake runtime."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from fakeruntime import FakeRuntime as PacedRuntime
from fakeruntime import reset

from agent.errors import EdgepackError, GateFailedError, InferenceError, InstallError, ManifestError
from agent.gate import (
    DEFAULT_PROMPT,
    Figures,
    GateConfig,
    judge,
    measure,
    parse_slo_overrides,
    run_gate,
)
from agent.protocol import error_code

FIG = Figures(ttft_ms=120.0, decode_tok_s=41.2, peak_rss_mb=700.0, tokens=32)


# --- judge --------------------------------------------------------------------------------------


def test_no_slo_means_nothing_is_checked():
    v = judge(FIG, {})
    assert v.ok and v.failures == () and v.thresholds == {}


def test_zero_thresholds_are_unchecked():
    v = judge(FIG, {"min_decode_tok_s": 0.0, "max_ttft_ms": 0, "max_rss_mb": 0.0})
    assert v.ok and v.thresholds == {}


def test_met_slos_pass_and_report_the_thresholds():
    slo = {"min_decode_tok_s": 40.0, "max_ttft_ms": 120.0, "max_rss_mb": 800}
    v = judge(FIG, slo)
    assert v.ok and v.failures == ()  # equal to the limit is within it
    assert v.thresholds == {"min_decode_tok_s": 40.0, "max_ttft_ms": 120.0, "max_rss_mb": 800.0}


def test_slow_decode_fails_with_measure_value_and_threshold():
    v = judge(FIG, {"min_decode_tok_s": 50.0})
    assert not v.ok
    assert v.failures == ("decode 41.2 tok/s < SLO 50.0 tok/s",)


def test_slow_first_token_fails():
    v = judge(FIG, {"max_ttft_ms": 100})
    assert v.failures == ("TTFT 120.0 ms > SLO 100.0 ms",)


def test_too_much_memory_fails():
    v = judge(FIG, {"max_rss_mb": 512})
    assert v.failures == ("peak RSS 700.0 MiB > SLO 512.0 MiB",)


def test_every_missed_slo_is_reported_in_a_fixed_order():
    v = judge(FIG, {"max_rss_mb": 1, "max_ttft_ms": 1, "min_decode_tok_s": 1000})
    assert [f.split()[0] for f in v.failures] == ["decode", "TTFT", "peak"]


def test_overrides_tighten_loosen_and_disable():
    slo = {"min_decode_tok_s": 50.0, "max_ttft_ms": 500.0, "max_rss_mb": 512.0}
    v = judge(FIG, slo, {"min_decode_tok_s": 40.0, "max_ttft_ms": 100.0, "max_rss_mb": 0})
    assert v.failures == ("TTFT 120.0 ms > override 100.0 ms",)  # tightened; the others pass
    assert v.thresholds == {"min_decode_tok_s": 40.0, "max_ttft_ms": 100.0}  # RSS turned off


def test_an_override_applies_where_the_manifest_sets_nothing():
    v = judge(FIG, {}, {"min_decode_tok_s": 100000})
    assert v.failures == ("decode 41.2 tok/s < override 100000.0 tok/s",)


def test_a_tiny_threshold_is_not_printed_as_zero():
    v = judge(FIG, {}, {"max_ttft_ms": 0.001})
    assert v.failures == ("TTFT 120.0 ms > override 0.001 ms",)


def test_unknown_slo_keys_from_a_newer_manifest_are_ignored():
    assert judge(FIG, {"min_quality": 99, "max_joules": 1}).ok


@pytest.mark.parametrize("bad", ["fast", -1, True, float("nan"), [1]])
def test_a_malformed_manifest_threshold_is_refused(bad: Any):
    with pytest.raises(ManifestError, match=r"slo\.max_ttft_ms"):
        judge(FIG, {"max_ttft_ms": bad})


def test_judge_is_pure():
    slo = {"min_decode_tok_s": 50.0}
    assert judge(FIG, slo) == judge(FIG, slo)
    assert slo == {"min_decode_tok_s": 50.0}


# --- configuration ------------------------------------------------------------------------------


def test_config_defaults():
    c = GateConfig()
    assert (c.prompt, c.max_tokens, c.runs, c.slo_overrides, c.enabled) == \
        (DEFAULT_PROMPT, 32, 1, {}, True)


@pytest.mark.parametrize("kw", [{"max_tokens": 1}, {"max_tokens": True}, {"runs": 0},
                                {"prompt": " "}, {"slo_overrides": {"max_joules": 1}},
                                {"slo_overrides": {"max_ttft_ms": -1}}])
def test_config_refuses_bad_values(kw: dict[str, Any]):
    with pytest.raises(EdgepackError):
        GateConfig(**kw)


def test_config_keeps_its_own_copy_of_the_overrides():
    overrides = {"max_ttft_ms": 10}
    c = GateConfig(slo_overrides=overrides)
    overrides["max_ttft_ms"] = 0
    assert c.slo_overrides == {"max_ttft_ms": 10.0}


def test_parse_overrides_later_wins_and_blanks_skip():
    got = parse_slo_overrides(["min_decode_tok_s=5", " ", "max_rss_mb = 512", "min_decode_tok_s=7.5"])
    assert got == {"min_decode_tok_s": 7.5, "max_rss_mb": 512.0}


@pytest.mark.parametrize("item", ["min_decode_tok_s", "speed=3", "max_ttft_ms=fast",
                                  "max_ttft_ms=-1", "max_ttft_ms=inf"])
def test_parse_overrides_refuses_malformed_items(item: str):
    with pytest.raises(EdgepackError, match="bad SLO override"):
        parse_slo_overrides([item])


# --- measure / run_gate on a fake runtime --------------------------------------------------------


@pytest.fixture
def runtime(tmp_path: Path) -> Generator[PacedRuntime, None, None]:
    reset()
    PacedRuntime.delay = 0.002
    (tmp_path / "m.bin").write_bytes(b"x")
    rt = PacedRuntime()
    rt.load(tmp_path / "m.bin")
    yield rt
    rt.close()
    reset()


def test_measure_reports_rates_memory_and_tokens(runtime: PacedRuntime):
    f = measure(runtime, GateConfig(max_tokens=8, runs=2))
    assert f.tokens == 16
    assert f.ttft_ms > 0 and 0 < f.decode_tok_s < 1000  # 2 ms per token: at most 500 tok/s
    assert f.peak_rss_mb > 1
    assert set(f.to_dict()) == {"ttft_ms", "decode_tok_s", "peak_rss_mb", "tokens", "decode_tokens"}
    assert f.decode_tokens == 7  # the rate stands on every token after the first, of each run


def test_every_measured_run_evaluates_the_whole_prompt(runtime: PacedRuntime, monkeypatch):
    # llama.cpp keeps the last prompt's KV: without a drop, runs after the warm-up would time
    # one token of prompt, not the prompt.
    events: list[str] = []
    monkeypatch.setattr(PacedRuntime, "_drop_prompt_cache", lambda self: events.append("drop"),
                        raising=False)
    real_stream = PacedRuntime._stream

    def stream(self, prompt, params, *, chat):
        events.append("run")
        return (yield from real_stream(self, prompt, params, chat=chat))

    monkeypatch.setattr(PacedRuntime, "_stream", stream)
    measure(runtime, GateConfig(max_tokens=4, runs=3))
    assert events == ["run"] + ["drop", "run"] * 3  # warm-up, then a drop before each run


def test_a_model_that_generates_nothing_fails_the_check(runtime: PacedRuntime, monkeypatch):
    monkeypatch.setattr(PacedRuntime, "words", 0)
    with pytest.raises(InferenceError, match="no tokens"):
        measure(runtime, GateConfig())
    with pytest.raises(InferenceError, match="no tokens"):
        run_gate(runtime, {}, GateConfig(enabled=False))


def test_run_gate_passes_with_a_report(runtime: PacedRuntime):
    r = run_gate(runtime, {"min_decode_tok_s": 1.0}, GateConfig(max_tokens=4))
    assert r["ok"] is True and r["failures"] == [] and r["thresholds"] == {"min_decode_tok_s": 1.0}
    assert r["decode_tok_s"] > 1 and r["tokens"] == 4


def test_run_gate_failure_carries_figures_and_failures(runtime: PacedRuntime):
    with pytest.raises(GateFailedError) as e:
        run_gate(runtime, {"min_decode_tok_s": 1.0}, GateConfig(max_tokens=4,
                                                                slo_overrides={"max_ttft_ms": 0.001}))
    err = e.value
    assert isinstance(err, InstallError) and err.step == "gate"
    assert err.failures[0].startswith("TTFT ") and "override 0.001 ms" in err.failures[0]
    assert err.figures["ttft_ms"] > 0 and err.thresholds["max_ttft_ms"] == 0.001
    assert err.failures[0] in str(err)


def test_disabled_gate_only_smoke_tests(runtime: PacedRuntime):
    assert set(run_gate(runtime, {"min_decode_tok_s": 1e9}, GateConfig(enabled=False))) == {"ttft_ms"}


def test_a_rolled_back_gate_failure_has_its_own_error_code():
    gate = GateFailedError("slow", figures={}, failures=("decode 1.0 tok/s < SLO 2.0 tok/s",))
    try:
        try:
            raise gate
        except GateFailedError as e:  # what Store.install does with a failing load check
            raise InstallError("rolled back", rolled_back=True, step="load_check") from e
    except InstallError as wrapped:
        assert error_code(wrapped) == "slo_failed"
    assert error_code(InstallError("load failed", rolled_back=True)) == "install_failed"
