"""The packaging report: cross-runtime rows and the chart (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from packager.report import chart_points, cross_runtime_rows, write_chart

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


def test_variants_sharing_an_artifact_are_one_point_naming_their_devices() -> None:
    q8 = {"runtime": "llamacpp", "precision": "int8", "quant": "Q8_0", "size_bytes": 286 * 2**20,
          "quality": {"delta_pct": 0.57}, "speed": {"decode_tok_s": 38.0}}
    variants = {f"llamacpp-gguf-Q8_0-{d}": {**q8, "device": d} for d in ("metal", "cuda", "cpu")}
    variants["ortgenai-onnx-int4-dml"] = {"runtime": "ortgenai", "precision": "int4", "quant": "int4",
                                          "device": "dml", "size_bytes": 324 * 2**20,
                                          "quality": {"delta_pct": 11.3}, "speed": {"error": "dml"}}
    points = chart_points(variants)
    assert [p.label for p in points] == ["llamacpp Q8_0 (cpu, cuda, metal)", "ortgenai int4 (dml)"]
    assert points[0].decode_tok_s == 38.0 and points[1].decode_tok_s == 0.0
    assert round(points[0].size_mib) == 286 and points[1].delta_pct == 11.3
