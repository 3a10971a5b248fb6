"""A precision chosen on the command line, through the real CLI, planner, llama.cpp and signer.

One profile of this host (GGUF Q4_K_M, llama.cpp) whose RAM budget lies between the tiny Phi-3's
Q4_K_M and Q5_K_M estimates, so the user's ``--quant Q5_K_M`` (a quant no shipped profile uses)
is over it: refused with the numbers, then built with ``--force``, then held to the quality budget
and let through by ``--max-loss``. Each build after the first reuses the cached variant and its
quality scores; the file takes well under a minute once the tiny model's F16 GGUF is cached.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import load_keyring
from edgepack.cli import main as edgepack
from packager.bundler import verify_bundle
from packager.catalog import resolve_model
from packager.gguf import gguf_file_type
from packager.plan import GIB, estimate_bytes
from packager.tiny import TinyModel

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONTEXT = 1024


def write_profile(d: Path, *, ram_budget_gb: float, max_loss: float) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tiny-tight.toml").write_text(f"""
name = "tiny-tight"
description = "test: this host, a RAM budget between Q4_K_M and Q5_K_M of the tiny Phi-3"
class = "server"

[match]
arch = ["x86_64", "aarch64"]

[target]
runtime = "llamacpp"
format = "gguf"
precision = "int4"
quant = "Q4_K_M"
fallbacks = ["Q4_0"]
context = {CONTEXT}
threads = 2
ram_budget_gb = {ram_budget_gb!r}

