"""resolve_source: local folders and files, and fast clear errors for everything else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ModelSourceError
from packager.model import read_hf_folder, resolve_source

PHI35_CONFIG = {
    "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32064, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "_name_or_path": "microsoft/Phi-3.5-mini-instruct",
}


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    d = tmp_path / "phi"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(PHI35_CONFIG))
    (d / "model.safetensors").write_bytes(b"not really weights, the resolver reads no weights")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return d


def test_local_hf_folder_is_read_from_its_config(hf_folder: Path, tmp_path: Path) -> None:
    m = resolve_source(str(hf_folder), cache_dir=tmp_path / "cache")
    assert m.source_kind == "hf" and m.name == "Phi-3.5-mini-instruct"
    assert m.architecture == "phi3" and m.n_layers == 32 and m.max_context == 131072
    assert m.has_chat_template and m.native_quant == ""
    assert m.source_digest.startswith("sha256:") and len(m.source_digest) == 7 + 64
    assert not (tmp_path / "cache").exists()  # a local source needs no cache


def test_source_digest_follows_the_bytes(hf_folder: Path) -> None:
    before = read_hf_folder(hf_folder).source_digest
    assert read_hf_folder(hf_folder).source_digest == before
    (hf_folder / "model.safetensors").write_bytes(b"other weights")
    assert read_hf_folder(hf_folder).source_digest != before


def test_missing_path_is_a_model_source_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"), cache_dir=tmp_path)
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source("missing-model.gguf", cache_dir=tmp_path)


def test_folder_without_config_or_weights_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        resolve_source(str(empty), cache_dir=tmp_path)
    (empty / "config.json").write_text(json.dumps(PHI35_CONFIG))
    with pytest.raises(ModelSourceError, match=r"no \*\.safetensors"):
        resolve_source(str(empty), cache_dir=tmp_path)


def test_config_without_a_dimension_is_refused(hf_folder: Path, tmp_path: Path) -> None:
    cfg = dict(PHI35_CONFIG)
    del cfg["num_hidden_layers"]
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="num_hidden_layers"):
        resolve_source(str(hf_folder), cache_dir=tmp_path)


def test_garbage_gguf_and_non_gguf_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        resolve_source(str(bad), cache_dir=tmp_path)
    txt = tmp_path / "model.bin"
    txt.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"not a \.gguf"):
        resolve_source(str(txt), cache_dir=tmp_path)


def count_hub_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record network downloads by the hub client (the cache lookup still runs for real)."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls: list[str] = []

    def snapshot_download(repo_id: str, **kw: Any) -> str:
        if not kw.get("local_files_only"):
            calls.append(repo_id)
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_id_offline_fails_fast_naming_the_id_and_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    downloads = count_hub_downloads(monkeypatch)
    with pytest.raises(ModelSourceError) as e:
        resolve_source("edgepack-test/no-such-model", cache_dir=tmp_path)
    assert downloads == []  # refused up front, not after the hub client's timeouts and retries
    assert "edgepack-test/no-such-model" in str(e.value)
    assert "unreachable" in str(e.value)
    assert "--local-dir" in e.value.diagnostics() and "model source" in e.value.diagnostics()


def test_hub_id_without_network_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No HF_HUB_OFFLINE: the resolver probes the hub itself instead of waiting out HTTP retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    downloads = count_hub_downloads(monkeypatch)
    with pytest.raises(ModelSourceError, match="edgepack-test/no-such-model") as e:
        resolve_source("edgepack-test/no-such-model", cache_dir=tmp_path)
    assert "unreachable" in str(e.value) and "hub.invalid:443" in str(e.value)
    assert downloads == []  # the probe answered; the hub client never started its retries


def test_spec_that_is_neither_path_nor_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source("just-a-name", cache_dir=tmp_path)


def test_small_gguf_is_read_without_gguf_reader(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.zeros((64,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = resolve_source(str(path), cache_dir=tmp_path)
    assert (m.name, m.architecture, m.source_kind, m.native_quant) == ("tiny", "llama", "gguf", "Q8_0")
    assert m.n_params == 100 * 64 + 64
    assert (m.n_layers, m.hidden_size, m.n_heads, m.n_kv_heads, m.head_dim) == (2, 64, 4, 2, 16)
    assert m.vocab_size == 100 and m.max_context == 4096 and m.has_chat_template
    assert sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors) == m.n_params
