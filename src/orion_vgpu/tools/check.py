"""`orion check runtime|install server|client` (alias `orion-check`).

Prints the sections and lines of the seeds' `orion-check` (000, 001) — wording kept,
typos included ("addrress", "Infomation", "under managered"), so scripts that grep them
keep working — and returns non-zero when something is wrong, each problem followed by
a `[Fix]` line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orion_vgpu import __version__
from orion_vgpu.config import (
    ClientConfig,
    ConfigError,
    ServerConfig,
    UserError,
    default_log_dir,
    load_client_config,
    load_server_config,
    resolve_pool_token,
    server_config_path,
)
from orion_vgpu.server.devices import (
    DeviceError,
    NvmlReport,
    device_notes,
    discover_devices,
    how_to_emulate,
    probe_nvml,
)
from orion_vgpu.tools.controller_api import ControllerApi
from orion_vgpu.tools.procfind import Process, find_oriond, pick

LABEL_WIDTH = 40


class Report:
    """Collects the printed lines' verdicts; `failed` decides the exit status."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self.write = write
        self.failed = 0

    def line(self, text: str = "") -> None:
        self.write(text)

    def flag(self, label: str, ok: bool, detail: str = "") -> None:
        self.write(f"{label:<{LABEL_WIDTH}}[{'Yes' if ok else 'No'}]" + (f"  {detail}" if detail else ""))

    def value(self, label: str, value: object) -> None:
        self.write(f"{label:<{LABEL_WIDTH}}{value}")

    def fail(self, problem: str, fix: str) -> None:
        self.failed += 1
        self.write(problem)
        self.write(f"[Fix] {fix}")

    @property
    def status(self) -> int:
        return 1 if self.failed else 0


# --------------------------------------------------------------------------- GPUs


def section_gpus(r: Report, cfg: ServerConfig, nvml: NvmlReport | None = None) -> None:
    nvml = nvml or probe_nvml()
    r.line("Searching NVIDIA GPU ...")
    if nvml.devices:
        r.line(f"CUDA driver {nvml.driver_version}")
        r.line(f"{nvml.driver_version} is installed.")
        r.line(f"{len(nvml.devices)} NVIDIA GPUs are found :")
        for device in nvml.devices:
            r.line(f"    {device.index} : {device.name}")
    else:
        r.line(f"No NVIDIA GPU is found ({nvml.error or 'NVML reports no GPU'}).")
        try:
            devices = discover_devices(cfg, nvml)
        except DeviceError:
            r.fail("No emulated GPU is configured either: this Orion Server has nothing to serve.",
                   how_to_emulate(cfg))
        else:
            r.line(f"{len(devices)} emulated GPUs are configured (they run on the CPU, not NVIDIA hardware) :")
            for device in devices:
                r.line(f"    {device.index} : {device.name}  [emulated]")
            for note in device_notes(cfg, devices):
                r.line(f"[Info] {note}")
    r.line()
    r.line("Checking NVIDIA MPS ...")
    r.line(f"NVIDIA CUDA MPS is {'on' if _mps_running() else 'off'}.")
    r.line()


def _mps_running() -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip().startswith("nvidia-cuda-mps"):
                    return True
            except OSError:
                continue
    return False


# --------------------------------------------------------------------------- server


def _load_server(r: Report, path: Path | None) -> ServerConfig:
    try:
        return load_server_config(path)
    except ConfigError as exc:
        r.fail(f"Configuration file is invalid: {exc}", "correct the line named above, then restart oriond")
        return ServerConfig()


