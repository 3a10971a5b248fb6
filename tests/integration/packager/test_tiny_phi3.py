"""The Phi path end to end on the tiny random-weight Phi-3 (packager/tiny.py), in seconds.

The model is made here (random weights, a sentencepiece tokenizer trained on the evaluation text,
Phi-3's special tokens and chat template), converted by each real tool — llama.cpp's converter and
quantizer, the onnxruntime-genai builder, optimum-intel in its converter environment — and
streamed through the three runtimes that serve Phi-3 on devices; then built, signed, installed and
served through the two CLIs. Random weights generate noise: the tests check that every tool
accepts the model and that every runtime generates all the tokens asked for, never the words.

Everything is cached under $EDGEPACK_CACHE like the sample's artifacts; warm, the file runs in
well under a minute (cold: about two, plus the OpenVINO converter environment if it is missing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tinymodel import TINY_PROFILE

from agent.cli import main as agent_cli
from agent.runtimes import GenerationParams, LoadOptions, Runtime, Usage, get_runtime
from edgepack.cli import main as edgepack
from packager import tiny
from packager.catalog import resolve_model
from packager.model import ModelInfo, read_gguf_header, resolve_source
from packager.plan import Variant
from packager.tiny import TinyModel, ensure_tiny_phi3

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPT = "The river rises in the hills and"
TOKENS = 24


@pytest.fixture(scope="module")
def tiny_info(tiny_phi3: TinyModel, packager_cache: Path) -> ModelInfo:
    return resolve_model("tiny-phi3", cache_dir=packager_cache)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-variants")


def generate(rt: Runtime, n: int = TOKENS, *, chat: bool = False, **params: object) -> tuple[str, Usage, int]:
    """(text, usage, text chunks) of one generation; greedy unless params say otherwise."""
    chunks = list(rt.stream(PROMPT, GenerationParams(max_tokens=n, **{"temperature": 0.0, **params}),
                            chat=chat))
    usage = chunks[-1].usage
    assert chunks[-1].done and usage is not None
    return "".join(c.text for c in chunks), usage, len(chunks) - 1


def assert_streams_all_tokens(rt: Runtime) -> None:
    """Plain, chat (the model's own template) and sampled: every requested token, as text."""
    for kwargs in ({}, {"chat": True}, {"temperature": 0.8, "seed": 7}):
        text, usage, n_chunks = generate(rt, **kwargs)  # type: ignore[arg-type]
        assert usage.completion_tokens == TOKENS and usage.finish_reason == "length", (kwargs, usage)
        assert text.strip() and n_chunks > 1, (kwargs, text)
    _, plain, _ = generate(rt)
    _, chat, _ = generate(rt, chat=True)
    assert chat.prompt_tokens > plain.prompt_tokens  # <|user|> ... <|end|> <|assistant|> around it


@pytest.fixture
def runtime(request: pytest.FixtureRequest) -> Iterator[Runtime]:
    rt = get_runtime(request.param)()
    yield rt
    rt.close()


# --- the model ------------------------------------------------------------------------------------


def test_made_once_then_a_cache_hit_with_the_same_bytes_for_a_seed(tmp_path, tiny_phi3, forbid,
                                                                   packager_cache):
    made = ensure_tiny_phi3(tmp_path)
    assert made.built and made.hf_dir.parent == tmp_path / "tiny-phi3"
    weights = made.hf_dir / "model.safetensors"
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (made.hf_dir, weights)]
    forbid(tiny, "_build")  # the second call must not build
    again = ensure_tiny_phi3(tmp_path)
    assert not again.built and again.hf_dir == made.hf_dir
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (made.hf_dir, weights)] == before
    # Deterministic: this fresh build has the bytes of the machine's cached copy, so its source
    # digest (the key of every cached variant) is the same too.
    fresh = resolve_source(str(made.hf_dir), cache_dir=tmp_path)
    cached = resolve_source(str(tiny_phi3.hf_dir), cache_dir=packager_cache)
    assert fresh.source_digest == cached.source_digest
    assert not list(tmp_path.glob("tiny-phi3/.*"))  # no temporary folder left behind


def test_another_seed_is_another_model(tmp_path, tiny_phi3):
    other = ensure_tiny_phi3(tmp_path, seed=1)
    assert other.name == "tiny-phi3-s1" and other.key != tiny_phi3.key
    assert (other.hf_dir / "model.safetensors").read_bytes() != (
        tiny_phi3.hf_dir / "model.safetensors").read_bytes()
    # the tokenizer depends on the text only
    assert (other.hf_dir / "tokenizer.model").read_bytes() == (
        tiny_phi3.hf_dir / "tokenizer.model").read_bytes()


