"""The agent's OpenAI-compatible HTTP API vs raw llama-cpp-python and llama.cpp's own HTTP server.

1. Decode tok/s and TTFT of ``POST /v1/completions`` with ``stream: true`` (Server-Sent Events) on
   ``edgepack-agent run --http`` vs raw llama-cpp-python (``create_completion(stream=True)`` in its
   own long-lived process) on the very file the agent serves: 2 threads, greedy, the default
   repeat penalty (agent/sampling.py), the same prompts. Targets: ratio >= 0.97, TTFT overhead
   <= 10 ms.
2. The same requests to llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``, its
   ``[server]`` extra: FastAPI, uvicorn, sse-starlette, pydantic-settings), which is what a user
   would otherwise run on the device. Its extra dependencies install from PyPI without conflicts,
   but a web framework has no place in the device's environment, so they go once into their own
   folder in the packager cache (``envs/llama-cpp-server-<version>/``, ``pip install --target``)
   that only the server's process has on its ``PYTHONPATH``; llama_cpp itself is ours, so both
   run the same llama.cpp build. Recorded as skipped, with the reason, if they cannot be installed.
3. What the HTTP door costs an idle agent (empty state dir), same run, with and without
   ``--http`` in alternation: RSS and USS after three health messages, process start -> retained
   ``online`` at a host subscriber, and with ``--http`` start -> first ``/health`` answer; plus
   the import time and RSS of ``agent.http_api`` on top of ``agent.daemon``.

Every HTTP side is measured by the same minimal stdlib client (``http.client``, TCP_NODELAY, SSE
lines parsed by hand), so client cost is alike: TTFT = request sent -> first text event; decode =
(tokens - 1) / (last text event - first). The agent sends the first token alone and then coalesces
tokens for 50 ms per event, so its token count comes from the final ``usage``; llama.cpp's server
sends one event per token. Runs rotate which side goes first; each prompt opens with a different
word so no prefix cache skips the prompt; medians are reported. Everything listens on 127.0.0.1;
every wait is bounded; all processes and temp dirs are cleaned up.

Usage: .venv/bin/python bench/bench_http.py [--runs 7] [--tokens 128] [--starts 5] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from _agentbench import RawServer, Rig, end, import_times, mem_of, ok, rss_steps, start_agent
from _decode import PROMPT
from machine import median, parse

from agent.sampling import DEFAULTS

THREADS = 2
REPEAT_PENALTY = DEFAULTS.repeat_penalty
OPENERS = ["Words", "List", "Index", "Lexicon", "Glossary", "Catalogue", "Register", "Roster",
           "Inventory", "Tally", "Record", "Ledger", "Digest"]


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None,
              path: str = "/health") -> float:
    """Poll until ``GET path`` answers (any status); returns when (perf_counter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", path)
                conn.getresponse().read()
                return time.perf_counter()
            finally:
                conn.close()
        time.sleep(0.005)
    raise TimeoutError(f"nothing answered on port {port} within {timeout}s")


# --- 1 + 2: streamed completions --------------------------------------------------------------------


def sse_completion(port: int, prompt: str, n: int, *, usage: bool) -> dict[str, Any]:
    """One streamed ``/v1/completions`` through the stdlib client, timed at the client."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0.0,
            "repeat_penalty": REPEAT_PENALTY, "top_k": DEFAULTS.top_k, "top_p": DEFAULTS.top_p,
            "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    else:
        body["min_p"] = 0.0  # llama.cpp's server defaults to 0.05 (ours: off); greedy either way
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times: list[float] = []
    text: list[str] = []
    final: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            event = json.loads(data)
            if event.get("usage"):
                final, timings = event["usage"], event.get("timings")
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    times.append(now)
                    text.append(choice["text"])
    finally:
        conn.close()
    if not times:
        raise RuntimeError("no text arrived")
    tokens = int(final["completion_tokens"]) if final else len(times)
    return {"events": len(times), "tokens": tokens, "ttft_ms": (times[0] - t0) * 1000,
            "decode_tok_s": (tokens - 1) / (times[-1] - times[0]) if tokens > 1 and len(times) > 1 else 0.0,
            "server_timings": timings, "text": "".join(text)}


def server_env(cache: Path) -> tuple[Path | None, str]:
    """llama_cpp.server's extra dependencies in their own folder (made once); (folder, note)."""
    version = metadata.version("llama-cpp-python")
    target = cache / "envs" / f"llama-cpp-server-{version}"
    stamp = target / ".edgepack-complete"
    if stamp.exists():
        return target, f"llama-cpp-python {version} [server] extra from {target}"
    reqs = []
    for r in metadata.requires("llama-cpp-python") or []:
        spec, _, marker = r.partition(";")
        if re.search(r"""extra\s*==\s*["']server["']""", marker):
            reqs.append(spec.strip())
    if not reqs:
        return None, f"llama-cpp-python {version} declares no [server] extra"
    shutil.rmtree(target, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--target", str(target), *reqs], capture_output=True, text=True, timeout=600,
                          check=False)
    if proc.returncode != 0:
        return None, f"pip could not install the [server] extra: {proc.stderr.strip()[-300:]}"
    stamp.write_text(" ".join(reqs) + "\n")
    return target, f"llama-cpp-python {version} [server] extra ({', '.join(reqs)}) installed into {target}"


def start_llama_server(deps: Path, model: Path, n_ctx: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(deps), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                                 "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
                                 "--n_ctx", str(n_ctx), "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


# --- 3: footprint -------------------------------------------------------------------------------------


def import_ms(reps: int = 5) -> float:
    """Median cumulative ``-X importtime`` of ``agent.http_api`` once ``agent.daemon`` is in (ms):
    what ``--http`` adds to the start-up imports."""
    def once() -> float:
        for mod, depth, ms in import_times("import agent.daemon; import agent.http_api"):
            if mod == "agent.http_api" and depth == 0:
                return ms
        raise RuntimeError("agent.http_api missing from -X importtime")

    return median([once() for _ in range(reps)])


# --- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="streamed completions per side")
    ap.add_argument("--tokens", type=int, default=128, help="max tokens per completion")
    ap.add_argument("--starts", type=int, default=5, help="idle agent starts per side")
    ap.add_argument("--no-llama-server", action="store_true", help="skip llama.cpp's own server")
    args, results = parse(ap, argv, smoke={"runs": 1, "tokens": 8, "starts": 1})
    runs = max(1, min(args.runs, len(OPENERS) - 1))

    from packager.cache import default_cache_dir

    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    rig = Rig.start("edgepack-bench-http-")
    host, children = rig.host, rig.children
    try:
        # --- 1 + 2 ----------------------------------------------------------------------------
        print("inference: agent, raw llama-cpp-python, llama.cpp server", flush=True)
        http_port = free_port()
        agent = start_agent(rig.state, rig.ring, rig.broker.url, "dev-http", "--threads", str(THREADS),
                            "--health-interval", "10", "--http", f"127.0.0.1:{http_port}")
        children.append(agent)
        wait_http(http_port, 60, agent)
        raw = RawServer(rig.model, rig.n_ctx, THREADS)
        children.append(raw.proc)
        sides: list[tuple[str, Any]] = [
            ("raw", raw.run), ("ours", lambda p, n: sse_completion(http_port, p, n, usage=True))]
        llama_note = "skipped (--no-llama-server)"
        llama_proc: subprocess.Popen[bytes] | None = None
        if not args.no_llama_server:
            deps, llama_note = server_env(default_cache_dir())
            if deps is not None:
                llama_port = free_port()
                llama_proc = start_llama_server(deps, rig.model, rig.n_ctx, llama_port, rig.work / "llama-server.log")
                children.append(llama_proc)
                wait_http(llama_port, 120, llama_proc, "/v1/models")
                sides.append(("llama_server", lambda p, n: sse_completion(llama_port, p, n, usage=False)))
        print(f"  llama.cpp server: {llama_note}", flush=True)
        for _, fn in sides:  # warm-up: lazy loads, page cache, first allocations
            fn(f"{OPENERS[-1]}: {PROMPT}", 16)
        runs_by: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in sides}
        for i in range(runs):
            prompt = f"{OPENERS[i]}: {PROMPT}"
            order = sides[i % len(sides):] + sides[: i % len(sides)]
            for name, fn in order:
                r = fn(prompt, args.tokens)
                runs_by[name].append(r)
                print(f"  run {i} {name}: {r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms, "
                      f"{r['tokens']} tokens", flush=True)
        loaded_rss = {"ours": mem_of(agent.pid)[0]}
        if llama_proc is not None:
            loaded_rss["llama_server"] = mem_of(llama_proc.pid)[0]
        for c in (agent, raw.proc, llama_proc):
            end(c)

        # --- 3 ----------------------------------------------------------------------------------
        print("idle footprint and start-up, with and without --http", flush=True)
        starts: dict[str, list[dict[str, Any]]] = {"plain": [], "http": []}
        for i in range(args.starts):
            for side in (["plain", "http"] if i % 2 == 0 else ["http", "plain"]):
                dev = f"{side}-s{i}"
                d = rig.work / f"idle-{dev}"
                extra = ["--health-interval", "1"]
                port = free_port()
                if side == "http":
                    extra += ["--http", f"127.0.0.1:{port}"]
                t0 = time.perf_counter()
                proc = start_agent(d / "state", rig.ring, rig.broker.url, dev, *extra)
                children.append(proc)
                row: dict[str, Any] = {"device": dev}
                if side == "http":
                    row["start_to_http_s"] = wait_http(port, 30, proc) - t0
                host.wait(lambda dev=dev: (dev, "online") in host.seen, 30)
                row["start_to_online_s"] = host.seen[(dev, "online")] - t0
                host.wait(lambda dev=dev: len(host.health.get(dev, [])) >= 3, 30)
                row["rss_mb"], row["uss_mb"] = mem_of(proc.pid)
                end(proc)
                starts[side].append(row)
                print(f"  {dev}: online after {row['start_to_online_s'] * 1000:.0f} ms, "
                      f"RSS {row['rss_mb']:.1f} MiB", flush=True)
        _, steps = rss_steps(["agent.daemon", "agent.http_api"])
        imp = import_ms()

        # --- results ------------------------------------------------------------------------------
        def med(side: str, key: str) -> float:
            return median([float(r[key]) for r in runs_by[side]])

        def pairs(side: str, key: str) -> float:
            return median([o[key] - r[key] for o, r in zip(runs_by[side], runs_by["raw"], strict=True)])

        inference: dict[str, Any] = {"runs": runs_by, "note_llama_server": llama_note,
                                     "loaded_rss_mb": loaded_rss}
        for side in runs_by:
            inference[side] = {"decode_tok_s_median": med(side, "decode_tok_s"),
                               "ttft_ms_median": med(side, "ttft_ms")}
            if side != "raw":
                inference[side]["ratio_decode"] = med(side, "decode_tok_s") / med("raw", "decode_tok_s")
                inference[side]["ttft_overhead_ms_median_of_pairs"] = pairs(side, "ttft_ms")
                inference[side]["identical_text_runs"] = sum(
                    o["text"] == r["text"] for o, r in zip(runs_by[side], runs_by["raw"], strict=True))
                inference[side]["equal_token_counts"] = all(
                    o["tokens"] == r["tokens"] for o, r in zip(runs_by[side], runs_by["raw"], strict=True))
        agent_ttft = median([float((r["server_timings"] or {}).get("ttft_ms") or float("nan"))
                             for r in runs_by["ours"]])
        inference["ours"]["agent_reported_ttft_ms_median"] = agent_ttft
        for rs in runs_by.values():
            for r in rs:
                r.pop("text", None)
        idle = {"starts": starts}
        for side, rows in starts.items():
            idle[side] = {k: median([r[k] for r in rows]) for k in rows[0] if k != "device"}
        idle["rss_added_mb"] = idle["http"]["rss_mb"] - idle["plain"]["rss_mb"]
        idle["uss_added_mb"] = idle["http"]["uss_mb"] - idle["plain"]["uss_mb"]
        idle["start_to_online_added_ms"] = (idle["http"]["start_to_online_s"]
                                            - idle["plain"]["start_to_online_s"]) * 1000
        idle["import_http_api_ms"] = imp
        idle["rss_steps_mb"] = steps
        ratio = inference["ours"]["ratio_decode"]
        overhead = inference["ours"]["ttft_overhead_ms_median_of_pairs"]
        met = {"decode_ratio_ge_0.97": ratio >= 0.97, "ttft_overhead_le_10ms": overhead <= 10.0}
        result = {"benchmark": "http_agent_vs_raw", "model": "gemma-3-270m Q4_K_M (sample)",
                  "threads": THREADS, "max_tokens": args.tokens, "n_ctx": rig.n_ctx,
                  "repeat_penalty": REPEAT_PENALTY, "runs": runs, "inference": inference,
                  "idle": idle, "targets": {"decode_ratio": ">= 0.97", "ttft_overhead_ms": "<= 10"},
                  "met": met}
        results.write("http", result, markdown(result, args))
    finally:
        rig.close()
    return 0


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    inf, idle = result["inference"], result["idle"]
    ours, raw = inf["ours"], inf["raw"]

    md = [
        "# The agent's OpenAI-compatible HTTP API vs raw llama-cpp-python and llama.cpp's server\n",
        "| measure | edgepack agent `--http` | raw llama-cpp-python | ratio / delta | target | |",
        "|---|---:|---:|---:|---|---|",
        f"| decode tok/s, streamed `/v1/completions` (median) | {ours['decode_tok_s_median']:.1f} | "
        f"{raw['decode_tok_s_median']:.1f} | {ours['ratio_decode']:.3f} | >= 0.97 | "
        f"{ok(result['met']['decode_ratio_ge_0.97'])} |",
        f"| TTFT ms (median) | {ours['ttft_ms_median']:.1f} | {raw['ttft_ms_median']:.1f} | "
        f"{ours['ttft_overhead_ms_median_of_pairs']:+.1f} ms (median of pairs) | <= +10 ms | "
        f"{ok(result['met']['ttft_overhead_le_10ms'])} |",
    ]
    ll = inf.get("llama_server")
    if ll:
        md += [
            "",
            "| side by side, same GGUF, threads, prompts | edgepack agent `--http` | llama.cpp server "
            "(`python -m llama_cpp.server`) |",
            "|---|---:|---:|",
            f"| decode tok/s (median) | {ours['decode_tok_s_median']:.1f} | {ll['decode_tok_s_median']:.1f} |",
            f"| decode ÷ raw | {ours['ratio_decode']:.3f} | {ll['ratio_decode']:.3f} |",
            f"| TTFT ms (median) | {ours['ttft_ms_median']:.1f} | {ll['ttft_ms_median']:.1f} |",
            f"| TTFT − raw (median of pairs) | {ours['ttft_overhead_ms_median_of_pairs']:+.1f} ms | "
            f"{ll['ttft_overhead_ms_median_of_pairs']:+.1f} ms |",
            f"| RSS with the model loaded, MiB | {inf['loaded_rss_mb']['ours']:.0f} | "
            f"{inf['loaded_rss_mb']['llama_server']:.0f} |",
            f"| identical text to raw (runs) | {ours['identical_text_runs']}/{result['runs']} | "
            f"{ll['identical_text_runs']}/{result['runs']} |",
        ]
    plain, withh = idle["plain"], idle["http"]
    md += [
        "",
        "| idle agent, empty state dir (median) | without `--http` | with `--http` | added |",
        "|---|---:|---:|---:|",
        f"| RSS MiB | {plain['rss_mb']:.1f} | {withh['rss_mb']:.1f} | {idle['rss_added_mb']:+.1f} |",
        f"| USS MiB (private) | {plain['uss_mb']:.1f} | {withh['uss_mb']:.1f} | {idle['uss_added_mb']:+.1f} |",
        f"| process start -> retained `online` s | {plain['start_to_online_s']:.3f} | "
        f"{withh['start_to_online_s']:.3f} | {idle['start_to_online_added_ms']:+.0f} ms |",
        f"| process start -> first `/health` answer s | | {withh['start_to_http_s']:.3f} | |",
        "",
        f"Inference: the installed file, {result['threads']} threads, n_ctx {result['n_ctx']}, greedy, "
        f"repeat_penalty {result['repeat_penalty']}, {result['max_tokens']} max tokens, {result['runs']} "
        "runs rotating which side goes first, each prompt opening with a different word. Every side keeps "
        "its model resident in its own process; they never generate at the same time. HTTP sides are "
        "timed by one stdlib client (request sent -> first text event; (tokens - 1) / (last - first "
        "text event)); raw is timed in-process around `create_completion(stream=True)`. The agent's own "
        f"TTFT (inside the device, from its usage `timings`): {ours['agent_reported_ttft_ms_median']:.1f} ms. "
        f"llama.cpp server: {inf['note_llama_server']}.",
        "",
        f"Idle: {len(idle['starts']['plain'])} starts per side, alternating, health every 1 s, memory read "
        "after three health messages; start-up = `Popen` -> retained `online` at a subscribed host. "
        f"Importing `agent.http_api` after `agent.daemon` costs {idle['import_http_api_ms']:.0f} ms; "
        "RSS by import step (one process): "
        + ", ".join(f"{n} {mb:.1f} MiB" for n, mb in idle["rss_steps_mb"]) + ". "
        "paho already imports most of what `http.server` needs (socketserver, email, http.client).",
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
