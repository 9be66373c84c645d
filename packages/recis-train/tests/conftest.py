"""Session-wide reporting for recis-train's tests."""

from __future__ import annotations

from _spawn import RETRIED


def pytest_terminal_summary(terminalreporter) -> None:
    if RETRIED:
        terminalreporter.section("distributed runs started again after a worker aborted")
        for line in RETRIED:
            terminalreporter.write_line(line)