def section_server_status(r: Report, process: Process | None, others: list[Process], cfg: ServerConfig) -> None:
    r.line("Checking Orion Server status ...")
    if process is None:
        r.fail(
            "Orion Server is not running.",
            "start it: `sudo systemctl start oriond`, `oriond --config /etc/orion/server.conf` or `orion up`",
        )
    else:
        r.line(f"Orion Server is running with Linux user   : {process.user}")
        r.line(f"Orion Server is running with command line : {process.command_line} ")
        if len(others) > 1:
            pids = ", ".join(str(p.pid) for p in others)
            r.line(f"[Info] {len(others)} Orion Server processes are running (pids {pids}); "
                   f"diagnosing pid {process.pid} (choose with --config)")
    r.flag("Enable SHM", cfg.enable_shm)
    r.flag("Enable RDMA", cfg.enable_rdma)
    r.flag("Enable Local QEMU-KVM with SHM", cfg.enable_kvm and cfg.enable_shm)
    r.value("Binding IP Address :", cfg.bind_addr or f"{cfg.bind_net} (bind_net)")
    r.value("Listening Port :", cfg.listen_port)
    r.value("Unix Socket :", cfg.unix_socket)
    r.value("Configuration File :", cfg.path or "none (defaults)")
    r.line()


def _dial_address(cfg: ServerConfig) -> str:
    from orion_vgpu.server.daemon import resolve_bind
    from orion_vgpu.server.netif import advertised_address

    try:
        host = resolve_bind(cfg).bind_addr or "127.0.0.1"
    except UserError:
        host = "127.0.0.1"
    return advertised_address(host)


def _tcp_reachable(host: str, port: int, timeout: float = 2.0) -> str | None:
    """None when a TCP connection succeeds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def section_server_network(r: Report, cfg: ServerConfig) -> None:
    r.line("Testing the Orion Server network ...")
    host = _dial_address(cfg)
    address = f"[{host}]:{cfg.listen_port}" if ":" in host else f"{host}:{cfg.listen_port}"
    problem = _tcp_reachable(host, cfg.listen_port)
    if problem is None:
        r.line(f"Orion Server can be reached through {address}")
    else:
        r.fail(
            f"Orion Server can not be reached through {address} ({problem}).",
            "start oriond, or check bind_addr/listen_port and the firewall",
        )
    if cfg.unix_socket.exists():
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(2.0)
                probe.connect(str(cfg.unix_socket))
            r.line(f"Orion Server can be reached through {cfg.unix_socket}")
        except OSError as exc:
            r.line(f"[Info] Unix socket {cfg.unix_socket} does not answer ({exc.strerror}).")
    r.line()


# --------------------------------------------------------------------------- controller


def section_controller(
    r: Report, addr: str, source: str, token: str | None, node_name: str | None = None
) -> dict[str, Any] | None:
    """The seeds' controller lines; returns the pool when the controller answered."""
    r.line("Checking Orion Controller status ...")
    r.line("[Info] Orion Controller setting may be different in different SHELL.")
    r.line("[Info] Environment variable ORION_CONTROLLER has the first priority.")
    r.line()
    if source == "env":
        r.line(f"Environment variable ORION_CONTROLLER is set as {addr} Using this address to diagnose Orion Controller.")
    elif source == "default":
        r.line(f"Orion Controller addrress is set as {addr} by default (no configuration file). Using this address to diagnose Orion Controller")
    else:
        r.line(f"Orion Controller addrress is set as {addr} in configuration file. Using this address to diagnose Orion Controller")
    host, _, port = addr.rpartition(":")
    problem = _tcp_reachable(host.strip("[]"), int(port))
    if problem is not None:
        r.fail(
            f"Address {addr} is not reached ({problem}).",
            "start the controller (`orion controller` or `orion up`), or set ORION_CONTROLLER / "
            "[controller] controller_addr to its HOST:PORT",
        )
        return None
    r.line(f"Address {addr} is reached.")
    with ControllerApi(addr, token) as api:
        try:
            info = api.info()
            pool = api.pool()
        except UserError as exc:
            r.fail(f"Orion Controller at {addr} does not answer correctly: {exc}",
                   "check that this address is an Orion Controller and read its controller.log")
            return None
    r.line(f"Orion Controller Version Infomation : api_version={info.get('api_version')},data_version={info.get('data_version')}")
    total, free = int(pool.get("vgpu_total", 0)), int(pool.get("vgpu_free", 0))
    r.line(f"There are {total} vGPU under managered by Orion Controller. {free} vGPU are free now.")
    if total == 0:
        r.fail("No vGPU in the pool: no Orion Server has registered.",
               "start oriond on the GPU nodes with controller_addr and pool_token pointing here "
               "(`orion check runtime server` on a node tells why it is missing)")
    if node_name is not None:
        _node_registered(r, pool, node_name)
    return pool


