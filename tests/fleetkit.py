"""Helpers for rollout tests: a signed release of made-up bundles, the controller in a thread
or as a process, and bounded waits on what the controller committed to its database."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.bundle import Keyring, SigningKey
from agent.bundle.release import RELEASE_NAME, RELEASE_SIG_NAME, Release, ReleaseBundle, sign_release
from fleet.controller import Controller, ControllerConfig
from fleet.rollout_ops import start_rollout, status

EDGEPACK = str(Path(sys.executable).parent / "edgepack")
FAST = {"device_timeout": 60.0, "retries": 0}  # spec fields every simulated rollout may start from


def fake_release(directory: Path, key: SigningKey, profiles: Iterable[str], *, version: int = 2,
                 model: str = "gemma-3-270m", expected: dict[str, float] | None = None,
                 fidelity_threshold: float | None = 0.9) -> Path:
    """A signed release whose bundles exist only by name (simulated devices do not download)."""
    directory.mkdir(parents=True, exist_ok=True)
    bundles = {}
    for p in profiles:
        digest = hashlib.sha256(f"{model}/{version}/{p}".encode()).hexdigest()
        bundles[p] = ReleaseBundle(
            profile=p, file=f"{model}-{p}-v{version}.bundle", sha256=digest, size=1 << 20,
            manifest_digest=hashlib.sha256(digest.encode()).hexdigest(), model=model, version=version,
            runtime="llamacpp", format="gguf", precision="int4", quant="Q4_K_M", device="cpu",
            quality={"delta_pct": 0.8, "top1_agreement": 0.97, "reference": "F16"},
            expected=expected, fidelity_threshold=fidelity_threshold)
    r = Release(model=model, version=version, created="2026-12-03T00:00:00Z", bundles=bundles,
                signer_key_id=key.key_id)
    data = r.to_bytes()
    (directory / RELEASE_NAME).write_bytes(data)
    (directory / RELEASE_SIG_NAME).write_bytes(sign_release(data, key))
    return directory / RELEASE_NAME


def write_keyring(path: Path, key: SigningKey) -> Path:
    path.write_bytes(Keyring([key.public]).to_bytes())
    return path


class ControllerThread:
    """The real controller, in this process (its threads are the subject of the test)."""

    def __init__(self, db: Path, broker_url: str, fleet: str, keyring: Path, **kw: Any) -> None:
        self.controller = Controller(ControllerConfig(db=db, broker_url=broker_url, fleet=fleet,
                                                      keyring=[keyring], **kw))
        self.thread = threading.Thread(target=self.controller.run, name="controller", daemon=True)

    def __enter__(self) -> Controller:
        self.thread.start()
        assert self.controller.wait_ready(60), "the controller did not start"
        return self.controller

    def __exit__(self, *exc: object) -> None:
        self.controller.request_stop()
        self.thread.join(30)


class ControllerProcess:
    """``edgepack fleet controller`` as a child process, so it can be SIGKILLed like a crash."""

    def __init__(self, db: Path, broker_url: str, fleet: str, keyring: Path, *extra: str) -> None:
        self.cmd = [EDGEPACK, "-q", "fleet", "controller", "--db", str(db), "--broker", broker_url,
                    "--fleet", fleet, "--keyring", str(keyring), *extra]
        self.log = db.parent / "controller.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ControllerProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def begin(db: Path, release: Path, keyring: Path, fleet: str, **fields: Any) -> str:
    """``edgepack rollout start`` through its domain function; returns the rollout id."""
    spec = {**FAST, "fleet": fleet, **fields}
    return start_rollout(db, release, [keyring], spec, base_url="http://127.0.0.1:9/").spec.rollout_id


def wait_status(db: Path, rollout: str, statuses: Iterable[str], timeout: float,
                pred=None) -> dict[str, Any]:
    """Poll the committed status until it is one of ``statuses`` (and ``pred`` holds); bounded."""
    want = set(statuses)
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            doc = status(db, rollout)
        except Exception as e:  # the database may be between a crash and a restart
            doc = {"status": f"unreadable: {e}"}
        if doc.get("status") in want and (pred is None or pred(doc)):
            return doc
        time.sleep(0.25)
    raise AssertionError(f"rollout {rollout} not in {sorted(want)} within {timeout}s: "
                         f"{ {k: doc.get(k) for k in ('status', 'reason', 'totals', 'history')} }")
