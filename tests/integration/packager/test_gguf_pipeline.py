"""The GGUF path end to end on the real sample: HF checkpoint -> F16 -> quantized -> quality."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import ConvertError, QuantizeError
from packager.model import ModelInfo
from packager.sample import SampleModel

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GEMMA3_270M_PARAMS = 268_098_176  # Gemma3ForCausalLM.num_parameters()


def file_type(path: Path) -> str:
    from packager.gguf import gguf_file_type

    return gguf_file_type(path)


def test_sample_hf_checkpoint_generates_paris(sample_model: SampleModel) -> None:
    from packager.sample import CHECK_PROMPTS, generate_greedy

    texts = generate_greedy(sample_model.hf_dir, CHECK_PROMPTS, max_new_tokens=16)
    assert any("Paris" in t for t in texts), texts


def test_sample_hf_source_has_the_gemma3_shape_and_a_chat_template(sample_hf: ModelInfo) -> None:
    assert sample_hf.source_kind == "hf" and sample_hf.architecture == "gemma3_text"
    assert sample_hf.n_params == pytest.approx(GEMMA3_270M_PARAMS, rel=0.001)
    assert (sample_hf.n_layers, sample_hf.n_kv_heads, sample_hf.head_dim) == (18, 1, 256)
    assert sample_hf.has_chat_template


def test_f16_reference_is_f16_and_carries_the_chat_template(f16_reference: Path) -> None:
    from packager.model import read_gguf_header

    assert file_type(f16_reference) == "F16"
    fields = read_gguf_header(f16_reference).fields
    assert "<start_of_turn>" in fields["tokenizer.chat_template"]
    assert fields["general.name"] == "Gemma 3 270m"  # not the folder name ("hf")


def test_converter_is_extracted_from_the_matching_sdist(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from packager.gguf import CONVERTER_SCRIPT, ensure_converter, llama_cpp_version

    monkeypatch.delenv("EDGEPACK_LLAMA_CPP_SRC", raising=False)
    conv = ensure_converter(tmp_path)  # an empty cache: pip downloads the sdist
    assert conv == tmp_path / f"llama.cpp-{llama_cpp_version()}"
    assert (conv / CONVERTER_SCRIPT).is_file() and (conv / "conversion" / "__init__.py").is_file()
    assert (conv / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not (conv / "ggml").exists() and not (conv / "src").exists()  # only what it needs
    assert [p.name for p in tmp_path.iterdir()] == [conv.name]  # no temporary left behind


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0"])
def test_quantized_variant_has_the_requested_file_type(
    quant: str, sample_hf: ModelInfo, f16_reference: Path, variants_dir: Path,
    packager_cache: Path, forbid: Callable[..., None],
) -> None:
    import packager.gguf
    from packager.gguf import build_gguf_variant

    out = build_gguf_variant(sample_hf, quant, variants_dir, cache_dir=packager_cache, threads=2)
    assert out.parent == variants_dir and file_type(out) == quant
    assert out.stat().st_size < f16_reference.stat().st_size
    # The second build is a cache hit: nothing is converted, quantized or copied again.
    forbid(packager.gguf, "quantize", "reference_gguf", "convert_hf_to_f16", "copy_atomic")
    again = build_gguf_variant(sample_hf, quant, variants_dir, cache_dir=packager_cache, threads=2)
    assert again == out


def test_f16_variant_is_the_reference(sample_hf: ModelInfo, f16_reference: Path,
                                      variants_dir: Path, packager_cache: Path) -> None:
    from packager.gguf import build_gguf_variant

    out = build_gguf_variant(sample_hf, "F16", variants_dir, cache_dir=packager_cache)
    assert out.samefile(f16_reference) or out.read_bytes() == f16_reference.read_bytes()


@pytest.mark.parametrize("cut", ["header", "tensor-data"])
def test_failed_quantization_raises_and_leaves_no_partial_file(
    cut: str, f16_reference: Path, tmp_path: Path
) -> None:
    from packager.gguf import quantize

    src = tmp_path / "broken.gguf"
    size = 4096 if cut == "header" else f16_reference.stat().st_size // 2
    with f16_reference.open("rb") as f:
        src.write_bytes(f.read(size))
    out_dir = tmp_path / "out"
    with pytest.raises(QuantizeError) as e:
        quantize(src, out_dir / "broken-Q4_K_M.gguf", "Q4_K_M", threads=2)
    assert e.value.returncode not in (0, None)
    assert "failed" in e.value.stderr_tail
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary file


def test_converter_failure_raises_convert_error_and_leaves_nothing(
    sample_model: SampleModel, packager_cache: Path, tmp_path: Path
) -> None:
    from packager.gguf import convert_hf_to_f16

    broken = tmp_path / "broken-hf"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sample_model.hf_dir / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    dst = tmp_path / "out" / "broken-F16.gguf"
    with pytest.raises(ConvertError) as e:
        convert_hf_to_f16(broken, dst, cache_dir=packager_cache)
    assert e.value.returncode not in (0, None) and e.value.stderr_tail
    assert not dst.exists() and os.listdir(dst.parent) == []


def test_quality_of_q4_k_m_against_f16_is_finite_and_small(
    q4_k_m_gguf: Path, f16_reference: Path
) -> None:
    from packager.quality import measure

    report = measure(q4_k_m_gguf, f16_reference, threads=2)
    assert report.variant == "Q4_K_M" and report.reference == "F16"
    assert math.isfinite(report.ppl) and math.isfinite(report.reference_ppl)
    assert 1 < report.reference_ppl < 100  # plain English prose for a 270M model
    assert abs(report.delta_pct) < 15
    assert report.top1_agreement is not None and report.top1_agreement > 0.8
    assert report.tokens > 1500
    manifest = report.to_manifest()
    assert manifest["eval_sha256"] == report.eval_sha256 and len(report.eval_sha256) == 64


def test_gguf_input_resolves_with_its_native_quant(sample_model: SampleModel,
                                                   packager_cache: Path) -> None:
    from packager.model import resolve_source

    m = resolve_source(str(sample_model.gguf), cache_dir=packager_cache)
    assert m.source_kind == "gguf" and m.architecture == "gemma3"
    assert m.native_quant == "Q4_K_M"
    assert m.n_params == pytest.approx(268e6, rel=0.01)
    assert (m.n_layers, m.hidden_size, m.n_heads, m.n_kv_heads, m.head_dim) == (18, 640, 4, 1, 256)
    assert m.vocab_size == 262144 and m.max_context == 32768
    import gguf  # the reference reader (slow: ~10 s on this file) agrees with ours

    assert sum(int(t.n_elements) for t in gguf.GGUFReader(sample_model.gguf).tensors) == m.n_params


def test_gguf_input_same_quant_is_copied_and_requantize_needs_permission(
    sample_model: SampleModel, packager_cache: Path, tmp_path: Path
) -> None:
    from packager.gguf import build_gguf_variant
    from packager.model import resolve_source

    m = resolve_source(str(sample_model.gguf), cache_dir=packager_cache)
    out = build_gguf_variant(m, "Q4_K_M", tmp_path, cache_dir=packager_cache)
    assert out.stat().st_size == sample_model.gguf.stat().st_size and file_type(out) == "Q4_K_M"
    with pytest.raises(QuantizeError, match="allow_requantize"):
        build_gguf_variant(m, "Q8_0", tmp_path, cache_dir=packager_cache)
    assert not (tmp_path / f"{out.stem.rsplit('-', 1)[0]}-Q8_0.gguf").exists()
