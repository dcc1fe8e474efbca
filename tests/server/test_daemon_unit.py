"""oriond's helpers: bind checks and messages, bind_net, the registration body."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from orion_vgpu import PROTOCOL_VERSION, __version__
from orion_vgpu.config import EmulatedGpus, ServerConfig, UserError
from orion_vgpu.server.daemon import (
    bind_error_message,
    check_bindable,
    registration_body,
    resolve_bind,
)
from orion_vgpu.server.devices import NvmlReport, discover_devices
from orion_vgpu.server.netif import advertised_address
from pool import free_port


def cfg(tmp_path: Path, **kw: object) -> ServerConfig:
    base: dict[str, object] = {"listen_port": free_port(), "unix_socket": tmp_path / "s.sock", "name": "n1"}
    return ServerConfig(path=tmp_path / "server.conf", **{**base, **kw})  # type: ignore[arg-type]


def test_registration_body_matches_contract(tmp_path: Path) -> None:
    c = cfg(tmp_path, emulated_gpus=EmulatedGpus(2, 16384), listen_port=9960)
    devices = discover_devices(c, NvmlReport(None, [], "none"))
    body = registration_body(c, devices)
    assert set(body) == {"name", "addr", "unix_socket", "version", "protocol_version", "vgpu_count", "gpus"}
    assert body["addr"] == "127.0.0.1:9960" and body["unix_socket"] == str(tmp_path / "s.sock")
    assert (body["version"], body["protocol_version"], body["vgpu_count"]) == (__version__, PROTOCOL_VERSION, 4)
    assert [set(g) for g in body["gpus"]] == [{"index", "uuid", "name", "memory_mib", "emulated"}] * 2


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        c = cfg(tmp_path, listen_port=busy.getsockname()[1])
        with pytest.raises(UserError, match="address already in use .* set \\[server\\] listen_port in"):
            check_bindable(c)


def test_stale_unix_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(c.unix_socket))  # bound, never listening: like a dead daemon's file
    check_bindable(c)
    assert not c.unix_socket.exists()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(c.unix_socket))
        live.listen()
        with pytest.raises(UserError, match="is in use by another Orion Server"):
            check_bindable(c)


def test_bind_error_messages(tmp_path: Path) -> None:
    c = cfg(tmp_path, bind_addr="10.9.9.9")
    message = bind_error_message(c, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    assert "this host has no such address; set [server] bind_addr" in message


def test_bind_net_resolves_interface(tmp_path: Path) -> None:
    assert resolve_bind(cfg(tmp_path, bind_addr=None, bind_net="lo")).bind_addr == "127.0.0.1"
    with pytest.raises(UserError, match="bind_net = nosuch0: no IPv4 address on that interface .*interfaces here: .*lo"):
        resolve_bind(cfg(tmp_path, bind_addr=None, bind_net="nosuch0"))


def test_wildcard_bind_advertises_a_real_address() -> None:
    assert advertised_address("127.0.0.1") == "127.0.0.1"
    assert advertised_address("0.0.0.0") != "0.0.0.0"
