"""A child process for the crash-point tests: one store operation, killed for real at a step.

Run as ``python tests/crashchild.py STATE KEYRING OP [ARGS] [--fail-check]`` with
``EDGEPACK_TEST_CRASH_AT=N`` (agent/_crashpoint.py) to die by SIGKILL at the N-th step, or with
``EDGEPACK_TEST_CRASH_TRACE=FILE`` to list the steps. OP is ``install BUNDLE``, ``stream URL SHA256
SIZE`` (an install streamed from a download that resumes after a kill, as the MQTT installer
does), ``rollback`` or ``open``
(only the recovery a start runs). It imports only the store, so a child starts in a fraction of a
second and a test can afford hundreds of them.

The load check re-reads every payload file and checks its sha256 against the manifest: what a
runtime's load would touch, without a runtime. ``--fail-check`` makes it fail after reading, so the
install takes its switch-back path. Exit codes: 0 done, 3 rolled back as asked, 1 any other error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from agent._fs import file_digest
from agent.bundle import Keyring
from agent.errors import EdgepackError, InstallError
from agent.store import InstalledBundle, Store


def main(argv: list[str]) -> int:
    state, keyring, op, *rest = argv
    fail = "--fail-check" in rest
    rest = [a for a in rest if a != "--fail-check"]

    def check(bundle: InstalledBundle) -> dict[str, Any]:
        for f in bundle.manifest.files:
            if file_digest(bundle.payload_dir / f.path).sha256 != f.sha256:
                raise RuntimeError(f"{f.path} differs from its manifest entry")
        if fail:
            raise RuntimeError("the load check was told to fail")
        return {"files": len(bundle.manifest.files)}

    store = Store(Path(state), Keyring.from_bytes(Path(keyring).read_bytes()), ram_total=lambda: 1 << 34)
    try:
        if op == "install":
            store.install(Path(rest[0]), load_check=check)
        elif op == "stream":
            from agent.bundle import archive
            from agent.fetch import open_download

            archive.CHECKPOINT_BYTES = 1 << 20  # a small bundle: checkpoints inside its files too

            def open_stream(start: int, prefix: Any) -> Any:
                return open_download(rest[0], sha256=rest[1], size=int(rest[2]), timeout=10.0,
                                     start=start, prefix=prefix)

            store.install_download(rest[1], int(rest[2]), open_stream, load_check=check)
        elif op == "rollback":
            store.rollback()
        elif op != "open":
            raise SystemExit(f"unknown op {op!r}")
    except InstallError as e:
        if fail and e.rolled_back:
            return 3
        print(f"error: {e}", file=sys.stderr)
        return 1
    except EdgepackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
