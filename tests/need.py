"""``need()``: a missing real part skips a test here and fails it in CI.

CI (``CI=true``) installs every part the suite drives — mosquitto and its dynamic-security plugin,
systemd-analyze, root for the tmpfs, the runtime extras, the sample model package — so a skip there
would hide a broken set-up behind a green run. On a developer's machine a missing part skips, with
the reason and how to get it.

Not for skips about what this machine legitimately lacks (a GPU, CUDA, DirectML, another OS): CI
lacks those too, so they stay plain ``pytest.skip`` / ``skipif`` with a comment saying so.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    """True when running in CI, where every real part must be present."""
    return os.environ.get("CI") == "true"


def need(ok: object, reason: str) -> None:
    """Go on if ``ok`` is truthy; else skip the test (locally) or fail it (in CI) with ``reason``."""
    if ok:
        return
    if in_ci():
        pytest.fail(f"CI must have this part: {reason}", pytrace=False)
    pytest.skip(reason)


def need_module(name: str, reason: str) -> ModuleType:
    """``pytest.importorskip`` that fails in CI: the imported module, or skip/fail with ``reason``."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(False, f"{reason} ({type(e).__name__}: {e})")
        raise  # not reached: need() skipped or failed