def _node_registered(r: Report, pool: dict[str, Any], node_name: str) -> None:
    gpus = [g for g in pool.get("gpus", []) if g.get("node_name") == node_name]
    if gpus:
        vgpus = sum(int(g.get("vgpu_count", 0)) for g in gpus)
        r.line(f"Orion Server {node_name} is registered with Orion Controller : {len(gpus)} GPU, {vgpus} vGPU.")
    else:
        r.fail(
            f"Orion Server {node_name} is not registered with Orion Controller.",
            "check [controller] controller_addr and pool_token in server.conf, and server.log",
        )


def _env_controller(env: Mapping[str, str], fallback: str, fallback_source: str) -> tuple[str, str]:
    from orion_vgpu.config import parse_host_port

    if env.get("ORION_CONTROLLER"):
        try:
            return parse_host_port(env["ORION_CONTROLLER"]), "env"
        except ValueError:
            raise ConfigError(f"environment ORION_CONTROLLER={env['ORION_CONTROLLER']}: expected HOST:PORT (e.g. 127.0.0.1:9123)") from None
    return fallback, fallback_source


# --------------------------------------------------------------------------- commands


def runtime_server(config: Path | None, env: Mapping[str, str] = os.environ) -> int:
    r = Report()
    processes = find_oriond()
    process = pick(processes, config)
    path = config if config is not None else (process.config if process else server_config_path())
    cfg = _load_server(r, path)
    section_gpus(r, cfg)
    section_server_status(r, process, processes, cfg)
    section_server_network(r, cfg)
    source = str(cfg.path) if cfg.path else "default"
    addr, source = _env_controller(env, cfg.controller_addr, source)
    try:
        token = resolve_pool_token(cfg.pool_token, cfg.pool_token_file, env)
    except ConfigError:
        token = None
    section_controller(r, addr, source, token, node_name=cfg.name)
    return r.status


def _client_config(r: Report, env: Mapping[str, str]) -> ClientConfig | None:
    try:
        return load_client_config(env)
    except ConfigError as exc:
        r.fail(f"Orion Client configuration is invalid: {exc}", "correct the file or variable named above")
        return None


def section_client_config(r: Report, cfg: ClientConfig) -> None:
    r.line("Checking Orion Client configuration ...")
    r.value("Configuration File :", ", ".join(map(str, reversed(cfg.files))) or "none (defaults)")
    r.value("ORION_VGPU :", cfg.vgpu if cfg.vgpu is not None else "not set")
    r.value("ORION_GMEM :", f"{cfg.gmem_mib} MiB" if cfg.gmem_mib else "default (GPU memory / vgpu_count)")
    r.value("ORION_RATIO :", f"{cfg.ratio} %" if cfg.ratio else "default (100 / vgpu_count)")
    r.value("ORION_CROSS_NODE :", int(cfg.cross_node))
    r.flag("Enable NET", cfg.enable_net)
    r.flag("Enable SHM", os.access("/dev/shm", os.W_OK))
    r.flag("Orion Client runtime for PyTorch", importlib.util.find_spec("torch") is not None,
           f"torch {_version('torch')}")
    r.value("Client Log Directory :", cfg.log_dir)
    if cfg.vgpu is None:
        r.line("[Info] ORION_VGPU is not set: programs use no Orion vGPU until you `export ORION_VGPU=1`.")
    r.line()


