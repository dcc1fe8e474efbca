"""Operator log lines: `YYYY-mm-dd HH:MM:SS [INFO] message`, one line per event."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from orion_vgpu.config import LogConfig
from orion_vgpu.logs import PACKAGE_LOGGER, setup_logging

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[(INFO|DEBUG|WARNING|ERROR)\] .+$")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    root = logging.getLogger(PACKAGE_LOGGER)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()


def test_seed_format_in_file(tmp_path: Path) -> None:
    log = setup_logging("server", LogConfig(log_to_screen=False), file=tmp_path / "server.log")
    log.info("Client exits with allocation ID %s", "fda38164-711b-4809-9984-2759a3a2165b")
    line = (tmp_path / "server.log").read_text().splitlines()[0]
    assert LINE.match(line)
    assert line.endswith("[INFO] Client exits with allocation ID fda38164-711b-4809-9984-2759a3a2165b")


def test_one_line_per_event(tmp_path: Path) -> None:
    log = setup_logging("x", LogConfig(log_to_screen=False), file=tmp_path / "f.log")
    log.warning("first\nsecond")
    try:
        raise ValueError("boom\nmore")
    except ValueError:
        log.exception("failed")
    lines = (tmp_path / "f.log").read_text().splitlines()
    assert len(lines) == 2 and all(LINE.match(line) for line in lines)
    assert lines[0].endswith("first | second")
    assert "(ValueError: boom" in lines[1]


def test_levels_and_switches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = LogConfig(log_level="WARNING", file_log_level="DEBUG", log_with_time=False)
    log = setup_logging("x", cfg, file=tmp_path / "f.log")
    log.debug("dbg")
    log.info("inf")
    log.warning("wrn")
    assert capsys.readouterr().out.splitlines() == ["[WARNING] wrn"]  # screen = stdout (seed)
    assert (tmp_path / "f.log").read_text().splitlines() == ["[DEBUG] dbg", "[INFO] inf", "[WARNING] wrn"]

    log = setup_logging("x", LogConfig(log_to_file=False, log_to_screen=False), file=tmp_path / "g.log")
    log.error("nowhere")
    assert not (tmp_path / "g.log").exists()
