"""End to end with real processes: a controller (tests/pool.py), `oriond` with emulated
GPUs, and the `orion check` / `orion smi` tools against them."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from oriond_procs import Oriond, pool_vgpus, run_orion, server_conf, wait_until

from pool import ControllerProc, free_port

SEED_POOL_LINE = "There are 8 vGPU under managered by Orion Controller. 8 vGPU are free now."


def test_oriond_registers_and_checks_pass(
    tmp_path: Path,
    controller: ControllerProc,
    oriond: Callable[..., Oriond],
    orion_env: dict[str, str],
) -> None:
    conf = server_conf(tmp_path / "server.conf", controller_addr=controller.addr, port=free_port(),
                       pool_token_file=controller.data_dir / "pool_token")  # fmt: skip
    daemon = oriond(conf)
    wait_until(lambda: pool_vgpus(controller.api) == 8, what=f"8 vGPU in the pool\n{daemon.out_text()}")

    server = run_orion(["check", "runtime", "server", "--config", str(conf)], orion_env)
    assert server.returncode == 0, server.stdout + server.stderr
    out = server.stdout
    assert "Searching NVIDIA GPU ..." in out
    assert "2 emulated GPUs are configured (they run on the CPU, not NVIDIA hardware) :" in out
    assert "    0 : Emulated GPU (CPU) 16GiB  [emulated]" in out
    assert "Checking Orion Server status ..." in out
    assert "Orion Server is running with Linux user   : " in out
    assert f"Orion Server is running with command line : {daemon.proc.args[0]} -m orion_vgpu.server --config {conf} " in out
    assert "Enable SHM                              [Yes]" in out
    assert "Enable RDMA                             [No]" in out
    assert "Binding IP Address :                    127.0.0.1" in out
    assert "Testing the Orion Server network ..." in out
    assert f"Orion Server can be reached through 127.0.0.1:{daemon_port(conf)}" in out
    assert (f"Orion Controller addrress is set as {controller.addr} in configuration file. "
            "Using this address to diagnose Orion Controller") in out  # fmt: skip
    assert f"Address {controller.addr} is reached." in out
    assert "Orion Controller Version Infomation : api_version=0.1,data_version=0.1" in out
    assert SEED_POOL_LINE in out
    assert "[Fix]" not in out

    client = run_orion(["check", "runtime", "client"], {**orion_env, "ORION_CONTROLLER": controller.addr})
    assert client.returncode == 0, client.stdout + client.stderr
    assert (f"Environment variable ORION_CONTROLLER is set as {controller.addr} "
            "Using this address to diagnose Orion Controller.") in client.stdout  # fmt: skip
    assert SEED_POOL_LINE in client.stdout

    smi = run_orion(["smi", "--controller", controller.addr], orion_env)
    assert smi.returncode == 0, smi.stderr
    assert "Emulated GPU (CPU) 16GiB [emulated]" in smi.stdout
    assert "0 / 4 used" in smi.stdout

    log = daemon.log_text()
    assert "[INFO] GPU 0 : Emulated GPU (CPU) 16GiB" in log
    assert f"Registered with Orion Controller {controller.addr} as node test-node" in log
    assert daemon.stop() == 0
    assert "[INFO] Orion Server stopping (SIGTERM)" in daemon.log_text()
    assert "[INFO] Orion Server stopped" in daemon.log_text()


def daemon_port(conf: Path) -> int:
    line = next(x for x in conf.read_text().splitlines() if "listen_port" in x)
    return int(line.split("=")[1])


def test_controller_down_then_up_and_restarted(
    tmp_path: Path, oriond: Callable[..., Oriond]
) -> None:
    """oriond keeps running while the controller is away, logs one line, and
    (re-)registers when it comes (back)."""
    token = "shared-pool-token-1"
    ctl = ControllerProc(data_dir=tmp_path / "controller", opts={"pool_token": token,
                         "heartbeat_interval_s": 0.5}, port=free_port())  # fmt: skip
    conf = server_conf(tmp_path / "server.conf", controller_addr=ctl.addr, port=free_port(), pool_token=token)
    daemon = oriond(conf)
    try:
        wait_until(lambda: "is unreachable" in daemon.log_text(), 60, "the unreachable line")
        time.sleep(2)  # several retries
        assert daemon.proc.poll() is None
        assert daemon.log_text().count("is unreachable") == 1
        ctl.start()
        wait_until(lambda: pool_vgpus(ctl.api) == 8, 30, "registration once the controller is up")
        ctl.restart(kill=True)  # crash + restart: the node must come back
        wait_until(lambda: pool_vgpus(ctl.api) == 8, 30, "registration after the restart")
        assert daemon.proc.poll() is None
    finally:
        ctl.kill()


def test_client_check_when_controller_unreachable(orion_env: dict[str, str]) -> None:
    addr = f"127.0.0.1:{free_port()}"
    result = run_orion(["check", "runtime", "client"], {**orion_env, "ORION_CONTROLLER": addr})
    assert result.returncode != 0
    assert f"Address {addr} is not reached (Connection refused)." in result.stdout
    assert "[Fix] start the controller" in result.stdout

    smi = run_orion(["smi"], {**orion_env, "ORION_CONTROLLER": addr})
    assert smi.returncode == 2
    assert smi.stderr.startswith(f"orion: error: cannot reach Orion Controller at {addr} (connection refused)")
    assert smi.stderr.count("\n") == 1 and "Traceback" not in smi.stderr


def test_port_in_use_is_one_clear_line(tmp_path: Path, oriond: Callable[..., Oriond]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = server_conf(tmp_path / "server.conf", controller_addr="127.0.0.1:1", port=port,
                           pool_token="some-pool-token")  # fmt: skip
        daemon = oriond(conf)
        assert daemon.proc.wait(60) == 2
    out = daemon.out_text()
    assert f"oriond: error: cannot listen on 127.0.0.1:{port}: address already in use" in out
    assert f"set [server] listen_port in {conf}" in out
    assert "Traceback" not in out
    assert "[ERROR] cannot listen on" in daemon.log_text()  # also recorded in server.log


def test_no_gpu_no_emulation_refuses(tmp_path: Path, oriond: Callable[..., Oriond]) -> None:
    conf = server_conf(tmp_path / "server.conf", controller_addr="127.0.0.1:1", port=free_port(),
                       pool_token="some-pool-token", emulated=None)  # fmt: skip
    daemon = oriond(conf)
    assert daemon.proc.wait(60) == 2
    out = daemon.out_text()
    assert "oriond: error: no NVIDIA GPU found" in out
    assert "emulated_gpus = 2x16GiB" in out and "orion up --emulated-gpus 2x16GiB" in out


def test_bad_config_is_one_line(tmp_path: Path, oriond: Callable[..., Oriond]) -> None:
    conf = tmp_path / "server.conf"
    conf.write_text("[server]\n    vgpu_count = abc\n")
    daemon = oriond(conf, [str(Path(sys.executable).parent / "oriond"), "--config", str(conf)])
    assert daemon.proc.wait(60) == 2
    assert daemon.out_text() == f"oriond: error: {conf} [server] vgpu_count = abc: expected an integer 1..64\n"
