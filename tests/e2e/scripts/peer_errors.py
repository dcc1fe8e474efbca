# Copies between vGPUs that must fail, each with one clear error at the next sync of the
# receiving vGPU (ORION_VGPU=2 only). PEER_TTL is the server's ORION_PEER_TTL_S: a snapshot
# nobody takes is dropped after it, and its memory released.
import os
import secrets
import socket
import threading
import time

import torch

from orion_vgpu.client import frontend
from orion_vgpu.client.runtime import get_runtime
from orion_vgpu.protocol import messages as m

x = torch.arange(1 << 20, dtype=torch.float32, device="cuda:0")  # 4 MiB
y = x.to("cuda:1")  # a good copy first
rt = get_runtime()
src, dst = rt.conn(0), rt.conn(1)
route = src.peer_route(dst)


def pull(xid: bytes, seq: int, where: object = route) -> str:
    dst.peer_recv(frontend._next_handle(), xid, seq, where, x)
    try:
        dst.request([m.CMD_SYNC])
        return "ok"
    except Exception as exc:  # the error the program would see
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


print("ROUTE", route[0])
print("UNKNOWN |", pull(secrets.token_bytes(16), src.peer_seq))
xid = secrets.token_bytes(16)
seq = src.peer_send(x._h, xid)
print("FIRST |", pull(xid, seq))
print("REPLAY |", pull(xid, seq))
print("NOT_PEER_NAME |", pull(secrets.token_bytes(16), 1, ["unix", "/tmp/oriond.sock"]))
junk = socket.create_server(("127.0.0.1", 0))


def serve_junk() -> None:
    c, _ = junk.accept()
    c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    time.sleep(1)
    c.close()


threading.Thread(target=serve_junk, daemon=True).start()
print("NOT_PEER_TCP |", pull(secrets.token_bytes(16), 1, ["tcp", "127.0.0.1",
                                                           junk.getsockname()[1]]))
base = src.stats()["allocated"]
xid = secrets.token_bytes(16)
seq = src.peer_send(x._h, xid)
held = src.stats()["allocated"] - base
time.sleep(float(os.environ["PEER_TTL"]) + 3)
print("HELD", held, "AFTER_TTL", src.stats()["allocated"] - base)
print("EXPIRED |", pull(xid, seq))
# 40 MiB of a 64 MiB vGPU (ORION_GMEM=64): no room for a snapshot on the source, so this
# copy comes through the client instead of failing.
big = torch.ones(10 << 20, device="cuda:0")
relayed = -sum(c.bytes_up + c.bytes_down for c in (src, dst))
moved = big.to("cuda:1")
relayed += sum(c.bytes_up + c.bytes_down for c in (src, dst))
print("NO_ROOM", float(moved.sum()), relayed)
del big, moved
src.peer_send(x._h, secrets.token_bytes(16))  # left for the session's end to drop
print("RESULT", float(y[-1]), float(x.to("cuda:1").sum()))