def test_it_is_a_phi3_checkpoint_with_phi3s_tokens_and_template(tiny_phi3, tiny_info):
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_phi3.hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["architectures"] == ["Phi3ForCausalLM"]
    assert tiny_info.architecture == "phi3" and tiny_info.name == "tiny-phi3"
    assert tiny_info.n_params == tiny_phi3.n_params  # the planner's count is exact here
    assert tiny_info.vocab_size == 3008 and tiny_info.vocab_size % 64 == 0
    assert tiny_info.has_chat_template and 5e6 < tiny_phi3.size_bytes < 16e6
    tok = AutoTokenizer.from_pretrained(tiny_phi3.hf_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tiny_phi3.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  tokenize=True)["input_ids"]
    names = tok.convert_ids_to_tokens(ids)
    assert names[0] == "<|user|>" and names[-2:] == ["<|end|>", "<|assistant|>"], names
    gen = json.loads((tiny_phi3.hf_dir / "generation_config.json").read_text())
    assert tok.convert_ids_to_tokens(gen["eos_token_id"]) == ["<|endoftext|>", "<|assistant|>",
                                                              "<|end|>"]


def test_every_profile_plans_it(tiny_info):
    from agent.profiles import load_profiles
    from packager.plan import plan

    bp = plan(load_profiles().values(), tiny_info)
    assert bp.refused == {} and len(bp.profiles) == len(load_profiles())


# --- GGUF through llama.cpp ----------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["llamacpp"], indirect=True)
@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_0", "Q4_K_M"])
def test_gguf_converts_quantizes_and_streams_through_llamacpp(quant, runtime, tiny_info, out_dir,
                                                              packager_cache):
    import gguf

    from packager.gguf import build_gguf_variant

    path = build_gguf_variant(tiny_info, quant, out_dir, cache_dir=packager_cache, threads=2)
    fields = read_gguf_header(path).fields
    assert fields["general.architecture"] == "phi3" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.eos_token_id"] == 3000
    assert "<|assistant|>" in fields["tokenizer.chat_template"]
    if quant == "Q4_K_M":
        # rows of 256 and 512 values: every tensor takes the k-quant it asks for, no fallbacks
        types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        assert {"Q4_K", "Q6_K"} <= types and not types & {"Q5_0", "Q5_1", "Q4_0", "Q8_0"}, types
    runtime.load(path, LoadOptions(context=512, threads=2))
    assert_streams_all_tokens(runtime)


@pytest.mark.parametrize("runtime", ["llamacpp"], indirect=True)
def test_an_eos_first_model_stops_at_once(runtime, tiny_phi3_eos_first, out_dir, packager_cache):
    from packager.gguf import build_gguf_variant

    info = resolve_source(str(tiny_phi3_eos_first.hf_dir), cache_dir=packager_cache)
    runtime.load(build_gguf_variant(info, "Q8_0", out_dir, cache_dir=packager_cache),
                 LoadOptions(context=512, threads=2))
    for kwargs in ({}, {"chat": True}, {"temperature": 1.0, "seed": 3}):
        text, usage, _ = generate(runtime, 8, **kwargs)  # type: ignore[arg-type]
        assert (text, usage.completion_tokens, usage.finish_reason) == ("", 0, "stop"), kwargs
    # ignore_eos (what the gate benchmarks with): on through EOS to max_tokens.
    for kwargs in ({}, {"chat": True}):
        _, usage, _ = generate(runtime, 8, ignore_eos=True, **kwargs)  # type: ignore[arg-type]
        assert (usage.completion_tokens, usage.finish_reason) == (8, "length"), kwargs


# --- ONNX through onnxruntime-genai, OpenVINO IR through openvino-genai ------------------------------


@pytest.mark.parametrize("runtime", ["ortgenai"], indirect=True)
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_onnx_builds_and_streams_through_ortgenai(precision, runtime, tiny_info, out_dir,
                                                  packager_cache):
    from packager.onnx import build_onnx_variant

    folder = build_onnx_variant(tiny_info, Variant("ortgenai", "onnx", precision, precision, "cpu"),
                                out_dir, cache_dir=packager_cache, threads=2)
    assert (folder / "genai_config.json").is_file() and (folder / "chat_template.jinja").is_file()
    runtime.load(folder, LoadOptions(context=512, threads=2))
    assert_streams_all_tokens(runtime)


@pytest.mark.parametrize("runtime", ["openvino"], indirect=True)
def test_openvino_int8_exports_and_streams_through_openvino(runtime, tiny_info, out_dir,
                                                            packager_cache):
    from packager.openvino import EXPORT_MARKER, build_openvino_variant, export_ir, export_spec

    folder = build_openvino_variant(tiny_info, Variant("openvino", "openvino-ir", "int8", "int8", "cpu"),
                                    out_dir, cache_dir=packager_cache, threads=2)
    marker = json.loads((export_ir(tiny_info, export_spec("int8", "cpu", {}),
                                   cache_dir=packager_cache) / EXPORT_MARKER).read_text())
    assert marker["check"]["tokenizer_match"] and marker["check"]["top1_agreement"] >= 0.7
    runtime.load(folder, LoadOptions(context=512, threads=2))
    assert_streams_all_tokens(runtime)


