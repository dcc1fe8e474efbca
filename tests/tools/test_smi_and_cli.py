"""`orion smi` rendering and the CLI's error contract."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rich.console import Console

from orion_vgpu.cli import main
from orion_vgpu.tools.smi import render

POOL = {
    "vgpu_total": 8, "vgpu_free": 7,
    "nodes": [{"id": "n1", "name": "gpu-node-1"}],
    "gpus": [
        {"node_id": "n1", "node_name": "gpu-node-1", "node_addr": "10.0.0.5:9960", "index": i,
         "uuid": f"EMU-{i}", "name": "Emulated GPU (CPU) 16GiB", "memory_mib": 16384,
         "memory_allocated_mib": 4096 if i == 0 else 0, "compute_allocated": 25 if i == 0 else 0,
         "vgpu_count": 4, "vgpu_free": 3 if i == 0 else 4, "emulated": True, "state": "up"}
        for i in range(2)
    ],
}  # fmt: skip
ALLOCATIONS = [
    {"id": "fda38164-711b-4809-9984-2759a3a2165b", "state": "active", "user": "alice",
     "host": "vm1", "pid": 4242, "command": "python train.py --epochs [10]", "created_at": 0,
     "vgpus": [{"index": 0, "node_name": "gpu-node-1", "gpu_index": 0, "emulated": True,
                "gmem_mib": 4096, "ratio": 25}]},
]  # fmt: skip


def test_render_pool_and_processes() -> None:
    console = Console(record=True, width=200)
    render(console, "127.0.0.1:9123", POOL, ALLOCATIONS)
    text = console.export_text()
    assert "Orion vGPU pool at 127.0.0.1:9123: 1 node(s), 2 GPU, 8 vGPU, 7 free" in text
    assert "Emulated GPU (CPU) 16GiB [emulated]" in text
    assert "4096 / 16384" in text and "1 / 4 used" in text
    assert "fda38164" in text and "alice@vm1" in text and "4242" in text
    assert "python train.py --epochs [10]" in text  # user text is not rich markup
    assert "gpu-node-1:0 (emulated)" in text


def test_render_idle_pool() -> None:
    console = Console(record=True, width=200)
    render(console, "c:1", POOL, [])
    assert "No running processes hold vGPUs." in console.export_text()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("orion-vgpu 0.1.0 (api_version=0.1,data_version=0.1")


def test_run_without_command_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--vgpu", "1", "--"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orion: error: give the command to run after --")
    assert err.count("\n") == 1


def test_bad_server_config_via_orion_server(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "server.conf"
    conf.write_text("[server]\n  bind_addr = 127.0.0.1\n  bind_net = lo\n")
    assert main(["server", "--config", str(conf)]) == 2
    assert capsys.readouterr().err == (
        f"orion: error: {conf} [server] bind_addr, bind_net: set only one of them "
        "(bind_addr = IP address, or bind_net = interface name such as eth0)\n"
    )


def test_console_script_aliases_exist() -> None:
    for name in ("orion", "oriond", "orion-check", "orion-shm", "orion-smi"):
        result = subprocess.run([sys.executable, "-c", f"import shutil,sys; print(shutil.which('{name}', path=sys.prefix + '/bin'))"],
                                capture_output=True, text=True)  # fmt: skip
        assert result.stdout.strip() != "None", name
