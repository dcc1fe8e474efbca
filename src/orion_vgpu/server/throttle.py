"""Compute share (ORION_RATIO, [throttle]): holds a session to its share of its GPU.

Placeholder until the throttle lands: ``make_throttle`` returns None (no enforcement).
"""

from __future__ import annotations

from typing import Any


def make_throttle(spec: dict) -> Any:
    """A throttle for this session's spec, or None when sessions run freely."""
    return None
