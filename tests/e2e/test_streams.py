"""Streams are distinct objects that switch the current stream and device as CUDA's do
(before: every stream on a device compared equal and torch.cuda.stream(s) changed
nothing); an ordinal the program does not have is refused by the memory, sync and stream
calls (memory_allocated(5) used to answer with vGPU 0's figure); events know their device."""

from __future__ import annotations

from pathlib import Path

from e2e.cluster import client_env, result_lines, run_script


def test_streams_events_and_ordinals(pool, tmp_path: Path) -> None:
    ctl, _ = pool
    env = client_env(ctl, tmp_path / "c", ORION_VGPU="2", ORION_GMEM="1024")
    results = result_lines(run_script("streams.py", env))
    assert results == [
        "RESULT ordinals RuntimeError:True RuntimeError:True RuntimeError:True "
        "ValueError:True RuntimeError:True AssertionError:True",
        "RESULT peers True",
        "RESULT identity True True True 0 True 3",
        "RESULT stream ctx True True [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]",
        "RESULT other device 1 cuda:1 True 0 [2.0, 2.0, 2.0]",
        "RESULT with stream True True",
        "RESULT set_stream 1 True",
        "RESULT set back 0 True",
        "RESULT event None cuda:1 None",
        "RESULT done 45.0",
    ]
