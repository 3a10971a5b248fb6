"""One error hierarchy for edgepack, device and host alike.

Every error we raise derives from :class:`EdgepackError`; the CLIs catch only that base, print
``str(err)`` and ``err.diagnostics()`` and exit 1. Errors are split by cause because callers react
differently: untrusted data is refused, transport is retried, a runtime is swapped, an install is
rolled back, a build is fixed by the person running it. Each carries structured attributes.
"""

from __future__ import annotations

from typing import Any


class EdgepackError(Exception):
    """Base of every edgepack error."""

    hint: str = ""
    # Set by the store on every install/rollback error: what serves after the failure
    # ("gemma v2 (slot ab12...)" or "nothing (no model is installed)"); "" when not known.
    serving: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def diagnostics(self) -> str:
        """A human hint on what to do next, and what serves now when that is known (may be empty)."""
        if not self.serving:
            return self.hint
        return f"{self.hint} Serving now: {self.serving}.".strip()


# --- untrusted or malformed data: refuse, keep what is installed --------------------------------


class UntrustedDataError(EdgepackError):
    """Data from outside (bundle, manifest, message) failed a trust or validity check."""

    hint = "The bundle was refused and nothing was changed on the device."


class ManifestError(UntrustedDataError):
    """The manifest is malformed, of another major format version, or inconsistent."""


class SignatureError(UntrustedDataError):
    """The manifest signature is missing, malformed, by an untrusted key, or does not verify."""

    hint = (
        "Check that the bundle was signed by a key in the device keyring "
        "(edgepack keys generate; edgepack-agent --keyring FILE)."
    )


class DigestMismatchError(UntrustedDataError):
    """A payload file's length or sha256 differs from the signed manifest."""

    def __init__(self, message: str, *, path: str = "", expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


class BundleFormatError(UntrustedDataError):
    """The bundle archive breaks a structural rule (member order, type, path, unlisted file)."""

    def __init__(self, message: str, *, member: str = "") -> None:
        super().__init__(message)
        self.member = member


class DowngradeError(UntrustedDataError):
    """The bundle's version is not newer than the highest one installed for that model."""

    hint = "Build a bundle with a higher --bundle-version, or use 'edgepack-agent rollback'."

    def __init__(self, message: str, *, offered: int, installed: int) -> None:
        super().__init__(message)
        self.offered = offered
        self.installed = installed


class ReleaseError(UntrustedDataError):
    """A release document (``release.json``) is missing, unsigned, malformed, of another major
    format, or inconsistent with the bundles it lists."""

    hint = ("A release is signed by 'edgepack build' beside its bundles (release.json + "
            "release.json.sig); check it with 'edgepack release verify RELEASE --keyring FILE'.")


class KeyringError(EdgepackError):
    """A key file or keyring is unreadable or malformed."""


# --- profiles --------------------------------------------------------------------------------


class ProfileError(EdgepackError):
    """A device profile is malformed, missing, or no profile matches the device."""


# --- transport -------------------------------------------------------------------------------


class TransportError(EdgepackError):
    """A network or broker operation failed; usually worth retrying."""


class DownloadRestartError(TransportError):
    """The server cannot continue a download where it stopped (a 416, a malformed 206): what was
    staged from it is dropped, and the install sent again starts from byte 0."""


# --- runtimes --------------------------------------------------------------------------------


class RuntimeUnavailableError(EdgepackError):
    """A runtime cannot run here (library missing, device missing); the reason says which."""

    def __init__(self, message: str, *, runtime: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.runtime = runtime


class InferenceError(EdgepackError):
    """Loading a model or generating from it failed inside a runtime."""


# --- install on the device ------------------------------------------------------------------


class InstallError(EdgepackError):
    """An install step failed. ``rolled_back`` says whether the previous model is serving again."""

    def __init__(self, message: str, *, rolled_back: bool = False, step: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.rolled_back = rolled_back
        self.step = step


class InsufficientResourcesError(InstallError):
    """Not enough free disk or RAM for the bundle; checked before anything is written."""

    def __init__(self, message: str, *, needed: int, available: int, resource: str) -> None:
        super().__init__(message, step="check")
        self.needed = needed
        self.available = available
        self.resource = resource


class GateFailedError(InstallError):
    """The new model loaded but missed its SLO in the post-install benchmark (agent.gate).

    ``figures`` are the measured numbers (ttft_ms, decode_tok_s, peak_rss_mb, tokens),
    ``failures`` one message per missed SLO, ``thresholds`` the limits that were checked.
    """

    hint = ("The model is too slow or too big for this device's profile; build for a smaller "
            "profile, or loosen the check with --slo KEY=VALUE.")

    def __init__(self, message: str, *, figures: dict[str, float], failures: tuple[str, ...],
                 thresholds: dict[str, float] | None = None,
                 fidelity: dict[str, Any] | None = None) -> None:
        super().__init__(message, step="gate")
        self.figures = dict(figures)
        self.failures = tuple(failures)
        self.thresholds = dict(thresholds or {})
        self.fidelity = dict(fidelity) if fidelity is not None else None  # agent.fidelity's report


class FidelityError(GateFailedError):
    """The new model runs but computes other tokens than the build host did on the fixed probe:
    its top-1 agreement with the manifest's ``fidelity`` ids is under the threshold
    (agent.fidelity). A runtime, driver or accelerator producing fluent garbage raises no error;
    this is how it shows.

    ``fidelity`` holds the check's report (agreement, positions, threshold, ok).
    """

    hint = ("This device's runtime, driver or accelerator computes different tokens than the "
            "build host did for the same bundle: check their versions, or ship a build for another "
            "device (target.device) or runtime. --slo min_agreement=VALUE replaces the threshold "
            "(0 turns the check off).")


class StoreError(EdgepackError):
    """The local store cannot do what was asked (nothing to roll back to, unknown slot, ...)."""


# --- packaging on the host -------------------------------------------------------------------


class PackagingError(EdgepackError):
    """A host-side build step failed."""


class ModelSourceError(PackagingError):
    """The model source cannot be read (missing folder, unknown id, offline hub)."""


class PlanError(PackagingError):
    """No build plan fits the profile (e.g. the model cannot fit its RAM at any allowed precision)."""


class ConvertError(PackagingError):
    """A converter subprocess failed."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    def diagnostics(self) -> str:
        return self.stderr_tail or self.hint


class QuantizeError(ConvertError):
    """Quantization failed; no partial output is left behind."""


class QualityBudgetError(PackagingError):
    """A variant loses more quality than the profile allows; it is not signed."""

    def __init__(
        self, message: str, *, profile: str, measured_pct: float, budget_pct: float
    ) -> None:
        super().__init__(message)
        self.profile = profile
        self.measured_pct = measured_pct
        self.budget_pct = budget_pct
