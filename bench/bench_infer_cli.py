"""Decode speed through `edgepack-agent infer` vs raw llama-cpp-python on the same file.

Same GGUF (the sample's Q4_K_M, installed as a signed bundle for our side), same threads (2), same
prompt, greedy with the default repeat penalty (agent/sampling.py), same max tokens. Each side
runs as its own process, alternating, several times; decode tok/s = (generated tokens - 1) /
(time from first to last token) on both sides, TTFT from the request to the first token.
Target ratio (ours / raw) >= 0.97.

Usage: .venv/bin/python bench/bench_infer_cli.py [--runs 5] [--max-tokens 128] [--smoke]
The bundle is built and signed by the packager and installed by the agent's store (bench/_sample.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _sample import install, sample_bundle
from machine import median, parse

from agent.sampling import DEFAULTS

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time"
THREADS = 2

RAW = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
repeat_penalty = float(sys.argv[5])
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
t0 = time.perf_counter(); first = last = None; count = 0
for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, repeat_penalty=repeat_penalty,
                                   stream=True):
    now = time.perf_counter()
    if first is None:
        first = now
    last = now; count += 1
print(json.dumps({"tokens": count, "ttft_ms": (first - t0) * 1000,
                  "decode_tok_s": (count - 1) / (last - first) if count > 1 else 0.0}))
"""


def run_ours(state: Path, ring: Path, n: int) -> dict:
    exe = Path(sys.executable).parent / "edgepack-agent"
    out = subprocess.run(
        [str(exe), "--state-dir", str(state), "--keyring", str(ring), "infer", PROMPT, "--json",
         "--temperature", "0", "--max-tokens", str(n), "--threads", str(THREADS),
         "--repeat-penalty", str(DEFAULTS.repeat_penalty)],
        check=True, capture_output=True, text=True,
    ).stdout
    usage = json.loads(out.strip().splitlines()[-1])["usage"]
    return {"tokens": usage["completion_tokens"], "ttft_ms": usage["ttft_ms"],
            "decode_tok_s": usage["decode_tok_s"]}


def run_raw(model: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RAW, str(model), PROMPT, str(n), str(THREADS),
                          str(DEFAULTS.repeat_penalty)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    args, results = parse(ap, argv, smoke={"runs": 1, "max_tokens": 8})
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        work = Path(tmp)
        bundle = sample_bundle(work)
        state, ring = work / "state", bundle.keyring
        model = install(bundle, state).entrypoint  # the very file our side loads
        os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
        run_raw(model, 8)  # warm-up both (page cache, CPU frequency)
        run_ours(state, ring, 8)
        ours, raw = [], []
        for _ in range(args.runs):
            raw.append(run_raw(model, args.max_tokens))
            ours.append(run_ours(state, ring, args.max_tokens))
        o = median([r["decode_tok_s"] for r in ours])
        r = median([r["decode_tok_s"] for r in raw])
        ot = median([x["ttft_ms"] for x in ours])
        rt = median([x["ttft_ms"] for x in raw])
        result = {
            "benchmark": "infer_cli_vs_raw_llama_cpp",
            "model": "gemma-3-270m Q4_K_M (sample)", "threads": THREADS, "max_tokens": args.max_tokens,
            "repeat_penalty": DEFAULTS.repeat_penalty, "runs": args.runs, "ours": ours, "raw": raw,
            "ours_decode_tok_s_median": o, "raw_decode_tok_s_median": r, "ratio_decode": o / r,
            "ours_ttft_ms_median": ot, "raw_ttft_ms_median": rt, "target": "ratio >= 0.97",
        }
        md = (
            "# Decode speed: `edgepack-agent infer` vs raw llama-cpp-python\n\n"
            "| side | decode tok/s (median) | TTFT ms (median) |\n|---|---:|---:|\n"
            f"| edgepack-agent infer | {o:.1f} | {ot:.0f} |\n| raw llama-cpp-python | {r:.1f} | {rt:.0f} |\n\n"
            f"**Ratio (ours / raw): {o / r:.3f}** (target >= 0.97). Same Q4_K_M file, {THREADS} threads, greedy,\n"
            f"{args.max_tokens} max tokens, {args.runs} alternating runs, each side in its own process.\n"
        )
        results.write("infer_cli", result, md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
