"""``torch.cuda.CUDAGraph``, ``torch.cuda.graph``, ``make_graphed_callables`` for vGPUs.

Capture records the session's commands instead of sending them (nothing runs, as with a
real capture). At the end of the capture the recording is sent once as a graph the server
keeps (``CMD_GRAPH_DEF``); the server binds the tensors the capture created, so static
outputs exist before the first replay, as on a GPU. Each replay is one short command
(``CMD_GRAPH_RUN``) in one frame, and the server re-runs the commands on the same tensor
handles. Tensors the graph touched stay alive until ``reset()``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch.cuda.graphs as _torch_graphs

from orion_vgpu.client.runtime import get_runtime
from orion_vgpu.protocol import messages as m

# Saved before activate() replaces the torch.cuda names with the ones of this module.
_torch_make_graphed_callables = _torch_graphs.make_graphed_callables

_capturing = False
# Graph ids of this process (CUDA graphs and torch.compile graphs share them per session).
next_graph_id = itertools.count(1).__next__


_dropped: list[tuple[int, int]] = []  # (vGPU, graph id) to drop on the server


def is_current_stream_capturing() -> bool:
    return _capturing


def drop_pending() -> None:
    """Tell the servers about graphs dropped since the last graph command."""
    rt = get_runtime()
    while _dropped:
        i, gid = _dropped.pop()
        if i < len(rt.conns) and not rt.conns[i].closed:
            rt.conns[i].push([m.CMD_GRAPH_DEF, gid, None, None])


class CUDAGraph:
    def __init__(self, keep_graph: bool = False) -> None:
        self._graphs: dict[int, tuple[int, int]] = {}  # vGPU -> (graph id, bytes recorded)
        self._kept: dict[int, list[int]] = {}
        self._captured = False

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global",
                      **kwargs: Any) -> None:
        global _capturing
        if self._captured:
            raise RuntimeError("CUDAGraph.capture_begin() on a graph already captured; call "
                               "reset() first")
        rt = get_runtime()
        rt.start()
        for conn in rt.conns:
            conn.begin_capture()
        _capturing = True

    def capture_end(self) -> None:
        global _capturing
        _capturing = False
        for i, conn in enumerate(get_runtime().conns):
            data, kept = conn.end_capture()
            self._kept[i] = kept
            if data:
                gid = next_graph_id()
                # Sent in stream order with the work around it; its errors (quota) surface
                # at the next sync point like an op's.
                conn.push([m.CMD_GRAPH_DEF, gid, "stream", data])
                self._graphs[i] = (gid, len(data))
        self._captured = True
        drop_pending()

    def replay(self) -> None:
        if not self._captured:
            raise RuntimeError("CUDAGraph.replay() before a capture")
        drop_pending()
        rt = get_runtime()
        for i, (gid, _) in self._graphs.items():
            conn = rt.conns[i]
            with conn.lock:
                conn.push([m.CMD_GRAPH_RUN, gid, [], []])
                conn.flush()  # the work starts now, as a replay launches it

    def reset(self) -> None:
        rt = get_runtime()
        for i, kept in self._kept.items():
            if i < len(rt.conns):
                rt.conns[i].frees.extend(kept)
        # Dropped with the next graph command: reset() also runs from __del__, at any point
        # (even inside a send), where only appending is safe.
        _dropped.extend((i, gid) for i, (gid, _) in self._graphs.items())
        self._graphs.clear()
        self._kept.clear()
        self._captured = False

    def instantiate(self) -> None:
        pass

    def register_generator_state(self, generator: Any) -> None:
        """Each replay draws anew from a generator a captured op names, as CUDA graphs do
        from a registered one: the server runs the captured op with the generator itself."""

    def pool(self) -> tuple[int, int]:
        return (0, id(self))

    def enable_debug_mode(self) -> None:
        pass

    def debug_dump(self, path: str) -> None:
        with open(path, "w") as f:
            f.write("".join(f"vgpu {i}: graph {g}, {n} bytes of commands\n"
                            for i, (g, n) in self._graphs.items()))

    def __del__(self) -> None:
        try:
            self.reset()
        except Exception:  # interpreter shutdown
            pass


class graph:  # noqa: N801  (torch.cuda.graph is a class with this name)
    """Context manager that captures vGPU work into ``cuda_graph``."""

    def __init__(self, cuda_graph: CUDAGraph, pool: Any = None, stream: Any = None,
                 capture_error_mode: str = "global", **kwargs: Any) -> None:
        self.cuda_graph = cuda_graph
        self.pool = pool

    def __enter__(self) -> None:
        get_runtime().synchronize()
        self.cuda_graph.capture_begin(self.pool)

    def __exit__(self, *exc: object) -> None:
        self.cuda_graph.capture_end()


def graph_pool_handle() -> tuple[int, int]:
    return (0, 0)


def make_graphed_callables(callables: Any, sample_args: Any, num_warmup_iters: int = 3,
                           allow_unused_input: bool = False, pool: Any = None) -> Any:
    """PyTorch's own ``make_graphed_callables`` over vGPU graphs.

    It only needs what a vGPU already has (``CUDAGraph``, ``graph``, streams, and
    ``data_ptr`` that tells storages apart), so it is reused as is: forward and backward
    are captured once each, and every call of the result replays them as one frame each.
    """
    return _torch_make_graphed_callables(callables, sample_args, num_warmup_iters,
                                         allow_unused_input, pool)
