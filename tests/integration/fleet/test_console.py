"""The fleet console against a real controller: real mosquitto, 200 simulated devices, the real
SQLite database, one rollout aborted by its regression limit and one running; the page rendered
by a real headless Chromium.

The JSON endpoints are compared with what ``edgepack rollout status --json`` reads
(:func:`fleet.rollout_ops.status`); the page is checked in the DOM Chromium rendered after its
scripts ran (``--dump-dom`` with a virtual time budget covering several polls).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from brokerkit import Broker, mosquitto_binary
from fleetkit import (
    EDGEPACK,
    ControllerProcess,
    ControllerThread,
    begin,
    fake_release,
    wait_status,
    write_keyring,
)
from need import need

from agent.bundle import SigningKey, load_keyring
from fleet.console import Console, ConsoleConfig, ConsoleError, FleetView, is_loopback
from fleet.rollout_ops import list_rollouts, status
from fleet.rollout_spec import RegressionLimits, Waves
from fleet.simulator import Simulator

pytestmark = [pytest.mark.integration]

FLEET = "sim"
PROFILES = ("raspberry-pi-5", "intel-core-ultra", "x86-64-cpu")
N = 200
KEY = "console-key-0123456789"
SCREENSHOT_ENV = "EDGEPACK_CONSOLE_SCREENSHOT"  # also copy the screenshot there (the README's)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """(1) a broker and 200 devices, 60% slow on the new bundle; (2) the controller with its
    console; (3) rollout A aborted by the decode-regression limit; (4) rollout B of the same
    release without limits, running slowly (4 devices at a time) while the tests look at it."""
    need(mosquitto_binary() is not None, "mosquitto is not installed (apt-get install mosquitto)")
    tmp = tmp_path_factory.mktemp("console")
    key = SigningKey.generate("release")
    release = fake_release(tmp / "release", key, PROFILES,
                           expected={"decode_tok_s": 30.0, "ttft_ms": 200.0, "peak_rss_mb": 400.0})
    keyring = write_keyring(tmp / "keyring.json", key)
    db = tmp / "fleet.db"
    with ExitStack() as stack:
        broker = stack.enter_context(Broker(tmp / "broker"))
        sim = stack.enter_context(Simulator(broker.url, FLEET, devices=N, release=release, slow_rate=0.6,
                                            slow_factor=0.5, install_seconds=0.8, health_interval=2.0,
                                            seed=5))
        assert sim.wait_online(60), sim.last_error
        ctl = stack.enter_context(ControllerThread(db, broker.url, FLEET, keyring))
        console = stack.enter_context(Console.for_controller(ctl, ConsoleConfig(port=0, refresh=0.3,
                                                                                poll=1.0)))
        # The wave order is hashed from the rollout id: this one's first wave has 14 of the 20
        # slow devices, so it aborts in wave 1 whichever of them commit first.
        aborted = begin(db, release, keyring, FLEET, rollout_id="ro-console-a", waves=Waves.parse("10%,100%"),
                        max_regression=RegressionLimits.parse("decode=10%"), min_executed=5)
        wait_status(db, aborted, ("aborted",), 60)
        running = begin(db, release, keyring, FLEET, rollout_id="ro-console-b",
                        waves=Waves.parse("10%,50%,100%"), max_parallel=4,
                        max_regression=RegressionLimits.parse("decode=off,ttft=off,rss=off"))
        wait_status(db, running, ("running",), 60,
                    pred=lambda d: d["wave_reports"] and d["wave_reports"][0]["counts"]["committed"] >= 4)
        yield {"db": db, "ctl": ctl, "console": console, "sim": sim, "broker": broker, "tmp": tmp,
               "aborted": aborted, "running": running, "release": release, "keyring": keyring}


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" \
                else body.decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else None, dict(e.headers)


def _api(world: dict[str, Any], path: str) -> Any:
    code, doc, _ = _get(world["console"].url.rstrip("/") + path)
    assert code == 200, (path, code, doc)
    return doc


# --- (1) the JSON endpoints against the controller's own state ------------------------------------


def test_overview_and_rollouts_read_what_rollout_status_reads(world):
    ov = _api(world, "/api/overview")
    assert ov["fleet"] == FLEET and ov["devices"]["total"] == N
    assert ov["devices"]["by_state"] == {"online": N}
    by_profile = ov["devices"]["by_profile"]
    assert sum(by_profile.values()) == N and set(by_profile) == set(PROFILES)
    assert [r["rollout"] for r in ov["rollouts"]] == [world["running"], world["aborted"]]
    run, ab = ov["rollouts"]
    assert run["status"] == "running" and "devices" not in run  # the overview stays small
    assert ab["status"] == "aborted" and ab["reason"].startswith("wave 1: median decode regression")
    assert [r["rollout"] for r in _api(world, "/api/rollouts")] == \
        [i["rollout"] for i in reversed(list_rollouts(world["db"], FLEET))]

    # The aborted rollout no longer changes: the console's document is the CLI's, plus its views.
    cli = status(world["db"], world["aborted"])
    doc = _api(world, f"/api/rollouts/{world['aborted']}")
    for k in ("status", "reason", "totals", "wave_reports", "devices", "history"):
        assert doc[k] == cli[k], k
    w1 = doc["progress"][0]
    counts = cli["wave_reports"][0]["counts"]
    assert w1["committed"] == counts["committed"] and w1["size"] == cli["wave_reports"][0]["size"]
    assert w1["failed"] == counts["failed"] + counts["rolled_back"] + counts["timed_out"]
    assert doc["progress"][1]["committed"] == 0 and doc["progress"][1]["phase"] == "waiting"

    # Before -> after per profile: the medians of the committed devices' own figures.
    committed = {d: t for d, t in cli["devices"].items() if t["state"] == "committed"}
    assert committed and sum(c["devices"] for c in doc["compare"]) == len(committed)
    # Following health for the console left what rollouts see alone: each device is compared
    # with its own gate report on its previous bundle (from its birth), not the release's figures.
    assert {t["baseline"] for t in committed.values()} == {"previous"}
    for c in doc["compare"]:
        assert c["profile"] in PROFILES
        assert c["decode_tok_s"]["before"] > 0 and c["decode_tok_s"]["after"] > 0
        assert 0.9 <= c["agreement"]["before"] <= 1.0 and 0.9 <= c["agreement"]["after"] <= 1.0
    slowed = [c for c in doc["compare"] if c["decode_tok_s"]["after"] < 0.9 * c["decode_tok_s"]["before"]]
    assert slowed, "60% of the devices decode at half speed on the new bundle: the chart must show it"


def test_the_running_rollout_updates_live(world):
    rid = world["running"]
    first = _api(world, f"/api/rollouts/{rid}")
    assert first["status"] == "running"
    assert [w["size"] for w in first["progress"]] == \
        [w["size"] for w in status(world["db"], rid)["wave_reports"]]
    done = sum(w["committed"] for w in first["progress"])
    deadline = time.monotonic() + 20  # bounded: 4 installs of 0.8 s at a time
    later = first
    while time.monotonic() < deadline:
        later = _api(world, f"/api/rollouts/{rid}")
        if sum(w["committed"] for w in later["progress"]) > done:
            break
        time.sleep(0.3)
    assert sum(w["committed"] for w in later["progress"]) > done, "the console did not follow the rollout"
    cli = status(world["db"], rid)  # read after the console: the controller only moves forward
    assert sum(w["committed"] for w in later["progress"]) <= cli["totals"]["committed"]
    in_flight = sum(w["in_flight"] for w in later["progress"])
    assert 0 <= in_flight <= 4  # --max-parallel 4


def test_devices_filter_by_profile_and_state(world):
    allrows = _api(world, "/api/devices")
    assert allrows["total"] == N == allrows["matched"] == len(allrows["devices"])
    assert sorted(allrows["profiles"]) == sorted(PROFILES) and allrows["states"] == ["online"]
    row = allrows["devices"][0]
    assert row["state"] == "online" and row["profile"] in PROFILES
    assert row["bundle"].startswith("gemma-3-270m v")
    assert row["decode_tok_s"] > 0 and row["ttft_ms"] > 0 and row["rss_bytes"] > 0
    assert 30 < row["temperature_c"] < 70 and 0 <= row["health_age_s"] < 30
    assert row["last_gate"] is not None and row["rollout"] == world["running"]
    total = 0
    for p in PROFILES:
        doc = _api(world, f"/api/devices?profile={p}")
        assert doc["matched"] == len(doc["devices"]) > 0 and {d["profile"] for d in doc["devices"]} == {p}
        total += doc["matched"]
    assert total == N
    assert _api(world, "/api/devices?state=offline")["matched"] == 0
    assert _api(world, "/api/devices?state=online&profile=x86-64-cpu")["matched"] == \
        _api(world, "/api/devices?profile=x86-64-cpu")["matched"]
    page = _api(world, "/api/devices?limit=10&offset=5")
    assert [d["device"] for d in page["devices"]] == [d["device"] for d in allrows["devices"][5:15]]
    assert _api(world, "/api/devices?q=sim-0000")["matched"] == 9  # sim-00001 .. sim-00009


def test_a_device_page_has_its_history_in_every_rollout(world):
    # A device A had committed before B was planned (one still installing when A aborted may
    # commit after that, and is then a target of B like any other).
    in_b = status(world["db"], world["running"])["devices"]
    dev = next(d for d, t in status(world["db"], world["aborted"])["devices"].items()
               if t["state"] == "committed" and in_b[d]["state"] == "already_installed")
    doc = _api(world, f"/api/devices/{dev}")
    assert doc["device"] == dev and doc["row"]["device"] == dev and doc["record"]["fleet"] == FLEET
    assert [h["rollout"] for h in doc["history"]] == [world["running"], world["aborted"]]
    ab = doc["history"][1]
    assert ab["status"] == "aborted" and ab["target"] == status(world["db"], world["aborted"])["devices"][dev]
    assert ab["target"]["after"]["decode_tok_s"] > 0
    assert doc["history"][0]["target"]["state"] == "already_installed"  # it got the bundle in A


def test_releases_show_each_profiles_bundle(world):
    (rel,) = _api(world, "/api/releases")
    assert rel["verified"] is True and rel["problem"] == ""
    assert sorted(rel["rollouts"]) == sorted([world["aborted"], world["running"]])
    assert [p["profile"] for p in rel["profiles"]] == sorted(PROFILES)
    p = rel["profiles"][0]
    assert p["precision"] == "int4" and p["quant"] == "Q4_K_M" and p["bundle"].endswith(".bundle")
    assert p["delta_ppl_pct"] == 0.8 and p["expected_decode_tok_s"] == 30.0


def test_a_release_changed_in_the_database_is_shown_as_not_verifying(world):
    copy = world["tmp"] / "tampered.db"
    with sqlite3.connect(world["db"]) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)  # a copy: the world's controller goes on with the real one
    with sqlite3.connect(copy) as db:
        (data,) = db.execute("SELECT data FROM releases").fetchone()
        tampered = bytes(data).replace(b'"quant":"Q4_K_M"', b'"quant":"Q2_K"')
        db.execute("UPDATE releases SET data=?", (tampered,))
    view = FleetView(copy, FLEET, list, load_keyring([world["keyring"]]))
    (rel,) = view.releases()
    assert rel["verified"] is False and rel["problem"]
    assert {p["quant"] for p in rel["profiles"]} == {"Q2_K"}  # shown as stored, flagged
    assert [r["rollout"] for r in view.overview()["rollouts"]] == [world["running"], world["aborted"]]


def test_unknown_ids_are_404_and_writes_are_refused(world):
    base = world["console"].url.rstrip("/")
    assert _get(base + "/api/devices/nobody")[0] == 404
    assert _get(base + "/api/rollouts/ro-nothing")[0] == 404
    assert _get(base + "/api/nothing")[0] == 404
    assert _get(base + "/api/devices?limit=x")[0] == 400
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        req = urllib.request.Request(base + f"/api/rollouts/{world['running']}", method=method, data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405 and e.value.headers["Allow"] == "GET, HEAD"
    assert status(world["db"], world["running"])["status"] == "running"


def test_an_unchanged_document_is_a_304(world):
    base = world["console"].url.rstrip("/")
    code, _, headers = _get(base + "/api/releases")
    assert code == 200
    assert _get(base + "/api/releases", {"If-None-Match": headers["ETag"]})[0] == 304


# --- (2) a real headless Chromium ----------------------------------------------------------------------


def _chromium(world: dict[str, Any], *args: str, budget_ms: int = 6000) -> str:
    exe = shutil.which("chromium")
    need(exe, "chromium is not installed (apt-get install chromium)")
    profile = world["tmp"] / f"chromium-{time.monotonic_ns()}"
    cmd = [str(exe), "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
           "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           f"--virtual-time-budget={budget_ms}", "--window-size=1440,1800", *args]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
    proc = subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return re.sub(r"<script>.*?</script>", "", proc.stdout.decode(), flags=re.S)  # the DOM, not the code


def test_chromium_renders_devices_waves_and_the_abort_reason(world):
    url = world["console"].url
    dom = _chromium(world, "--dump-dom", url)
    assert int(re.search(r'<body data-refreshes="(\d+)"', dom).group(1)) >= 2, "the page polls"
    assert re.search(r'<span class="live" id="live">live · updated', dom), "the polls succeed"
    assert re.search(r'id="device-total">(\d+)<', dom).group(1) == str(N)
    assert len(re.findall(r'<tr data-device="', dom)) == N
    # Both rollouts, newest first; the aborted one says why.
    cards = re.findall(r'<div class="rollout" data-rollout="([^"]+)" data-status="([^"]+)"', dom)
    assert cards == [(world["running"], "running"), (world["aborted"], "aborted")]
    reason = re.search(r'<div class="reason aborted" data-status="aborted"><b>Aborted:</b> ([^<]+)</div>',
                       dom)
    assert reason and "median decode regression" in reason.group(1)
    assert reason.group(1) == status(world["db"], world["aborted"])["reason"]
    # The waves as progress bars, with the counts the controller committed.
    waves = re.findall(r'<div class="wave" data-wave="(\d+)" data-size="(\d+)" data-committed="(\d+)" '
                       r'data-failed="(\d+)" data-inflight="(\d+)" data-offline="(\d+)">', dom)
    run_doc = status(world["db"], world["running"])
    ab_doc = status(world["db"], world["aborted"])
    sizes = [w["size"] for w in run_doc["wave_reports"]] + [w["size"] for w in ab_doc["wave_reports"]]
    assert [int(w[1]) for w in waves] == sizes
    run_committed = sum(int(w[2]) for w in waves[:len(run_doc["wave_reports"])])
    assert 4 <= run_committed <= run_doc["totals"]["committed"]  # read after the page: it only grows
    assert [int(w[2]) for w in waves[len(run_doc["wave_reports"]):]] == \
        [w["counts"]["committed"] for w in ab_doc["wave_reports"]]
    assert re.search(r'<span class="c" style="width:[\d.]+%"', dom), "a committed segment is drawn"
    # Per profile, a before -> after chart (inline SVG) of decode tok/s and agreement.
    assert len(re.findall(r'<svg [^>]*aria-label="decode tok/s', dom)) >= 3
    assert len(re.findall(r'<svg [^>]*aria-label="fidelity agreement', dom)) >= 3
    # The releases table: one row per profile.
    assert len(re.findall(r'<tr data-release="', dom)) == len(PROFILES)

    shot = world["tmp"] / "console.png"
    _chromium(world, f"--screenshot={shot}", "--hide-scrollbars", url, budget_ms=5000)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])


def test_chromium_filters_and_the_device_page(world):
    base = world["console"].url
    dom = _chromium(world, "--dump-dom", base + "#profile=x86-64-cpu&state=online", budget_ms=3000)
    want = _api(world, "/api/devices?profile=x86-64-cpu")["matched"]
    assert re.search(r'id="device-matched">(\d+)<', dom).group(1) == str(want)
    assert len(re.findall(r'<tr data-device="', dom)) == want
    assert re.search(r'<option selected="">x86-64-cpu</option>', dom)

    dev = sorted(status(world["db"], world["aborted"])["devices"])[0]
    dom = _chromium(world, "--dump-dom", base + f"#device/{dev}", budget_ms=3000)
    assert f'<h2 id="device-id">{dev}</h2>' in dom
    assert re.findall(r'<tr data-history-rollout="([^"]+)"', dom) == [world["running"], world["aborted"]]


# --- (3) loopback by default, and the key when set ------------------------------------------------------


def test_nothing_listens_beyond_loopback_by_default(world, monkeypatch):
    assert ConsoleConfig().host == "127.0.0.1" and world["console"].address[0] == "127.0.0.1"
    for host in ("0.0.0.0", "::", "192.0.2.7", "console.example"):
        with pytest.raises(ConsoleError, match="without a key"):
            ConsoleConfig(host=host)
        ConsoleConfig(host=host, key=KEY)  # with a key it may (not bound here: tests stay on loopback)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.53", "::1", "localhost"))

    # The CLI: no --http, no console; a bare port is loopback; beyond loopback without a key it
    # refuses before it binds anything.
    from agent.http_api import parse_listen
    from edgepack.cli import build_parser

    for name in ("EDGEPACK_CONSOLE_HTTP", "EDGEPACK_CONSOLE_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["fleet", "controller"])
    assert args.http is None and args.http_key_file is None
    assert parse_listen(build_parser().parse_args(["fleet", "controller", "--http", "8400"]).http) == \
        ("127.0.0.1", 8400)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_CONSOLE")}
    db = world["tmp"] / "refused.db"
    proc = subprocess.run(
        [EDGEPACK, "fleet", "controller", "--db", str(db),
         "--broker", world["broker"].url, "--fleet", FLEET, "--keyring", str(world["keyring"]),
         "--client-id", "refused", "--http", "0.0.0.0:0"],
        capture_output=True, timeout=60, check=False, env=env)
    assert proc.returncode == 1 and b"without a key" in proc.stderr, proc.stderr[-1000:]


def test_the_key_is_enforced_when_set(world):
    with Console(ConsoleConfig(port=0, key=KEY), world["console"].view) as c:
        base = c.url.rstrip("/")
        for path in ("/", "/api/overview", f"/api/rollouts/{world['running']}"):
            code, _, headers = _get(base + path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
        basic = lambda user, pw: "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()  # noqa: E731
        for bad in ("Bearer wrong", f"Bearer {KEY}x", basic("op", "wrong"), basic(KEY, ""), f"Token {KEY}",
                    "Basic !!!"):
            assert _get(base + "/api/overview", {"Authorization": bad})[0] == 401, bad
        for good in (f"Bearer {KEY}", basic("op", KEY), basic("", KEY)):
            code, doc, _ = _get(base + "/api/overview", {"Authorization": good})
            assert code == 200 and doc["devices"]["total"] == N, good
        # A browser logs in with basic auth (here: credentials in the URL) and its polls follow.
        dom = _chromium(world, "--dump-dom", c.url.replace("http://", f"http://op:{KEY}@"), budget_ms=3000)
        assert re.search(r'id="device-total">(\d+)<', dom).group(1) == str(N)


def test_the_controller_command_serves_the_console_with_its_key(world):
    key_file = world["tmp"] / "console.key"
    key_file.write_text(KEY + "\n")
    ctl = ControllerProcess(world["tmp"] / "cli.db", world["broker"].url, FLEET, world["keyring"],
                            "--client-id", "console-cli", "--http", "127.0.0.1:0", "--http-key-file",
                            str(key_file))
    ctl.start()
    try:
        url = None
        for _ in range(120):  # bounded: 30 s
            m = re.search(r"console (http://127\.0\.0\.1:\d+/)", ctl.tail())
            if m:
                url = m.group(1)
                break
            time.sleep(0.25)
        assert url, ctl.tail()
        assert _get(url + "api/overview")[0] == 401
        doc: Any = None
        for _ in range(80):  # bounded: 20 s, until the retained births arrived
            code, doc, _ = _get(url + "api/overview", {"Authorization": f"Bearer {KEY}"})
            if code == 200 and doc["devices"]["total"] == N:
                break
            time.sleep(0.25)
        assert doc["devices"]["total"] == N and doc["rollouts"] == [], doc
    finally:
        assert ctl.stop() == 0, ctl.tail()
