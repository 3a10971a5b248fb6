"""Install and rollback errors tell the truth about what serves (issue 12, item 10).

Through the MQTT installer (agent/installer.py) with a stand-in model whose load fails (the logic
under test is ours), and through the real ``edgepack-agent`` CLI with the real runtime refusing a
model that is not one: a first install that fails never claims a previous model, and every error
says what serves now, or that nothing does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.bundle import Keyring
from agent.cli import main
from agent.errors import InferenceError, InstallError, StoreError, TransportError
from agent.installer import Installer
from agent.protocol import InstallRequest
from agent.store import Store

GIB = 1 << 30


class FailingModel:
    """Stands in for the resident model: every load fails, as a model that does not load would."""

    def __init__(self) -> None:
        self.dropped = 0

    def load_and_gate(self, bundle: Any, gate: Any, *, on_gate: Any = None) -> dict[str, Any]:
        raise InferenceError(f"cannot load {bundle.entrypoint.name}: corrupt header")

    def drop(self) -> None:
        self.dropped += 1


def request(bundle: Path) -> InstallRequest:
    import hashlib

    data = bundle.read_bytes()
    return InstallRequest(url=bundle.as_uri(), sha256=hashlib.sha256(data).hexdigest(), size=len(data))


@pytest.fixture
def installer(tmp_path: Path, keyring: Keyring):
    events: list[tuple[str, str, dict[str, Any]]] = []
    store = Store(tmp_path / "state", keyring, ram_total=lambda: 8 * GIB)
    inst = Installer(store, FailingModel(), events=lambda job, stage, **d: events.append((job, stage, d)))  # type: ignore[arg-type]
    return inst, events


def test_a_failed_first_install_over_mqtt_says_nothing_serves(installer, make_bundle):
    inst, events = installer
    with pytest.raises(InstallError) as e:
        inst.install(request(make_bundle(version=1)), "job-1")
    assert e.value.rolled_back and "previous model is still" not in e.value.diagnostics()
    assert "Serving now: nothing (no model is installed)." in e.value.diagnostics()
    failed = [d for _j, stage, d in events if stage == "failed"]
    assert failed[0]["serving"] == "nothing (no model is installed)"
    assert inst.last_install is not None and inst.last_install["serving"].startswith("nothing")


def test_a_failed_upgrade_over_mqtt_names_the_model_serving_again(installer, make_bundle):
    inst, _events = installer
    inst.load_check = False
    inst.install(request(make_bundle(version=1)), "job-1")
    cur = inst.store.current()
    inst.load_check = True
    with pytest.raises(InstallError) as e:
        inst.install(request(make_bundle(version=2)), "job-2")
    assert e.value.serving == f"tiny v1 (slot {cur.slot})"  # type: ignore[union-attr]
    assert inst.model.dropped == 2  # type: ignore[attr-defined]  # after the first, and the failure


def test_a_download_failure_names_what_serves(installer, make_bundle):
    inst, _events = installer
    bundle = make_bundle(version=1)
    req = request(bundle)
    bundle.unlink()
    with pytest.raises(TransportError) as e:
        inst.install(req, "job-1")
    assert "Serving now: nothing (no model is installed)." in e.value.diagnostics()


def test_a_rollback_with_nothing_to_go_back_to_names_what_serves(installer, make_bundle):
    inst, _events = installer
    with pytest.raises(StoreError) as e:
        inst.rollback()
    assert e.value.serving == "nothing (no model is installed)"


def test_the_cli_says_a_failed_first_install_leaves_nothing_serving(tmp_path: Path, keyring: Keyring,
                                                                    make_bundle, capsys):
    """The real CLI and the real runtime: a "model" that is not one fails its load check."""
    kr = tmp_path / "keyring.json"
    kr.write_bytes(keyring.to_bytes())
    bundle = make_bundle({"model.gguf": b"GGUF" + b"\0" * 4096}, version=1)
    rc = main(["--state-dir", str(tmp_path / "state"), "--keyring", str(kr), "install", str(bundle)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "previous model is still" not in err and "first install" in err
    assert "Serving now: nothing (no model is installed)." in err
    rc = main(["--state-dir", str(tmp_path / "state"), "rollback"])
    err = capsys.readouterr().err
    assert rc == 1 and "Serving now: nothing (no model is installed)." in err
