"""The agent over MQTT vs raw baselines on the same machine and the same mosquitto (loopback).

1. Decode tok/s of inference streamed through MQTT (host-side arrival times of the chunks) vs raw
   llama-cpp-python on the very file the agent serves, 2 threads, same prompts, greedy, the
   default repeat penalty (agent/sampling.py); the raw side is its own long-lived process with
   the model resident (as the agent's is). Target ratio >= 0.97.
2. TTFT over MQTT (host publish -> first chunk arrival) minus raw TTFT (call -> first token).
   Target <= 10 ms.
3. ``status`` round trip (RequestClient.call) vs a bare paho v2 request/response (echo responder
   in its own process, TCP_NODELAY on both ends, QoS 1): p50 / p99 over the same count.
4. Idle agent (empty state dir): RSS (psutil and its own health ``rss_bytes``), targets <= 35 MB;
   process start -> retained ``state`` = online seen by a host subscriber, target <= 0.5 s; both
   next to a bare paho "agent" (paho + psutil + cryptography imported, connect, publish online).

Runs alternate between our side and the baseline; medians are reported. Everything listens on
127.0.0.1 (mosquitto started by ``fleet.broker.Broker``); every wait is bounded; all processes and
temp dirs are cleaned up. The agent serves the sample's Q4_K_M bundle, built, signed and installed
as in bench/_sample.py.

Usage: .venv/bin/python bench/bench_mqtt.py [--runs 7] [--tokens 128] [--calls 500] [--starts 5]
       [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from _agentbench import (
    FLEET,
    RawServer,
    Rig,
    end,
    import_times,
    mem_of,
    ok,
    read_line,
    rss_steps,
    start_agent,
)
from machine import median, parse

from agent.sampling import DEFAULTS

THREADS = 2
REPEAT_PENALTY = DEFAULTS.repeat_penalty
WARMUP_CALLS = 20  # round trips per side before timing
BASE_PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
               "Once upon a time")
# A different opening word per run: the prompt-prefix cache of llama-cpp-python (on both sides)
# cannot skip the prompt evaluation, so TTFT includes it every time.
OPENERS = ["Story", "Tale", "Fable", "Legend", "Chapter", "Episode", "Draft", "Sketch", "Scene",
           "Account", "Memoir", "Yarn"]

# The bare paho responder: echoes each request to its Response Topic with its Correlation Data.
RESPONDER = r"""
import socket, sys
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def on_socket_open(c, u, sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def on_connect(c, u, flags, rc, props):
    c.subscribe(topic, qos=1)
def on_subscribe(c, u, mid, rcs, props):
    print("ready", flush=True)
def on_message(c, u, m):
    p = Properties(PacketTypes.PUBLISH)
    p.CorrelationData = m.properties.CorrelationData
    c.publish(m.properties.ResponseTopic, m.payload, qos=1, properties=p)
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-responder",
                protocol=MQTTProtocolVersion.MQTTv5)
c.on_socket_open = on_socket_open; c.on_connect = on_connect
c.on_subscribe = on_subscribe; c.on_message = on_message
c.connect(host, port)
c.loop_forever()
"""

# The bare "agent" for the footprint baseline: what DESIGN.md calls the floor (CPython + paho +
# psutil + cryptography imported), connects with a will and publishes retained state=online.
BARE_AGENT = r"""
import json, socket, sys, time
import paho.mqtt.client as mqtt
import psutil
from cryptography.hazmat.primitives.asymmetric import ed25519
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=topic.split("/")[3],
                protocol=MQTTProtocolVersion.MQTTv5)
c.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.will_set(topic, json.dumps({"state": "lost", "schema": 1}), qos=1, retain=True)
def on_connect(c, u, flags, rc, props):
    c.publish(topic, json.dumps({"state": "online", "ts": time.time(), "schema": 1}), qos=1, retain=True)
