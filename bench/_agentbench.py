"""The agent as a process on a real broker, a host's MQTT session, and the raw llama-cpp-python side.

Shared by bench/bench_mqtt.py and bench/bench_http.py (which run in a :class:`Rig`) and
bench/bench_footprint.py. Invariants:

* Everything listens on 127.0.0.1 (mosquitto started by ``fleet.broker.Broker``).
* Every child is stopped with :func:`end` (SIGTERM, then SIGKILL after 10 s): a benchmark adds
  each one it starts to ``Rig.children``, and :meth:`Rig.close` ends them all, then stops the
  broker and removes the temporary folder.
* Every wait is bounded (:func:`read_line`, :meth:`HostClient.wait`) and raises ``TimeoutError``.
* The raw side (:class:`RawServer`) keeps its model resident in its own long-lived process, as the
  agent does, and generates with the agent's default sampling (``agent.sampling.DEFAULTS``), greedy.
* Import figures (:func:`import_times`, :func:`rss_steps`) come from a fresh interpreter each,
  started in the checkout, so nothing this process has imported counts.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _sample import install, sample_bundle

from agent.sampling import DEFAULTS

if TYPE_CHECKING:
    from fleet.broker import Broker

ROOT = Path(__file__).resolve().parent.parent
AGENT = Path(sys.executable).parent / "edgepack-agent"
FLEET = "bench"

# The raw side: llama-cpp-python with the model resident; one JSON request per stdin line. It passes
# top-k / top-p / min_p 0 as agent/runtimes/llamacpp.py does: under greedy they do not change the
# text, but llama-cpp-python's own defaults (min_p 0.05) would make the two sides' settings differ.
# llama-cpp-python streams one chunk per token, so the count is of tokens.
RAW = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.perf_counter(); first = last = None; count = 0; text = []
    for chunk in llm.create_completion(req["prompt"], max_tokens=req["n"], temperature=0.0,
                                       repeat_penalty=req["repeat_penalty"], top_k=req["top_k"],
                                       top_p=req["top_p"], min_p=0.0, stream=True):
        now = time.perf_counter()
        piece = chunk["choices"][0]["text"]
        if not piece:
            continue
        if first is None:
            first = now
        last = now; count += 1; text.append(piece)
    print(json.dumps({"tokens": count, "ttft_ms": (first - t0) * 1000,
                      "decode_tok_s": (count - 1) / (last - first) if count > 1 else 0.0,
                      "text": "".join(text)}), flush=True)
"""

# RSS of one interpreter with psutil imported, then after each module of argv in turn (bytes).
RSS_STEPS = r"""
import importlib, json, psutil, sys
p = psutil.Process()
out = [p.memory_info().rss]
for mod in sys.argv[1:]:
    importlib.import_module(mod)
    out.append(p.memory_info().rss)
print(json.dumps(out))
"""


# --- processes -------------------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line of a child, bounded in time."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise TimeoutError(f"no output from child within {timeout}s")
        line = proc.stdout.readline()
    finally:
        sel.close()
    if not line:
        raise RuntimeError(f"child exited (rc={proc.poll()})")
    return line


def end(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_agent(state: Path, ring: Path, broker_url: str, device: str, *extra: str) -> subprocess.Popen[bytes]:
    """``edgepack-agent run`` as its own process (stopped with :func:`end`), logging next to its
    state folder."""
    log = state.parent / f"{device}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen([str(AGENT), "-v", "--state-dir", str(state), "--keyring", str(ring), "run",
                                 "--broker", broker_url, "--device", device, "--fleet", FLEET, *extra],
                                stdout=out, stderr=subprocess.STDOUT)


def mem_of(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MiB: USS is the memory private to the process (no shared library pages)."""
    import psutil

    mi = psutil.Process(pid).memory_full_info()
    return mi.rss / 2**20, mi.uss / 2**20


class RawServer:
    """Raw llama-cpp-python with ``model`` resident in its own process (:data:`RAW`); ``proc`` is
    the child to :func:`end`."""

    def __init__(self, model: Path, n_ctx: int, threads: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RAW, str(model), str(threads), str(n_ctx)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(read_line(self.proc, 120))

    def run(self, prompt: str, n: int) -> dict[str, Any]:
        """One streamed completion of up to ``n`` tokens: tokens, ttft_ms, decode_tok_s, text."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "n": n, "repeat_penalty": DEFAULTS.repeat_penalty,
                                          "top_k": DEFAULTS.top_k, "top_p": DEFAULTS.top_p}) + "\n")
        self.proc.stdin.flush()
        return json.loads(read_line(self.proc, 300))


# --- the host's session ------------------------------------------------------------------------------


