"""Every benchmark in bench/ runs end to end in smoke mode, so a change that breaks one fails CI.

Each benchmark runs as its own process, as the README runs it, with ``--smoke`` (tiny counts: see
bench/machine.py) and ``--results-dir`` this test's temporary folder; the committed bench/results/
must come out byte for byte unchanged. The model artifacts are the ones the rest of the suite puts
in the packager cache (tests/conftest.py, tests/integration/packager/, tests/integration/runtimes/),
so with a warm cache each smoke takes seconds; bench_mqtt starts its own mosquitto
(fleet/broker.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from need import need, need_module

from fleet.broker import mosquitto_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# Seconds per benchmark. Warm, each takes 5-20 s; a cold packager cache first builds and scores
# the variants (bench_quants scores the F16 reference: ~3 minutes on 2 cores).
TIMEOUT = 600


@dataclass(frozen=True)
class Case:
    script: str
    files: tuple[str, ...]  # what it writes to the results folder
    modules: tuple[str, ...] = ("llama_cpp",)  # the runtime libraries it drives
    mosquitto: bool = False


CASES = (
    Case("bench_runtime_decode", ("runtime_decode.json", "runtime_decode.md")),
    Case("bench_infer_cli", ("infer_cli.json", "infer_cli.md")),
    Case("bench_install", ("install.json", "install.md")),
    Case("bench_quants", ("quants.json", "quants.md")),
    Case("bench_mqtt", ("mqtt.json", "mqtt.md"), mosquitto=True),
    Case("bench_ortgenai", ("ortgenai.json", "ortgenai_builds.md", "ortgenai_decode.md"),
         modules=("onnxruntime_genai",)),
    Case("bench_openvino", ("openvino_decode.json", "openvino_decode.md"), modules=("openvino_genai",)),
    Case("bench_http", ("http.json", "http.md"), mosquitto=True),
    Case("bench_fidelity", ("fidelity.json", "fidelity.md")),
    Case("bench_fleet", ("fleet.json", "fleet.md"), modules=(), mosquitto=True),
    # The llamacpp binary the agent-binary tests build (cached by its inputs), against the venv.
    Case("bench_footprint", ("footprint.json", "footprint.md"), mosquitto=True),
)


def committed_results() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((BENCH / "results").iterdir())}


def test_every_benchmark_has_a_smoke_case() -> None:
    assert sorted(c.script for c in CASES) == sorted(p.stem for p in BENCH.glob("bench_*.py"))


def test_a_full_run_writes_bench_results_and_a_smoke_run_never_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_machine", BENCH / "machine.py")
    assert spec is not None and spec.loader is not None
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    monkeypatch.delenv(machine.SMOKE_ENV, raising=False)

    def parse(*argv: str) -> tuple[argparse.Namespace, Any]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--runs", type=int, default=5)
        return machine.parse(ap, list(argv), {"runs": 1})

    args, results = parse()
    assert (args.runs, args.smoke, results.directory, results.smoke) == (5, False, BENCH / "results", False)
    args, results = parse("--smoke", "--results-dir", str(tmp_path))
    assert (args.runs, results.directory, results.smoke) == (1, tmp_path, True)
    args, _ = parse("--smoke", "--runs", "3", "--results-dir", str(tmp_path))  # an explicit count wins
    assert args.runs == 3
    monkeypatch.setenv(machine.SMOKE_ENV, "1")
    args, results = parse("--results-dir", str(tmp_path))
    assert (args.runs, results.smoke) == (1, True)
    with pytest.raises(SystemExit):  # a smoke run's numbers never land among the committed results
        parse("--results-dir", str(BENCH / "results"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.script)
def test_benchmark_runs_in_smoke_mode(case: Case, tmp_path: Path) -> None:
    for module in case.modules:
        need_module(module, f"{case.script} drives {module}")
    if case.mosquitto:
        need(mosquitto_binary() is not None, "mosquitto is not installed (apt-get install mosquitto)")
    before = committed_results()
    out = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / f"{case.script}.py"), "--smoke", "--results-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, f"{case.script} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert sorted(p.name for p in out.iterdir()) == sorted(case.files)
    for name in case.files:
        text = (out / name).read_text()
        if name.endswith(".json"):
            result = json.loads(text)
            assert result["smoke"] is True and result["machine"]["cpu"] is not None
        else:
            assert text.startswith("# ") and "|---" in text
    assert committed_results() == before
