"""The OpenAI-compatible HTTP door, for real: the official ``openai`` client against
``edgepack-agent run --http`` (a process), the sample model, a real mosquitto.

One agent serves the whole module (``--http 0``: a bare port, so the default address; ``--queue 1``
so the queue is easy to fill; a bearer key): chat and completions, streamed and not, stop
sequences, a client that goes away mid-stream, a full queue shared with the MQTT door (429), an
install over MQTT while an HTTP stream runs, malformed and oversized requests, the key, and the
listening address. The last tests run :class:`~agent.http_api.HttpApi` in-process with no model,
for the socket limits (a slow sender, too many connections) that need no generation.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from agentkit import AgentProcess, Host
from brokerkit import Broker, mosquitto_binary
from need import need, need_module

from agent._fs import file_digest
from agent.bundle import Keyring, SigningKey
from agent.protocol import InferChunk, InferRequest, InstallRequest, StatusRequest
from fleet.serve import BundleServer

pytestmark = pytest.mark.integration

openai = need_module("openai", "the HTTP API tests drive the official openai client "
                               "(pip install -e '.[dev]')")

DEV = "dev-http"
KEY = "sk-edgepack-test-" + "k" * 16
COUNTING = "1, 2, 3, 4,"  # a base model counts on and on: long, predictable generations


# --- the shared agent ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, agent_bundles) -> dict[str, Path]:
    """agent_bundles' v1 and v2 (the sample Q4_K_M GGUF) re-signed with Gemma's chat template.

    The PyPI GGUF carries no template, so its bundles can only complete text; the chat endpoint
    formats with the bundle's template (a bundle without one is answered 400)."""
    from packager.bundler import read_manifest, write_bundle
    from packager.sample import GEMMA3_CHAT_TEMPLATE

    d = tmp_path_factory.mktemp("http-bundles")
    key = SigningKey.generate("http-tests")
    gguf = d / "model.gguf"
    with tarfile.open(agent_bundles["v1"]) as tar, open(gguf, "wb") as out:
        src = tar.extractfile("model.gguf")
        assert src is not None
        shutil.copyfileobj(src, out, 1 << 20)
    out_paths: dict[str, Path] = {}
    for v in (1, 2):
        m = read_manifest(agent_bundles[f"v{v}"])
        m.generation = {**m.generation, "chat_template": GEMMA3_CHAT_TEMPLATE}
        m.signer_key_id = key.key_id
        out_paths[f"v{v}"] = d / f"chat-v{v}.bundle"
        write_bundle(out_paths[f"v{v}"], m, key, {"model.gguf": gguf})
    gguf.unlink()
    out_paths["keyring"] = d / "keyring.json"
    out_paths["keyring"].write_bytes(Keyring([key.public]).to_bytes())
    return out_paths


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory) -> Iterator[Broker]:
    """The ``broker`` fixture's mosquitto, for the whole module (one agent serves every test)."""
    need(mosquitto_binary() is not None, "mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def host(module_broker) -> Iterator[Host]:
    h = Host(module_broker.url)
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(bundles) -> Iterator[BundleServer]:
    with BundleServer(bundles["v1"].parent) as s:
        yield s


def install(host: Host, server: BundleServer, bundle: Path, timeout: float = 180.0) -> dict[str, Any]:
    digest, size = file_digest(bundle)
    r = host.requests.call(DEV, "install", InstallRequest(url=server.url_for(bundle.name),
                                                          sha256=digest, size=size), timeout=timeout)
    assert r.ok, r.error
    return r.result or {}


@pytest.fixture(scope="module")
def agent(tmp_path_factory, module_broker, host, server, bundles) -> Iterator[AgentProcess]:
    work = tmp_path_factory.mktemp("http-agent")
    key_file = work / "http.key"
    key_file.write_text(KEY + "\n")
    a = AgentProcess(work / "state", bundles["keyring"], module_broker.url, device=DEV,
                     extra=("--http", "0", "--http-key-file", str(key_file), "--queue", "1",
                            "--no-gate")).start()
    try:
        host.wait_for(DEV, "state", lambda m: m["state"] == "online", timeout=30)
        install(host, server, bundles["v1"])
    except AssertionError:
        a.stop()
        raise AssertionError(a.tail()) from None
    yield a
    a.stop()


@pytest.fixture(scope="module")
def port(agent) -> int:
    agent.wait_log("http: listening on ")
    m = re.search(r"http: listening on http://127\.0\.0\.1:(\d+)", agent.log.read_text())
    assert m, agent.tail()
    return int(m.group(1))


@pytest.fixture(scope="module")
def client(port) -> Any:
    # No retries: a 429 or a dropped connection must surface here, not be retried away.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0,
                         timeout=120.0)


