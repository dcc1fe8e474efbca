"""``torch.cuda.CUDAGraph`` / ``torch.cuda.graph`` for vGPUs.

Capture records the session's commands instead of sending them (nothing runs, as with a
real capture); each replay sends the recorded bytes as one frame, and the server re-runs
them on the same tensor handles. Tensors the graph touched stay alive until ``reset()``.
"""

from __future__ import annotations

from typing import Any

from orion_vgpu.client.runtime import get_runtime

_capturing = False


def is_current_stream_capturing() -> bool:
    return _capturing


class CUDAGraph:
    def __init__(self, keep_graph: bool = False) -> None:
        self._data: dict[int, bytes] = {}
        self._kept: dict[int, list[int]] = {}

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global",
                      **kwargs: Any) -> None:
        global _capturing
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
            if data:
                self._data[i] = data
            self._kept[i] = kept

    def replay(self) -> None:
        if not self._data:
            raise RuntimeError("CUDAGraph.replay() before a capture")
        rt = get_runtime()
        for i, data in self._data.items():
            rt.conns[i].replay(data)

    def reset(self) -> None:
        rt = get_runtime()
        for i, kept in self._kept.items():
            if i < len(rt.conns):
                rt.conns[i].frees.extend(kept)
        self._data.clear()
        self._kept.clear()

    def instantiate(self) -> None:
        pass

    def pool(self) -> tuple[int, int]:
        return (0, id(self))

    def enable_debug_mode(self) -> None:
        pass

    def debug_dump(self, path: str) -> None:
        with open(path, "w") as f:
            f.write("".join(f"vgpu {i}: {len(d)} bytes of commands\n" for i, d in self._data.items()))

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
    """Warm the callables up and return them; they run eagerly on the vGPU.

    (Graphing separate forward and backward passes is not implemented yet.)"""
    single = not isinstance(callables, tuple)
    fns = (callables,) if single else callables
    args = (sample_args,) if single else sample_args
    for fn, a in zip(fns, args, strict=True):
        for _ in range(num_warmup_iters):
            fn(*a)
    return callables