class HostClient:
    """The host's one MQTT session: when each device's retained ``state`` arrived, its health
    messages, and commands out through ``requests``."""

    def __init__(self, broker_url: str) -> None:
        from agent.protocol import fleet_filter
        from agent.transport.mqtt import MqttTransport
        from agent.transport.request import RequestClient

        self.seen: dict[tuple[str, str], float] = {}
        self.health: dict[str, list[dict[str, Any]]] = {}
        self.cond = threading.Condition()
        self.t = MqttTransport(broker_url, f"host-{secrets.token_hex(4)}", session_expiry=0)
        self.t.subscribe(fleet_filter(FLEET, "state"), handler=self._on_state)
        self.t.subscribe(fleet_filter(FLEET, "health"), handler=self._on_health)
        self.requests = RequestClient(self.t, FLEET)
        self.t.start()
        self.t.wait_connected(10)
        time.sleep(0.3)  # SUBACKs in

    def _on_state(self, msg: Any) -> None:
        now = time.perf_counter()
        if not msg.payload:
            return
        # .get: a state message without a state (another schema) must not kill the MQTT thread.
        state = json.loads(msg.payload).get("state")
        with self.cond:
            self.seen.setdefault((msg.topic.split("/")[3], state), now)
            self.cond.notify_all()

    def _on_health(self, msg: Any) -> None:
        if not msg.payload:
            return
        with self.cond:
            self.health.setdefault(msg.topic.split("/")[3], []).append(json.loads(msg.payload))
            self.cond.notify_all()

    def wait(self, pred: Callable[..., bool], timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise TimeoutError("condition not met in time")

    def close(self) -> None:
        self.t.stop()


# --- the rig: bundle, broker, host session, children --------------------------------------------------


@dataclass
class Rig:
    """What an agent benchmark runs in, made by :meth:`start` and torn down by :meth:`close`."""

    work: Path  # a new temporary folder, removed by close()
    ring: Path  # the keyring that verifies the sample bundle
    state: Path  # an agent state folder with the sample's Q4_K_M bundle installed
    model: Path  # the installed model file (state/slots/<digest>/payload/model.gguf): what the agent loads
    n_ctx: int  # the bundle's context (tokens)
    broker: Broker
    host: HostClient
    children: list[subprocess.Popen[Any]] = field(default_factory=list)  # every process to end

    @classmethod
    def start(cls, prefix: str) -> Rig:
        """(1) build, sign and install the sample bundle in a new folder named ``prefix...``
        (bench/_sample.py) (2) start mosquitto (3) connect the host session; undone if one fails."""
        from fleet.broker import Broker

        work = Path(tempfile.mkdtemp(prefix=prefix))
        broker: Broker | None = None
        try:
            bundle = sample_bundle(work)
            state = work / "agent" / "state"
            installed = install(bundle, state)
            n_ctx = int(installed.manifest.generation.get("context", 2048))
            broker = Broker(work / "broker").start()
            return cls(work, bundle.keyring, state, installed.entrypoint, n_ctx, broker, HostClient(broker.url))
        except BaseException:
            if broker is not None:
                broker.stop()
            shutil.rmtree(work, ignore_errors=True)
            raise

    def close(self) -> None:
        """Close the host session, end every child, stop the broker, remove the folder."""
        with contextlib.suppress(Exception):  # a failed goodbye must not keep the children running
            self.host.close()
        for child in self.children:
            end(child)
        self.broker.stop()
        shutil.rmtree(self.work, ignore_errors=True)


# --- imports: time and memory --------------------------------------------------------------------------


def import_times(stmt: str) -> list[tuple[str, int, float]]:
    """Every import a fresh interpreter makes running ``stmt``, from ``-X importtime``:
    (module, depth, cumulative ms), depth 0 = imported by the statement itself. Cumulative times
    nest (a parent includes its children)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", stmt], capture_output=True,
                       text=True, check=True, cwd=ROOT, timeout=120)
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)", line)
        if m:
            rows.append((m.group(4), (len(m.group(3)) - 1) // 2, int(m.group(2)) / 1000))
    return rows


def rss_steps(mods: Sequence[str]) -> tuple[float, list[tuple[str, float]]]:
    """RSS (MiB) of a fresh interpreter with psutil imported, and after importing each of ``mods``
    in turn (cumulative)."""
    r = subprocess.run([sys.executable, "-c", RSS_STEPS, *mods], capture_output=True, text=True,
                       check=True, cwd=ROOT, timeout=120)
    base, *steps = (b / 2**20 for b in json.loads(r.stdout))
    return base, list(zip(mods, steps, strict=True))


# --- results pages ---------------------------------------------------------------------------------------


def ok(flag: bool) -> str:
    """A target's verdict cell in a results table."""
    return "met" if flag else "**missed**"
