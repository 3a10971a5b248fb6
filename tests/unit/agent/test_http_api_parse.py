"""The HTTP door's pure parts: OpenAI request bodies mapped onto ours (or refused with the field
named), the answers' shapes, error mapping, the listen address and the key file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent._openai_compat import (
    Answer,
    ApiError,
    failure,
    fingerprint,
    parse_chat,
    parse_completion,
    usage_body,
)
from agent.errors import EdgepackError, InferenceError
from agent.http_api import HttpConfig, parse_listen, read_key_file
from agent.runtimes import GenerationParams, Runtime, StreamStats
from agent.runtimes.base import chat_messages
from agent.sampling import DEFAULTS

ROOT = Path(__file__).resolve().parents[3]
USER = [{"role": "user", "content": "Hi"}]


def chat(**body: Any):
    return parse_chat({"model": "gpt-4o", "messages": USER, **body}, "chatcmpl-1")


def refused(fn, body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(body, "id-1")
    assert e.value.status == 400
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    return e.value


def test_a_bare_chat_request_takes_our_shared_defaults():
    call = chat()
    r = call.request
    assert (call.kind, call.stream, call.include_usage) == ("chat", False, False)
    assert r.chat and r.prompt == "Hi" and r.request_id == "chatcmpl-1"
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.repeat_penalty, r.stop, r.seed) == (
        DEFAULTS.max_tokens, DEFAULTS.temperature, DEFAULTS.top_p, DEFAULTS.top_k,
        DEFAULTS.repeat_penalty, (), None)
    assert call.messages == ({"role": "user", "content": "Hi"},)


def test_sampling_fields_are_mapped():
    call = chat(max_completion_tokens=33, temperature=0, top_p=0.5, top_k=7, repeat_penalty=1.3,
                seed=42, stop="END", stream=True, stream_options={"include_usage": True}, n=1,
                frequency_penalty=0, presence_penalty=0.0, user="u", metadata={"a": "b"},
                store=False, logprobs=False, tools=[], tool_choice="none",
                response_format={"type": "text"})
    r = call.request
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.repeat_penalty, r.seed) == (
        33, 0.0, 0.5, 7, 1.3, 42)
    assert r.stop == ("END",) and call.stream and call.include_usage
    assert chat(max_tokens=9).request.max_tokens == 9
    assert chat(max_tokens=9, max_completion_tokens=9).request.max_tokens == 9
    assert chat(stop=["a", "b"], temperature=None, seed=None).request.stop == ("a", "b")


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": 5000}, "max_tokens", "invalid_value"),
    ({"max_tokens": "8"}, "max_tokens", "invalid_type"),
    ({"max_tokens": True}, "max_tokens", "invalid_type"),
    ({"max_tokens": 8, "max_completion_tokens": 9}, "max_tokens", "invalid_value"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens", "invalid_type"),
    ({"temperature": 2.5}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"top_k": -1}, "top_k", "invalid_value"),
    ({"repeat_penalty": 3}, "repeat_penalty", "invalid_value"),
    ({"seed": -1}, "seed", "invalid_value"),
    ({"stop": 3}, "stop", "invalid_type"),
    ({"stop": ["ok", ""]}, "stop[1]", "invalid_value"),
    ({"stop": ["x"] * 9}, "stop", "array_above_max_length"),
    ({"stop": "y" * 65}, "stop", "invalid_value"),
    ({"n": 2}, "n", "unsupported_value"),
    ({"n": True}, "n", "unsupported_value"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_value"),
    ({"presence_penalty": -1}, "presence_penalty", "unsupported_value"),
    ({"logprobs": True}, "logprobs", "unsupported_value"),
    ({"top_logprobs": 3}, "top_logprobs", "unsupported_value"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "unsupported_value"),
    ({"tools": [{"type": "function"}]}, "tools", "unsupported_value"),
    ({"tool_choice": "auto"}, "tool_choice", "unsupported_value"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_value"),
    ({"stream": "yes"}, "stream", "invalid_type"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_type"),
    ({"stream_options": {"chunk": 1}}, "stream_options.chunk", "unknown_parameter"),
    ({"model": 7}, "model", "invalid_type"),
    ({"max_tokns": 8}, "max_tokns", "unknown_parameter"),
    ({"min_p": 0.1}, "min_p", "unknown_parameter"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unknown_parameter"),
])
def test_chat_refusals_name_the_field(body, param, code):
    e = refused(parse_chat, {"messages": USER, **body})
    assert (e.param, e.code) == (param, code), str(e)
    assert param.split("[")[0].split(".")[0] in str(e)


@pytest.mark.parametrize(("messages", "param"), [
    (None, "messages"),
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": "a", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "a", "audio": {}}], "messages[0].audio"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages[1]"),
    ([{"role": "user", "content": ""}], "messages[0]"),
    ([{"role": "user", "content": "x" * 40_000}], "messages"),
])
def test_bad_messages_are_refused(messages, param):
    body = {} if messages is None else {"messages": messages}
    assert refused(parse_chat, body).param == param


def test_messages_roles_parts_and_names():
    call = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Two"},
                                                    {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": []},
        {"role": "user", "content": "Last"}])
    assert call.messages == ({"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Two\nparts"},
                             {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "Last"})
    assert call.request.prompt == "Last"


def test_completions_map_and_refuse():
    call = parse_completion({"model": "m", "prompt": ["Once"], "max_tokens": 5, "echo": False,
                             "best_of": 1, "suffix": "", "logprobs": None}, "cmpl-1")
    assert call.kind == "completion" and call.messages is None
    assert (call.request.prompt, call.request.chat, call.request.max_tokens) == ("Once", False, 5)
    for body, param in [({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": [1, 2]}, "prompt"),
                        ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
                        ({"prompt": "a", "logprobs": 0}, "logprobs"),
                        ({"prompt": "a", "best_of": 2}, "best_of"),
                        ({"prompt": "a", "suffix": "z"}, "suffix"),
                        ({"prompt": "a", "messages": USER}, "messages"),
                        ({"prompt": "a", "max_completion_tokens": 3}, "max_completion_tokens")]:
        assert refused(parse_completion, body).param == param, body


def test_answers_have_openai_shapes():
    a = Answer("chat", "chatcmpl-1", 1700000000, "gemma", fingerprint("gemma", 2, "ab" * 32))
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "ttft_ms": 12.5, "decode_tok_s": 50.0,
             "finish_reason": "length"}
    body = a.body("Hello", usage)
    assert body["object"] == "chat.completion" and body["system_fingerprint"] == "gemma-v2-abababababab"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    first = a.chunk("", role=True, with_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert a.chunk(None, finish="stop")["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                          "finish_reason": "stop"}
    assert a.usage_chunk(usage)["choices"] == [] and a.usage_chunk(usage)["usage"]["total_tokens"] == 8
    c = Answer("completion", "cmpl-1", 1, "gemma", "f")
    assert c.body("x", usage)["choices"][0]["text"] == "x" and c.chunk("y")["object"] == "text_completion"
    assert c.body("x", {**usage, "finish_reason": "cancelled"})["choices"][0]["finish_reason"] is None
    assert usage_body(None) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(("code", "message", "status", "api_code"), [
    ("no_model", "no bundle is installed on this device", 503, "model_not_loaded"),
    ("runtime_unavailable", "llama-cpp-python is not installed", 503, "runtime_unavailable"),
    ("inference_failed", "prompt of 2000 tokens does not fit the context of 1024", 400,
     "context_length_exceeded"),
    ("inference_failed", "this model has no chat template; pass ...", 400, "chat_template_missing"),
    ("inference_failed", "llamacpp: generation failed: boom", 500, "inference_failed"),
    ("internal", "internal error: x", 500, "internal"),
])
def test_generation_failures_map_to_http(code, message, status, api_code):
    e = failure(code, message, "chat")
    assert (e.status, e.code) == (status, api_code)


@pytest.mark.parametrize(("value", "expected"), [
    ("8000", ("127.0.0.1", 8000)), (":8000", ("127.0.0.1", 8000)), ("0", ("127.0.0.1", 0)),
    ("127.0.0.1:8000", ("127.0.0.1", 8000)), ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:8000", ("::1", 8000)), ("localhost:9", ("localhost", 9)),
])
def test_listen_addresses(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["", "host", "host:", "host:70000", "::1:80", "a:b"])
def test_bad_listen_addresses(value):
    with pytest.raises(EdgepackError):
        parse_listen(value)


def test_key_file(tmp_path):
    f = tmp_path / "key"
    f.write_text("  sk-abc123\n")
    assert read_key_file(f) == "sk-abc123"
    for bad in ("", "two words", "é" * 3, "x" * 5000):
        f.write_text(bad)
        with pytest.raises(EdgepackError):
            read_key_file(f)
    with pytest.raises(EdgepackError):
        read_key_file(tmp_path / "missing")
    with pytest.raises(EdgepackError):
        HttpConfig(api_key="has space")


def test_the_daemon_imports_the_http_door_only_when_asked():
    r = subprocess.run([sys.executable, "-c", "import sys, agent.cli, agent.daemon; "
                        "print('agent.http_api' in sys.modules, 'http.server' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr



class _Echo(Runtime):
    """Records what its ``_stream`` hook was given (the chat contract the HTTP door relies on)."""

    name: ClassVar[str] = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    @classmethod
    def check(cls, device: str = "cpu") -> None:
        return None

    @classmethod
    def _describe(cls) -> dict[str, Any]:
        return {}

    def _load(self, model_path: Path, options: Any) -> None:
        return None

    def _stream(self, prompt: Any, params: Any, *, chat: bool) -> Generator[str, None, StreamStats]:
        self.seen.append(chat_messages(prompt) if chat else prompt)
        yield "ok"
        return StreamStats(1, 1, "stop")

    def _evaluate_nll(self, text: str, window: int) -> Any:
        raise NotImplementedError

    def _close(self) -> None:
        return None


def test_a_chat_prompt_may_be_a_whole_conversation(tmp_path):
    echo = _Echo()
    (tmp_path / "m").write_bytes(b"x")
    echo.load(tmp_path / "m")
    params = GenerationParams(max_tokens=2)
    convo = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    assert "".join(c.text for c in echo.stream(convo, params, chat=True)) == "ok"
    assert "".join(c.text for c in echo.stream("Hi", params, chat=True)) == "ok"
    assert echo.seen == [list(map(dict, convo)), [{"role": "user", "content": "Hi"}]]
    for bad, chat in [(convo, False), ((), True), ([{"role": "tool", "content": "x"}], True),
                      ([{"role": "user", "content": 3}], True), (b"hi", True)]:
        with pytest.raises(InferenceError):
            echo.stream(bad, params, chat=chat)
