"""Ready ONNX GenAI / OpenVINO IR folders as sources, and folder payloads in bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import ModelSourceError, PlanError
from agent.profiles.schema import DeviceProfile
from packager.build import artifact_size, payload_files
from packager.model import resolve_source
from packager.plan import plan_profile

GENAI_CONFIG = {"model": {"type": "gemma3_text", "context_length": 32768, "vocab_size": 262144,
                          "decoder": {"hidden_size": 640, "num_hidden_layers": 18, "head_size": 256,
                                      "num_attention_heads": 4, "num_key_value_heads": 1}},
                "search": {"max_length": 1024}, "chat_template": "{{ messages }}"}
HF_CONFIG = {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
             "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
             "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768}


def onnx_folder(root: Path) -> Path:
    d = root / "gemma-onnx"
    d.mkdir()
    (d / "genai_config.json").write_text(json.dumps(GENAI_CONFIG))
    (d / "model.onnx").write_bytes(b"onnx-graph")
    (d / "model.onnx.data").write_bytes(b"\0" * 100)
    return d


def ov_folder(root: Path) -> Path:
    d = root / "gemma-ov"
    d.mkdir()
    (d / "openvino_model.xml").write_text("<net/>")
    (d / "openvino_model.bin").write_bytes(b"\0" * 64)
    (d / "config.json").write_text(json.dumps(HF_CONFIG))
    (d / "chat_template.jinja").write_text("{{ messages }}")
    return d


def profile(fmt: str, runtime: str) -> DeviceProfile:
    return DeviceProfile.from_dict({
        "name": f"p-{fmt}", "match": {"min_ram_gb": 8},
        "target": {"runtime": runtime, "format": fmt, "precision": "int4", "context": 2048},
        "budget": {"max_ppl_increase_pct": 10.0}})


def test_an_onnx_genai_folder_is_read_from_its_genai_config(tmp_path: Path) -> None:
    m = resolve_source(str(onnx_folder(tmp_path)), cache_dir=tmp_path)
    assert (m.source_kind, m.n_layers, m.n_kv_heads, m.head_dim) == ("onnx", 18, 1, 256)
    assert m.has_chat_template and m.max_context == 32768
    assert 200e6 < m.n_params < 300e6  # estimated: embeddings + 12 h^2 per layer
    assert m.source_digest.startswith("sha256:")


def test_an_openvino_folder_is_read_from_the_hf_config_beside_it(tmp_path: Path) -> None:
    m = resolve_source(str(ov_folder(tmp_path)), cache_dir=tmp_path)
    assert (m.source_kind, m.architecture, m.hidden_size) == ("openvino-ir", "gemma3_text", 640)
    assert m.has_chat_template


def test_an_openvino_folder_without_weights_is_refused(tmp_path: Path) -> None:
    d = ov_folder(tmp_path)
    (d / "openvino_model.bin").unlink()
    with pytest.raises(ModelSourceError, match=r"no openvino_model\.bin"):
        resolve_source(str(d), cache_dir=tmp_path)


def test_an_onnx_folder_without_a_graph_is_refused(tmp_path: Path) -> None:
    d = onnx_folder(tmp_path)
    (d / "model.onnx").unlink()
    with pytest.raises(ModelSourceError, match=r"no \*\.onnx"):
        resolve_source(str(d), cache_dir=tmp_path)


def test_a_ready_folder_ships_only_to_profiles_of_its_format(tmp_path: Path) -> None:
    m = resolve_source(str(onnx_folder(tmp_path)), cache_dir=tmp_path)
    pp = plan_profile(profile("onnx", "ortgenai"), m)
    assert pp.variant.format == "onnx" and any("ready onnx folder" in r for r in pp.reasons)
    with pytest.raises(PlanError, match="ready onnx folder"):
        plan_profile(profile("openvino-ir", "openvino"), m)


def test_a_folder_payload_ships_every_file_under_model_in_sorted_order(tmp_path: Path) -> None:
    d = onnx_folder(tmp_path)
    (d / "sub").mkdir()
    (d / "sub" / "tokenizer.json").write_text("{}")
    files, entry = payload_files(d, "onnx")
    assert entry == "model"
    assert list(files) == ["model/genai_config.json", "model/model.onnx", "model/model.onnx.data",
                           "model/sub/tokenizer.json"]
    assert artifact_size(d) == sum(p.stat().st_size for p in files.values())


def test_a_file_payload_keeps_the_format_name(tmp_path: Path) -> None:
    f = tmp_path / "x-Q4_K_M.gguf"
    f.write_bytes(b"GGUF")
    assert payload_files(f, "gguf") == ({"model.gguf": f}, "model.gguf")
