"""Operator logs: one line per event, `2019-06-25 16:06:15 [INFO] message` (seed 001).

`setup_logging(name, cfg_log, file)` configures the package logger `orion_vgpu` from a
`[log]` section, so every module (`logging.getLogger(__name__)`) writes the same format to
the screen (stdout, as the seed says) and/or the file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from orion_vgpu.config import LogConfig

PACKAGE_LOGGER = "orion_vgpu"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class OneLineFormatter(logging.Formatter):
    """Keeps each record on one line so logs stay greppable: newlines become ' | ' and an
    exception is summarised as `(Type: message)`; full tracebacks only at DEBUG."""

    def __init__(self, with_time: bool, tracebacks: bool) -> None:
        fmt = "%(asctime)s [%(levelname)s] %(message)s" if with_time else "[%(levelname)s] %(message)s"
        super().__init__(fmt, datefmt=TIME_FORMAT)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        exc_info, record.exc_info = record.exc_info, None
        cached, record.exc_text = record.exc_text, None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text = exc_info, cached
        if exc_info and exc_info[1] is not None:
            line += f" ({type(exc_info[1]).__name__}: {exc_info[1]})"
        line = " | ".join(part for part in line.splitlines() if part.strip())
        if exc_info and self.tracebacks:
            line += "\n" + self.formatException(exc_info)
        return line


def _level(name: str) -> int:
    return logging.getLevelName(name) if isinstance(logging.getLevelName(name), int) else logging.INFO


def setup_logging(name: str, cfg_log: LogConfig, file: Path | None = None) -> logging.Logger:
    """Configure `orion_vgpu.*` logging from `[log]`; return the logger `orion_vgpu.<name>`.

    Calling it again replaces the handlers (tests, `orion up` re-configuring)."""
    root = logging.getLogger(PACKAGE_LOGGER)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.propagate = False
    levels = []
    if cfg_log.log_to_screen:
        screen = logging.StreamHandler(sys.stdout)
        screen.setLevel(_level(cfg_log.log_level))
        screen.setFormatter(OneLineFormatter(cfg_log.log_with_time, tracebacks=False))
        root.addHandler(screen)
        levels.append(screen.level)
    if cfg_log.log_to_file and file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(file, encoding="utf-8")
        to_file.setLevel(_level(cfg_log.file_log_level))
        debug = to_file.level <= logging.DEBUG
        to_file.setFormatter(OneLineFormatter(cfg_log.log_with_time, tracebacks=debug))
        root.addHandler(to_file)
        levels.append(to_file.level)
    if not levels:
        root.addHandler(logging.NullHandler())
    root.setLevel(min(levels, default=logging.WARNING))
    return logging.getLogger(f"{PACKAGE_LOGGER}.{name}")
