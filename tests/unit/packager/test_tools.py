"""The tool runner: progress lines, the error line kept ahead of a long tail, quiet lines."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from packager._tools import lines, progress_key, run_streaming


def test_carriage_returns_end_lines_and_a_last_unterminated_line_is_kept() -> None:
    stream = io.BufferedReader(io.BytesIO(b"a\r\nb 10%\rb 20%\r\n\nlast"))  # type: ignore[arg-type]
    assert list(lines(stream)) == ["a", "b 10%", "b 20%", "last"]


def test_progress_bars_are_recognised_but_tables_are_not() -> None:
    assert progress_key("Applying Weight Compression ━━━━━━ 45% • 0:00:04 • 0:00:05") == \
        "Applying Weight Compression"
    assert progress_key("Loading weights:  12%|█▏        | 28/236 [00:00<00:01]") == "Loading weights:"
    assert progress_key("│ int8_asym, per-channel    │ 100% (127 / 129)            │") is None
    assert progress_key("INFO:nncf:Statistics of the bitwidth distribution:") is None


def test_tool_output_keeps_the_error_line_ahead_of_a_long_tail() -> None:
    # NNCF names the problem once, then lists every failing layer: more than a tail's worth.
    code = ("import sys\n"
            "print('nncf.errors.InvalidGroupSizeError: Failed to apply group-wise quantization "
            "with group size value 256.')\n"
            "for i in range(100): print(f'  node {i} (channel size: 640)')\n"
            "sys.exit(3)\n")
    rc, tail = run_streaming([sys.executable, "-c", code], env=None, prefix="test: ",
                             log=logging.getLogger("test"))
    assert rc == 3
    assert tail.startswith("nncf.errors.InvalidGroupSizeError") and "node 99" in tail
    assert "node 10 " not in tail


def test_quiet_lines_go_to_debug_and_swallowed_lines_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    import re

    code = "print('INFO:hf-to-gguf:blk.0.attn_q.weight, torch.float32'); print('MARK 1'); print('done')"
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="tooltest"):
        rc, tail = run_streaming([sys.executable, "-c", code], env=None, prefix="t: ",
                                 log=logging.getLogger("tooltest"),
                                 quiet=re.compile(r"^INFO:hf-to-gguf:"),
                                 on_line=lambda ln: ln.startswith("MARK") and not seen.append(ln))
    assert rc == 0 and seen == ["MARK 1"] and "MARK" not in tail
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels == {"t: INFO:hf-to-gguf:blk.0.attn_q.weight, torch.float32": logging.DEBUG,
                      "t: done": logging.INFO}
