"""check_budget: a pure comparison of a measured quality report with a profile's budget."""

from __future__ import annotations

import math

import pytest

from agent.errors import QualityBudgetError
from agent.profiles.schema import DeviceProfile
from packager.quality import QualityReport, eval_text


def report(ppl: float, reference_ppl: float = 12.3, variant: str = "Q4_0") -> QualityReport:
    return QualityReport(
        metric="perplexity", variant=variant, reference="F16", reference_ppl=reference_ppl,
        ppl=ppl, mean_nll=math.log(ppl) if ppl > 0 else math.nan,
        reference_mean_nll=math.log(reference_ppl), delta_pct=(ppl / reference_ppl - 1) * 100,
        top1_agreement=0.9, tokens=2000, eval_sha256="0" * 64,
    )


PI = DeviceProfile.from_dict({
    "name": "raspberry-pi-5", "match": {"min_ram_gb": 3.5},
    "target": {"runtime": "llamacpp", "format": "gguf", "precision": "int4", "quant": "Q4_0"},
    "budget": {"max_ppl_increase_pct": 15.0},
})


def test_over_budget_names_variant_profile_and_numbers() -> None:
    from packager.quality import check_budget

    with pytest.raises(QualityBudgetError) as e:
        check_budget(report(15.14), PI)
    assert str(e.value) == ("variant Q4_0 for profile raspberry-pi-5 loses 23.1% perplexity "
                            "(12.3 -> 15.1); the profile allows 15.0%")
    assert e.value.profile == "raspberry-pi-5"
    assert e.value.measured_pct == pytest.approx(23.09, abs=0.01)
    assert e.value.budget_pct == 15.0


def test_within_budget_passes() -> None:
    from packager.quality import check_budget

    check_budget(report(13.0), PI)
    check_budget(report(12.3 * 1.15), PI)  # exactly at the budget is allowed


def test_a_quantized_variant_that_scores_better_passes() -> None:
    from packager.quality import check_budget

    check_budget(report(12.0), PI)


def test_non_finite_delta_is_refused_not_passed() -> None:
    from packager.quality import check_budget

    with pytest.raises(QualityBudgetError, match="non-finite"):
        check_budget(report(math.nan), PI)


def test_manifest_form_is_plain_and_rounded() -> None:
    m = report(13.0).to_manifest()
    assert m["metric"] == "perplexity" and m["reference"] == "F16" and m["variant"] == "Q4_0"
    assert m["delta_pct"] == round((13.0 / 12.3 - 1) * 100, 3)
    assert set(m) >= {"reference_ppl", "ppl", "mean_nll", "top1_agreement", "tokens",
                      "eval_sha256"}


def test_eval_text_is_shipped_with_a_stable_digest() -> None:
    text, sha = eval_text()
    assert 1500 <= len(text.split()) <= 2500
    assert len(sha) == 64
    assert eval_text()[1] == sha


def test_max_loss_replaces_the_profiles_budget_and_says_so() -> None:
    from packager.quality import check_budget

    check_budget(report(15.14), PI, max_loss_pct=25.0)  # +23.1% within --max-loss 25
    with pytest.raises(QualityBudgetError) as e:
        check_budget(report(15.14), PI, max_loss_pct=20.0)
    assert str(e.value).endswith("--max-loss allows 20.0% (the profile 15.0%)")
    assert e.value.budget_pct == 20.0
    assert "--max-loss PCT" in e.value.diagnostics()
