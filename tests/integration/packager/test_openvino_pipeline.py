"""The OpenVINO path end to end on the real sample: HF checkpoint -> IR (int4 / int8 / fp32) ->
quality through the runtime -> a runtime-only install that serves the IR.

Exports run in the packager's converter environment (made once under $EDGEPACK_CACHE/envs/) and
are cached, so a second session reuses every IR here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import ConvertError
from packager.model import ModelInfo
from packager.plan import Variant

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]
OV_PINS = ("openvino-genai==2026.4.1.0",)


def ov_variant(precision: str, device: str = "cpu", **options: object) -> Variant:
    return Variant("openvino", "openvino-ir", precision, precision, device,
                   tuple(sorted(options.items())))


@pytest.fixture(scope="session")
def ov_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov-variants")


@pytest.fixture(scope="session")
def ov_int8(sample_hf: ModelInfo, ov_out: Path, packager_cache: Path) -> Path:
    from packager.openvino import build_openvino_variant

    return build_openvino_variant(sample_hf, ov_variant("int8", "gpu"), ov_out,
                                  cache_dir=packager_cache, threads=2)


@pytest.fixture(scope="session")
def ov_fp32(sample_hf: ModelInfo, packager_cache: Path) -> Path:
    from packager.openvino import reference_openvino

    return reference_openvino(sample_hf, packager_cache, threads=2)


@pytest.fixture(scope="session")
def ov_int4_fallback(sample_hf: ModelInfo, ov_out: Path, packager_cache: Path) -> Path:
    # Hidden size 640 is not a multiple of 256: NNCF adjusts those layers' group size.
    from packager.openvino import build_openvino_variant

    return build_openvino_variant(sample_hf, ov_variant("int4", group_size=256), ov_out,
                                  cache_dir=packager_cache, threads=2)


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def export_record(ir: Path, packager_cache: Path) -> dict:
    from packager.openvino import EXPORT_MARKER

    # the placed folder's files are hard links to the cached IR, which keeps the export record
    cached = next(d for d in (packager_cache / "openvino").iterdir()
                  if (d / "openvino_model.bin").is_file()
                  and (d / "openvino_model.bin").samefile(ir / "openvino_model.bin"))
    return json.loads((cached / EXPORT_MARKER).read_text())


def greedy(ir: Path, prompt: str, max_tokens: int = 16, repeat_penalty: float = 1.0) -> str:
    from agent.runtimes import GenerationParams, LoadOptions, get_runtime

    with get_runtime("openvino")() as rt:
        rt.load(ir, LoadOptions(context=512, threads=2))
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0,
                                  repeat_penalty=repeat_penalty)
        return "".join(c.text for c in rt.stream(prompt, params))


def test_converter_env_has_the_pins_and_no_torchvision(ov_int8: Path, packager_cache: Path) -> None:
    from packager.openvino import CONVERTER_PINS, converter_env_dir, converter_versions

    versions = converter_versions(packager_cache)
    for pin in CONVERTER_PINS:
        name, version = pin.split("==")
        assert versions[name].split("+")[0] == version, (name, versions)
    py = converter_env_dir(packager_cache) / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torchvision'))"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "None"


def test_int8_ir_has_tokenizer_detokenizer_and_a_passed_check(ov_int8: Path,
                                                              packager_cache: Path) -> None:
    names = {p.name for p in ov_int8.iterdir()}
    assert {"openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
            "openvino_detokenizer.xml", "chat_template.jinja"} <= names
    assert not any(n.startswith(".") for n in names)  # the export record stays in the cache
    assert "tokenizer.json" not in names  # the HF tokenizer: genai reads openvino_tokenizer.xml
    record = export_record(ov_int8, packager_cache)
    assert record["args"][-1] == "int8"
    check = record["check"]
    assert check["tokenizer_match"] and check["top1_agreement"] >= 0.7
    assert check["generated"].strip()


def test_int8_generates_paris(ov_int8: Path) -> None:
    assert "Paris" in greedy(ov_int8, "Q: What is the capital of France?\nA:")


def test_second_build_is_a_cache_hit(sample_hf: ModelInfo, ov_int8: Path, ov_out: Path,
                                     packager_cache: Path, forbid: Callable[..., None]) -> None:
    import packager.openvino
    from packager.openvino import build_openvino_variant

    forbid(packager.openvino, "run_streaming")  # neither the export nor its check runs again
    again = build_openvino_variant(sample_hf, ov_variant("int8", "gpu"), ov_out,
                                   cache_dir=packager_cache, threads=2)
    assert again == ov_int8
    # cpu and gpu int8 are one export; the folder name says what it is
    assert again.name.endswith("-openvino-int8")


def test_int4_with_group_size_fallback_is_smaller_and_coherent(
        ov_int4_fallback: Path, ov_int8: Path, packager_cache: Path) -> None:
    record = export_record(ov_int4_fallback, packager_cache)
    args = record["args"]
    assert args[args.index("--group-size") + 1] == "256"
    assert args[args.index("--group-size-fallback") + 1] == "adjust"
    assert size_of(ov_int4_fallback) < size_of(ov_int8)
    text = greedy(ov_int4_fallback, "The capital of France is", repeat_penalty=1.2)
    assert sum(ch.isalpha() for ch in text) > 10, text


def test_int4_without_fallback_fails_cleanly_and_caches_nothing(
        sample_hf: ModelInfo, tmp_path: Path, packager_cache: Path) -> None:
    from packager.openvino import build_openvino_variant, cached_ir_dir, variant_spec

    variant = ov_variant("int4", group_size=256, group_size_fallback="error")
    with pytest.raises(ConvertError) as e:
        build_openvino_variant(sample_hf, variant, tmp_path / "out", cache_dir=packager_cache,
                               threads=2)
    assert e.value.returncode and e.value.stderr_tail
    assert "group_size_fallback" in str(e.value)  # what to change, in the message itself
    assert "group-wise quantization" in e.value.stderr_tail  # NNCF's reason, kept in the tail
    dst = cached_ir_dir(sample_hf, variant_spec(variant), packager_cache)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]  # no temp
    assert not (tmp_path / "out").exists()


def test_fp32_reference_scores_like_the_source(ov_fp32: Path, packager_cache: Path) -> None:
    check = export_record(ov_fp32, packager_cache)["check"]
    assert check["top1_agreement"] >= 0.95
    assert check["ov_nll"] == pytest.approx(check["ref_nll"], rel=0.01)


def test_int8_nll_is_close_to_fp32(ov_int8: Path, ov_fp32: Path) -> None:
    from agent.runtimes import LoadOptions, get_runtime
    from packager.quality import eval_text

    text, _ = eval_text()
    scores = {}
    for name, ir in (("int8", ov_int8), ("fp32", ov_fp32)):
        with get_runtime("openvino")() as rt:
            rt.load(ir, LoadOptions(context=512 + 64, threads=2))
            scores[name] = rt.evaluate_nll(text, window=512)
    int8, fp32 = scores["int8"], scores["fp32"]
    assert int8.tokens == fp32.tokens > 512
    # intel-core-ultra's budget is 5% perplexity: int8 weight-only compression must fit it.
    assert int8.perplexity / fp32.perplexity - 1 < 0.05, (int8.perplexity, fp32.perplexity)
    assert int8.top1 is not None and fp32.top1 is not None
    agree = sum(a == b for a, b in zip(int8.top1, fp32.top1, strict=True)) / len(fp32.top1)
    assert agree > 0.85


def _light_deps() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def test_runtime_only_install_serves_the_ir_without_torch(ov_int8: Path, tmp_path: Path) -> None:
    """A device install: edgepack (no deps) + its light deps + openvino-genai; no torch or
    transformers. It loads the int8 IR through OpenVINORuntime and streams an answer."""
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True, timeout=300, env=env)
    subprocess.run([*pip, *_light_deps(), *OV_PINS], check=True, timeout=600, env=env)
    code = f"""
import importlib.util, json
from pathlib import Path
from agent.runtimes import GenerationParams, LoadOptions, get_runtime
rt = get_runtime("openvino")()
rt.load(Path({str(ov_int8)!r}), LoadOptions(context=512, threads=2))
chunks = list(rt.stream("Q: What is the capital of France?\\nA:",
                        GenerationParams(max_tokens=16, temperature=0.0, repeat_penalty=1.0)))
rt.close()
print(json.dumps({{"text": "".join(c.text for c in chunks), "usage": chunks[-1].usage.to_dict(),
                  "heavy": [m for m in ("torch", "transformers", "optimum", "packager")
                            if importlib.util.find_spec(m) and m != "packager"]}}))
"""
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert "Paris" in out["text"], out
    assert out["usage"]["completion_tokens"] > 0 and out["usage"]["decode_tok_s"] > 0
