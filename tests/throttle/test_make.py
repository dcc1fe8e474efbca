"""make_throttle: what a session spec turns into; CUDA metering with stand-in events."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from orion_vgpu.server import throttle as th
from orion_vgpu.server.throttle import CudaTimer, Throttle, make_throttle, mps_active, table_path


def spec(**extra: object) -> dict:
    base = {"session_id": "ab" * 16, "allocation_id": "alloc-1", "device": "cpu",
            "device_uuid": "EMU-1234-abcd", "emulated": True, "ratio": 25,
            "throttle_level": 100, "enable_computation_throttle": True}
    base.update(extra)
    return base


def test_disabled_throttle_on_an_emulated_gpu_is_none() -> None:
    assert make_throttle(spec(enable_computation_throttle=False)) is None


def test_emulated_gpu_table_is_per_gpu_and_per_daemon(tmp_path: Path) -> None:
    path = table_path(spec(), tmp_path)
    assert path.parent == tmp_path
    assert "EMU-1234-abcd" in path.name and f"-d{os.getppid()}" in path.name
    assert table_path(spec(device_uuid="EMU-other"), tmp_path) != path
    odd = table_path(spec(device_uuid="../../etc/x y"), tmp_path)
    assert odd.parent == tmp_path and "/" not in odd.name and " " not in odd.name


def test_tables_of_dead_daemons_are_swept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    uid = os.geteuid()
    stale = tmp_path / f"orion-throttle-v1-u{uid}-EMU-1-d{dead.pid}"
    live = tmp_path / f"orion-throttle-v3-u{uid}-EMU-1-d{os.getpid()}"
    other_user = tmp_path / f"orion-throttle-v3-u{uid + 1}-EMU-1-d{dead.pid}"
    real_gpu = tmp_path / f"orion-throttle-v3-u{uid}-GPU-9f"
    for p in (stale, live, other_user, real_gpu):
        p.write_bytes(b"")
    assert th.sweep_stale_tables(tmp_path) == 1
    assert not stale.exists() and live.exists() and other_user.exists() and real_gpu.exists()


def test_a_real_gpu_table_is_shared_by_every_daemon_on_the_host(tmp_path: Path) -> None:
    path = table_path(spec(device="cuda:0", emulated=False, device_uuid="GPU-9f"), tmp_path)
    assert path.name.endswith("-GPU-9f")


def test_sessions_on_one_gpu_meet_in_one_table(tmp_path: Path) -> None:
    a, b = make_throttle(spec(ratio=25), tmp_path), make_throttle(spec(ratio=75), tmp_path)
    assert isinstance(a, Throttle) and isinstance(b, Throttle)
    assert a.table is not None and b.table is not None and a.table.path == b.table.path
    assert a.table.claimed() == 2 and (a.cap, b.cap) == (1.0, 1.0)
    a.close()
    b.close()
    assert list(tmp_path.iterdir()) == []


def test_level_sets_the_cap(tmp_path: Path) -> None:
    t = make_throttle(spec(ratio=50, throttle_level=0), tmp_path)
    assert isinstance(t, Throttle) and t.cap == 0.5 and t.bucket is not None
    t.close()


def test_without_a_usable_table_the_session_keeps_its_cap(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="orion.session")
    t = make_throttle(spec(ratio=50, throttle_level=0), tmp_path / "missing")
    assert isinstance(t, Throttle) and t.table is None and t.cap == 0.5
    assert "cannot use" in caplog.text
    t.before_op()
    t.after_op(0.001)
    t.close()


def test_close_logs_the_session_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="orion.session")
    t = make_throttle(spec(ratio=50), tmp_path)
    assert t is not None
    t.before_op()
    t.after_op(0.25)
    t.close()
    assert "compute share: ratio 50%, throttle_level 100: busy 0.25 s of" in caplog.text
    assert t.stats()["busy_s"] == 0.25


def test_a_disabled_throttle_on_cuda_still_meters() -> None:
    t = make_throttle(spec(device="cuda:0", emulated=False, enable_computation_throttle=False))
    assert isinstance(t, Throttle) and t.timer is not None
    assert t.bucket is None and t.table is None and t.cap == 1.0


def test_mps_is_detected_from_its_pipe_directory(tmp_path: Path) -> None:
    assert not mps_active({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    (tmp_path / "control").touch()
    assert mps_active({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})


# -- CUDA metering with stand-in events -----------------------------------------------------


class FakeEvent:
    """Completes when the fake device reaches the time it was recorded at."""

    device_time = 0.0
    done_until = 0.0

    def __init__(self) -> None:
        self.t = 0.0
        self.synced = False

    def record(self, stream: object = None) -> None:
        self.t = FakeEvent.device_time

    def query(self) -> bool:
        return self.t <= FakeEvent.done_until

    def synchronize(self) -> None:
        FakeEvent.done_until = max(FakeEvent.done_until, self.t)

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1000.0


def test_cuda_timer_charges_ops_once_the_device_ran_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeEvent, "device_time", 0.0)
    monkeypatch.setattr(FakeEvent, "done_until", 0.0)
    timer = CudaTimer(FakeEvent, lambda: None)
    charged = []
    for _ in range(3):           # three queued ops of 10 ms each, device still busy
        timer.start()
        FakeEvent.device_time += 0.010
        charged.append(timer.stop(synchronize=False))
    assert charged == [0.0, 0.0, 0.0]
    FakeEvent.done_until = 0.020  # two finished
    timer.start()
    FakeEvent.device_time += 0.010
    assert timer.stop(synchronize=False) == pytest.approx(0.020)
    timer.start()
    FakeEvent.device_time += 0.010
    assert timer.stop(synchronize=True) == pytest.approx(0.030)  # contended: settled now


def test_throttle_charges_cuda_device_time_not_launch_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeEvent, "device_time", 0.0)
    monkeypatch.setattr(FakeEvent, "done_until", 1e9)
    t = Throttle(ratio=50, level=100, table=None, timer=CudaTimer(FakeEvent, lambda: None))
    t.before_op()
    FakeEvent.device_time += 0.5
    t.after_op(0.00001)          # what the launch took on the host
    assert t.busy_s == pytest.approx(0.5) and t.vtime == pytest.approx(1.0)


def test_no_system_call_constants_for_unknown_machines_means_plain_sleeps(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(th, "_SYS_FUTEX", None)
    table = th.ShareTable.join(tmp_path / "t", 0.5)
    assert table is not None and table.futex is None
    table.wait_change(table.generation(), 0.001)
    table.bump()
    table.close()
