"""Session worker for fault tests (``ORION_WORKER_MODULE=faults.abort_worker``).

The real worker, except that running ``aten::sinh`` aborts the process (SIGABRT), the
way a crashing kernel or a failed C++ assertion ends a worker. Core dumps are off, so a
crash leaves no file in the daemon's working directory.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

from orion_vgpu.server import worker
from orion_vgpu.server.executor import Executor

TRIGGER = "aten::sinh"

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_define, _run = Executor.define, Executor.run
_triggers: set[tuple[int, int]] = set()  # (id of the executor, op id)


def _define_watch(self: Executor, op_id: int, name: str) -> None:
    if isinstance(name, str) and name.split(".")[0] == TRIGGER:
        _triggers.add((id(self), op_id))
    _define(self, op_id, name)


def _run_or_abort(self: Executor, op_id: int, *args: Any, **kwargs: Any) -> Any:
    if (id(self), op_id) in _triggers:
        os.abort()
    return _run(self, op_id, *args, **kwargs)


Executor.define = _define_watch  # type: ignore[method-assign]
Executor.run = _run_or_abort  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(worker.main())