[budget]
max_ppl_increase_pct = {max_loss!r}
""")
    return d


@pytest.fixture(scope="module")
def setup(tiny_phi3: TinyModel, packager_cache: Path,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    info = resolve_model("tiny-phi3", cache_dir=packager_cache)
    q4, q5 = (estimate_bytes(info, q, CONTEXT).total_bytes for q in ("Q4_K_M", "Q5_K_M"))
    d = tmp_path_factory.mktemp("override")
    assert edgepack(["-q", "keys", "generate", "--name", "release", "-o", str(d / "keys")]) == 0
    return {"dir": d, "budget_gb": (q4 + q5) / 2 / GIB, "q4": q4, "q5": q5,
            "key": d / "keys" / "release.key", "keyring": d / "keys" / "release.pub.json"}


def run(capsys: pytest.CaptureFixture[str], profiles: Path, *args: str) -> tuple[int, str, str]:
    rc = edgepack(["-q", "--profiles-dir", str(profiles), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def build(capsys: pytest.CaptureFixture[str], setup: dict[str, Any], profiles: Path, out: Path,
          *args: str) -> tuple[int, dict[str, Any], str]:
    rc, _, err = run(capsys, profiles, "build", "--model", "tiny-phi3", "--profile", "tiny-tight",
                     "--key", str(setup["key"]), "-o", str(out), "--quant", "Q5_K_M", *args)
    return rc, json.loads((out / "build-report.json").read_text()), err


def test_plan_shows_the_users_choice_the_profiles_and_the_ram_refusal(setup, capsys):
    profiles = write_profile(setup["dir"] / "p-plan", ram_budget_gb=setup["budget_gb"], max_loss=20.0)
    base = ["plan", "--model", "tiny-phi3", "--profile", "tiny-tight", "--json"]
    rc, out, _ = run(capsys, profiles, *base)
    own = json.loads(out)["profiles"]["tiny-tight"]
    assert rc == 0 and own["quant"] == "Q4_K_M" and own["choice"] == {"by": "profile"}

    rc, out, _ = run(capsys, profiles, *base, "--quant", "Q5_K_M")
    why = json.loads(out)["refused"]["tiny-tight"]
    assert rc == 0 and "Q5_K_M needs" in why and "(chosen by the user), over the RAM budget" in why
    assert f"{setup['budget_gb']:.2f} GiB" in why and "--force" in why
    assert "the profile itself would choose Q4_K_M" in why

    rc, out, _ = run(capsys, profiles, *base, "--quant", "Q5_K_M", "--force", "--max-loss", "30")
    p = json.loads(out)["profiles"]["tiny-tight"]
    assert (p["quant"], p["precision"], p["max_loss_pct"]) == ("Q5_K_M", "int4", 30.0)
    assert p["estimate_bytes"] == setup["q5"] > p["ram_budget_bytes"]
    c = p["choice"]
    assert (c["by"], c["requested"], c["forced"]) == ("user", "Q5_K_M", True)
    assert c["profile_choice"]["quant"] == "Q4_K_M" and c["profile_choice"]["estimate_bytes"] == setup["q4"]
    assert (c["max_loss_pct"], c["profile_max_loss_pct"]) == (30.0, 20.0)


def test_build_a_quant_no_profile_has_refused_for_ram_forced_then_held_to_quality(setup, capsys):
    d = setup["dir"]
    profiles = write_profile(d / "p-build", ram_budget_gb=setup["budget_gb"], max_loss=1000.0)

    # (1) over the RAM budget: refused with the numbers, nothing built or signed
    rc, report, err = build(capsys, setup, profiles, d / "refused")
    assert rc == 1 and not report["bundles"] and not report["variants"]
    assert "Q5_K_M needs" in report["refused"]["tiny-tight"] and "--force" in err
    assert not list((d / "refused").glob("*.bundle"))

    # (2) --force: a real Q5_K_M GGUF, signed; the manifest records who chose and what not
    rc, report, _ = build(capsys, setup, profiles, d / "forced", "--force", "--bundle-version", "1")
    assert rc == 0, report
    (b,) = report["bundles"]
    assert (b["quant"], b["precision"]) == ("Q5_K_M", "int4")
    assert b["choice"]["by"] == "user" and b["choice"]["forced"] is True
    m = verify_bundle(Path(b["bundle"]), load_keyring([setup["keyring"]]))
    assert m.choice == b["choice"] and m.target.quant == "Q5_K_M"
    assert m.choice["requested"] == "Q5_K_M" and m.choice["profile_choice"]["quant"] == "Q4_K_M"
    assert m.choice["ram_budget_bytes"] < m.requirements.min_ram_bytes == setup["q5"]
    with tarfile.open(b["bundle"]) as tar:
        tar.extract("model.gguf", d / "forced-payload", filter="data")
    assert gguf_file_type(d / "forced-payload" / "model.gguf") == "Q5_K_M"
    md = (d / "forced" / "build-report.md").read_text()
    assert "## Chosen on the command line" in md
    assert "Q5_K_M chosen by the user; the profile would have chosen Q4_K_M (int4)" in md
    assert "built with --force" in md
    rc, out, _ = run(capsys, profiles, "bundle", "inspect", b["bundle"])
    assert rc == 0 and "chosen:    Q5_K_M chosen by the user" in out
    loss = b["quality"]["delta_pct"]

    # (3) a quality budget just under the measured loss (whatever its sign on random weights):
    # refused, never signed, and told how to replace the budget
    profiles = write_profile(d / "p-strict", ram_budget_gb=setup["budget_gb"], max_loss=loss - 1.0)
    rc, report, _ = build(capsys, setup, profiles, d / "strict", "--force")
    assert rc == 1 and not report["bundles"] and not list((d / "strict").glob("*.bundle"))
    assert "the profile allows" in report["over_budget"]["tiny-tight"]
    assert "--max-loss PCT" in report["over_budget"]["tiny-tight"]

    # (4) --max-loss replaces it for this build, and the manifest says so
    max_loss = max(0.0, loss + 1.0)
    rc, report, _ = build(capsys, setup, profiles, d / "loose", "--force", "--max-loss", str(max_loss))
    assert rc == 0, report
    (b,) = report["bundles"]
    m = verify_bundle(Path(b["bundle"]), load_keyring([setup["keyring"]]))
    assert m.choice["max_loss_pct"] == max_loss
    assert m.choice["profile_max_loss_pct"] == pytest.approx(loss - 1.0)
