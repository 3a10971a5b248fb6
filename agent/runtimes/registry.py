"""The registry's data: what edgepack knows about each runtime without importing it.

Pure data with no imports of the plugins or the runtime base, so the profile schema, the probe and
the runtime base can all read it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from agent.errors import RuntimeUnavailableError


@dataclass(frozen=True)
class RuntimeInfo:
    """What edgepack knows about one runtime without importing it."""

    name: str  # as a manifest and a profile name it: "llamacpp"
    format: str  # the bundle format it serves: "gguf"
    module: str  # importing this proves the runtime can run here: "llama_cpp"
    # pip distributions providing the module; the first one installed gives the version
    distributions: tuple[str, ...]
    package: str  # what a person installs, for messages: "llama-cpp-python"
    plugin: str  # "module:Class" of the Runtime subclass

    @property
    def install_hint(self) -> str:
        return f"pip install 'edgepack[{self.name}]'"


RUNTIMES: Final[dict[str, RuntimeInfo]] = {
    info.name: info
    for info in (
        RuntimeInfo("llamacpp", "gguf", "llama_cpp", ("llama-cpp-python",), "llama-cpp-python",
                    "agent.runtimes.llamacpp:LlamaCppRuntime"),
        RuntimeInfo("ortgenai", "onnx", "onnxruntime_genai",
                    ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml"),
                    "onnxruntime-genai", "agent.runtimes.ortgenai:OrtGenAIRuntime"),
        # The runtime is openvino-genai (LLMPipeline); plain openvino alone cannot serve a model.
        RuntimeInfo("openvino", "openvino-ir", "openvino_genai", ("openvino-genai",), "openvino-genai",
                    "agent.runtimes.openvino:OpenVINORuntime"),
    )
}


def runtime_info(name: str) -> RuntimeInfo:
    """The registry entry for ``name``.

    Raises:
        RuntimeUnavailableError: the name is unknown (the message lists the known ones).
    """
    info = RUNTIMES.get(name)
    if info is None:
        raise RuntimeUnavailableError(
            f"unknown runtime {name!r} (known: {', '.join(sorted(RUNTIMES))})", runtime=str(name))
    return info


__all__ = ["RUNTIMES", "RuntimeInfo", "runtime_info"]
