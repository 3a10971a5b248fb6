"""The packaging report: cross-runtime rows and the chart (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from packager.report import cross_runtime_rows, write_chart

VARIANTS = {
    "llamacpp-gguf-Q4_K_M-cpu": {"runtime": "llamacpp", "precision": "int4", "size_bytes": 250 * 2**20,
                                 "quality": {"delta_pct": 3.0, "top1_agreement": 0.9},
                                 "speed": {"ttft_ms": 40.0, "decode_tok_s": 60.0}},
    "ortgenai-onnx-int4-cpu-abc123": {"runtime": "ortgenai", "precision": "int4",
                                      "size_bytes": 235 * 2**20,
                                      "quality": {"delta_pct": 2.0, "top1_agreement": 0.92},
                                      "speed": {"ttft_ms": 50.0, "decode_tok_s": 54.0}},
    "openvino-openvino-ir-int8-gpu": {"runtime": "openvino", "precision": "int8",
                                      "size_bytes": 270 * 2**20,
                                      "quality": {"delta_pct": 0.1, "top1_agreement": 0.99},
                                      "speed": {"error": "device GPU not available here"}},
}


def test_only_precisions_built_by_two_runtimes_are_compared() -> None:
    rows = cross_runtime_rows(VARIANTS)
    assert len(rows) == 2 and all(r.startswith("| int4 |") for r in rows)
    assert "| ortgenai |" in rows[1] and "54.0" in rows[1]


def test_the_chart_is_a_png_with_unrunnable_variants_included(tmp_path: Path) -> None:
    out = write_chart(VARIANTS, tmp_path / "r.png", title="t")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
