"""Inference runtimes: one contract (:class:`Runtime`), plugins found through a registry.

The registry maps a runtime name (as a bundle manifest names it) to ``"module:Class"`` and imports the
module only when asked, so importing :mod:`agent.runtimes` never imports a runtime library
(llama_cpp, onnxruntime_genai, openvino_genai). Add a runtime by adding one entry to
:data:`RUNTIMES`; nothing else branches on runtime names.
"""

from __future__ import annotations

import importlib

from agent.errors import RuntimeUnavailableError
from agent.runtimes.base import (
    Chunk,
    GenerationParams,
    LoadOptions,
    NllResult,
    Runtime,
    StreamStats,
    Usage,
)

# name -> "module:Class"; the module is imported lazily by get_runtime().
RUNTIMES: dict[str, str] = {
    "llamacpp": "agent.runtimes.llamacpp:LlamaCppRuntime",
    "ortgenai": "agent.runtimes.ortgenai:OrtGenAIRuntime",
    "openvino": "agent.runtimes.openvino:OpenVINORuntime",
}


def get_runtime(name: str) -> type[Runtime]:
    """The Runtime class registered under ``name`` (its library is not imported yet).

    Args:
        name: A runtime name, e.g. ``"llamacpp"``.

    Returns:
        The Runtime subclass.

    Raises:
        RuntimeUnavailableError: The name is unknown (the message lists the known ones).
    """
    target = RUNTIMES.get(name)
    if target is None:
        known = ", ".join(sorted(RUNTIMES))
        raise RuntimeUnavailableError(
            f"unknown runtime {name!r} (known: {known})", runtime=str(name)
        )
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise TypeError(f"registry entry {target!r} is not a Runtime subclass")
    return cls


def viable_runtimes() -> dict[str, str | None]:
    """Which registered runtimes can run here.

    Returns:
        name -> None when viable, else the reason it is not (from ``check()``).
    """
    result: dict[str, str | None] = {}
    for name in RUNTIMES:
        try:
            get_runtime(name).check()
        except RuntimeUnavailableError as e:
            result[name] = str(e)
        else:
            result[name] = None
    return result


__all__ = [
    "RUNTIMES",
    "Chunk",
    "GenerationParams",
    "LoadOptions",
    "NllResult",
    "Runtime",
    "StreamStats",
    "Usage",
    "get_runtime",
    "viable_runtimes",
]
