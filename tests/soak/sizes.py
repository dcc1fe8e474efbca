"""Soak sizes: a CI-sized run by default, the issue's full size with ``ORION_SOAK=1``.

Full size: 100 concurrent programs for 300 s and 1,000 sequential programs; each number
can be set with ``ORION_SOAK_CONCURRENT``, ``ORION_SOAK_SECONDS`` and
``ORION_SOAK_SEQUENTIAL`` (the full run and its last result: docs/reliability.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SoakSize:
    concurrent: int
    seconds: float
    sequential: int
    full: bool


def soak_size_from_env() -> SoakSize:
    full = os.environ.get("ORION_SOAK") == "1"
    env = os.environ.get
    return SoakSize(concurrent=int(env("ORION_SOAK_CONCURRENT") or (100 if full else 8)),
                    seconds=float(env("ORION_SOAK_SECONDS") or (300 if full else 15)),
                    sequential=int(env("ORION_SOAK_SEQUENTIAL") or (1000 if full else 12)),
                    full=full)
