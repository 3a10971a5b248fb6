"""PyInstaller inputs for ``edgepack agent-binary`` (see :mod:`packager.agent_binary`).

Files here are read by PyInstaller in the runtime-only build environment, never imported by
edgepack itself: ``agent.spec`` (the build; its parameters arrive as JSON), ``edgepack_agent.py``
(the entry script), ``pyi_rth_edgepack.py`` (the runtime hook that runs first in every frozen
agent) and ``hooks/`` (what each runtime's package needs collected, overriding the generic
community hooks).
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEC = HERE / "agent.spec"
ENTRY = HERE / "edgepack_agent.py"
RUNTIME_HOOK = HERE / "pyi_rth_edgepack.py"
HOOKS_DIR = HERE / "hooks"
# Read by the runtime hook from the bundle's root (sys._MEIPASS): which flavour this binary is.
FLAVOUR_FILE = "edgepack-binary.json"

__all__ = ["ENTRY", "FLAVOUR_FILE", "HERE", "HOOKS_DIR", "RUNTIME_HOOK", "SPEC"]
