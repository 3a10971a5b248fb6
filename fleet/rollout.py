"""Rollouts: one signed release rolled out to a fleet in waves — the state machine.

No I/O and no clock: the controller (:mod:`fleet.controller`) feeds a :class:`Rollout` events —
what it learns of a device (:meth:`Rollout.device`), install events and replies, rollback
replies, operator commands, and ticks — each with ``now``, and carries out the :data:`Action`
values it gets back. It persists the rollout (:meth:`Rollout.to_dict`, :meth:`Rollout.target_rows`
for the targets in :attr:`Rollout.dirty`) BEFORE it acts, so a controller killed at any point
restarts from a state that is at most one step behind what devices saw, and
:meth:`Rollout.resume` re-sends what was in flight under the same job names (the agent answers a
job it already ran from its journal: nothing runs twice).

The life of a rollout::

    new --(the controller plans it)--> running --(all waves done)--> finished | open (--dynamic:
    keeps taking devices that join);   running <-> paused (operator);
    new/running/paused/open --(threshold | operator)--> aborted

Targets are the fleet's devices (from retained births) that match the selection; a device whose
profile has no bundle in the release is ``incompatible``, one already on the bundle is
``already_installed`` — neither is in a wave. The rest are ordered by a hash of (rollout, device)
— deterministic, and the canary is not always the alphabetically first device — and split into
waves of cumulative sizes (``1,10%,50%,100%``). Per target::

    pending -> dispatched -> downloading -> installed -> committed
                                                      -> rolled_back | failed | timed_out | offline

A wave is done when every target in it is terminal. Wave n+1 starts only when wave n is done,
within the failure threshold and the regression limits, and (``soak``) its committed devices
stayed online on the new bundle that long. Thresholds are checked as results arrive and again,
unconditionally, when the wave is done:

- failures (failed, rolled_back, timed_out; offline only with ``offline_is_failure``) over
  ``max_failures`` (a count, or a percentage of the wave's finished targets when it is done;
  mid-wave it stops as soon as the failures already exceed that share of the whole wave, so the
  noise of the first few results does not stop a good rollout);
- the median speed regression of the wave's committed devices over ``max_regression``: each
  device's gate figures on the new bundle against its own figures on its previous bundle (the gate
  report its birth carried at dispatch) or, for a device with none (a first install), the
  release's expected figures for its profile;
- the median fidelity agreement under ``min_agreement`` (a device's own gate already rolls back
  below the bundle's threshold; this is the fleet's stricter bar).

Retries: a timed-out install, or one that failed for a reason that may pass (download, busy,
store, internal), is dispatched again under a new job name (attempt + 1) up to ``retries`` times;
a gate rollback (SLO, fidelity) is a verdict on the bundle, not retried.

Devices that come and go: a target offline when its wave starts stays pending until
``device_timeout`` after the wave started, then is ``offline``; if it returns while the rollout is
still running it is dispatched. A device that appears during an active rollout and matches joins
the next wave that has not started (or the last one); with ``dynamic`` a finished rollout stays
``open`` and installs every device that joins later — provisioning without naming anyone.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Final

from fleet.rollout_spec import (
    FailureThreshold,
    RegressionLimits,
    RolloutError,
    RolloutSpec,
    Selection,
    Waves,
)

FORMAT: Final = 1

# Target states.
PENDING, DISPATCHED, DOWNLOADING, INSTALLED = "pending", "dispatched", "downloading", "installed"
COMMITTED, ROLLED_BACK, FAILED, TIMED_OUT = "committed", "rolled_back", "failed", "timed_out"
OFFLINE, INCOMPATIBLE, ALREADY = "offline", "incompatible", "already_installed"
TARGET_STATES: Final = (PENDING, DISPATCHED, DOWNLOADING, INSTALLED, COMMITTED, ROLLED_BACK, FAILED,
                        TIMED_OUT, OFFLINE, INCOMPATIBLE, ALREADY)
IN_FLIGHT: Final = frozenset({DISPATCHED, DOWNLOADING, INSTALLED})
TERMINAL: Final = frozenset({COMMITTED, ROLLED_BACK, FAILED, TIMED_OUT, OFFLINE})
NOT_IN_WAVES: Final = frozenset({INCOMPATIBLE, ALREADY})

# Rollout states.
NEW, RUNNING, PAUSED, FINISHED, OPEN, ABORTED = "new", "running", "paused", "finished", "open", "aborted"
ACTIVE: Final = frozenset({NEW, RUNNING, PAUSED, OPEN})  # may still dispatch: one per fleet

# Failure codes worth another attempt (the device or the network, not the bundle).
# "interrupted": the agent died mid-install and says so when it is back; sent again, it resumes.
RETRYABLE: Final = frozenset({"download_failed", "busy", "store", "internal", "timeout",
                              "interrupted"})

_HISTORY = 200  # rollout history lines kept
_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


# --- what the state machine knows of devices and the release ------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """A device as the inventory sees it now."""

    device: str
    profile: str | None
    online: bool
    current_digest: str | None = None  # manifest digest of the bundle it serves
    current_gate: dict[str, Any] | None = None  # its gate report on that bundle


@dataclass(frozen=True)
class BundleRef:
    """A release's bundle for one profile, as the rollout needs it."""

    profile: str
    file: str
    sha256: str
    size: int
    manifest_digest: str
    expected: dict[str, Any] | None = None  # host-measured figures from the build


