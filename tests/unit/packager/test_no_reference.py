"""A ready folder has no reference to compare with: its quality reads "not measured against a
reference" everywhere (manifest, budget, report rows, chart), never a loss of +0.0 %."""

from __future__ import annotations

import pytest

from agent.errors import QualityBudgetError
from agent.profiles.schema import DeviceProfile
from packager.quality import NO_REFERENCE, QualityReport, check_budget, describe_loss
from packager.report import chart_points, cross_runtime_rows

PROFILE = DeviceProfile.from_dict({
    "name": "pc", "match": {"min_ram_gb": 1},
    "target": {"runtime": "ortgenai", "format": "onnx", "precision": "int4"},
    "budget": {"max_ppl_increase_pct": 1.0},
})


def unreferenced() -> QualityReport:
    return QualityReport(metric="perplexity", variant="int4", reference=NO_REFERENCE,
                         reference_ppl=None, ppl=25.0, mean_nll=3.2, reference_mean_nll=None,
                         delta_pct=None, top1_agreement=None, tokens=100, eval_sha256="0" * 64,
                         runtime="ortgenai")


def test_the_manifest_table_has_no_loss_and_says_so():
    m = unreferenced().to_manifest()
    assert m["delta_pct"] is None and m["reference_ppl"] is None and m["reference"] == "none"
    assert describe_loss(m) == "not measured against a reference"
    # Positive control: a measured one reads as a loss against its reference.
    assert describe_loss({"delta_pct": 0.571, "reference": "F16"}) == "+0.57% vs F16"


def test_the_budget_does_not_apply_without_a_reference():
    check_budget(unreferenced(), PROFILE)  # nothing to compare: no refusal
    over = QualityReport(**{**unreferenced().__dict__, "reference": "fp32", "reference_ppl": 20.0,
                            "reference_mean_nll": 3.0, "delta_pct": 25.0})
    with pytest.raises(QualityBudgetError):
        check_budget(over, PROFILE)  # control: a measured loss over budget is refused


def test_report_rows_and_chart_leave_it_out_of_the_loss_axis():
    variants = {
        "onnx-int4": {"runtime": "ortgenai", "precision": "int4", "quant": "int4", "size_bytes": 2**20,
                      "quality": unreferenced().to_manifest(), "speed": {}},
        "gguf-q4": {"runtime": "llamacpp", "precision": "int4", "quant": "Q4_K_M", "size_bytes": 2**21,
                    "quality": {"delta_pct": 0.8, "top1_agreement": 0.97}, "speed": {}},
    }
    assert [p.runtime for p in chart_points(variants)] == ["llamacpp"]
    rows = cross_runtime_rows(variants)
    assert any("n/a (no reference)" in r for r in rows) and any("+0.80" in r for r in rows)
