"""Errors of the client runtime, and mapping of server-side errors to PyTorch's types."""

from __future__ import annotations

import sys
from types import TracebackType

import torch


class OrionError(RuntimeError):
    """The pool could not serve this program; the message says what to do."""


_REMOTE_TYPES: dict[str, type[BaseException]] = {
    "OutOfMemoryError": torch.OutOfMemoryError,
    "IndexError": IndexError,
    "ValueError": ValueError,
    "TypeError": TypeError,
    "NotImplementedError": NotImplementedError,
    "ZeroDivisionError": ZeroDivisionError,
    "RuntimeError": RuntimeError,
}


def raise_remote(kind: str, message: str) -> None:
    """Raise what PyTorch would have raised on a local GPU."""
    if kind == "ProtocolError":
        raise OrionError(f"the Orion Server rejected a message: {message}")
    if kind == "SessionEnded":  # protocol.messages.ERR_SESSION_ENDED
        raise OrionError(message)
    raise _REMOTE_TYPES.get(kind, RuntimeError)(message)


def install_excepthook() -> None:
    """An uncaught OrionError is one clear line, not a traceback."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if isinstance(exc, OrionError):
            print(f"orion: error: {exc}", file=sys.stderr)
            return
        previous(kind, exc, tb)

    sys.excepthook = hook