def _check_request_fits(r: Report, cfg: ClientConfig, pool: dict[str, Any]) -> None:
    gpus = pool.get("gpus", [])
    if cfg.gmem_mib and gpus:
        largest = max(int(g.get("memory_mib", 0)) for g in gpus)
        if cfg.gmem_mib > largest:
            r.fail(f"ORION_GMEM={cfg.gmem_mib} MiB is larger than any GPU in the pool (largest {largest} MiB).",
                   f"export ORION_GMEM={largest} or less")
    if cfg.vgpu and cfg.vgpu > int(pool.get("vgpu_total", 0)) > 0:
        r.fail(f"ORION_VGPU={cfg.vgpu} is more than the pool's {pool.get('vgpu_total')} vGPU.",
               "ask for fewer vGPU or add Orion Servers")


def runtime_client(env: Mapping[str, str] = os.environ) -> int:
    r = Report()
    cfg = _client_config(r, env)
    if cfg is None:
        return r.status
    section_client_config(r, cfg)
    pool = section_controller(
        r, cfg.controller_addr, cfg.controller_addr_source, cfg.token or cfg.pool_token
    )
    if pool is not None:
        _check_request_fits(r, cfg, pool)
    return r.status


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _section_install_common(r: Report, command: str) -> None:
    r.value("Orion vGPU version :", __version__)
    r.value("Python :", f"{sys.version.split()[0]} ({sys.executable})")
    torch = _version("torch")
    r.value("PyTorch :", torch)
    if torch == "not installed":
        r.fail("PyTorch is not installed.", "pip install torch (the same version on clients and servers)")
    on_path = shutil.which(command)
    beside = Path(sys.executable).parent / command  # the venv's bin, maybe not on PATH
    where = on_path or (str(beside) if os.access(beside, os.X_OK) else None)
    r.flag(f"Command {command}", where is not None, where or "")
    if where is None:
        r.fail(f"{command} is not installed.", "reinstall orion-vgpu (pip install orion-vgpu)")
    elif on_path is None:
        r.line(f"[Info] {command} is not on PATH; add {beside.parent} to PATH to type `{command}`.")


def _section_writable(r: Report, label: str, directory: Path) -> None:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    ok = os.access(probe, os.W_OK)
    r.flag(label, ok, str(directory))
    if not ok:
        r.fail(f"{directory} is not writable.", "set [log] log_dir to a writable directory or run as its owner")


def install_server(config: Path | None) -> int:
    r = Report()
    r.line("Checking Orion Server installation ...")
    _section_install_common(r, "oriond")
    path = config if config is not None else server_config_path()
    r.value("Configuration File :", path or "not found (defaults; /etc/orion/server.conf)")
    before = r.failed
    cfg = _load_server(r, path)
    r.flag("Configuration is valid", r.failed == before)
    try:
        resolve_pool_token(cfg.pool_token, cfg.pool_token_file)
        r.flag("Pool token", True)
    except ConfigError as exc:
        r.flag("Pool token", False)
        r.fail(f"No pool token: {exc}", "copy the controller's <data-dir>/pool_token into [controller] pool_token")
    _section_writable(r, "Log directory writable", cfg.log.log_dir or default_log_dir("server"))
    r.line()
    section_gpus(r, cfg)
    return r.status


def install_client(env: Mapping[str, str] = os.environ) -> int:
    r = Report()
    r.line("Checking Orion Client installation ...")
    _section_install_common(r, "orion")
    cfg = _client_config(r, env)
    r.flag("Configuration is valid", cfg is not None)
    hook = importlib.util.find_spec("orion_vgpu.client") is not None
    r.flag("Orion Client runtime", hook)
    if not hook:
        r.fail("The Orion Client runtime (orion_vgpu.client) is missing.", "reinstall orion-vgpu")
    if cfg is not None:
        _section_writable(r, "Log directory writable", cfg.log_dir)
    return r.status


def run(kind: str, role: str, config: Path | None) -> int:
    if kind == "runtime":
        return runtime_server(config) if role == "server" else runtime_client()
    return install_server(config) if role == "server" else install_client()
