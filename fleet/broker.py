"""A local mosquitto run as a child process: for the demo, development and the test suite.

The demo and the tests start a real broker with it (never a mock), on loopback ports, killable and
restartable; production fleets point agents at their own MQTT 5 broker instead. Facts it encodes
(measured with Debian's mosquitto 2.0.11): mosquitto does not start itself; as root it needs
``user root`` to write its persistence; ``set_tcp_nodelay true`` or a round trip costs 44–88 ms;
``max_queued_messages`` above the default 1000 or QoS 1 bursts are silently dropped; ``listener 0``
is not an ephemeral port, so we pick free ports ourselves; it is ready only once it logs "running".

Auth mode writes a ``password_file`` in mosquitto's PBKDF2-SHA512 ``$7$`` format from Python and an
``acl_file`` that confines each device (user name = device id) to its own subtree, read-only on its
``cmd/`` topics and write-only on its ``reply/`` topics; controller users may read and write the
whole tree. TLS mode makes a CA and a
server certificate (SAN 127.0.0.1 and localhost) with ``cryptography``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from agent.errors import TransportError

START_TIMEOUT = 10.0  # seconds for mosquitto to log "running"
STOP_TIMEOUT = 10.0
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable (Debian puts it in /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def password_line(user: str, password: str, *, iterations: int = 101) -> str:
    """One mosquitto 2.x password-file line: ``user:$7$<iter>$<b64 salt>$<b64 pbkdf2-sha512>``."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(controllers: tuple[str, ...]) -> str:
    """The ACL: devices own only their subtree (by authenticated user name, %u, never the
    client-chosen client id) and may only read their commands; controllers own the whole tree."""
    lines = [
        "# devices (user name = device id)",
        "pattern read edgepack/v1/+/%u/cmd/+",
        "pattern write edgepack/v1/+/%u/state",
        "pattern write edgepack/v1/+/%u/birth",
        "pattern write edgepack/v1/+/%u/health",
        "pattern write edgepack/v1/+/%u/events",
        "# replies stay in the replying device's own subtree: no device can answer for another",
        "pattern write edgepack/v1/+/%u/reply/+",
    ]
    for c in controllers:
        lines += ["", f"user {c}", "topic readwrite edgepack/v1/#"]
    return "\n".join(lines) + "\n"


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """Write a CA and a server certificate/key valid for 127.0.0.1 and localhost.

    Returns:
        (ca_cert, server_cert, server_key) paths.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgepack test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class Broker:
    """A mosquitto child process with its config, persistence and log in ``workdir``.

    Args:
        workdir: a fresh directory (created) for config, persistence, log and TLS files.
        users: ``{user: password}`` — enables auth + ACL when given (anonymous refused).
        controllers: which of ``users`` may access the whole tree.
        tls: also open a TLS listener (``tls_port``, CA at ``ca_file``).
        bridges: ``mqtt://host:port`` URLs of central brokers to bridge ``edgepack/#`` to, both
            ways, over MQTT 5 (a two-tier topology: devices on edge brokers, the controller on
            the central one). Retained messages and MQTT 5 properties (Response Topic,
            Correlation Data, expiry) cross a mosquitto bridge; shared subscriptions do not
            balance across one.
        port: the plain listener's port (default: a free one).

    Use as a context manager, or call :meth:`start` / :meth:`stop`. Ports and persistence stay
    the same across :meth:`restart`, so persistent sessions survive it.
    """

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None,
                 controllers: tuple[str, ...] = (), tls: bool = False,
                 bridges: tuple[str, ...] = (), port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise TransportError("mosquitto not found: apt-get install mosquitto")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.controllers = controllers
        self.bridges = bridges
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.ca_file: Path | None = None
        self.log_file = self.workdir / "mosquitto.log"
        self.conf_file = self.workdir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise TransportError("this broker has no TLS listener")
        return f"mqtts://{HOST}:{self.tls_port}"

    def _write_config(self) -> None:
        d = self.workdir
        (d / "data").mkdir(exist_ok=True)
        lines = [
            f"pid_file {d / 'mosquitto.pid'}",
            "persistence true",
            f"persistence_location {d / 'data'}/",
            # Save every ~2 s too (1 s granularity, strict >), so a SIGKILLed broker comes back
            # with recent sessions; tests call wait_saved() before a kill.
            "autosave_interval 1",
            f"log_dest file {self.log_file}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "log_type subscribe",
            "log_timestamp true",
            "connection_messages true",
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            "max_inflight_messages 1000",
            "per_listener_settings false",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to "mosquitto" and cannot write d/data
        if self.users:
            pw = d / "passwd"
            pw.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            acl = d / "acl"
            acl.write_text(acl_text(self.controllers))
            acl.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}", f"acl_file {acl}"]
        else:
            lines.append("allow_anonymous true")
        lines += ["", f"listener {self.port} {HOST}"]
        if self.tls_port is not None:
            ca, cert, key = make_tls_files(d)
            self.ca_file = ca
            lines += ["", f"listener {self.tls_port} {HOST}", f"cafile {ca}", f"certfile {cert}",
                      f"keyfile {key}", "tls_version tlsv1.2"]
        for i, url in enumerate(self.bridges):
            host, _, port = url.removeprefix("mqtt://").partition(":")
            lines += ["", f"connection edgepack-bridge-{i}", f"address {host}:{port or 1883}",
                      "bridge_protocol_version mqttv50", "topic edgepack/# both 1",
                      f"remote_clientid edgepack-bridge-{self.port}-{i}", "cleansession false",
                      "restart_timeout 1 5", "try_private true"]
        self.conf_file.write_text("\n".join(lines) + "\n")

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Broker:
        """Start mosquitto and wait (bounded) for its "running" log line.

        Raises:
            TransportError: it exited or did not log "running" within START_TIMEOUT (log attached).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise TransportError("broker already running")
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        out = (self.workdir / "stderr.log").open("ab")
        try:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_file)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._log_since(offset).find(" running") >= 0:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise TransportError(f"mosquitto did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence) and wait, escalating to SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash. Only what the last autosave wrote survives (see :meth:`wait_saved`)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or kill, with ``crash``) and start again on the same ports and persistence."""
        self.kill() if crash else self.stop()
        self.start()

    def wait_saved(self, timeout: float = 5.0) -> None:
        """Wait for the next autosave of the persistence file (every ~2 s), so that a following
        :meth:`kill` keeps everything that happened before this call.

        Raises:
            RuntimeError: no save logged within ``timeout``.
        """
        offset = self.log_file.stat().st_size
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Saving in-memory database" in self._log_since(offset):
                # The line is logged as the save starts; mosquitto writes a temp file and renames
                # it, so a short pause is enough for the new file to be in place.
                time.sleep(0.3)
                return
            time.sleep(0.05)
        raise TransportError(f"no persistence save within {timeout}s:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the broker log and its stderr, for failure messages."""
        text = self._log_since(0)
        err = self.workdir / "stderr.log"
        if err.exists():
            text += err.read_text(errors="replace")
        return "\n".join(text.splitlines()[-n:])

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
