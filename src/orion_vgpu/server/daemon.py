"""`oriond`: the per-node server daemon.

Reads `server.conf`, finds the node's GPUs (NVML or emulated), opens the data plane
through the session manager, and keeps the node registered with the controller until
SIGTERM/SIGINT. Problems the operator can fix (bad config, port in use, no GPU) end the
daemon with one line and a non-zero status; a controller that is down does not.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from orion_vgpu import PROTOCOL_VERSION, __version__
from orion_vgpu.config import ServerConfig, UserError, load_server_config, resolve_pool_token
from orion_vgpu.logs import PACKAGE_LOGGER, setup_logging
from orion_vgpu.server.devices import Device, device_notes, discover_devices
from orion_vgpu.server.netif import advertised_address, resolve_bind_net
from orion_vgpu.server.registration import ControllerLink

log = logging.getLogger(__name__)


def run_server(config_path: Path | None = None, stop: threading.Event | None = None) -> int:
    """Run oriond until SIGTERM/SIGINT (or `stop` is set); return the exit status."""
    cfg = resolve_bind(load_server_config(config_path))
    log_dir = cfg.log_dir
    session_dir = log_dir / "session"
    _make_dirs(log_dir, session_dir)
    setup_logging("server", cfg.log, file=log_dir / "server.log" if cfg.log.log_to_file else None)
    _route_data_plane_logs()
    try:
        node = Node(cfg, session_dir)
        node.start()
    except UserError as exc:
        _file_only(logging.ERROR, str(exc))
        raise
    stop = stop or threading.Event()
    received = _on_signals(stop)
    while not stop.wait(1.0):
        pass
    node.stop(received.get("name", "stop requested"))
    return 0


class Node:
    """Devices + session manager + controller link of one oriond."""

    def __init__(self, cfg: ServerConfig, session_dir: Path) -> None:
        self.cfg = cfg
        self.session_dir = session_dir
        self.devices: list[Device] = discover_devices(cfg)
        self.pool_token = resolve_pool_token(cfg.pool_token, cfg.pool_token_file)
        self.sessions: Any = None
        self.link: ControllerLink | None = None

    def start(self) -> None:
        # NVML numbers GPUs by PCI bus; make CUDA (in workers) use the same numbering.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        self._log_summary()
        check_bindable(self.cfg)
        from orion_vgpu.server.sessions import SessionManager

        self.sessions = SessionManager(
            devices=self.devices,
            server_cfg=self.cfg,
            pool_token=self.pool_token,
            session_log_dir=self.session_dir,
            on_event=self._on_event,
        )
        try:
            self.sessions.start()
        except OSError as exc:
            raise UserError(bind_error_message(self.cfg, exc)) from None
        log.info("Listening on %s (TCP) and %s (Unix socket)", tcp_address(self.cfg), self.cfg.unix_socket)
        self.link = ControllerLink(
            controller_addr=self.cfg.controller_addr,
            pool_token=self.pool_token,
            registration=registration_body(self.cfg, self.devices),
            stats=self.sessions.stats,
            on_registered=self.sessions.set_node_id,
            on_end_sessions=self.sessions.end_sessions,
            heartbeat_interval=self.cfg.heartbeat_interval,
        )
        self.link.start()

    def stop(self, why: str) -> None:
        log.info("Orion Server stopping (%s)", why)
        if self.sessions is not None:
            try:
                self.sessions.stop()  # ends sessions; their session_ended events get queued
            except Exception:
                log.exception("Stopping the sessions failed")
        if self.link is not None:
            self.link.stop(flush_timeout=3.0)
        log.info("Orion Server stopped")

    def _on_event(self, event: dict[str, Any]) -> None:
        """Called by the session manager from its threads: log one line, tell the controller."""
        kind = event.get("type")
        alloc, vgpu = event.get("allocation_id"), event.get("vgpu_index")
        if kind == "session_started":
            log.info("Session started: allocation ID %s vGPU %s", alloc, vgpu)
        elif kind == "session_ended":
            log.info("Session ended: allocation ID %s vGPU %s (%s)", alloc, vgpu, event.get("reason") or "closed")
        else:
            log.info("Session event %s: allocation ID %s vGPU %s", kind, alloc, vgpu)
        if self.link is not None:
            self.link.post_event(dict(event))

    def _log_summary(self) -> None:
        cfg = self.cfg
        log.info(
            "Orion Server %s starting as node %s (pid %d, config %s)",
            __version__,
            cfg.name,
            os.getpid(),
            cfg.path or "defaults: no server.conf",
        )
        for device in self.devices:
            kind = "emulated, runs on CPU" if device.emulated else device.torch_device
            log.info(
                "GPU %d : %s, %d MiB, %s (%s), %d vGPU",
                device.index,
                device.name,
                device.memory_mib,
                device.uuid,
                kind,
                cfg.vgpu_count,
            )
        log.info(
            "Data plane %s and %s; SHM %s, RDMA %s, KVM %s; session logs in %s; controller %s",
            tcp_address(cfg),
            cfg.unix_socket,
            _on(cfg.enable_shm),
            _on(cfg.enable_rdma),
            _on(cfg.enable_kvm),
            self.session_dir,
            cfg.controller_addr,
        )
        for note in device_notes(cfg, self.devices):
            log.warning(note)
        if cfg.enable_rdma:
            log.warning("enable_rdma = true: RDMA is not supported by this build; using TCP, Unix socket and shared memory")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def resolve_bind(cfg: ServerConfig) -> ServerConfig:
    """Turn `bind_net = eth0` into its IPv4 address: the session manager binds bind_addr."""
    if cfg.bind_addr is None and cfg.bind_net:
        return replace(cfg, bind_addr=resolve_bind_net(cfg.bind_net))
    return cfg


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_address(cfg: ServerConfig) -> str:
    return _host_port(cfg.bind_addr or "127.0.0.1", cfg.listen_port)


def registration_body(cfg: ServerConfig, devices: list[Device]) -> dict[str, Any]:
    """`POST /nodes/register` (docs/architecture.md)."""
    return {
        "name": cfg.name,
        "addr": _host_port(advertised_address(cfg.bind_addr or "127.0.0.1"), cfg.listen_port),
        "unix_socket": str(cfg.unix_socket),
        "version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "vgpu_count": cfg.vgpu_count,
        "gpus": [device.to_register() for device in devices],
    }


def check_bindable(cfg: ServerConfig) -> None:
    """Fail early, with the fix, when the TCP port or the Unix socket is taken."""
    host = cfg.bind_addr or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, cfg.listen_port))
        except OSError as exc:
            raise UserError(bind_error_message(cfg, exc)) from None
    _check_unix_socket(cfg)


def _check_unix_socket(cfg: ServerConfig) -> None:
    path = cfg.unix_socket
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create {path.parent} for the Unix socket: {exc.strerror}; "
            "set [server] unix_socket to a writable path"
        ) from None
    if not path.exists() and not path.is_symlink():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # left behind by a daemon that died: reuse the name
            return
    raise UserError(
        f"Unix socket {path} is in use by another Orion Server; stop it or set "
        f"[server] unix_socket (and listen_port) to other values in {_where(cfg)}"
    )


def _where(cfg: ServerConfig) -> str:
    return str(cfg.path) if cfg.path else "/etc/orion/server.conf"


def bind_error_message(cfg: ServerConfig, exc: OSError) -> str:
    where = f"cannot listen on {tcp_address(cfg)}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: address already in use (another oriond or program holds the port; "
            f"`orion check runtime server` shows a running oriond); stop it or set "
            f"[server] listen_port in {_where(cfg)}"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{where}: this host has no such address; set [server] bind_addr to one of its "
            f"addresses (or bind_net to an interface) in {_where(cfg)}"
        )
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need root); set [server] listen_port"
    return f"{where} / {cfg.unix_socket}: {exc.strerror or exc}"


def _make_dirs(*dirs: Path) -> None:
    for directory in dirs:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot create log directory {directory}: {exc.strerror}; "
                "set [log] log_dir to a writable directory"
            ) from None


def _on_signals(stop: threading.Event) -> dict[str, str]:
    """SIGTERM/SIGINT set `stop`; returns a dict that will hold the signal's name."""
    received: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        return received  # embedded (tests): the caller stops us through `stop`

    def handler(signum: int, _frame: object) -> None:
        received["name"] = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return received


# sessions.py, handshake.py and workerpool.py log as "orion.server" (their tests listen
# there), outside the package logger that setup_logging configures.
DATA_PLANE_LOGGER = "orion.server"


class _ToPackageLogger(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(PACKAGE_LOGGER).handle(record)


def _route_data_plane_logs() -> None:
    """Send the data plane's lines (handshakes, session start/end, worker trouble) to
    server.log and the screen like the daemon's own, at the same level."""
    data_plane = logging.getLogger(DATA_PLANE_LOGGER)
    for handler in list(data_plane.handlers):
        if isinstance(handler, _ToPackageLogger):
            data_plane.removeHandler(handler)
    data_plane.addHandler(_ToPackageLogger())
    data_plane.setLevel(logging.getLogger(PACKAGE_LOGGER).level)


def _file_only(level: int, message: str) -> None:
    """Record a fatal error in server.log; the CLI prints it on the screen itself."""
    record = logging.LogRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger(PACKAGE_LOGGER).handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)