@dataclass(frozen=True)
class Dispatch:
    """Send ``install`` for ``bundle`` to ``device`` as job ``job``."""

    device: str
    job: str
    bundle: BundleRef


@dataclass(frozen=True)
class Rollback:
    """Send a conditional ``rollback`` (leave ``from_digest``) to ``device`` as job ``job``."""

    device: str
    job: str
    from_digest: str


Action = Dispatch | Rollback


@dataclass
class Target:
    """One device of a rollout."""

    device: str
    profile: str | None
    state: str = PENDING
    wave: int | None = None
    attempt: int = 0
    job: str | None = None
    reason: str = ""
    since: float = 0.0  # when the state last changed
    dispatched_at: float | None = None
    baseline: dict[str, Any] | None = None  # figures compared with: previous bundle or expected
    baseline_source: str | None = None  # "previous" | "expected"
    figures: dict[str, Any] | None = None  # the gate report on the new bundle
    regression: dict[str, float] | None = None  # decode / ttft / rss as fractions (+ = worse)
    agreement: float | None = None
    rollback: str | None = None  # None | "sent" | "done" | "failed" (rollback on abort)
    code: str | None = None  # the device's error code when it failed

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every field, and a 10,000-device wave writes
        # each target several times (the measured hot spot of bench/bench_fleet.py).
        return {k: getattr(self, k) for k in _TARGET_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


_TARGET_FIELDS: Final = tuple(Target.__dataclass_fields__)


def bundle_refs(release: Any) -> dict[str, BundleRef]:
    """The rollout's view of a verified :class:`agent.bundle.release.Release`: a
    :class:`BundleRef` per profile."""
    return {p: BundleRef(p, b.file, b.sha256, b.size, b.manifest_digest,
                         dict(b.expected) if b.expected else None)
            for p, b in release.bundles.items()}


def job_name(rollout_id: str, device: str, attempt: int, kind: str = "") -> str:
    """The job name of one attempt: stable, so a resend is the same job to the agent."""
    return f"{rollout_id}.{device}.{kind}{attempt}"


def parse_job(job: str) -> tuple[str, str] | None:
    """(rollout id, device) of a job name from :func:`job_name`, or None if it is not ours."""
    parts = job.split(".")
    if len(parts) != 3 or not _ID.match(parts[0]):
        return None
    return parts[0], parts[1]


def order_key(rollout_id: str, device: str) -> str:
    return hashlib.sha256(f"{rollout_id}/{device}".encode()).hexdigest()


def _fig(d: dict[str, Any] | None, key: str) -> float | None:
    v = (d or {}).get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def regression_of(new: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """Per measure, how much worse ``new`` is than ``base`` as a fraction (+ worse, - better). Pure.

    decode: relative drop of decode tok/s; ttft and rss: relative rise. A measure missing (or 0)
    on either side is left out.
    """
    out: dict[str, float] = {}
    for key, name, lower_is_better in (("decode_tok_s", "decode", False), ("ttft_ms", "ttft", True),
                                       ("peak_rss_mb", "rss", True)):
        n, b = _fig(new, key), _fig(base, key)
        if n is None or b is None or b <= 0:
            continue
        out[name] = (n - b) / b if lower_is_better else (b - n) / b
    return out


# --- the state machine ------------------------------------------------------------------------------


class Rollout:
    """One rollout's state and its transitions.

    Args:
        spec: what was asked.
        bundles: the release's bundles by profile.
        created: when it was recorded (epoch seconds).
    """

    def __init__(self, spec: RolloutSpec, bundles: dict[str, BundleRef], *, created: float) -> None:
        self.spec = spec
        self.bundles = bundles
        self.created = created
        self.updated = created
        self.status = NEW
        self.reason = ""
        self.started = False  # targets chosen and waves planned
        self.wave = 0  # the current wave (index into self.plan)
        self.plan: list[int] = []  # cumulative target count per wave at planning time
        self.wave_started: float | None = None
        self.soak_until: float | None = None
        self.history: list[dict[str, Any]] = []
        self.waves_done = False  # the last wave is done (an open rollout keeps taking joiners)
        self.targets: dict[str, Target] = {}
        self.online: dict[str, bool] = {}  # device -> connected now (not persisted: births re-tell it)
        # Indexes kept in step with every transition, so one event costs O(1) at 10,000 devices:
        self._by_wave: dict[int, set[str]] = {}  # wave -> devices
        self._counts: dict[int, dict[str, int]] = {}  # wave -> state -> devices
        self._ready: dict[int, set[str]] = {}  # wave -> pending devices
        self._in_flight = 0  # across waves, for --max-parallel
        self._next_check: dict[int, int] = {}  # wave -> committed count of the next median check
        self._maybe_ready = True  # something may be dispatchable now (see _dispatch_ready)
        self._order: dict[str, str] = {}  # device -> its place in this rollout's order
        self.dirty: set[str] = set()  # targets changed since the last persist
        self.changed = True  # the rollout's own fields changed since the last persist

    # --- events ---------------------------------------------------------------------------------

    def start(self, devices: list[DeviceInfo], now: float) -> list[Action]:
        """Choose the targets from the inventory, plan the waves and dispatch the first.

        Raises:
            RolloutError: already started.
        """
        if self.started or self.status != NEW:
            raise RolloutError(f"rollout {self.spec.rollout_id} was already started")
        self.started, self.status = True, RUNNING
        eligible: list[Target] = []
        for info in devices:
            self.online[info.device] = info.online
            t = self._new_target(info, now)
            if t is not None and t.state == PENDING:
                eligible.append(t)
        eligible.sort(key=lambda t: order_key(self.spec.rollout_id, t.device))
        self.plan = self.spec.waves.sizes(len(eligible)) if eligible else []
        start = 0
        for i, end in enumerate(self.plan):
            for t in eligible[start:end]:
                self._assign(t, i)
            start = end
        n_inc = sum(t.state == INCOMPATIBLE for t in self.targets.values())
        n_already = sum(t.state == ALREADY for t in self.targets.values())
        self._note(now, f"started: {len(eligible)} target(s) in {len(self.plan)} wave(s) "
                        f"{[self._wave_size(i) for i in range(len(self.plan))]}; {n_inc} incompatible, "
                        f"{n_already} already installed")
        if not self.plan:
            self._finish(now)
            return []
        self._begin_wave(0, now)
        return self._advance(now)

    def device(self, info: DeviceInfo, now: float) -> list[Action]:
        """A birth or state change of a device: dispatch it if its turn came, add it if it joins."""
        if info.online and not self.online.get(info.device, False):
            self._maybe_ready = True
        self.online[info.device] = info.online
        if not self.started or self.status == ABORTED or self.status == FINISHED:
            return []
        t = self.targets.get(info.device)
        if t is None:
            if not self.spec.selection.matches(info.device, info.profile):
                return []
            t = self._new_target(info, now)
            if t is None:
                return []
            if t.state == PENDING:
                wave = self._join_wave()
                self._assign(t, wave)
                self._note(now, f"{info.device} ({info.profile}) joined wave {wave + 1}")
            return self._advance(now)
        if t.state == OFFLINE and info.online and self.status in (RUNNING, OPEN):
            # Back before the rollout ended: give it its install after all.
            wave = self._join_wave() if t.wave is None or t.wave < self.wave else t.wave
            self._assign(t, wave)
            self._set(t, PENDING, now, "back online")
        return self._advance(now) if info.online and t.state == PENDING else []

    def install_event(self, device: str, job: str, stage: str, detail: dict[str, Any],
                      now: float) -> list[Action]:
        """An ``events`` message of one of our install jobs."""
        t = self.targets.get(device)
        if t is None or t.job != job or t.state not in IN_FLIGHT:
            return []  # stale (an earlier attempt) or already settled
        if stage in ("downloading", "verified"):
            if t.state == DISPATCHED:
                self._set(t, DOWNLOADING, now)
        elif stage in ("installed", "benchmarked"):
            if t.state != INSTALLED:
                self._set(t, INSTALLED, now)
        elif stage == "committed":
            return self._committed(t, detail.get("check") if isinstance(detail.get("check"), dict)
                                   else None, now)
        elif stage == "failed":
            code = str(detail.get("code") or "install_failed")
            rolled = detail.get("rolled_back") is True
            return self._failed(t, code, str(detail.get("reason") or ""), rolled, now)
        return []

    def install_reply(self, device: str, job: str, ok: bool, result: dict[str, Any] | None,
                      error: dict[str, Any] | None, now: float) -> list[Action]:
        """The device's one reply to an install job."""
        t = self.targets.get(device)
        if t is None or t.job != job or t.state not in IN_FLIGHT:
            return []
        if ok:
            check = (result or {}).get("check")
            return self._committed(t, check if isinstance(check, dict) else None, now)
        err = error or {}
        code = str(err.get("code") or "install_failed")
        message = str(err.get("message") or "")
        return self._failed(t, code, message, code in ("slo_failed", "fidelity_failed")
                            or "rolled back" in message, now)

    def rollback_reply(self, device: str, ok: bool, result: dict[str, Any] | None,
                       error: dict[str, Any] | None, now: float) -> list[Action]:
        """The device's reply to a rollback sent because the rollout aborted."""
        t = self.targets.get(device)
        if t is None or t.rollback != "sent":
            return []
        if ok:
            t.rollback = "done"
            changed = bool((result or {}).get("rolled_back", True))
            self._set(t, ROLLED_BACK, now, "rolled back after the rollout aborted" if changed
                      else f"rollback not needed: {(result or {}).get('reason', '')}")
        else:
            t.rollback = "failed"
            t.reason = f"rollback failed: {(error or {}).get('message', '')}"
            self.dirty.add(t.device)
        return []

    def tick(self, now: float) -> list[Action]:
        """Time passes: install and offline timeouts, soak, the next wave, more dispatches."""
        if not self.started or self.status in (ABORTED, FINISHED):
            return []
        actions: list[Action] = []
        for t in list(self.targets.values()):
            if t.state in IN_FLIGHT and t.dispatched_at is not None \
                    and now - t.dispatched_at > self.spec.device_timeout:
                actions += self._failed(t, "timeout", f"no answer within {self.spec.device_timeout:g}s",
                                        False, now)
            elif t.state == PENDING and t.wave is not None and t.wave <= self.wave \
                    and not self.online.get(t.device, False) and self.wave_started is not None \
                    and now - max(self.wave_started, t.since) > self.spec.device_timeout:
                self._set(t, OFFLINE, now, f"offline for {self.spec.device_timeout:g}s of its wave")
        return actions + self._advance(now)

    def command(self, name: str, now: float, *, reason: str = "") -> list[Action]:
        """The operator's ``pause``, ``resume`` or ``abort``.

        Raises:
            RolloutError: an unknown command, or one the current state does not allow.
        """
        if name == "pause":
            if self.status not in (RUNNING, OPEN):
                raise RolloutError(f"cannot pause a rollout that is {self.status}")
            self.status, self.changed = PAUSED, True
            self._note(now, "paused by the operator")
            return []
        if name == "resume":
            if self.status != PAUSED:
                raise RolloutError(f"cannot resume a rollout that is {self.status}")
            self.status, self.changed = (OPEN if self.waves_done else RUNNING), True
            self._maybe_ready = True
            self._note(now, "resumed by the operator")
            return self._advance(now)
        if name == "abort":
            if self.status not in ACTIVE:
                raise RolloutError(f"cannot abort a rollout that is {self.status}")
            return self._abort(now, reason or "aborted by the operator")
        raise RolloutError(f"unknown rollout command {name!r} (pause, resume, abort)")

    def resume(self, now: float) -> list[Action]:
        """After a controller restart: send again what was in flight, under the same job names."""
        actions: list[Action] = []
        for t in self.targets.values():
            if t.state in IN_FLIGHT and t.job and t.profile in self.bundles:
                actions.append(Dispatch(t.device, t.job, self.bundles[t.profile]))
            elif t.rollback == "sent":
                actions.append(Rollback(t.device, job_name(self.spec.rollout_id, t.device, t.attempt, "rb"),
                                        self.bundles[t.profile].manifest_digest if t.profile else ""))
        if actions:
            self._note(now, f"controller restarted: {len(actions)} job(s) in flight sent again")
        return actions + self._advance(now)

    # --- transitions -----------------------------------------------------------------------------

    def _new_target(self, info: DeviceInfo, now: float) -> Target | None:
        # No profile yet: its retained state arrived before its birth. Not a target until the
        # birth says what it is (else it would be "incompatible" for good, and never get its
        # bundle once the birth came).
        if info.profile is None or not self.spec.selection.matches(info.device, info.profile):
            return None
        t = Target(info.device, info.profile, since=now)
        bundle = self.bundles.get(info.profile or "")
        if bundle is None:
            t.state, t.reason = INCOMPATIBLE, f"the release has no bundle for profile {info.profile!r}"
        elif info.current_digest == bundle.manifest_digest:
            t.state, t.reason = ALREADY, "already serves this release's bundle"
        else:
            self._capture_baseline(t, info)
        self.targets[t.device] = t
        self.dirty.add(t.device)
        return t

    def _capture_baseline(self, t: Target, info: DeviceInfo) -> None:
        gate = info.current_gate or {}
        if _fig(gate, "decode_tok_s") is not None:
            t.baseline, t.baseline_source = {k: gate.get(k) for k in ("decode_tok_s", "ttft_ms",
                                                                       "peak_rss_mb")}, "previous"
            fidelity = gate.get("fidelity")
            if isinstance(fidelity, dict):  # not judged; shown before -> after (status, console)
                t.baseline["agreement"] = fidelity.get("agreement")
        else:
            exp = self.bundles[t.profile or ""].expected
            if exp:
                t.baseline, t.baseline_source = dict(exp), "expected"

    def _assign(self, t: Target, wave: int) -> None:
        self._unindex(t)
        t.wave = wave
        self._index(t)
        self.dirty.add(t.device)

    def _index(self, t: Target) -> None:
        if t.state in IN_FLIGHT:
            self._in_flight += 1
        if t.state == PENDING:
            self._maybe_ready = True
        if t.wave is None:
            return
        self._by_wave.setdefault(t.wave, set()).add(t.device)
        c = self._counts.setdefault(t.wave, {})
        c[t.state] = c.get(t.state, 0) + 1
        if t.state == PENDING:
            self._ready.setdefault(t.wave, set()).add(t.device)

    def _unindex(self, t: Target) -> None:
        if t.state in IN_FLIGHT:
            self._in_flight -= 1
            self._maybe_ready = True  # a slot freed (--max-parallel)
        if t.wave is None:
            return
        self._by_wave.get(t.wave, set()).discard(t.device)
        self._counts[t.wave][t.state] -= 1
        self._ready.get(t.wave, set()).discard(t.device)

    def _join_wave(self) -> int:
        # The next wave that has not started; once the waves are done, the last one (an open
        # rollout's devices that join all go there).
        if self.waves_done:
            return len(self.plan) - 1
        return min(self.wave + 1, max(len(self.plan) - 1, 0))

    def _set(self, t: Target, state: str, now: float, reason: str = "") -> None:
        self._unindex(t)
        t.state, t.since, t.reason = state, now, reason
        self._index(t)
        self.dirty.add(t.device)

    def _dispatch(self, t: Target, now: float) -> Dispatch:
        t.attempt += 1
        t.job = job_name(self.spec.rollout_id, t.device, t.attempt)
        t.dispatched_at = now
        self._set(t, DISPATCHED, now, f"attempt {t.attempt}")
        return Dispatch(t.device, t.job, self.bundles[t.profile or ""])

    def _committed(self, t: Target, check: dict[str, Any] | None, now: float) -> list[Action]:
        t.figures = check
        t.agreement = _fig((check or {}).get("fidelity") if isinstance((check or {}).get("fidelity"), dict)
                           else None, "agreement")
        if check and t.baseline:
            t.regression = regression_of(check, t.baseline)
        self._set(t, COMMITTED, now, "committed" + (f" ({_describe(t.regression)} vs {t.baseline_source})"
                                                   if t.regression else ""))
        if self.status == ABORTED and self.spec.rollback_on_abort and t.wave == self.wave:
            return [self._send_rollback(t)]
        return self._advance(now)

    def _failed(self, t: Target, code: str, reason: str, rolled_back: bool, now: float) -> list[Action]:
        t.code = code
        if code in RETRYABLE and t.attempt <= self.spec.retries and self.status in (RUNNING, OPEN):
            self._note(now, f"{t.device}: attempt {t.attempt} {code}: {reason}; retrying")
            self._set(t, PENDING, now, f"retry after {code}: {reason}")
            return self._advance(now)
        state = TIMED_OUT if code == "timeout" else ROLLED_BACK if rolled_back else FAILED
        self._set(t, state, now, f"{code}: {reason}" if reason else code)
        return self._advance(now)

    def _send_rollback(self, t: Target) -> Rollback:
        t.rollback = "sent"
        self.dirty.add(t.device)
        return Rollback(t.device, job_name(self.spec.rollout_id, t.device, t.attempt, "rb"),
                        self.bundles[t.profile or ""].manifest_digest)

    def _abort(self, now: float, reason: str) -> list[Action]:
        self.status, self.reason, self.changed = ABORTED, reason, True
        self._note(now, f"aborted: {reason}")
        if not self.spec.rollback_on_abort:
            return []
        actions: list[Action] = [self._send_rollback(t) for t in self._wave_targets(self.wave)
                                 if t.state == COMMITTED and t.rollback is None]
        if actions:
            self._note(now, f"rolling back {len(actions)} device(s) of wave {self.wave + 1}")
        return list(actions)

    def _finish(self, now: float) -> None:
        self.status = OPEN if self.spec.dynamic else FINISHED
        self.waves_done = self.changed = True
        if not self.plan:
            self.plan = [0]  # an open rollout needs a group for the devices that join
        self._note(now, "all waves done" + ("; open for devices that join (--dynamic)"
                                            if self.spec.dynamic else ""))

    # --- waves -----------------------------------------------------------------------------------

    def _wave_targets(self, wave: int) -> list[Target]:
        return [self.targets[d] for d in self._by_wave.get(wave, ())]

    def _wave_size(self, wave: int) -> int:
        return len(self._by_wave.get(wave, ()))

    def _count(self, wave: int, *states: str) -> int:
        c = self._counts.get(wave, {})
        return sum(c.get(s, 0) for s in states)

    def _wave_done(self, wave: int) -> bool:
        return self._count(wave, PENDING, *IN_FLIGHT) == 0

    def _begin_wave(self, wave: int, now: float) -> None:
        self.wave, self.wave_started, self.soak_until, self.changed = wave, now, None, True
        self._maybe_ready = True
        self._note(now, f"wave {wave + 1} of {len(self.plan)} started ({self._wave_size(wave)} device(s))")

    def _verdict(self, wave: int, *, final: bool) -> str | None:
        """Why the wave must stop the rollout, or None.

        Failures, from the indexes on every call: mid-wave the rollout stops as soon as the wave
        cannot end within the threshold any more (a percentage of the whole wave is already
        failed), not on the noisy rate of the first few results; when the wave is done, the rate
        over its finished devices decides. The medians need the figures, so mid-wave they are
        taken at ``min_executed`` committed devices and then at each doubling (O(n log n) over a
        wave), and always when the wave is done.
        """
        failing = (FAILED, ROLLED_BACK, TIMED_OUT, OFFLINE) if self.spec.offline_is_failure \
            else (FAILED, ROLLED_BACK, TIMED_OUT)
        n_fail = self._count(wave, *failing)
        n_counted = self._count(wave, COMMITTED, *failing)
        # Mid-wave the denominator is every device of the wave that can still count.
        n_base = n_counted if final else self._wave_size(wave) - (
            0 if self.spec.offline_is_failure else self._count(wave, OFFLINE))
        th = self.spec.max_failures
        if n_fail and th.exceeded(n_fail, n_base):
            codes = sorted({t.code or t.state for t in self._wave_targets(wave) if t.state in failing})
            of = f"{n_counted} finished device(s)" if final else \
                f"the wave's {n_base} device(s) ({n_counted} finished so far)"
            return f"wave {wave + 1}: {n_fail} of {of} failed (threshold {th}; {', '.join(codes)})"
        n_committed = self._count(wave, COMMITTED)
        if not final:
            due = self._next_check.setdefault(wave, self.spec.min_executed)
            if n_committed < due:
                return None
            self._next_check[wave] = max(due * 2, n_committed + 1)
        committed = [t for t in self._wave_targets(wave) if t.state == COMMITTED]
        limits = self.spec.max_regression.to_dict()
        for measure, limit in limits.items():
            values = [t.regression[measure] for t in committed if t.regression and measure in t.regression]
            if limit is None or not values:
                continue
            med = statistics.median(values)
            if med > limit:
                return (f"wave {wave + 1}: median {measure} regression {med:+.1%} over {len(values)} "
                        f"device(s) exceeds {limit:.0%}")
        agreements = [t.agreement for t in committed if t.agreement is not None]
        if self.spec.min_agreement is not None and agreements:
            med = statistics.median(agreements)
            if med < self.spec.min_agreement:
                return (f"wave {wave + 1}: median fidelity agreement {med:.3f} over {len(agreements)} "
                        f"device(s) is below {self.spec.min_agreement:.3f}")
        return None

    def _advance(self, now: float) -> list[Action]:
        """Check the current wave, move on when it is done, dispatch what may go now."""
        if self.status in (ABORTED, FINISHED) or not self.plan:
            return []
        why = self._verdict(self.wave, final=False)
        if why is not None:
            return self._abort(now, why)
        if self._wave_done(self.wave) and self.status != PAUSED:
            why = self._verdict(self.wave, final=True)
            if why is not None:
                return self._abort(now, why)
            if self.soak_until is None and self.spec.soak and self.status == RUNNING:
                self.soak_until, self.changed = now + self.spec.soak, True
                self._note(now, f"wave {self.wave + 1} done; soaking for {self.spec.soak:g}s")
            if self.soak_until is not None and now < self.soak_until:
                return []
            if self.soak_until is not None:
                self.soak_until, self.changed = None, True
            if self.wave + 1 < len(self.plan):
                self._note(now, f"wave {self.wave + 1} done: {self._summary(self.wave)}")
                self._begin_wave(self.wave + 1, now)
                return self._advance(now)
            if self.status == RUNNING:
                self._note(now, f"wave {self.wave + 1} done: {self._summary(self.wave)}")
                self._finish(now)
        if self.status == PAUSED:
            return []
        return self._dispatch_ready(now)

    def _dispatch_ready(self, now: float) -> list[Action]:
        # Only when something may have become dispatchable (a pending target indexed, a device
        # online again, a slot freed, a wave begun): scanning every pending target on each of
        # 10,000 replies would make a wave quadratic.
        if not self._maybe_ready:
            return []
        self._maybe_ready = False
        pending = self._ready.get(self.wave)
        if not pending:
            return []
        room = max(0, self.spec.max_parallel - self._in_flight) if self.spec.max_parallel else len(pending)
        if not room:
            return []
        # Always in the rollout's order (not the set's, which changes with PYTHONHASHSEED): the
        # same events give the same dispatches, so a run can be replayed.
        ready = sorted((d for d in pending if self.online.get(d, False)), key=self._order_of)
        return [self._dispatch(self.targets[d], now) for d in ready[:room]]

    def _order_of(self, device: str) -> str:
        key = self._order.get(device)
        if key is None:
            key = self._order[device] = order_key(self.spec.rollout_id, device)
        return key

    # --- reporting ---------------------------------------------------------------------------------

    def _note(self, now: float, text: str) -> None:
        self.history.append({"ts": round(now, 3), "text": text})
        del self.history[:-_HISTORY]
        self.changed = True
        self.updated = now

    def _summary(self, wave: int) -> str:
        counts: dict[str, int] = {}
        for t in self._wave_targets(wave):
            counts[t.state] = counts.get(t.state, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"

    def wave_report(self, wave: int) -> dict[str, Any]:
        """Counts per state, median regressions and agreement for one wave (status output)."""
        ts = self._wave_targets(wave)
        counts = dict.fromkeys(TARGET_STATES[:9], 0)
        for t in ts:
            counts[t.state] = counts.get(t.state, 0) + 1
        medians: dict[str, float | None] = {}
        for measure in ("decode", "ttft", "rss"):
            vals = [t.regression[measure] for t in ts if t.state == COMMITTED and t.regression
                    and measure in t.regression]
            medians[measure] = round(statistics.median(vals), 4) if vals else None
        agreements = [t.agreement for t in ts if t.state == COMMITTED and t.agreement is not None]
        if wave < self.wave or self.status in (FINISHED, OPEN):
            phase = "done"
        elif wave > self.wave or not self.started:
            phase = "waiting"
        elif self.status == ABORTED:
            phase = "aborted"
        elif self.soak_until is not None:
            phase = "soaking"
        else:
            phase = "running"
        return {"wave": wave + 1, "size": len(ts), "phase": phase, "counts": counts,
                "median_regression": medians,
                "median_agreement": round(statistics.median(agreements), 4) if agreements else None}

    def status_report(self) -> dict[str, Any]:
        """The stable ``rollout status --json`` document of this rollout (see README)."""
        totals = dict.fromkeys(TARGET_STATES, 0)
        for t in self.targets.values():
            totals[t.state] += 1
        return {
            "rollout": self.spec.rollout_id, "release": self.spec.release_id, "fleet": self.spec.fleet,
            "status": self.status, "reason": self.reason, "created": self.created,
            "updated": self.updated, "wave": self.wave + 1 if self.plan else 0, "waves": len(self.plan),
            "soak_until": self.soak_until, "spec": self.spec.to_dict(), "totals": totals,
            "wave_reports": [self.wave_report(i) for i in range(len(self.plan))],
            "history": list(self.history),
        }

    # --- persistence ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The rollout's own fields (targets are persisted row by row: :meth:`target_rows`)."""
        return {"format": FORMAT, "spec": self.spec.to_dict(),
                "bundles": {p: asdict(b) for p, b in self.bundles.items()},
                "created": self.created, "updated": self.updated, "status": self.status,
                "reason": self.reason, "started": self.started, "waves_done": self.waves_done,
                "wave": self.wave,
                "plan": self.plan, "wave_started": self.wave_started, "soak_until": self.soak_until,
                "history": self.history}

    def target_rows(self, devices: set[str] | None = None) -> list[dict[str, Any]]:
        """The targets to persist (default: the dirty ones)."""
        names = self.dirty if devices is None else devices
        return [self.targets[d].to_dict() for d in names if d in self.targets]

    @classmethod
    def from_dict(cls, d: dict[str, Any], targets: list[dict[str, Any]]) -> Rollout:
        """Rebuild a persisted rollout.

        Raises:
            RolloutError: another format.
        """
        if d.get("format") != FORMAT:
            raise RolloutError(f"stored rollout has format {d.get('format')!r}; this controller "
                               f"reads {FORMAT}")
        r = cls(RolloutSpec.from_dict(d["spec"]),
                {p: BundleRef(**b) for p, b in d["bundles"].items()}, created=d["created"])
        for k in ("updated", "status", "reason", "started", "waves_done", "wave", "plan",
                  "wave_started", "soak_until", "history"):
            setattr(r, k, d[k])
        for row in targets:
            t = Target.from_dict(row)
            r.targets[t.device] = t
            r._index(t)
        r.dirty, r.changed = set(), False
        return r


def _describe(regression: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:+.1%}" for k, v in (regression or {}).items())


__all__ = [
    "ABORTED", "ACTIVE", "FINISHED", "NEW", "OPEN", "PAUSED", "RUNNING", "TARGET_STATES", "Action",
    "BundleRef", "DeviceInfo", "Dispatch", "FailureThreshold", "RegressionLimits", "Rollback",
    "Rollout", "RolloutError", "RolloutSpec", "Selection", "Target", "Waves", "bundle_refs", "job_name",
    "order_key", "parse_job", "regression_of",
]