def test_the_three_runtimes_score_the_full_precision_model_alike(tiny_info, packager_cache):
    from packager.gguf import reference_gguf
    from packager.onnx import reference_onnx
    from packager.openvino import reference_openvino
    from packager.quality import eval_text

    text, _ = eval_text()
    refs = {"llamacpp": reference_gguf(tiny_info, packager_cache),
            "ortgenai": reference_onnx(tiny_info, packager_cache, threads=2),
            "openvino": reference_openvino(tiny_info, packager_cache, threads=2)}
    nll = {}
    for name, path in refs.items():
        with get_runtime(name)() as rt:
            rt.load(path, LoadOptions(context=600, threads=2))
            nll[name] = rt.evaluate_nll(text, window=512).mean_nll
    # F16 GGUF vs fp32 ONNX / IR of the same random weights (tokenizers may differ by a token).
    assert max(nll.values()) - min(nll.values()) < 0.05, nll


# --- build, sign, install, serve through the CLIs --------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiny-keys")
    assert edgepack(["-q", "keys", "generate", "--name", "release", "-o", str(d)]) == 0
    return d / "release.key", d / "release.pub.json"


def agent(state: Path, keyring: Path, *args: str) -> int:
    return agent_cli(["--state-dir", str(state), "--keyring", str(keyring), *args])


def infer_lines(capsys: pytest.CaptureFixture[str], state: Path, keyring: Path, *args: str) -> list[dict]:
    assert agent(state, keyring, "infer", PROMPT, "--max-tokens", str(TOKENS), "--json", *args) == 0
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


def test_edgepack_build_then_agent_install_and_infer(tmp_path, keys, tiny_phi3, capsys):
    out = tmp_path / "out"
    assert edgepack(["-q", "build", "--model", "tiny-phi3", "--profile", "x86-64-cpu",
                     "--key", str(keys[0]), "-o", str(out), "--bundle-version", "7"]) == 0
    report = json.loads((out / "build-report.json").read_text())
    (bundle,) = report["bundles"]
    assert bundle["quant"] == "Q8_0" and bundle["version"] == 7
    q = bundle["quality"]  # noise against noise, but measured: Q8_0 vs the F16 of the same weights
    assert q["reference"] == "F16" and abs(q["delta_pct"]) < 5 and q["top1_agreement"] > 0.8
    capsys.readouterr()

    state, ring = tmp_path / "state", keys[1]
    # The gate runs in this process, whose RSS is the test session's (torch, every runtime),
    # not an agent's: the profile's max_rss_mb is for devices, so that one check is off here.
    assert agent(state, ring, "install", bundle["bundle"], "--json", "--slo", "max_rss_mb=0") == 0
    result = json.loads(capsys.readouterr().out)
    installed, check = result["installed"], result["check"]
    assert (installed["model"], installed["version"], installed["quant"]) == ("tiny-phi3", 7, "Q8_0")
    # the gate got all 32 tokens it asked for, so its decode rate is a real one
    assert check["ok"] is True and check["tokens"] == 32 and check["decode_tok_s"] > 0, check
    for args in ((), ("--chat",)):
        lines = infer_lines(capsys, state, ring, "--temperature", "0", *args)
        assert lines[-1]["done"] and lines[-1]["usage"]["completion_tokens"] == TOKENS, args
        assert len(lines) > 3 and "".join(x.get("text", "") for x in lines).strip(), args


def test_tiny_bundles_install_in_order_and_serve(tmp_path, tiny_bundles, capsys):
    from packager.bundler import read_manifest

    state, ring = tmp_path / "state", tiny_bundles["keyring"]
    for v in (1, 2, 3):
        assert agent(state, ring, "install", str(tiny_bundles[f"v{v}"]), "--gate-tokens", "8") == 0
    capsys.readouterr()
    assert agent(state, ring, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["current"]["version"] == 3 and status["previous"]["version"] == 2
    lines = infer_lines(capsys, state, ring)  # sampled, the CLI's defaults
    assert lines[-1]["usage"]["completion_tokens"] == TOKENS
    m = read_manifest(tiny_bundles["stops_v4"])
    assert (m.model_name, m.version, m.profile) == ("tiny-phi3", 4, TINY_PROFILE["name"])
    # A model that ends every answer at once: the gate still measures its rate over every token
    # it asked for (end of sequence ignored), never over one token (the "105485 tok/s" it once said).
    assert agent(state, ring, "install", str(tiny_bundles["stops_v4"]), "--gate-tokens", "8",
                 "--slo", "max_rss_mb=0", "--json") == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert (check["tokens"], check["decode_tokens"]) == (8, 7), check
    assert 0 < check["decode_tok_s"] < 100_000 and check["fidelity"]["ok"] is True, check