def health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_idle(port: int, timeout: float = 60.0) -> dict[str, Any]:
    """Health once nothing runs and nothing waits (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(port)
        if not h["busy"] and h["queue"] == 0:
            return h
        assert time.monotonic() < deadline, f"still busy after {timeout}s: {h}"
        time.sleep(0.05)


def wait_health(port: int, pred, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not pred(h := health(port)):
        assert time.monotonic() < deadline, f"health never matched within {timeout}s: {h}"
        time.sleep(0.02)
    return h


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                       "Content-Type": "application/json",
                                                       **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        conn.close()


def long_stream(client: Any) -> Any:
    """A completion stream that runs for a long while (the caller closes it)."""
    return client.completions.create(model="any", prompt=COUNTING, max_tokens=1000,
                                     temperature=0, stream=True)


# --- serving ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_lists_the_current_bundle(client):
    models = client.models.list().data
    assert len(models) == 1
    m = models[0].model_dump()
    assert m["id"] == m["model"] == "gemma-3-270m" and m["object"] == "model"
    assert (m["version"], m["quant"], m["runtime"], m["context"]) == (1, "Q4_K_M", "llamacpp", 1024)
    assert client.models.retrieve("gemma-3-270m").id == "gemma-3-270m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.slow
def test_chat_non_streaming_with_a_conversation(client):
    r = client.chat.completions.create(
        model="whatever-the-app-says", temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "You answer in one short sentence."},
                  {"role": "user", "content": "Hello!"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Name a fruit that is yellow."}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "gemma-3-270m" and "-v1-" in r.system_fingerprint
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 30 and 0 < u.completion_tokens <= 24  # the whole conversation was read
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


@pytest.mark.slow
def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model="m", temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Write one sentence about the sea."}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens > 0  # the usage chunk
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.slow
def test_completions_streaming_and_not(client):
    r = client.completions.create(model="m", prompt=COUNTING, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text.startswith(" 5, 6") and r.usage.completion_tokens == 12
    parts = []
    for c in client.completions.create(model="m", prompt=COUNTING, max_tokens=12, temperature=0,
                                       stream=True):
        parts.append(c.choices[0].text)
        last = c
    assert "".join(parts) == r.choices[0].text  # greedy: the same answer either way
    assert last.choices[0].finish_reason == "length" and len(parts) > 2  # streamed, not one blob


@pytest.mark.slow
def test_stop_sequences_end_the_answer(client):
    r = client.completions.create(model="m", prompt=COUNTING, max_tokens=40, temperature=0,
                                  stop=[", 8", "never"])
    assert r.choices[0].text == " 5, 6, 7" and r.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=COUNTING, max_tokens=40, temperature=0, stop=", 7", stream=True))
    assert text == " 5, 6"


@pytest.mark.slow
def test_a_client_gone_mid_stream_frees_the_model(client, port, host):
    before = health(port)["counters"]["http_disconnects"]
    stream = long_stream(client)
    it = iter(stream)
    got = [next(it), next(it)]
    assert all(c.choices[0].text is not None for c in got)
    stream.close()  # the client goes away mid-generation
    h = wait_idle(port, timeout=30)
    assert h["counters"]["http_disconnects"] == before + 1
    assert h["last_usage"]["finish_reason"] == "cancelled" and h["last_usage"]["completion_tokens"] < 1000
    # The next request is served, and both doors see an empty queue.
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2).choices[0].text is not None
    status = host.requests.call(DEV, "status", StatusRequest(), timeout=30).result
    assert status["queue"] == 0 and not status["busy"]


@pytest.mark.slow
def test_one_queue_for_both_doors_429_when_full(client, port, host):
    # --queue 1: one HTTP stream runs, one MQTT request waits, the next is refused by either door.
    stream = long_stream(client)
    it = iter(stream)
    next(it)
    with host.requests.request(DEV, "infer", InferRequest(prompt="Hello", max_tokens=4),
                               timeout=120) as queued:
        wait_health(port, lambda h: h["queue"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="m", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full"
        with host.requests.request(DEV, "infer", InferRequest(prompt="Hi", max_tokens=2),
                                   timeout=30) as refused:
            busy = InferChunk.from_bytes(refused.get().payload)
        assert busy.done and busy.error["code"] == "busy"
        stream.close()  # the running stream ends; the queued MQTT request is served
        chunks = [InferChunk.from_bytes(queued.get().payload)]
        while not chunks[-1].done:
            chunks.append(InferChunk.from_bytes(queued.get().payload))
    assert not chunks[-1].error and chunks[-1].usage["completion_tokens"] > 0
    h = wait_idle(port)
    assert h["counters"]["busy"] >= 2  # one counter for both doors


@pytest.mark.slow
def test_an_install_during_a_stream_swaps_the_model_after_it(client, port, host, server, bundles,
                                                             agent):
    wait_idle(port)
    host.clear(DEV, "events")
    n = 600
    stream = client.completions.create(model="m", prompt=COUNTING, max_tokens=n, temperature=0,
                                       stream=True)
    it = iter(stream)
    first = next(it)
    assert "-v1-" in first.system_fingerprint
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(install(host, server, bundles["v2"])))
    t.start()
    try:
        # The switch happens while the old model still generates: the new one waits for the lock.
        host.wait_for(DEV, "events", lambda m: m["stage"] == "installed", timeout=120)
        assert health(port)["busy"], "the stream ended before the install switched: raise n"
        assert client.models.list().data[0].model_dump()["version"] == 2  # current is v2 already
        chunks = [first, *it]
    finally:
        t.join(180)
    assert {c.system_fingerprint for c in chunks} == {first.system_fingerprint}
    assert chunks[-1].choices[0].finish_reason == "length"  # it finished, on the old model
    assert result["installed"]["version"] == 2
    r = client.completions.create(model="m", prompt=COUNTING, max_tokens=4, temperature=0)
    assert "-v2-" in r.system_fingerprint and r.choices[0].text.startswith(" 5")


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_agent_keeps_serving(client, port):
    cases = [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_json"),
        (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens", "invalid_type"),
        (json.dumps({"prompt": "x", "temperature": 9}).encode(), 400, "temperature", "invalid_value"),
        (json.dumps({"prompt": 3}).encode(), 400, "prompt", "invalid_type"),
        (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n", "unsupported_value"),
        (json.dumps({"prompt": "x", "typo_tokens": 2}).encode(), 400, "typo_tokens", "unknown_parameter"),
        (b'{"prompt": "' + b"a" * (300 << 10) + b'"}', 413, None, "request_too_large"),
    ]
    for body, status, param, code in cases:
        got, _, err = post(port, "/v1/completions", body)
        assert got == status, (body[:40], err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, err
        assert (err["error"]["param"], err["error"]["code"]) == (param, code), err
    # The same through the client: wrong types surface as BadRequestError naming the field.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "tool", "content": "x",
                                                             "tool_call_id": "1"}])
    assert e.value.body["param"] == "messages[0].role"
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2).usage.completion_tokens > 0


@pytest.mark.slow
def test_the_bearer_key_is_required_on_v1_but_not_on_health(client, port):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=b'{"prompt": "x"}')  # no Authorization
        r = conn.getresponse()
        assert r.status == 401 and r.getheader("WWW-Authenticate") == "Bearer"
        assert json.loads(r.read())["error"]["code"] == "invalid_api_key"
    finally:
        conn.close()
    h = health(port)
    assert h["ready"] and h["model_loaded"] and h["current"]["model"] == "gemma-3-270m"
    assert client.models.list().data  # positive control: the right key


@pytest.mark.slow
def test_a_bare_port_listens_on_loopback_only(agent, port):
    listening = [c for c in psutil.Process(agent.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert [c.laddr.port for c in listening] == [port], listening
    assert all(c.laddr.ip == "127.0.0.1" for c in listening), listening


# --- the socket limits, in-process without a model ----------------------------------------------------


@pytest.fixture
def bare_api() -> Iterator[Any]:
    """HttpApi over a real InferenceServer with nothing installed; small limits."""
    from agent.http_api import HttpApi, HttpConfig
    from agent.resident import ResidentModel
    from agent.serving import InferenceServer

    serving = InferenceServer(ResidentModel(), lambda: None, queue_size=1)
    serving.start()
    api = HttpApi(HttpConfig(port=0, read_timeout=0.5, max_connections=2, poll_interval=0.02),
                  serving, lambda: None, lambda: {"ready": False, "status": "no_model"})
    api.start()
    yield api
    api.stop()
    serving.stop()


def test_without_a_model_generation_is_503_and_health_says_not_ready(bare_api):
    port = bare_api.address[1]
    status, _, err = post(port, "/v1/completions", b'{"prompt": "Hi"}')
    assert status == 503 and err["error"]["code"] == "model_not_loaded"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 503 and json.loads(r.read())["ready"] is False
    conn.close()


def test_a_slow_sender_is_cut_off_at_the_read_deadline(bare_api):
    port = bare_api.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for _ in range(40):  # one header byte every 0.1 s would take 4 s: past the deadline
                s.sendall(b"X")
                time.sleep(0.1)
        s.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while s.recv(4096):
                pass
        assert time.monotonic() - t0 < 2.5  # closed at the 0.5 s deadline, not after the drip


def test_connections_past_the_limit_are_refused_with_503(bare_api):
    port = bare_api.address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.1)  # both accepted and held by their handler threads
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 503 and json.loads(r.read())["error"]["code"] == "too_many_connections"
        conn.close()
    finally:
        for s in idle:
            s.close()
    time.sleep(0.7)  # the idle ones hit their read deadline; their threads are free again
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "no_model"  # served by a handler
    conn.close()
