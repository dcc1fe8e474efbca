"""Pieces of `orion check`: the seeds' line layout, GPU section, process matching."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from orion_vgpu.config import EmulatedGpus, ServerConfig
from orion_vgpu.server.devices import Device, NvmlReport
from orion_vgpu.tools import check
from orion_vgpu.tools.procfind import is_oriond
from pool import free_port


def report() -> tuple[check.Report, list[str]]:
    lines: list[str] = []
    return check.Report(lines.append), lines


def test_flag_and_value_columns_match_the_seeds() -> None:
    r, lines = report()
    r.flag("Enable SHM", True)
    r.flag("Enable RDMA", False)
    r.flag("Enable Local QEMU-KVM with SHM", True)
    r.value("Binding IP Address :", "33.31.0.1")
    r.value("Listening Port :", 9960)
    assert lines == [  # copied from seed 001
        "Enable SHM                              [Yes]",
        "Enable RDMA                             [No]",
        "Enable Local QEMU-KVM with SHM          [Yes]",
        "Binding IP Address :                    33.31.0.1",
        "Listening Port :                        9960",
    ]
    assert r.status == 0


def test_fail_is_followed_by_fix() -> None:
    r, lines = report()
    r.fail("Something is wrong.", "do this")
    assert lines == ["Something is wrong.", "[Fix] do this"] and r.status == 1


def test_gpu_section_with_nvidia_gpus() -> None:
    r, lines = report()
    gpus = [Device(i, f"GPU-{i}", "Tesla V100-PCIE-16GB", 16160, False, f"cuda:{i}") for i in range(2)]
    check.section_gpus(r, ServerConfig(), NvmlReport("418.67", gpus, None))
    assert lines[:6] == [
        "Searching NVIDIA GPU ...",
        "CUDA driver 418.67",
        "418.67 is installed.",
        "2 NVIDIA GPUs are found :",
        "    0 : Tesla V100-PCIE-16GB",
        "    1 : Tesla V100-PCIE-16GB",
    ]
    assert "Checking NVIDIA MPS ..." in lines


def test_gpu_section_emulated_and_missing() -> None:
    r, lines = report()
    no_nvml = NvmlReport(None, [], "NVML unavailable: NVML Shared Library Not Found")
    check.section_gpus(r, ServerConfig(emulated_gpus=EmulatedGpus(1, 8192)), no_nvml)
    assert "    0 : Emulated GPU (CPU) 8GiB  [emulated]" in lines and r.status == 0

    r, lines = report()
    check.section_gpus(r, ServerConfig(), no_nvml)
    assert r.status == 1
    assert any(line.startswith("[Fix] to serve emulated GPUs") for line in lines)


@pytest.mark.parametrize(("argv", "expected"), [
    (["/usr/bin/oriond"], True),
    (["/venv/bin/python3", "/venv/bin/oriond", "--config", "x"], True),
    (["python", "-m", "orion_vgpu.server", "--config", "x"], True),
    (["python3.11", "-u", "-m", "orion_vgpu.cli", "server"], True),
    (["/venv/bin/python", "/venv/bin/orion", "server", "--config", "c"], True),
    (["/venv/bin/python", "/venv/bin/orion", "check", "runtime", "server"], False),
    (["python", "-m", "orion_vgpu.server.worker", "--control-fd", "6"], False),
    (["sudo", "oriond"], False),
    (["vim", "oriond.py"], False),
    ([], False),
])  # fmt: skip
def test_is_oriond(argv: list[str], expected: bool) -> None:
    assert is_oriond(argv) is expected


def test_controller_section_unreachable() -> None:
    r, lines = report()
    addr = f"127.0.0.1:{free_port()}"
    assert check.section_controller(r, addr, "/etc/orion/client.conf", None) is None
    assert (f"Orion Controller addrress is set as {addr} in configuration file. "
            "Using this address to diagnose Orion Controller") in lines  # fmt: skip
    assert f"Address {addr} is not reached (Connection refused)." in lines
    assert r.status == 1


def test_runtime_client_invalid_env(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env: Mapping[str, str] = {"ORION_HOME": str(tmp_path), "ORION_GMEM": "lots"}
    assert check.runtime_client(env) == 1
    out = capsys.readouterr().out
    assert "Orion Client configuration is invalid: environment ORION_GMEM=lots" in out
    assert "[Fix]" in out


def test_request_larger_than_any_gpu() -> None:
    from orion_vgpu.config import ClientConfig

    r, lines = report()
    pool = {"vgpu_total": 8, "gpus": [{"memory_mib": 16384}, {"memory_mib": 16384}]}
    check._check_request_fits(r, ClientConfig(gmem_mib=20000, vgpu=9), pool)
    assert "ORION_GMEM=20000 MiB is larger than any GPU in the pool (largest 16384 MiB)." in lines
    assert "ORION_VGPU=9 is more than the pool's 8 vGPU." in lines


def test_install_server_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_HOME", str(tmp_path))
    conf = tmp_path / "server.conf"
    conf.write_text(f"[controller]\n  pool_token = install-token\n[log]\n  log_dir = {tmp_path / 'log'}\n[server]\n  emulated_gpus = 1x4GiB\n")
    status = check.install_server(conf)
    out = capsys.readouterr().out
    assert "Checking Orion Server installation ..." in out
    assert "Configuration is valid                  [Yes]" in out
    assert "Pool token                              [Yes]" in out
    assert "    0 : Emulated GPU (CPU) 4GiB  [emulated]" in out
    assert status == (0 if "[Fix]" not in out else 1)
