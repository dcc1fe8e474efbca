"""Network interfaces: `[server] bind_net = eth0` → the interface's IPv4 address."""

from __future__ import annotations

import fcntl
import socket
import struct

from orion_vgpu.config import UserError

_SIOCGIFADDR = 0x8915  # linux/sockios.h


def interface_names() -> list[str]:
    return [name for _, name in socket.if_nameindex()]


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of interface `name`, or None if it has none / does not exist."""
    request = struct.pack("256s", name.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
        except OSError:
            return None
    return socket.inet_ntoa(reply[20:24])


def resolve_bind_net(name: str) -> str:
    address = interface_ipv4(name)
    if address is None:
        known = ", ".join(interface_names()) or "none"
        raise UserError(
            f"[server] bind_net = {name}: no IPv4 address on that interface "
            f"(interfaces here: {known}); fix bind_net or set bind_addr instead"
        )
    return address


def advertised_address(bind_addr: str) -> str:
    """The address clients should dial: bind_addr itself, unless it is a wildcard, in
    which case the first non-loopback IPv4 address (clients cannot dial 0.0.0.0)."""
    if bind_addr not in ("0.0.0.0", "::"):
        return bind_addr
    for name in interface_names():
        address = interface_ipv4(name)
        if address and not address.startswith("127."):
            return address
    return "127.0.0.1"
