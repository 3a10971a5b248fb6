"""The Runtime base class and the registry, with a tiny fake runtime (pure logic, no model)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fakeruntime import FakeRuntime, reset
from need import need_module

import agent.runtimes as runtimes
from agent.errors import InferenceError, RuntimeUnavailableError
from agent.runtimes import (
    GenerationParams,
    LoadOptions,
    Runtime,
    RuntimeInfo,
    get_runtime,
    viable_runtimes,
)
from agent.runtimes.base import nll_result, score_logits


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "m1.bin"
    p.write_bytes(b"weights")
    return p


@pytest.fixture(autouse=True)
def _reset_fake() -> None:
    reset()


# --- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"max_tokens": True},
        {"max_tokens": 1.5},
        {"temperature": -1.0},
        {"temperature": math.nan},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repeat_penalty": 0.0},
        {"stop": "END"},
        {"stop": ("ok", "")},
        {"seed": -1},
        {"seed": 2**32},
    ],
)
def test_bad_generation_params_raise_inference_error(bad: dict[str, Any]) -> None:
    with pytest.raises(InferenceError):
        GenerationParams(**bad)


def test_stop_list_is_stored_as_tuple() -> None:
    params = GenerationParams(stop=["\n\n", "END"])  # type: ignore[arg-type]
    assert params.stop == ("\n\n", "END")
    hash(params)


@pytest.mark.parametrize(
    "bad", [{"context": 8}, {"threads": -1}, {"chat_template": "  "}, {"device": ""}]
)
def test_bad_load_options_raise_inference_error(bad: dict[str, Any]) -> None:
    with pytest.raises(InferenceError):
        LoadOptions(**bad)


def test_zero_threads_resolves_to_a_positive_count() -> None:
    assert LoadOptions(threads=0).resolved_threads() >= 1
    assert LoadOptions(threads=3).resolved_threads() == 3


# --- lifecycle and wrapping -----------------------------------------------------------------


def test_stream_before_load_raises() -> None:
    with pytest.raises(InferenceError, match="no model loaded"):
        FakeRuntime().stream("a b", GenerationParams())


def test_stream_yields_text_then_exactly_one_done_chunk(model: Path) -> None:
    rt = FakeRuntime()
    rt.load(model)
    chunks = list(rt.stream("one two three", GenerationParams(max_tokens=2)))
    assert [c.text for c in chunks] == ["one ", "two ", ""]
    assert [c.done for c in chunks] == [False, False, True]
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.finish_reason) == (3, 2, "length")
    assert usage.ttft_ms >= 0 and usage.decode_tok_s > 0
    assert usage.to_dict()["finish_reason"] == "length"


def test_second_load_closes_the_first(model: Path, tmp_path: Path) -> None:
    other = tmp_path / "m2.bin"
    other.write_bytes(b"w2")
    rt = FakeRuntime()
    rt.load(model)
    rt.load(other)
    assert FakeRuntime.loads == ["m1.bin", "m2.bin"]
    assert len(FakeRuntime.closes) == 1, "the first model is closed before the second loads"
    assert rt.model_path == other


def test_failed_load_leaves_nothing_resident(model: Path) -> None:
    rt = FakeRuntime()
    rt.load(model)
    FakeRuntime.fail_in = "load"
    with pytest.raises(InferenceError, match="corrupt header") as err:
        rt.load(model)
    assert isinstance(err.value.__cause__, ValueError)
    assert not rt.loaded
    assert len(FakeRuntime.closes) == 1


def test_missing_model_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="not found"):
        FakeRuntime().load(tmp_path / "nope.bin")


@pytest.mark.parametrize(
    ("hook", "cause"), [("stream", RuntimeError), ("nll", MemoryError), ("close", OSError)]
)
def test_foreign_exceptions_become_inference_error(model: Path, hook: str, cause: type) -> None:
    rt = FakeRuntime()
    rt.load(model)
    FakeRuntime.fail_in = hook
    with pytest.raises(InferenceError) as err:
        if hook == "stream":
            list(rt.stream("a b", GenerationParams()))
        elif hook == "nll":
            rt.evaluate_nll("a b")
        else:
            rt.close()
    assert isinstance(err.value.__cause__, cause)


def test_runtime_stays_usable_after_a_failed_stream(model: Path) -> None:
    rt = FakeRuntime()
    rt.load(model)
    FakeRuntime.fail_in = "stream"
    with pytest.raises(InferenceError):
        list(rt.stream("a b", GenerationParams()))
    FakeRuntime.fail_in = ""
    assert list(rt.stream("a", GenerationParams()))[-1].done


def test_concurrent_stream_is_refused(model: Path) -> None:
    rt = FakeRuntime()
    rt.load(model)
    first = rt.stream("a b c", GenerationParams())
    next(first)
    with pytest.raises(InferenceError, match="busy"):
        list(rt.stream("x", GenerationParams()))
    first.close()  # abandoning a stream releases the runtime
    assert list(rt.stream("x", GenerationParams()))[-1].done


def test_cancel_from_another_thread_reports_cancelled(model: Path) -> None:
    rt = FakeRuntime()
    rt.load(model)
    chunks = []
    for chunk in rt.stream(" ".join(["w"] * 100), GenerationParams(max_tokens=100)):
        chunks.append(chunk)
        if len(chunks) == 3:
            t = threading.Thread(target=rt.cancel)
            t.start()
            t.join()
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.finish_reason == "cancelled"
    assert usage.completion_tokens == 3
    # A cancel aimed at the finished generation does not cancel the next one.
    again = list(rt.stream("a b", GenerationParams()))
    assert again[-1].usage is not None and again[-1].usage.finish_reason == "length"


def test_context_manager_closes(model: Path) -> None:
    with FakeRuntime() as rt:
        rt.load(model)
    assert not rt.loaded
    assert len(FakeRuntime.closes) == 1


def test_evaluate_nll_validates_window(model: Path) -> None:
    rt = FakeRuntime()
    rt.load(model, LoadOptions(context=64))
    assert rt.evaluate_nll("a b c", window=63).tokens == 3
    for window in (0, 64, 2.5):
        with pytest.raises(InferenceError):
            rt.evaluate_nll("a b c", window=window)  # type: ignore[arg-type]
    with pytest.raises(InferenceError):
        rt.evaluate_nll("")


def test_load_on_unavailable_runtime_raises_runtime_unavailable(model: Path) -> None:
    class Missing(FakeRuntime):
        @classmethod
        def check(cls, device: str = "cpu") -> None:
            raise RuntimeUnavailableError("libfoo is not installed", runtime="missing")

    with pytest.raises(RuntimeUnavailableError, match="libfoo"):
        Missing().load(model)


# --- scoring ----------------------------------------------------------------------------------


def test_score_logits_matches_a_direct_softmax() -> None:
    np = need_module("numpy", "numpy not installed (comes with every runtime extra)")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((37, 1000)) * 8).astype(np.float32)
    targets = [int(t) for t in rng.integers(0, 1000, 37)]
    total, top1 = score_logits(logits, targets)
    x = logits.astype(np.float64)
    expected = -sum(
        x[i, t] - (x[i].max() + math.log(np.exp(x[i] - x[i].max()).sum())) for i, t in enumerate(targets)
    )
    assert total == pytest.approx(expected, rel=1e-12)
    assert top1 == [int(i) for i in x.argmax(axis=1)]


def test_nll_result_computes_perplexity() -> None:
    r = nll_result(6.0, 3, [1, 2, 3])
    assert (r.mean_nll, r.tokens, r.top1) == (2.0, 3, (1, 2, 3))
    assert r.perplexity == pytest.approx(math.exp(2.0))
    with pytest.raises(InferenceError):
        nll_result(0.0, 0, None)


# --- registry ----------------------------------------------------------------------------------


def test_unknown_runtime_lists_the_known_ones() -> None:
    with pytest.raises(RuntimeUnavailableError, match="llamacpp") as err:
        get_runtime("tensorrt")
    assert err.value.runtime == "tensorrt"


def test_viable_runtimes_maps_every_name_to_none_or_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runtimes.RUNTIMES, "fake", RuntimeInfo(
        "fake", "fake", "json", ("fake",), "fake", "fakeruntime:FakeRuntime"))
    result = viable_runtimes()
    assert set(result) == set(runtimes.RUNTIMES)
    assert result["fake"] is None
    assert all(v is None or (isinstance(v, str) and v) for v in result.values())


def test_registry_entries_resolve_to_runtime_classes() -> None:
    for name in runtimes.RUNTIMES:
        cls = get_runtime(name)
        assert issubclass(cls, Runtime) and cls.name == name


def test_importing_runtimes_does_not_import_llama_cpp() -> None:
    code = (
        "import sys, agent.runtimes as r; r.get_runtime('llamacpp'); "
        "sys.exit(1 if 'llama_cpp' in sys.modules else 0)"
    )
    root = Path(__file__).resolve().parents[4]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or "llama_cpp was imported"


def test_require_module_names_the_package_and_the_fix(tmp_path, monkeypatch) -> None:
    from agent.runtimes.base import require_module

    with pytest.raises(RuntimeUnavailableError, match=r"no-such-pkg is not installed \(pip x\)") as e:
        require_module("rt", "edgepack_no_such_module", "no-such-pkg", "pip x")
    assert e.value.hint == "pip x"
    # Installed, but its native library does not load (wrong ISA, missing libc).
    (tmp_path / "edgepack_broken_native.py").write_text("raise OSError('libfoo.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeUnavailableError, match="broken-pkg is installed but cannot load: libfoo"):
        require_module("rt", "edgepack_broken_native", "broken-pkg", "pip y")
    require_module("rt", "json", "json", "")  # importable: no error


def test_stop_strings_cut_across_pieces_and_never_show_the_stop() -> None:
    from agent.runtimes.base import StopStrings

    s = StopStrings(("\n\n", "END"))
    shown = [s.feed(p) for p in ("Hello E", "N", "ough\n", "\nmore")]
    # "E" and "EN" are held back until "ough" rules END out; "\n" until the second "\n" cuts.
    assert shown == ["Hello ", "", "ENough", ""] and s.hit
    assert s.feed("ignored") == "" and s.flush() == ""


def test_stop_strings_release_a_held_tail_at_the_end() -> None:
    from agent.runtimes.base import StopStrings

    s = StopStrings(("END",))
    assert s.feed("the EN") == "the " and not s.hit
    assert s.flush() == "EN" and s.flush() == ""
    assert StopStrings(()).feed("anything END") == "anything END"  # no stops: passed through