c.on_connect = on_connect
c.connect(host, port)
c.loop_forever()
"""

# What the idle footprint is made of, import by import (bench/_agentbench.py rss_steps).
RSS_MODULES = ["paho.mqtt.client", "cryptography.hazmat.primitives.asymmetric.ed25519", "agent.protocol",
               "agent.transport.mqtt", "agent.bundle", "agent.profiles", "agent.store", "agent.cli",
               "agent.daemon", "agent.probe"]


def cpu_s(p: Any) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- 1 + 2: streamed inference --------------------------------------------------------------------


def run_raw(raw: RawServer, prompt: str, n: int) -> dict[str, Any]:
    r = raw.run(prompt, n)
    # mqtt.json names the raw count "chunks", as for the agent's side (one chunk per token here).
    r["chunks"] = r.pop("tokens")
    return r


def run_ours(requests: Any, device: str, prompt: str, n: int) -> dict[str, Any]:
    from agent.protocol import InferRequest

    req = InferRequest(prompt, max_tokens=n, temperature=0.0, repeat_penalty=REPEAT_PENALTY,
                       request_id=secrets.token_hex(6))
    times: list[float] = []
    text: list[str] = []
    usage: dict[str, Any] | None = None
    t0 = time.perf_counter()
    for c in requests.stream(device, req, timeout=120):
        now = time.perf_counter()
        if c.error:
            raise RuntimeError(f"inference failed: {c.error}")
        if c.text or c.done:
            times.append(now)
            text.append(c.text)
        if c.done:
            usage = c.usage
    if not times or usage is None:
        raise RuntimeError("no chunks")
    # The agent sends the first token alone, then coalesces tokens into chunks: count tokens (from
    # the final usage), not chunks, over the time from the first arrival to the last.
    tokens = int(usage["completion_tokens"])
    return {"chunks": len(times), "tokens": tokens, "ttft_ms": (times[0] - t0) * 1000,
            "decode_tok_s": (tokens - 1) / (times[-1] - times[0]) if tokens > 1 else 0.0,
            "agent_usage": usage, "text": "".join(text)}


# --- 3: round trips ------------------------------------------------------------------------------


class BareRequester:
    """A bare paho v2 client: publish with Response Topic + Correlation Data, wait for the echo."""

    def __init__(self, host: str, port: int, request_topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.request_topic = request_topic
        self.reply_topic = f"bare/reply/{secrets.token_hex(4)}"
        self.got = threading.Event()
        self.want = b""
        self.subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-req-{secrets.token_hex(4)}",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.on_socket_open = self._on_socket_open
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(self.reply_topic, qos=1)
        c.on_subscribe = lambda cl, u, mid, rcs, p: self.subscribed.set()
        c.on_message = self._on_message
        c.connect(host, port)
        c.loop_start()
        self.client = c
        if not self.subscribed.wait(10):
            raise TimeoutError("bare requester did not subscribe")

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_message(self, client: Any, userdata: Any, m: Any) -> None:
        if bytes(getattr(m.properties, "CorrelationData", b"")) == self.want:
            self.got.set()

    def call(self, payload: bytes = b"{}") -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.got.clear()
        self.want = secrets.token_bytes(16)
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic = self.reply_topic
        p.CorrelationData = self.want
        self.client.publish(self.request_topic, payload, qos=1, properties=p)
        if not self.got.wait(10):
            raise TimeoutError("no echo within 10 s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- 4: footprint and start-up -------------------------------------------------------------------


def import_profile(stmt: str, top: int = 15) -> tuple[float, list[tuple[str, int, float]]]:
    """Total import time (ms) and the heaviest imports at any depth: (module, depth, cumulative ms).

    Cumulative times nest (a parent includes its children)."""
    rows = import_times(stmt)
    total = sum(ms for _, depth, ms in rows if depth == 0)
    return total, sorted(rows, key=lambda x: -x[2])[:top]


def rss_by_step() -> list[tuple[str, float]]:
    base, steps = rss_steps(RSS_MODULES)
    return [("python + psutil", base), *[(f"+ {mod}", mb) for mod, mb in steps]]


def python_startup_ms(n: int = 5) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30)
        xs.append((time.perf_counter() - t0) * 1000)
    return median(xs)


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="inference runs per side")
    ap.add_argument("--tokens", type=int, default=128, help="max tokens per inference run")
    ap.add_argument("--calls", type=int, default=500, help="round trips per side")
    ap.add_argument("--starts", type=int, default=5, help="cold starts per side")
    args, results = parse(ap, argv, smoke={"runs": 1, "tokens": 8, "calls": 10, "starts": 1})
    runs = max(1, min(args.runs, len(OPENERS) - 1))

    from agent.protocol import StatusRequest, Topics
    from fleet.broker import HOST

    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    rig = Rig.start("edgepack-bench-mqtt-")
    broker, host, children = rig.broker, rig.host, rig.children
    port, n_ctx = broker.port, rig.n_ctx
    requests, seen, health = host.requests, host.seen, host.health
    bare: BareRequester | None = None
    try:
        # --- 1 + 2 ----------------------------------------------------------------------------
        print("inference: starting agent and raw server", flush=True)
        agent = start_agent(rig.state, rig.ring, broker.url, "dev-infer",
                            "--threads", str(THREADS), "--health-interval", "10")
        children.append(agent)
        host.wait(lambda: ("dev-infer", "online") in seen, 30)
        raw = RawServer(rig.model, n_ctx, THREADS)
        children.append(raw.proc)
        # Warm-up: the agent loads its model lazily on the first request; both warm their caches.
        run_ours(requests, "dev-infer", f"{OPENERS[-1]}: {BASE_PROMPT}", 16)
        raw.run(f"{OPENERS[-1]}: {BASE_PROMPT}", 16)
        import psutil

        # CPU time per process over each run: where the cycles of a streamed generation go.
        assert broker.proc is not None  # started above
        procs = {"agent": psutil.Process(agent.pid), "raw": psutil.Process(raw.proc.pid),
                 "broker": psutil.Process(broker.proc.pid), "host": psutil.Process()}
        ours_inf: list[dict[str, Any]] = []
        raw_inf: list[dict[str, Any]] = []
        for i in range(runs):
            prompt = f"{OPENERS[i]}: {BASE_PROMPT}"
            pair = [("raw", lambda p, n: run_raw(raw, p, n)),
                    ("ours", lambda p, n: run_ours(requests, "dev-infer", p, n))]
            if i % 2:
                pair.reverse()
            for side, fn in pair:
                before = {k: cpu_s(q) for k, q in procs.items()}
                r = fn(prompt, args.tokens)
                r["cpu_ms"] = {k: (cpu_s(q) - before[k]) * 1000 for k, q in procs.items()}
                (raw_inf if side == "raw" else ours_inf).append(r)
                print(f"  run {i} {side}: {r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms, "
                      f"{r['chunks']} chunks", flush=True)
        same_text = sum(o["text"] == r["text"] for o, r in zip(ours_inf, raw_inf, strict=True))
        end(raw.proc)

        # --- 3 ----------------------------------------------------------------------------------
        print("round trips", flush=True)
        bare_topic = f"bare/{secrets.token_hex(4)}/cmd"
        responder = subprocess.Popen([sys.executable, "-c", RESPONDER, HOST, str(port), bare_topic],
                                     stdout=subprocess.PIPE, text=True)
        children.append(responder)
        read_line(responder, 15)
        bare = BareRequester(HOST, port, bare_topic)
        status_payload = StatusRequest()
        for _ in range(min(WARMUP_CALLS, args.calls)):
            requests.call("dev-infer", "status", status_payload, timeout=10)
            bare.call()
        ours_rtt: list[float] = []
        bare_rtt: list[float] = []
        block = 50
        for b in range((args.calls + block - 1) // block):
            n = min(block, args.calls - b * block)
            order = ["ours", "bare"] if b % 2 == 0 else ["bare", "ours"]
            for side in order:
                for _ in range(n):
                    t0 = time.perf_counter()
                    if side == "ours":
                        rep = requests.call("dev-infer", "status", status_payload, timeout=10)
                        if not rep.ok:
                            raise RuntimeError(f"status failed: {rep.error}")
                        ours_rtt.append((time.perf_counter() - t0) * 1000)
                    else:
                        bare.call()
                        bare_rtt.append((time.perf_counter() - t0) * 1000)
        bare.close()
        bare = None
        end(responder)
        end(agent)

        # --- 4 ----------------------------------------------------------------------------------
        print("idle footprint and start-up", flush=True)
        starts: list[dict[str, Any]] = []
        bare_starts: list[dict[str, Any]] = []
        for i in range(args.starts):
            for side in (["bare", "ours"] if i % 2 == 0 else ["ours", "bare"]):
                dev = f"{side}-s{i}"
                if side == "ours":
                    d = rig.work / f"idle{i}"
                    d.mkdir()
                    t0 = time.perf_counter()
                    proc = start_agent(d / "state", rig.ring, broker.url, dev, "--health-interval", "1")
                else:
                    t0 = time.perf_counter()
                    proc = subprocess.Popen([sys.executable, "-c", BARE_AGENT, HOST, str(port),
                                             Topics(FLEET, dev).state])
                children.append(proc)
                host.wait(lambda dev=dev: (dev, "online") in seen, 30)
                online_s = seen[(dev, "online")] - t0
                row: dict[str, Any] = {"device": dev, "start_to_online_s": online_s}
                if side == "ours":
                    host.wait(lambda dev=dev: len(health.get(dev, [])) >= 3, 30)
                    row["rss_mb_psutil"], row["uss_mb_psutil"] = mem_of(proc.pid)
                    row["rss_mb_health"] = health[dev][-1]["rss_bytes"] / 2**20
                    end(proc)
                    starts.append(row)
                else:
                    time.sleep(1.5)  # as idle as the agent's sample
                    row["rss_mb_psutil"], row["uss_mb_psutil"] = mem_of(proc.pid)
                    end(proc)
                    bare_starts.append(row)
                print(f"  {dev}: online after {online_s * 1000:.0f} ms, "
                      f"RSS {row['rss_mb_psutil']:.1f} MB", flush=True)
        host.close()  # before the import figures; Rig.close closing it again does nothing

        imp_total, imp_top = import_profile(
            "import agent.cli, agent.daemon, agent.probe, agent.profiles, psutil")
        imp_daemon, _ = import_profile("import agent.daemon")
        steps = rss_by_step()
        py_ms = python_startup_ms()

        # --- results ------------------------------------------------------------------------------
        o_tps = median([r["decode_tok_s"] for r in ours_inf])
        r_tps = median([r["decode_tok_s"] for r in raw_inf])
        o_ttft = median([r["ttft_ms"] for r in ours_inf])
        r_ttft = median([r["ttft_ms"] for r in raw_inf])
        ttft_delta = median([o["ttft_ms"] - r["ttft_ms"] for o, r in zip(ours_inf, raw_inf, strict=True)])
        agent_side_ttft = median([float((r["agent_usage"] or {}).get("ttft_ms", float("nan")))
                                  for r in ours_inf])
        def per_tok(rows: list[dict[str, Any]], key: str) -> float:
            return median([r["cpu_ms"][key] / max(1, r.get("tokens", r["chunks"])) for r in rows])

        cpu = {"agent_ms_per_token": per_tok(ours_inf, "agent"),
               "raw_ms_per_token": per_tok(raw_inf, "raw"),
               "broker_ms_per_token_ours": per_tok(ours_inf, "broker"),
               "host_ms_per_token_ours": per_tok(ours_inf, "host")}
        cpu["agent_extra_ms_per_token"] = cpu["agent_ms_per_token"] - cpu["raw_ms_per_token"]
        agent_tps = median([float((r["agent_usage"] or {}).get("decode_tok_s", float("nan")))
                            for r in ours_inf])
        o50, o99 = pct(ours_rtt, 0.5), pct(ours_rtt, 0.99)
        b50, b99 = pct(bare_rtt, 0.5), pct(bare_rtt, 0.99)
        rss_ps = median([s["rss_mb_psutil"] for s in starts])
        rss_h = median([s["rss_mb_health"] for s in starts])
        bare_rss = median([s["rss_mb_psutil"] for s in bare_starts])
        uss = median([s["uss_mb_psutil"] for s in starts])
        bare_uss = median([s["uss_mb_psutil"] for s in bare_starts])
        up = median([s["start_to_online_s"] for s in starts])
        bare_up = median([s["start_to_online_s"] for s in bare_starts])
        targets = {
            "decode_ratio_ge_0.97": o_tps / r_tps >= 0.97,
            "ttft_overhead_le_10ms": ttft_delta <= 10.0,
            "idle_rss_le_35MB": rss_ps <= 35.0,
            "start_to_online_le_0.5s": up <= 0.5,
        }
        for r in ours_inf + raw_inf:
            r.pop("text", None)
        result = {
            "benchmark": "mqtt_agent_vs_raw",
            "model": "gemma-3-270m Q4_K_M (sample)", "threads": THREADS, "max_tokens": args.tokens,
            "repeat_penalty": REPEAT_PENALTY, "runs": runs, "n_ctx": n_ctx,
            "inference": {"ours": ours_inf, "raw": raw_inf,
                          "ours_decode_tok_s_median": o_tps, "raw_decode_tok_s_median": r_tps,
                          "ratio_decode": o_tps / r_tps,
                          "ours_ttft_ms_median": o_ttft, "raw_ttft_ms_median": r_ttft,
                          "ttft_overhead_ms_median_of_pairs": ttft_delta,
                          "agent_reported_ttft_ms_median": agent_side_ttft,
                          "identical_text_runs": same_text,
                          "agent_reported_decode_tok_s_median": agent_tps, "cpu": cpu},
            "round_trip": {"calls": len(ours_rtt), "ours_p50_ms": o50, "ours_p99_ms": o99,
                           "bare_p50_ms": b50, "bare_p99_ms": b99,
                           "ratio_p50": o50 / b50, "ratio_p99": o99 / b99},
            "idle": {"starts": starts, "bare_starts": bare_starts,
                     "rss_mb_psutil_median": rss_ps, "rss_mb_health_median": rss_h,
                     "bare_rss_mb_median": bare_rss, "uss_mb_median": uss,
                     "bare_uss_mb_median": bare_uss,
                     "start_to_online_s_median": up, "bare_start_to_online_s_median": bare_up,
                     "python_startup_ms": py_ms,
                     "import_ms_run_path": imp_total, "import_ms_agent_daemon": imp_daemon,
                     "import_top_ms": imp_top, "rss_steps_mb": steps},
            "targets": {"decode_ratio": ">= 0.97", "ttft_overhead_ms": "<= 10",
                        "idle_rss_mb": "<= 35", "start_to_online_s": "<= 0.5"},
            "met": targets,
        }

        md = [
            "# The agent over MQTT vs raw baselines (mosquitto on loopback)\n",
            "| measure | edgepack agent | raw baseline | ratio / delta | target | |",
            "|---|---:|---:|---:|---|---|",
            f"| decode tok/s, streamed over MQTT (median) | {o_tps:.1f} | {r_tps:.1f} (llama-cpp-python) "
            f"| {o_tps / r_tps:.3f} | >= 0.97 | {ok(targets['decode_ratio_ge_0.97'])} |",
            f"| TTFT ms (median) | {o_ttft:.1f} | {r_ttft:.1f} | +{ttft_delta:.1f} ms (median of pairs) "
            f"| <= +10 ms | {ok(targets['ttft_overhead_le_10ms'])} |",
            f"| `status` round trip p50 ms | {o50:.2f} | {b50:.2f} (bare paho echo) | {o50 / b50:.2f}x | | |",
            f"| `status` round trip p99 ms | {o99:.2f} | {b99:.2f} | {o99 / b99:.2f}x | | |",
            f"| idle RSS MiB, psutil (median) | {rss_ps:.1f} (health msg: {rss_h:.1f}) | {bare_rss:.1f} "
            f"(bare paho+psutil+cryptography) | +{rss_ps - bare_rss:.1f} MiB | <= 35 MiB "
            f"| {ok(targets['idle_rss_le_35MB'])} |",
            f"| idle USS MiB (private memory, median) | {uss:.1f} | {bare_uss:.1f} | "
            f"+{uss - bare_uss:.1f} MiB | | |",
            f"| process start -> retained `online` s (median) | {up:.3f} | {bare_up:.3f} | "
            f"+{(up - bare_up) * 1000:.0f} ms | <= 0.5 s | {ok(targets['start_to_online_le_0.5s'])} |",
            "",
            f"Inference: the same installed file (`state/slots/*/payload/model.gguf`), {THREADS} threads, "
            f"n_ctx {n_ctx}, greedy, repeat_penalty {REPEAT_PENALTY}, {args.tokens} max tokens, {runs} "
            "alternating runs (one prompt per run, the same on both sides, each opening with a different "
            "word so the prompt-prefix cache never skips the prompt). Both models stay resident in their "
            "own processes and never generate at the same time. tok/s = (tokens - 1) / (last - first "
            "arrival), measured on the host for the agent (tokens from the final usage: the agent sends "
            "the first token alone, then coalesces tokens for 50 ms per chunk) and in-process for raw "
            f"`create_completion(stream=True)`. Identical text on {same_text}/{runs} runs. The agent's own "
            f"usage TTFT (inside the device) median: {agent_side_ttft:.1f} ms; its own decode tok/s "
            f"(inside the device) median: {agent_tps:.1f}.",
            "",
            "CPU time per generated token (median over runs, all processes on the same 2 cores): "
            f"agent process {cpu['agent_ms_per_token']:.2f} ms vs raw process {cpu['raw_ms_per_token']:.2f} ms "
            f"(agent extra {cpu['agent_extra_ms_per_token']:+.2f} ms); mosquitto "
            f"{cpu['broker_ms_per_token_ours']:.2f} ms; host client {cpu['host_ms_per_token_ours']:.2f} ms.",
            "",
            f"Round trips: {len(ours_rtt)} sequential calls per side, in alternating blocks of {block}, "
            "QoS 1 both ways, TCP_NODELAY on broker and clients. Ours = `RequestClient.call(status)` "
            "against the agent (the reply is the status JSON, read from the store); bare = paho v2 "
            "publish with Response Topic + Correlation Data to a paho echo process.",
            "",
            f"Idle: {len(starts)} fresh agents with an empty state dir, health every 1 s; RSS read after "
            "three health messages. Start-up = `Popen` -> retained `state` = online arriving at a host "
            "subscriber that was already subscribed. The bare baseline imports paho, psutil and "
            "cryptography (Ed25519), connects with a will and publishes retained online.",
            "",
            f"Python interpreter start (`python -c pass`): {py_ms:.0f} ms. Imports on the agent's `run` path "
            f"(`agent.cli, agent.daemon, agent.probe, agent.profiles, psutil`): {imp_total:.0f} ms; "
            f"`import agent.daemon` alone: {imp_daemon:.0f} ms. Top-level contributors (`-X importtime`, "
            "cumulative ms, nested: a module includes what it imports; depth 0 = imported by the statement):",
            "",
            "| module | depth | cumulative ms |", "|---|---:|---:|",
            *[f"| `{n}` | {d} | {ms:.1f} |" for n, d, ms in imp_top],
            "",
            "RSS as modules are imported (one process, cumulative):",
            "",
            "| step | RSS MB |", "|---|---:|",
            *[f"| {n} | {mb:.1f} |" for n, mb in steps],
        ]
        step = dict(steps)
        ratio = o_tps / r_tps
        md += [
            "",
            "## What the agent does for these numbers, and what dominates",
            "",
            f"- **Decode ratio {ratio:.3f} (target 0.97, {'met' if ratio >= 0.97 else 'missed'}).** "
            f"The agent's own in-device decode rate is {agent_tps:.1f} tok/s. With one QoS 1 message "
            "per token the ratio was 0.93 (first version of this bench): on 2 cores the llama threads "
            "share the CPU with the per-token messaging in the agent, mosquitto "
            f"({cpu['broker_ms_per_token_ours']:.2f} ms CPU/token now) and the host client, which here "
            f"runs on the same cores ({cpu['host_ms_per_token_ours']:.2f} ms CPU/token; on a real fleet "
            "it is elsewhere). The agent now sends the first token alone (TTFT unchanged) and "
            "coalesces the rest into one QoS 1 chunk per 50 ms (`--chunk-interval`), so a chunk "
            "carries ~3-4 tokens at this speed; `seq` still orders them and nothing is sent at QoS 0.",
            f"- **Idle RSS {rss_ps:.1f} MiB (target 35, {'met' if rss_ps <= 35.0 else 'missed'}).** "
            f"The floor (CPython + psutil + paho + cryptography, connected) is {bare_rss:.1f} MiB, of "
            f"which paho alone is ~{step['+ paho.mqtt.client'] - step['python + psutil']:.1f} MiB (it "
            "imports ssl, urllib.request, http.client and email) and cryptography "
            f"~{step['+ cryptography.hazmat.primitives.asymmetric.ed25519'] - step['+ paho.mqtt.client']:.1f} MiB. "
            f"The agent adds {rss_ps - bare_rss:.1f} MiB (USS {uss:.1f} vs {bare_uss:.1f}). It keeps "
            "tarfile (installs only) and importlib.metadata (runtime versions come from the dist-info "
            "folder name) out of the idle process, and hands the heap freed after start-up (probe, "
            "profile parsing) back to the OS with glibc's malloc_trim once online.",
        ]
        text = "\n".join(md) + "\n"
        results.write("mqtt", result, text)
        print(text)
    finally:
        if bare is not None:
            with contextlib.suppress(Exception):
                bare.close()
        rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
