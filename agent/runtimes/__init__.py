"""Inference runtimes: one contract (:class:`Runtime`), plugins found through one registry.

:data:`RUNTIMES` is the only place that knows the runtimes: for each, the bundle format it serves,
the module whose import proves it can run, the pip distributions that provide it, the edgepack
extra that installs it and the plugin class. The probe, the profile schema, the packager and the
agent all ask it; nothing else branches on runtime names. Importing this package never imports a
runtime library (llama_cpp, onnxruntime_genai, openvino_genai): :func:`get_runtime` imports the
plugin module, and the plugin imports its library only when it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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
from agent.runtimes.registry import RUNTIMES, RuntimeInfo, runtime_info

if TYPE_CHECKING:
    from agent.bundle import Manifest


def get_runtime(name: str) -> type[Runtime]:
    """The Runtime class registered under ``name`` (its library is not imported yet).

    Args:
        name: A runtime name, e.g. ``"llamacpp"``.

    Returns:
        The Runtime subclass.

    Raises:
        RuntimeUnavailableError: The name is unknown (the message lists the known ones).
    """
    module_name, _, class_name = runtime_info(name).plugin.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise TypeError(f"registry entry {name!r} is not a Runtime subclass")
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


def runtime_for(manifest: Manifest, *, threads: int | None = None) -> tuple[Runtime, LoadOptions]:
    """The runtime that serves a bundle, and how to load it, from the bundle's manifest alone.

    Args:
        manifest: the verified manifest (``target.runtime``, ``target.device``, ``generation``).
        threads: overrides the manifest's thread count (None: the manifest's; 0: physical cores).

    Returns:
        A fresh, unloaded runtime instance and its load options.

    Raises:
        RuntimeUnavailableError: the runtime is unknown, or cannot run here on the bundle's device
            (the message names what to install).
        InferenceError: the manifest's generation settings are out of range.
    """
    gen = manifest.generation
    cls = get_runtime(manifest.target.runtime)
    cls.check(manifest.target.device)
    opts = LoadOptions(
        context=int(gen.get("context", 2048)),
        threads=int(threads if threads is not None else gen.get("threads", 0)),
        chat_template=gen.get("chat_template") or None,
        device=manifest.target.device,
    )
    return cls(), opts


__all__ = [
    "RUNTIMES",
    "Chunk",
    "GenerationParams",
    "LoadOptions",
    "NllResult",
    "Runtime",
    "RuntimeInfo",
    "StreamStats",
    "Usage",
    "get_runtime",
    "runtime_for",
    "runtime_info",
    "viable_runtimes",
]
