"""The precision matrix end to end: one `edgepack build --all-profiles` of the real sample for every
shipped profile plus one CPU profile per runtime of this host, then each runtime's bundle installed
and answering through the agent CLI and over MQTT.

The build runs once per session (module fixture); its variants are cached by the packager, so a
second session reuses the ONNX, OpenVINO and GGUF conversions and their quality scores.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from agentkit import AgentProcess, Host

from agent._fs import file_digest
from agent.bundle import Manifest
from agent.cli import main as agent
from agent.protocol import InferRequest, InstallRequest
from edgepack.cli import main as edgepack
from fleet.serve import BundleServer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# One profile per runtime that this CPU-only x86 host can serve (the shipped ones target GPUs,
# NPUs and phones). Budgets are loose: the sample's weights come from a Q4_K_M file.
HOST_PROFILE = """
name = "host-{runtime}"
description = "test: this host through {runtime}"
class = "pc"
[match]
arch = ["x86_64", "aarch64"]
min_ram_gb = 1.0
[target]
runtime = "{runtime}"
format = "{fmt}"
precision = "{precision}"
{quant}
device = "cpu"
context = 1024
threads = 2
{options}
[budget]
max_ppl_increase_pct = 50.0
[slo]
min_decode_tok_s = 1.0
"""
HOST = {
    "llamacpp": HOST_PROFILE.format(runtime="llamacpp", fmt="gguf", precision="int4",
                                    quant='quant = "Q4_K_M"', options=""),
    "ortgenai": HOST_PROFILE.format(runtime="ortgenai", fmt="onnx", precision="int4", quant="",
                                    # android-arm64's options: the two profiles share one build
                                    options='options = { block_size = 16, accuracy_level = 4, '
                                            'algo_config = "k_quant_mixed" }'),
    "openvino": HOST_PROFILE.format(runtime="openvino", fmt="openvino-ir", precision="int8", quant="",
                                    options=""),
}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, sample_model) -> dict:
    from agent.profiles import default_profiles_dir

    profiles = tmp_path_factory.mktemp("profiles")
    for f in default_profiles_dir().glob("*.toml"):
        shutil.copy(f, profiles)
    for runtime, text in HOST.items():
        (profiles / f"host-{runtime}.toml").write_text(text)
    keys = tmp_path_factory.mktemp("keys")
    assert edgepack(["-q", "keys", "generate", "--name", "release", "-o", str(keys)]) == 0
    out = tmp_path_factory.mktemp("bundles")
    rc = edgepack(["-q", "--profiles-dir", str(profiles), "build", "--model", str(sample_model.hf_dir),
                   "--all-profiles", "--key", str(keys / "release.key"), "-o", str(out),
                   "--bundle-version", "7"])
    report = json.loads((out / "build-report.json").read_text())
    assert rc == 0, report
    return {"report": report, "out": out, "keyring": keys / "release.pub.json",
            "bundles": {b["profile"]: Path(b["bundle"]) for b in report["bundles"]}}


def _words_ratio(text: str) -> float:
    words = re.findall(r"\S+", text)
    ascii_words = [w for w in words if re.fullmatch(r"[A-Za-z][A-Za-z'’-]*[.,;:!?\"')]*", w)]
    return len(ascii_words) / max(1, len(words))


def test_every_shipped_profile_gets_a_signed_bundle_with_its_quality(matrix) -> None:
    from agent.profiles import load_profiles

    report = matrix["report"]
    assert report["refused"] == {} and report["over_budget"] == {}
    shipped = load_profiles()
    assert set(shipped) <= set(matrix["bundles"])
    by_profile = {b["profile"]: b for b in report["bundles"]}
    assert {by_profile[p]["format"] for p in shipped} == {"gguf", "onnx", "openvino-ir"}
    for name, b in by_profile.items():
        q = b["quality"]
        assert q["metric"] == "perplexity" and q["tokens"] > 500, name
        assert 1.0 < q["reference_ppl"] < 1000 and 0.5 < q["top1_agreement"] <= 1.0, name
        assert q["runtime"] == b["runtime"], name  # scored by the runtime that serves it
        t = shipped[name].target if name in shipped else None
        if t is not None:
            assert (b["runtime"], b["format"], b["device"]) == (t.runtime, t.format, t.device)


def test_each_distinct_variant_is_built_once_and_reported_with_a_chart(matrix) -> None:
    report, out = matrix["report"], matrix["out"]
    used = {b["variant"] for b in report["bundles"]}
    assert used == set(report["variants"])
    # android-arm64 and host-ortgenai want the same ONNX int4 build: shared, not rebuilt.
    by_profile = {b["profile"]: b for b in report["bundles"]}
    assert by_profile["android-arm64"]["variant"] == by_profile["host-ortgenai"]["variant"]
    md = (out / "build-report.md").read_text()
    assert "## The same precision across runtimes" in md and "| int4 | ortgenai |" in md
    assert (out / "build-report.png").read_bytes()[:4] == b"\x89PNG"
    speeds = {k: v["speed"] for k, v in report["variants"].items()}
    for runtime in HOST:
        host_variant = by_profile[f"host-{runtime}"]["variant"]
        assert speeds[host_variant]["decode_tok_s"] > 0, (runtime, speeds[host_variant])


def test_a_folder_bundle_carries_every_file_with_its_hash(matrix) -> None:
    from agent.bundle import BundleReader

    with open(matrix["bundles"]["host-openvino"], "rb") as f:
        m = Manifest.from_bytes(BundleReader(f).read_header()[0])
    assert m.target.entrypoint == "model"
    names = {e.path for e in m.files}
    assert {"model/openvino_model.xml", "model/openvino_model.bin",
            "model/openvino_tokenizer.xml", "model/openvino_detokenizer.xml"} <= names


@pytest.mark.parametrize("runtime", list(HOST))
def test_each_runtime_installs_and_streams_through_the_agent_cli(matrix, runtime, tmp_path, capsys):
    state = ["--state-dir", str(tmp_path / "state"), "--keyring", str(matrix["keyring"])]
    assert agent([*state, "install", str(matrix["bundles"][f"host-{runtime}"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["installed"]["runtime"] == runtime
    assert res["check"]["decode_tok_s"] > 0  # the post-install gate ran on this runtime
    assert agent([*state, "infer", PROMPT, "--max-tokens", "24", "--temperature", "0", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    text = "".join(x.get("text", "") for x in lines)
    assert lines[-1]["done"] and lines[-1]["usage"]["completion_tokens"] > 0
    assert len(lines) > 3, lines  # streamed, not one blob
    assert len(text.split()) >= 5 and _words_ratio(text) > 0.6, text


@pytest.mark.parametrize("runtime", list(HOST))
def test_each_runtime_installs_and_streams_over_mqtt(matrix, runtime, tmp_path, broker):
    bundle = matrix["bundles"][f"host-{runtime}"]
    host = Host(broker.url)
    dev = f"dev-{runtime}"
    a = AgentProcess(tmp_path / "state", matrix["keyring"], broker.url, device=dev).start()
    try:
        host.wait_for(dev, "state", lambda m: m["state"] == "online", timeout=30)
        with BundleServer(bundle.parent) as server:
            digest, size = file_digest(bundle)
            r = host.requests.call(dev, "install", InstallRequest(
                url=server.url_for(bundle.name), sha256=digest, size=size), timeout=300)
        assert r.ok, (r.error, a.tail())
        assert r.result["installed"]["runtime"] == runtime
        chunks = list(host.requests.stream(dev, InferRequest(prompt=PROMPT, max_tokens=24,
                                                             temperature=0.0), timeout=120))
        assert [c.seq for c in chunks] == list(range(len(chunks))) and chunks[-1].done
        text = "".join(c.text for c in chunks)
        assert len(text.split()) >= 5 and _words_ratio(text) > 0.6, text
        health = host.wait_for(dev, "health", lambda m: (m.get("last_gate") or {}).get("ok"))
        assert health["last_gate"]["decode_tok_s"] > 0
    finally:
        a.stop()
        host.close()
