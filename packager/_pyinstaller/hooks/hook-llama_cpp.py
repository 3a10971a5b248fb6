"""llama-cpp-python: the libraries ``llama_cpp.llama_cpp`` ctypes-loads from its package folder.

Collected by the names the loader asks for: ``libllama.so`` (ctypes opens that path) and the
SONAMEs its dependencies are found by (``libggml.so.0``, ``libggml-base.so.0``, and
``libggml-cpu.so.0`` in a one-CPU build). The wheel holds every library three times
(``x.so``, ``x.so.0``, ``x.so.0.25.3``, copies, not links): two thirds of it would be dead weight.
A ``GGML_BACKEND_DL`` build's CPU variants (``libggml-cpu-<variant>.so``, which ggml installs to
the wheel's ``bin/``) go next to them, where the runtime hook has ggml pick the best one.
libmtmd (multimodal) and the HTTP server are left out: the agent serves text models itself.

The ``sapphirerapids`` variant (the only one with AMX) is left out too: in llama-cpp-python 0.3.36
its AMX matmul dies with SIGILL at ``tilezero`` in an OpenMP worker on a Sapphire Rapids host
that grants AMX (arch_prctl XTILEDATA succeeds); llama.cpp's open PR #26954 explains it (the tile
configuration is optimised away; worker threads never request XTILEDATA). Without it ggml picks
``zen4`` there (AVX512 VBMI/VNNI/BF16), which runs. Revisit when the pin moves.
"""

from pathlib import Path

from PyInstaller.utils.hooks import copy_metadata, get_package_paths

_site, _pkg = get_package_paths("llama_cpp")
_lib = Path(_pkg) / "lib"
_NAMES = ("libllama.so", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0")

binaries = [(str(_lib / n), "llama_cpp/lib") for n in _NAMES if (_lib / n).is_file()]
_LEFT_OUT = ("libggml-cpu-sapphirerapids.so",)

binaries += [(str(p), "llama_cpp/lib") for p in sorted((Path(_site) / "bin").glob("libggml-cpu-*.so"))
             if p.name not in _LEFT_OUT]
excludedimports = ["llama_cpp.server", "llama_cpp.mtmd_cpp", "llama_cpp.llava_cpp", "llama_cpp._ggml"]
# The probe reads the runtime's version from its dist-info folder.
datas = copy_metadata("llama-cpp-python")
