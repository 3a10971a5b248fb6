"""Decode speed and TTFT of one of our runtimes against the raw library it wraps, on the same model.

Shared by bench/bench_runtime_decode.py (llama-cpp-python), bench/bench_ortgenai.py
(onnxruntime-genai) and bench/bench_openvino.py (openvino-genai). Invariants of the comparison:

* Same model files, threads, prompt and settings on both sides: greedy, the repetition penalty of
  ``agent.sampling.DEFAULTS`` (and its top-k / top-p where the raw library takes them), the same
  max tokens. Our side is the registry's :class:`~agent.runtimes.Runtime`, timed by its own
  ``Usage``; the raw side is timed by :func:`time_tokens` / :func:`rates`, which follow the same
  definitions (TTFT = start -> first token; decode = tokens after the first / time after the first).
* Our API cannot ignore EOS, so :data:`PROMPT` is one a base model continues at length, and the
  result records whether both sides generated the same number of tokens in every run.
* Both sides are warmed up unmeasured (page cache, first-run allocations, graph compilation), then
  runs alternate which side goes first, so drift (thermal, other load) hits both alike; medians are
  reported with the ratio ours / raw. The machine's load average is in the result's machine facts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import Results, machine, median

from agent.sampling import DEFAULTS

if TYPE_CHECKING:
    from agent.runtimes import Runtime

# A prompt a base model continues at length (a list), so EOS rarely comes before max_tokens.
PROMPT = "Here is a long list of English words, one per line, in alphabetical order:\nabandon\nability\n"
REPEAT_PENALTY = DEFAULTS.repeat_penalty
CONTEXT = 1024  # tokens: the prompt plus the longest run fit with room to spare
WARMUP_TOKENS = 16

# One raw generation of N tokens -> {"ttft_ms", "decode_tok_s", "tokens", extra figures...}.
RawRun = Callable[[int], dict[str, float]]


def rates(t0: float, t_first: float, t_end: float, tokens: int) -> dict[str, float]:
    """A raw run's figures from its clock readings, defined as the runtimes' ``Usage`` defines them."""
    span = t_end - t_first
    return {"ttft_ms": (t_first - t0) * 1000, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / span if tokens > 1 and span > 0 else 0.0}


def time_tokens(tokens: Iterable[object]) -> dict[str, float]:
    """Time a raw side's lazy stream of generated tokens (one item per token). The clock starts
    here, so the generator's own set-up (tokenizing, the prompt pass) is inside TTFT, as ours is."""
    t0 = time.perf_counter()
    t_first = 0.0
    n = 0
    for _ in tokens:
        if not n:
            t_first = time.perf_counter()
        n += 1
    return rates(t0, t_first or time.perf_counter(), time.perf_counter(), n)


def run_ours(rt: Runtime, tokens: int) -> dict[str, float]:
    """One ``Runtime.stream`` run, timed by the runtime's own ``Usage``."""
    from agent.runtimes import GenerationParams

    params = GenerationParams(max_tokens=tokens, temperature=0.0, repeat_penalty=REPEAT_PENALTY)
    usage = None
    for chunk in rt.stream(PROMPT, params):
        if chunk.done:
            usage = chunk.usage
    assert usage is not None, "a stream always ends with a usage chunk"
    return {"ttft_ms": usage.ttft_ms, "decode_tok_s": usage.decode_tok_s,
            "tokens": usage.completion_tokens}


def compare(runtime: str, model: Path, raw: RawRun, *, threads: int, reps: int,
            tokens: int) -> dict[str, Any]:
    """Load ``model`` in our ``runtime``, then time it against ``raw``, alternating, ``reps`` times.

    Returns:
        The result: settings, every run of each side, the medians of each figure, the decode
        ratio ours / raw, whether the token counts matched, and the machine facts.

    Raises:
        RuntimeUnavailableError: our runtime cannot run here.
        InferenceError: loading or generating failed on our side.
    """
    from agent.runtimes import LoadOptions, get_runtime

    with get_runtime(runtime)() as ours:
        ours.load(model, LoadOptions(context=CONTEXT, threads=threads))
        warmup = min(WARMUP_TOKENS, tokens)
        raw(warmup)
        run_ours(ours, warmup)
        runs: dict[str, list[dict[str, float]]] = {"raw": [], "ours": []}
        sides: list[tuple[str, RawRun]] = [("raw", raw), ("ours", lambda n: run_ours(ours, n))]
        for _ in range(reps):
            for label, run in sides:
                runs[label].append(run(tokens))
            sides.reverse()  # who goes first alternates
    medians = {label: {key: median([r[key] for r in rs]) for key in rs[0]} for label, rs in runs.items()}
    raw_rate = medians["raw"]["decode_tok_s"]
    return {
        "machine": machine(),
        "model": model.name,
        "threads": threads,
        "tokens": tokens,
        "reps": reps,
        "runs": runs,
        "median": medians,
        "ratio_decode_ours_over_raw": medians["ours"]["decode_tok_s"] / raw_rate if raw_rate else float("nan"),
        "token_counts_equal": all(a["tokens"] == b["tokens"]
                                  for a, b in zip(runs["raw"], runs["ours"], strict=True)),
    }


def write(results: Results, result: dict[str, Any], *, json_name: str, table: str, title: str,
          about: str, library: str, before: Mapping[str, str] | None = None,
          after: Mapping[str, str] | None = None) -> None:
    """Write the result to JSON_NAME.json, add this run to the history table TABLE.md (started
    with ``title`` and ``about`` when new) and print the headline figures.

    Columns: date and machine, the raw ``library``'s version, ``before``, the settings, medians and
    ratio, ``after``, the load average; ``before`` / ``after`` map extra column names to cells.
    """
    results.write_json(json_name, result)
    m = result["machine"]
    raw, ours = result["median"]["raw"], result["median"]["ours"]
    cells = {
        "date (UTC)": m["date"], "CPU": m["cpu"],
        "cores (phys/logical)": f"{m['cores_physical']}/{m['cores_logical']}", "python": m["python"],
        library: m[library.replace("-", "_")],
        **(before or {}),
        "threads": result["threads"], "tokens x reps": f"{result['tokens']} x {result['reps']}",
        "raw tok/s": f"{raw['decode_tok_s']:.1f}", "ours tok/s": f"{ours['decode_tok_s']:.1f}",
        "ours/raw": f"{result['ratio_decode_ours_over_raw']:.3f}",
        "raw TTFT ms": f"{raw['ttft_ms']:.1f}", "ours TTFT ms": f"{ours['ttft_ms']:.1f}",
        **(after or {}),
        "load 1m": f"{m['loadavg_1m']:.2f}",
    }
    head = (f"# {title}\n\n{about}\n\n| {' | '.join(cells)} |\n"
            f"|{'---|' * len(cells)}")
    results.append_rows(table, head, [f"| {' | '.join(str(c) for c in cells.values())} |"])
    print(json.dumps({k: result[k] for k in ("median", "ratio_decode_ours_over_raw", "token_counts_equal")},
                     indent=2))
