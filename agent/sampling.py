"""The one set of sampling defaults and limits, shared by the CLI, the protocol and the runtimes.

A request over MQTT, a flag of ``edgepack-agent infer`` and a :class:`~agent.runtimes.GenerationParams`
built in code all start from :data:`DEFAULTS` and are held to :data:`LIMITS`, so the three can never
disagree on what "the default temperature" is or on which values are allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Limit:
    """An allowed closed range ``[lo, hi]`` (``lo_open``: ``(lo, hi]``) and whether it is integral."""

    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False

    def admits(self, value: object) -> bool:
        """Whether ``value`` is of the right kind and inside the range (bool is never a number)."""
        if isinstance(value, bool):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.lo_open and value == self.lo:
            return False
        return self.lo <= value <= self.hi

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo = "(" if self.lo_open else "["
        return f"{kind} in {lo}{_fmt(self.lo)}, {_fmt(self.hi)}]"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


MAX_SEED: Final = (1 << 32) - 1  # llama.cpp and friends take a uint32 seed
MAX_STOP_STRINGS: Final = 8
MAX_STOP_CHARS: Final = 64


@dataclass(frozen=True)
class Defaults:
    """What a generation uses when the caller does not say."""

    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    # Base models loop without a repetition penalty; 1.1 keeps them coherent and barely touches
    # chat models (llama.cpp's server used the same value for years).
    repeat_penalty: float = 1.1
    # Generations end at the model's end-of-sequence token; only a benchmark that needs a fixed
    # token count (the post-install gate) goes on through it.
    ignore_eos: bool = False


DEFAULTS: Final = Defaults()

LIMITS: Final[dict[str, Limit]] = {
    "max_tokens": Limit(1, 4096, integer=True),
    "temperature": Limit(0.0, 2.0),
    "top_p": Limit(0.0, 1.0, lo_open=True),
    "top_k": Limit(0, 1000, integer=True),
    "repeat_penalty": Limit(0.5, 2.0),
    "seed": Limit(0, MAX_SEED, integer=True),
}

__all__ = ["DEFAULTS", "LIMITS", "MAX_SEED", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "Defaults", "Limit"]
