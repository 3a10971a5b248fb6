"""One fake Runtime for the pure-logic unit tests (the base class, the gate, the resident model).

Each word of the prompt is one token. Class attributes steer it: ``fail_in`` names a hook that
raises ("load", "stream", "nll", "close"), ``delay`` paces each token, ``words`` caps how many
tokens a generation yields (0: none); ``loads`` and ``closes`` record what happened. Reset with
:func:`reset`. It stands in for a model only where the logic under test is ours, never for a real
runtime's behaviour (the contract suite runs the real ones).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

from agent.runtimes import GenerationParams, LoadOptions, NllResult, Runtime, StreamStats
from agent.runtimes.base import nll_result


class FakeRuntime(Runtime):
    name: ClassVar[str] = "fake"
    fail_in: ClassVar[str] = ""
    delay: ClassVar[float] = 0.0
    words: ClassVar[int | None] = None
    loads: ClassVar[list[str]] = []
    closes: ClassVar[list[str]] = []

    @classmethod
    def check(cls, device: str = "cpu") -> None:
        return None  # a fake has no library to import

    @classmethod
    def _describe(cls) -> dict[str, Any]:
        return {"version": "0", "devices": ["cpu"]}

    def _load(self, model_path: Path, options: LoadOptions) -> None:
        if self.fail_in == "load":
            raise ValueError("corrupt header")
        self.loads.append(model_path.name)

    def _stream(self, prompt: str, params: GenerationParams, *,
                chat: bool) -> Generator[str, None, StreamStats]:
        words = prompt.split()
        if self.words is not None:
            words = words[: self.words]
        n = 0
        for word in words[: params.max_tokens]:
            if self.fail_in == "stream":
                raise RuntimeError("decode failed")
            if self.delay:
                time.sleep(self.delay)
            n += 1
            yield word + " "
            if self._cancel_event.is_set():
                break
        return StreamStats(prompt_tokens=len(words), completion_tokens=n, finish_reason="length")

    def _evaluate_nll(self, text: str, window: int) -> NllResult:
        if self.fail_in == "nll":
            raise MemoryError("out of memory")
        return nll_result(2.0 * len(text.split()), len(text.split()), None)

    def _close(self) -> None:
        if self.fail_in == "close":
            raise OSError("munmap failed")
        self.closes.append("x")


def reset() -> None:
    FakeRuntime.fail_in = ""
    FakeRuntime.delay = 0.0
    FakeRuntime.words = None
    FakeRuntime.loads = []
    FakeRuntime.closes = []
