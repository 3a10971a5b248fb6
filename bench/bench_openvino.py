"""Decode speed and TTFT of our OpenVINORuntime against raw openvino_genai.LLMPipeline.

Same IR folder (the sample Gemma 3 270M exported to OpenVINO int8 by the packager), same device
(CPU), threads, prompt and generation settings (greedy, repetition penalty 1.1, max_new_tokens).
Raw is the idiomatic call: ``LLMPipeline.generate(tokenizer.encode(prompt), config, callback)``, timed by
our clock the way the runtime's Usage is (TTFT = start -> first text, decode = tokens after the
first / time after the first text) with the token count from genai's perf metrics; genai's own
throughput figure is recorded too. Runs alternate raw / ours so drift (other load on a shared
machine) hits both alike; medians are reported with the ratio ours / raw.

    PYTHONPATH=. .venv/bin/python bench/bench_openvino.py [--reps 5] [--tokens 128] [--ir DIR]

Writes bench/results/openvino_decode.json and appends a row to bench/results/openvino_decode.md.
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
REPEAT_PENALTY = 1.1


def sample_int8_ir(threads: int) -> Path:
    """The packager's int8 IR of the sample (exported once, then taken from the cache)."""
    from packager.cache import default_cache_dir
    from packager.model import resolve_source
    from packager.openvino import build_openvino_variant
    from packager.plan import Variant
    from packager.sample import ensure_sample

    cache = default_cache_dir()
    model = resolve_source(str(ensure_sample(cache).hf_dir), cache_dir=cache)
    variant = Variant("openvino", "openvino-ir", "int8", "int8", "cpu")
    return build_openvino_variant(model, variant, cache / "variants", cache_dir=cache, threads=threads)


def run_raw(pipe: Any, tokens: int) -> dict[str, float]:
    """One raw LLMPipeline.generate with a text callback."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = tokens
    config.do_sample = False
    config.repetition_penalty = REPEAT_PENALTY
    config.apply_chat_template = False
    t_first = 0.0

    def on_text(_: str) -> openvino_genai.StreamingStatus:
        nonlocal t_first
        if not t_first:
            t_first = time.perf_counter()
        return openvino_genai.StreamingStatus.RUNNING

    t0 = time.perf_counter()
    # Tokenized input: generate() then returns EncodedResults with perf metrics (a str prompt
    # returns only the text). Tokenizing is inside the timing, as it is in our runtime.
    result = pipe.generate(pipe.get_tokenizer().encode(PROMPT), config, on_text)
    t_end = time.perf_counter()
    n = int(result.perf_metrics.get_num_generated_tokens())
    return {"ttft_ms": (t_first - t0) * 1000, "decode_tok_s": (n - 1) / (t_end - t_first),
            "tokens": n, "genai_throughput_tok_s": float(result.perf_metrics.get_throughput().mean)}


def run_ours(rt: Any, tokens: int) -> dict[str, float]:
    """One OpenVINORuntime.stream run, timed by the runtime's own Usage."""
    from agent.runtimes import GenerationParams

    params = GenerationParams(max_tokens=tokens, temperature=0.0, repeat_penalty=REPEAT_PENALTY)
    usage = None
    for chunk in rt.stream(PROMPT, params):
        if chunk.done:
            usage = chunk.usage
    assert usage is not None
    return {"ttft_ms": usage.ttft_ms, "decode_tok_s": usage.decode_tok_s,
            "tokens": usage.completion_tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="runs of each, interleaved")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ir", type=Path, help="an OpenVINO IR folder (default: the sample's int8)")
    args = ap.parse_args(argv)

    import openvino_genai

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine  # the machine facts every bench result carries

    from agent.runtimes import LoadOptions
    from agent.runtimes.openvino import OpenVINORuntime

    ir = args.ir or sample_int8_ir(args.threads)
    # The same properties our runtime passes for CPU.
    raw = openvino_genai.LLMPipeline(str(ir), "CPU", PERFORMANCE_HINT="LATENCY",
                                     INFERENCE_NUM_THREADS=args.threads)
    ours = OpenVINORuntime()
    ours.load(ir, LoadOptions(context=1024, threads=args.threads))

    # Warm-up both (page cache, first-inference compilation), not measured.
    run_raw(raw, 16)
    run_ours(ours, 16)
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "ours": []}
    for i in range(args.reps):
        # Alternate who goes first so neither always runs on a warmer or cooler machine.
        order = (("raw", run_raw, raw), ("ours", run_ours, ours))
        for label, fn, obj in order if i % 2 == 0 else order[::-1]:
            runs[label].append(fn(obj, args.tokens))
    ours.close()
    del raw

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        # Others share this machine: the load average says how much to trust the absolute numbers.
        "machine": {**machine(), "loadavg_1m": os.getloadavg()[0],
                    "openvino_genai": openvino_genai.__version__},
        "ir": ir.name,
        "threads": args.threads,
        "tokens": args.tokens,
        "reps": args.reps,
        "runs": runs,
        "median": {
            label: {"decode_tok_s": med(label, "decode_tok_s"), "ttft_ms": med(label, "ttft_ms")}
            for label in runs
        },
        "median_genai_throughput_tok_s": med("raw", "genai_throughput_tok_s"),
    }
    result["ratio_decode_ours_over_raw"] = (
        result["median"]["ours"]["decode_tok_s"] / result["median"]["raw"]["decode_tok_s"]
    )
    result["token_counts_equal"] = all(
        a["tokens"] == b["tokens"] for a, b in zip(runs["raw"], runs["ours"], strict=True)
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "openvino_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    md = RESULTS / "openvino_decode.md"
    if not md.exists():
        md.write_text(
            "# Decode speed: OpenVINORuntime.stream vs raw openvino_genai.LLMPipeline.generate\n\n"
            "Medians of interleaved runs, greedy, same IR, prompt, device (CPU) and threads. "
            "Generated by `bench/bench_openvino.py`.\n\n"
            "| date (UTC) | CPU | cores (phys/logical) | python | openvino-genai | IR | threads | "
            "tokens x reps | raw tok/s | ours tok/s | ours/raw | raw TTFT ms | ours TTFT ms | "
            "genai tok/s | load 1m |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
    m = result["machine"]
    raw_m, our_m = result["median"]["raw"], result["median"]["ours"]
    with md.open("a") as f:
        f.write(
            f"| {result['date']} | {m['cpu']} | {m['cores_physical']}/{m['cores_logical']} | "
            f"{m['python']} | {m['openvino_genai'].split('-')[0]} | {ir.name} | {args.threads} | "
            f"{args.tokens} x {args.reps} | {raw_m['decode_tok_s']:.1f} | {our_m['decode_tok_s']:.1f} | "
            f"{result['ratio_decode_ours_over_raw']:.3f} | {raw_m['ttft_ms']:.1f} | "
            f"{our_m['ttft_ms']:.1f} | {result['median_genai_throughput_tok_s']:.1f} | "
            f"{m['loadavg_1m']:.2f} |\n"
        )
    print(json.dumps({k: result[k] for k in ("median", "ratio_decode_ours_over_raw",
                                             "median_genai_throughput_tok_s", "token_counts_equal")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
