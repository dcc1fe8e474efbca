"""Client hosts in their own network namespaces, on a bridge like Docker's ``docker0``.

Each client host is a network namespace joined by a veth pair to a bridge in this
namespace; the bridge holds the gateway address, which oriond binds (``bind_addr``), as a
container on a Docker subnet reaches a server on its gateway. The addresses are a
private /29 in 10.203.0.0/16 that exists only on these devices: no traffic leaves the
machine. Needs root and iproute2 (``ip``); without them the test fails and says so.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientHost:
    netns: str
    host_if: str  # veth end in this namespace, a port of the bridge
    peer_if: str  # veth end inside ``netns``
    addr: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """Command prefix that runs a program on this host."""
        return ("ip", "netns", "exec", self.netns)

    def cut(self, end: str) -> None:
        """Take the link down at its ``bridge`` end (the client hears nothing from then on)
        or at its ``client`` end (the client's own route is gone)."""
        if end == "bridge":
            ip("link", "set", self.host_if, "down")
        else:
            ip("netns", "exec", self.netns, "ip", "link", "set", self.peer_if, "down")

    def restore(self) -> None:
        ip("link", "set", self.host_if, "up")
        ip("netns", "exec", self.netns, "ip", "link", "set", self.peer_if, "up")
        # Neighbour entries that failed during the cut would delay the next connection.
        ip("netns", "exec", self.netns, "ip", "neigh", "flush", "dev", self.peer_if)


@dataclass(frozen=True)
class Subnet:
    bridge: str
    gateway: str  # oriond and the controller bind this
    hosts: list[ClientHost]


def ip(*args: str) -> str:
    if shutil.which("ip") is None:
        raise RuntimeError("the network-cut test needs iproute2 (`ip`): apt-get install -y "
                           "iproute2")
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): "
                           f"{proc.stderr.strip()} (network namespaces need root)")
    return proc.stdout


def _free_slash29() -> ipaddress.IPv4Network:
    """A /29 in 10.203.0.0/16 that no interface here uses yet."""
    used = ip("-4", "-o", "addr", "show")
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.203.{random.randrange(256)}.{8 * random.randrange(32)}/29")
        if not any(f"{h}/" in used for h in net):
            return net
    raise RuntimeError("no free /29 in 10.203.0.0/16")


@contextlib.contextmanager
def bridged_hosts(count: int) -> Iterator[Subnet]:
    """``count`` client hosts on a fresh bridge (unique names); all removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    addrs = [str(h) for h in _free_slash29().hosts()]
    subnet = Subnet(f"orb{tag}", addrs[0], [
        ClientHost(f"orion-f-{tag}-{i}", f"orh{tag}{i}", f"orc{tag}{i}", addrs[1 + i])
        for i in range(count)])
    created: list[str] = []
    try:
        ip("link", "add", subnet.bridge, "type", "bridge")
        created.append(subnet.bridge)
        ip("addr", "add", f"{subnet.gateway}/29", "dev", subnet.bridge)
        ip("link", "set", subnet.bridge, "up")
        for host in subnet.hosts:
            _add_host(subnet, host, created)
        yield subnet
    finally:
        _remove(subnet, created)


def _add_host(subnet: Subnet, host: ClientHost, created: list[str]) -> None:
    ip("netns", "add", host.netns)
    created.append(host.netns)
    ip("link", "add", host.host_if, "type", "veth", "peer", "name", host.peer_if)
    ip("link", "set", host.peer_if, "netns", host.netns)
    ip("link", "set", host.host_if, "master", subnet.bridge)
    ip("link", "set", host.host_if, "up")
    inside = ("netns", "exec", host.netns, "ip")
    ip(*inside, "addr", "add", f"{host.addr}/29", "dev", host.peer_if)
    ip(*inside, "link", "set", host.peer_if, "up")
    ip(*inside, "link", "set", "lo", "up")


def _remove(subnet: Subnet, created: list[str]) -> None:
    # Deleting a namespace deletes its end of the pair, and with it the other end.
    for host in subnet.hosts:
        if host.netns in created:
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", host.netns)
        with contextlib.suppress(RuntimeError):
            ip("link", "del", host.host_if)
    if subnet.bridge in created:
        with contextlib.suppress(RuntimeError):
            ip("link", "del", subnet.bridge)
