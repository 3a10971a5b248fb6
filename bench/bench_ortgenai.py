"""ONNX Runtime GenAI path: build time, size and quality per precision, and decode speed of our
OrtGenAIRuntime against raw onnxruntime_genai on the same folder.

Builds: the sample (Gemma 3 270M HF checkpoint) through the packager's ONNX backend into a fresh
temporary cache, so every build is timed from scratch; quality is the perplexity increase over the
first build (fp32) on ``packager/data/eval.txt`` (window 512), scored through OrtGenAIRuntime. A
smoke run builds only the int4 variant, from the packager cache, and scores a short prefix.

Decode: the int4 folder (round-to-nearest, block 32, accuracy level 4; bench/_sample.py), same
threads, prompt and settings. Raw is the idiomatic loop: ``Generator.append_tokens`` then
``generate_next_token`` / ``get_next_tokens`` / a tokenizer stream. How the two are compared:
bench/_decode.py.

    .venv/bin/python bench/bench_ortgenai.py [--reps 5] [--tokens 128] [--no-builds] [--smoke]

Writes bench/results/ortgenai.json and appends rows to bench/results/ortgenai_decode.md and
bench/results/ortgenai_builds.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _decode import CONTEXT, PROMPT, REPEAT_PENALTY, compare, time_tokens, write
from _sample import ONNX_INT4_OPTIONS, sample_source, sample_variant
from machine import Results, parse

# name -> (precision, options); fp32 first: it is the quality reference.
BUILDS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "fp32": ("fp32", ()),
    "int8": ("int8", ()),
    "int4 (rtn, block 32)": ("int4", ONNX_INT4_OPTIONS),
    "int4 (k_quant_mixed, block 16)": ("int4", (("accuracy_level", 4),
                                                ("algo_config", "k_quant_mixed"), ("block_size", 16))),
}
SMOKE_BUILDS = ("int4 (rtn, block 32)",)  # the decode folder: already in the packager cache
SMOKE_EVAL_CHARS = 1500  # about one scoring window of the evaluation text


def build_all(names: tuple[str, ...], threads: int, *, fresh: bool, quality: bool,
              eval_chars: int | None) -> list[dict[str, Any]]:
    """Build each named variant (into an empty cache when ``fresh``), time it, size it, score it."""
    from agent.runtimes import LoadOptions, get_runtime
    from packager.build import build_variant
    from packager.plan import Variant
    from packager.quality import eval_text

    model, cache = sample_source("hf")
    text = eval_text()[0][:eval_chars]
    rows: list[dict[str, Any]] = []
    ref_nll = None
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        build_cache = Path(tmp) if fresh else cache
        for name in names:
            precision, options = BUILDS[name]
            variant = Variant("ortgenai", "onnx", precision, precision, "cpu", options)
            t0 = time.perf_counter()
            folder = build_variant(model, variant, cache_dir=build_cache, threads=threads)
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


def raw_tokens(model: Any, tokenizer: Any, tokens: int) -> Iterator[int]:
    """Raw onnxruntime_genai, one item per generated token, BOS added as our runtime adds it."""
    import onnxruntime_genai as og

    ids = [2, *tokenizer.encode(PROMPT)]  # <bos>
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=CONTEXT, do_sample=False, repetition_penalty=REPEAT_PENALTY)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    stream = tokenizer.create_stream()
    for _ in range(tokens):
        if gen.is_done():
            return
        gen.generate_next_token()
        token = int(gen.get_next_tokens()[0])
        if token == 1:  # <eos>
            return
        stream.decode(token)
        yield token


def write_builds(results: Results, date: str, threads: int, load: float, builds: list[dict[str, Any]],
                 version: str) -> None:
    head = ("# ONNX builds of the sample (Gemma 3 270M) with the onnxruntime-genai builder\n\n"
            "Each build from scratch (empty cache), CPU EP. Perplexity on packager/data/eval.txt "
            "(window 512) through OrtGenAIRuntime; Δ against the fp32 build. "
            "Generated by `bench/bench_ortgenai.py`.\n\n"
            "| date (UTC) | onnxruntime-genai | threads | variant | build s | size MB | "
            "perplexity | Δ ppl % | load 1m |\n|---|---|---|---|---|---|---|---|---|")
    results.append_rows("ortgenai_builds", head, [
        f"| {date} | {version} | {threads} | {b['variant']} | {b['build_s']:.1f} | {b['size_mb']:.0f} | "
        f"{b.get('perplexity', float('nan')):.3f} | {b.get('delta_ppl_pct', float('nan')):+.1f} | {load:.2f} |"
        for b in builds])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="decode runs of each, interleaved")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-builds", action="store_true", help="skip the timed builds")
    ap.add_argument("--no-quality", action="store_true", help="skip scoring the builds")
    args, results = parse(ap, argv, smoke={"reps": 1, "tokens": 8})
    logging.basicConfig(level=logging.WARNING)

    import onnxruntime_genai as og

    builds = [] if args.no_builds else build_all(
        SMOKE_BUILDS if args.smoke else tuple(BUILDS), args.threads, fresh=not args.smoke,
        quality=not args.no_quality, eval_chars=SMOKE_EVAL_CHARS if args.smoke else None)

    folder = sample_variant("ortgenai", "onnx", "int4", ONNX_INT4_OPTIONS, threads=args.threads)
    config = og.Config(str(folder))
    config.overlay(json.dumps({
        "model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}},
        "search": {"max_length": CONTEXT},
    }))
    raw_model = og.Model(config)
    raw_tok = og.Tokenizer(raw_model)
    result = compare("ortgenai", folder, lambda n: time_tokens(raw_tokens(raw_model, raw_tok, n)),
                     threads=args.threads, reps=args.reps, tokens=args.tokens)
    result["builds"] = builds

    write(results, result, json_name="ortgenai", table="ortgenai_decode", library="onnxruntime-genai",
          after={"same tokens": str(result["token_counts_equal"])},
          title="Decode speed: OrtGenAIRuntime.stream vs raw onnxruntime_genai Generator loop",
          about="Medians of interleaved runs, greedy, same ONNX int4 folder (block 32, accuracy "
                "level 4), prompt and threads. Generated by `bench/bench_ortgenai.py`.")
    if builds:
        m = result["machine"]
        write_builds(results, m["date"], args.threads, m["loadavg_1m"], builds, m["onnxruntime_genai"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
