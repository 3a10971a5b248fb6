"""The conversion tools as subprocesses: their merged output streamed to our log as progress.

llama.cpp's converter, the onnxruntime-genai builder, optimum-intel's exporter and pip all run as
child processes (a crash in one must not take the packager down, and some run in another
environment). Each line they print goes to the caller's logger; per-tensor chatter goes to debug
(``-v`` shows it); a redrawn progress bar is logged at most every :data:`PROGRESS_EVERY_S`; and
the caller gets the output's tail for :class:`~agent.errors.ConvertError`, with the last error
lines kept even when more than a tail's worth of detail follows them.
"""

from __future__ import annotations

import collections
import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import IO

TAIL_LINES = 40  # output lines kept for ConvertError.stderr_tail
ERROR_LINES = 8  # lines that look like errors, kept apart from the tail
PROGRESS_EVERY_S = 5.0  # a redrawn progress bar is logged at most this often
_ERROR_LINE = re.compile(r"Error\b|error:|^Failed|Traceback")


def lines(stream: IO[bytes]) -> Iterator[str]:
    """The non-empty lines of a byte stream as they arrive; ``\\r`` ends a line too.

    tqdm and rich redraw progress bars with ``\\r``: splitting there shows the progress and keeps
    memory bounded.
    """
    buf = b""
    read: Callable[[int], bytes] = stream.read1  # type: ignore[attr-defined]
    while chunk := read(65536):
        buf += chunk
        *done, buf = re.split(rb"\r\n|\r|\n", buf)
        for raw in done:
            if raw.strip():
                yield raw.decode("utf-8", "replace").rstrip()
    if buf.strip():
        yield buf.decode("utf-8", "replace").rstrip()


def progress_key(line: str) -> str | None:
    """The name of the progress bar a line redraws, or None when it is not one.

    A bar ("Applying Weight Compression ━━━ 45% • 0:00:04", tqdm's "12/236 [...]") is named by
    the text before its first digit or bar glyph.
    """
    if not re.search(r"\d+%", line) or not re.search(r"━|\||it/s", line):
        return None
    return re.split(r"[\d━╸|]", line, maxsplit=1)[0].strip() or "progress"


def run_streaming(cmd: list[str], *, env: dict[str, str] | None, prefix: str, log: logging.Logger,
                  quiet: re.Pattern[str] | None = None,
                  on_line: Callable[[str], bool] | None = None,
                  level: int = logging.INFO) -> tuple[int, str]:
    """Run ``cmd`` with its output streamed to ``log``.

    Args:
        cmd: the command.
        env: its environment (None: ours).
        prefix: put before each logged line ("convert: ").
        log: the caller's logger.
        quiet: lines matching it are logged at debug level (per-tensor chatter).
        on_line: sees every line first; returns True to swallow it (not logged, not in the tail).
        level: the level of ordinary lines.

    Returns:
        (exit code, the output's tail, preceded by earlier error lines that fell out of it).
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: collections.deque[str] = collections.deque(maxlen=ERROR_LINES)
    last_progress: dict[str, float] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    try:
        for line in lines(proc.stdout):
            if on_line is not None and on_line(line):
                continue
            tail.append(line)
            if _ERROR_LINE.search(line):
                errors.append(line)
            key = progress_key(line)
            if key is not None and "100%" not in line:
                now = time.monotonic()
                if now - last_progress.get(key, 0.0) < PROGRESS_EVERY_S:
                    continue
                last_progress[key] = now
            noisy = quiet is not None and quiet.search(line) is not None
            log.log(logging.DEBUG if noisy else level, "%s%s", prefix, line)
        rc = proc.wait()
    except BaseException:
        proc.kill()  # Ctrl-C or a logging failure: do not leave the tool writing
        proc.wait()
        raise
    earlier = [e for e in errors if e not in tail]
    return rc, "\n".join([*earlier, "...", ""] if earlier else []) + "\n".join(tail)
