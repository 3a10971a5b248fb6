"""Runs first in every frozen edgepack agent (a PyInstaller runtime hook), before ``agent.cli``.

(1) The binary's flavour comes from ``sys._MEIPASS/edgepack-binary.json`` (written at build time).
(2) A bundle of another runtime is refused naming the flavour it needs: the registry's install
    hint ("pip install 'edgepack[ortgenai]'", meaningless for a binary) is replaced, once
    ``agent.runtimes.registry`` is imported, by the ``edgepack agent-binary`` command to run.
(3) llama.cpp built with ``GGML_BACKEND_DL`` registers no CPU backend by itself, and
    llama-cpp-python 0.3.36 never calls ``ggml_backend_load_all`` (llama.cpp then refuses every
    model: "no backends are loaded"). So right after ``llama_cpp.llama_cpp`` has loaded libllama,
    the backends are loaded from its ``lib/`` folder: ggml scores every ``libggml-cpu-<variant>.so``
    against this CPU and keeps the best.
(2) and (3) happen when their module is first imported, so an idle agent loads nothing more.
"""

import ctypes
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_After = Callable[[ModuleType], None]


def _flavour() -> dict[str, Any]:
    try:
        path = os.path.join(getattr(sys, "_MEIPASS", ""), "edgepack-binary.json")
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError):  # a binary built without it behaves like the venv agent
        return {}


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, then runs ``after(module)``."""

    def __init__(self, inner: Any, after: _After) -> None:
        self._inner, self._after = inner, after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._after(module)

    def __getattr__(self, name: str) -> Any:  # get_code, get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """A post-import hook per module name: ``{name: after(module)}`` runs once the module has
    been executed (each ``after`` is idempotent, so a reload is harmless)."""

    def __init__(self, hooks: dict[str, _After]) -> None:
        self._hooks = dict(hooks)

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        after = self._hooks.get(name)
        if after is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _Loader(spec.loader, after)
        return spec


def _name_the_flavour(flavour: str) -> _After:
    def after(registry: ModuleType) -> None:
        cls = registry.RuntimeInfo
        pip_hint = cls.install_hint
        if getattr(pip_hint.fget, "_edgepack_flavour", None):
            return

        def install_hint(info: Any) -> str:
            if info.name == flavour:
                return pip_hint.fget(info)
            return (f"this edgepack-agent binary is the {flavour} flavour; {info.name} bundles "
                    f"need the {info.name} flavour: edgepack agent-binary --runtime {info.name}")

        install_hint._edgepack_flavour = flavour  # type: ignore[attr-defined]
        cls.install_hint = property(install_hint)

    return after


def _load_ggml_backends(module: ModuleType) -> None:
    lib = module._lib
    count = lib.ggml_backend_reg_count
    count.argtypes, count.restype = [], ctypes.c_size_t
    if count():  # a one-CPU build: its backend is linked in
        return
    load = lib.ggml_backend_load_all_from_path
    load.argtypes, load.restype = [ctypes.c_char_p], None
    load(os.fsencode(module._base_path))
    if not count():
        sys.stderr.write(f"edgepack-agent: no llama.cpp CPU backend in {module._base_path} loads "
                         "on this CPU\n")


def _install() -> None:
    info = _flavour()
    hooks: dict[str, _After] = {}
    if info.get("flavour"):
        hooks["agent.runtimes.registry"] = _name_the_flavour(info["flavour"])
    if info.get("llama_cpu") == "all-variants":
        hooks["llama_cpp.llama_cpp"] = _load_ggml_backends
    if hooks:
        sys.meta_path.insert(0, _AfterImport(hooks))


_install()
