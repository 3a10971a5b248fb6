"""ONNX Runtime GenAI path: build time, size and quality per precision, and decode speed of our
OrtGenAIRuntime against raw onnxruntime_genai on the same folder.

Builds: the sample (Gemma 3 270M HF checkpoint) through ``packager.onnx`` into a fresh temporary
cache, so every build is timed from scratch; quality is the perplexity increase over the fp32
build on ``packager/data/eval.txt`` (window 512), scored through OrtGenAIRuntime.

Decode: the int4 folder with the android-arm64 profile's options (block 32, accuracy level 4),
same threads, prompt and settings (greedy, repetition penalty 1.1). Raw is the idiomatic loop:
``Generator.append_tokens`` then ``generate_next_token`` / ``get_next_tokens`` / a tokenizer
stream, timed by our clock the way the runtime's Usage is (TTFT = start -> first text, decode =
tokens after the first / time after the first). Runs alternate raw / ours so drift (other load on
a shared machine) hits both alike; medians are reported with the ratio ours / raw.

    PYTHONPATH=. .venv/bin/python bench/bench_ortgenai.py [--reps 5] [--tokens 128] [--no-builds]

Writes bench/results/ortgenai.json and appends rows to bench/results/ortgenai_decode.md and
bench/results/ortgenai_builds.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# A prompt a base model continues at length (a list), so EOS rarely comes before max_tokens.
PROMPT = "Here is a long list of English words, one per line, in alphabetical order:\nabandon\nability\n"
REPEAT_PENALTY = 1.1
PROFILE_INT4 = (("accuracy_level", 4), ("block_size", 32))  # profiles/android-arm64.toml
# name -> (precision, options); fp32 first: it is the quality reference.
BUILDS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "fp32": ("fp32", ()),
    "int8": ("int8", ()),
    "int4 (rtn, block 32)": ("int4", PROFILE_INT4),
    "int4 (k_quant_mixed, block 16)": ("int4", (("accuracy_level", 4),
                                                ("algo_config", "k_quant_mixed"), ("block_size", 16))),
}


def build_all(model: Any, threads: int, quality: bool) -> list[dict[str, Any]]:
    from agent.runtimes import LoadOptions, get_runtime
    from packager.onnx import build_onnx_variant
    from packager.plan import Variant

    text = (Path(__file__).resolve().parents[1] / "packager" / "data" / "eval.txt").read_text()
    rows: list[dict[str, Any]] = []
    ref_nll = None
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        cache, out = Path(tmp, "cache"), Path(tmp, "out")
        for name, (precision, options) in BUILDS.items():
            variant = Variant("ortgenai", "onnx", precision, precision, "cpu", options)
            t0 = time.perf_counter()
            folder = build_onnx_variant(model, variant, out, cache_dir=cache, threads=threads)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "variant": name, "precision": precision, "options": dict(options),
                "build_s": round(seconds, 1),
                "size_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e6, 1),
            }
            if quality:
                with get_runtime("ortgenai")() as rt:
                    rt.load(folder, LoadOptions(context=576, threads=threads))
                    res = rt.evaluate_nll(text, window=512)
                ref_nll = res.mean_nll if ref_nll is None else ref_nll
                row.update(mean_nll=round(res.mean_nll, 4), perplexity=round(res.perplexity, 3),
                           delta_ppl_pct=round((math.exp(res.mean_nll - ref_nll) - 1) * 100, 2), tokens=res.tokens)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def run_raw(model: Any, tokenizer: Any, tokens: int) -> dict[str, float]:
    """One raw onnxruntime_genai generation, timed as OrtGenAIRuntime times its own."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    ids = [2, *tokenizer.encode(PROMPT)]  # BOS, as our runtime adds it
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=1024, do_sample=False, repetition_penalty=REPEAT_PENALTY)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    stream = tokenizer.create_stream()
    t_first = 0.0
    n = 0
    while not gen.is_done() and n < tokens:
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token == 1:  # <eos>
            break
        stream.decode(token)
        n += 1
        if not t_first:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    del gen
    return {"ttft_ms": (t_first - t0) * 1000, "decode_tok_s": (n - 1) / (t_end - t_first), "tokens": n}


def run_ours(rt: Any, tokens: int) -> dict[str, float]:
    """One OrtGenAIRuntime.stream run, timed by the runtime's own Usage."""
    from agent.runtimes import GenerationParams

    params = GenerationParams(max_tokens=tokens, temperature=0.0, repeat_penalty=REPEAT_PENALTY)
    usage = None
    for chunk in rt.stream(PROMPT, params):
        if chunk.done:
            usage = chunk.usage
    assert usage is not None
    return {"ttft_ms": usage.ttft_ms, "decode_tok_s": usage.decode_tok_s, "tokens": usage.completion_tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="decode runs of each, interleaved")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-builds", action="store_true", help="skip the timed builds")
    ap.add_argument("--no-quality", action="store_true", help="skip scoring the builds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import onnxruntime_genai as og

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine  # the machine facts every bench result carries

    from agent.runtimes import LoadOptions
    from agent.runtimes.ortgenai import OrtGenAIRuntime
    from packager.cache import default_cache_dir
    from packager.model import resolve_source
    from packager.onnx import build_onnx_variant
    from packager.plan import Variant
    from packager.sample import ensure_sample

    cache = default_cache_dir()
    model = resolve_source(str(ensure_sample(cache).hf_dir), cache_dir=cache)
    builds = [] if args.no_builds else build_all(model, args.threads, not args.no_quality)

    folder = build_onnx_variant(model, Variant("ortgenai", "onnx", "int4", "int4", "cpu", PROFILE_INT4),
                                Path(tempfile.mkdtemp(prefix="bench-ort-")), cache_dir=cache,
                                threads=args.threads)
    config = og.Config(str(folder))
    config.overlay(json.dumps({
        "model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}},
        "search": {"max_length": 1024},
    }))
    raw_model = og.Model(config)
    raw_tok = og.Tokenizer(raw_model)
    ours = OrtGenAIRuntime()
    ours.load(folder, LoadOptions(context=1024, threads=args.threads))

    # Warm-up both (page cache, first-run allocations), not measured.
    run_raw(raw_model, raw_tok, 16)
    run_ours(ours, 16)
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "ours": []}
    for i in range(args.reps):
        # Alternate who goes first so neither always runs on a warmer or cooler machine.
        raw_run = ("raw", lambda: run_raw(raw_model, raw_tok, args.tokens))
        our_run = ("ours", lambda: run_ours(ours, args.tokens))
        for label, fn in (raw_run, our_run) if i % 2 == 0 else (our_run, raw_run):
            runs[label].append(fn())
    ours.close()
    shutil.rmtree(folder.parent)  # hard links into the cache: the build itself stays cached

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        # Others share this machine: the load average says how much to trust the absolute numbers.
        "machine": {**machine(), "onnxruntime_genai": og.__version__,
                    "loadavg_1m": os.getloadavg()[0]},
        "folder": folder.name,
        "threads": args.threads,
        "tokens": args.tokens,
        "reps": args.reps,
        "builds": builds,
        "runs": runs,
        "median": {label: {"decode_tok_s": med(label, "decode_tok_s"), "ttft_ms": med(label, "ttft_ms")}
                   for label in runs},
    }
    result["ratio_decode_ours_over_raw"] = (
        result["median"]["ours"]["decode_tok_s"] / result["median"]["raw"]["decode_tok_s"])
    result["token_counts_equal"] = all(
        a["tokens"] == b["tokens"] for a, b in zip(runs["raw"], runs["ours"], strict=True))

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ortgenai.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    md = RESULTS / "ortgenai_decode.md"
    if not md.exists():
        md.write_text(
            "# Decode speed: OrtGenAIRuntime.stream vs raw onnxruntime_genai Generator loop\n\n"
            "Medians of interleaved runs, greedy, same ONNX int4 folder (block 32, accuracy level 4), "
            "prompt and threads. Generated by `bench/bench_ortgenai.py`.\n\n"
            "| date (UTC) | CPU | cores (phys/logical) | python | onnxruntime-genai | threads | "
            "tokens x reps | raw tok/s | ours tok/s | ours/raw | raw TTFT ms | ours TTFT ms | "
            "same tokens | load 1m |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    raw_m, our_m = result["median"]["raw"], result["median"]["ours"]
    with md.open("a") as f:
        f.write(f"| {result['date']} | {m['cpu']} | {m['cores_physical']}/{m['cores_logical']} | "
                f"{m['python']} | {m['onnxruntime_genai']} | {args.threads} | {args.tokens} x {args.reps} | "
                f"{raw_m['decode_tok_s']:.1f} | {our_m['decode_tok_s']:.1f} | "
                f"{result['ratio_decode_ours_over_raw']:.3f} | {raw_m['ttft_ms']:.1f} | "
                f"{our_m['ttft_ms']:.1f} | {result['token_counts_equal']} | {m['loadavg_1m']:.2f} |\n")
    if builds:
        md = RESULTS / "ortgenai_builds.md"
        if not md.exists():
            md.write_text(
                "# ONNX builds of the sample (Gemma 3 270M) with the onnxruntime-genai builder\n\n"
                "Each build from scratch (empty cache), CPU EP. Perplexity on packager/data/eval.txt "
                "(window 512) through OrtGenAIRuntime; Δ against the fp32 build. "
                "Generated by `bench/bench_ortgenai.py`.\n\n"
                "| date (UTC) | onnxruntime-genai | threads | variant | build s | size MB | "
                "perplexity | Δ ppl % | load 1m |\n|---|---|---|---|---|---|---|---|---|\n")
        with md.open("a") as f:
            for b in builds:
                f.write(f"| {result['date']} | {m['onnxruntime_genai']} | {args.threads} | {b['variant']} | "
                        f"{b['build_s']:.1f} | {b['size_mb']:.0f} | {b.get('perplexity', float('nan')):.3f} | "
                        f"{b.get('delta_ppl_pct', float('nan')):+.1f} | {m['loadavg_1m']:.2f} |\n")
    print(json.dumps({k: result[k] for k in ("median", "ratio_decode_ours_over_raw", "token_counts_equal")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
