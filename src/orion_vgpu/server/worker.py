"""One session's worker process: started warm by the session manager, handed a client.

``python -m orion_vgpu.server.worker --control-fd N``. It waits on the control socket for
the session spec and the client connection (fd passing), greets the client, then executes
the client's command stream until the client says goodbye or goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import mmap
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

import msgpack
import torch

from orion_vgpu import PROTOCOL_VERSION, __version__
from orion_vgpu.protocol import codec, frames, waiting
from orion_vgpu.protocol import messages as m
from orion_vgpu.protocol.shm import (
    STREAM_MIN_BYTES,
    Arena,
    ShmError,
    ShmPeerGone,
    chunks,
    copy_bytes,
    prefer_huge_pages,
    stream_chunk,
)
from orion_vgpu.server import peer, settings
from orion_vgpu.server.collectives import Collectives
from orion_vgpu.server.executor import Executor, Missing, SessionError, oom_message
from orion_vgpu.server.graphs import GraphStore
from orion_vgpu.server.hostbuffers import HostBuffers, release
from orion_vgpu.server.throttle import make_throttle

log = logging.getLogger("orion.session")
STATS_INTERVAL_S = 1.0
# A frame expected within this is waited for awake (protocol.waiting), as the client waits
# for a reply: a worker asleep in recv made each of the client's sends that woke it take
# 30-45 us (a 2-vCPU VM), about 5 % of an eager MLP step. Longer gaps (a program computing
# on the host, a slow client) are waited for asleep, and so is every frame while other
# sessions share the GPU (see _shared_gpu).
SPIN_MAX_S = 0.001


class Control:
    """The worker's side of the control channel to the session manager."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, msg: dict) -> None:
        body = msgpack.packb(msg)
        with self.lock:
            try:
                frames.send_frame(self.sock, body)
            except OSError:
                pass  # the manager is gone; the session still ends cleanly

    def receive(self) -> tuple[dict, list[int]]:
        """One control frame and the fds sent with it. Reads exactly one frame: a fork
        request and the session spec may follow each other, each with its own fd."""
        head, fds = self._recv_fds(frames.HEADER.size)
        body_len = frames.HEADER.unpack(head)[0]
        body, more = self._recv_fds(body_len)
        msg = msgpack.unpackb(bytes(body))
        if not isinstance(msg, dict):
            raise SystemExit("control message is not a map")
        return msg, fds + more

    def _recv_fds(self, n: int) -> tuple[bytearray, list[int]]:
        buf, fds = bytearray(), []
        while len(buf) < n:
            data, got, _flags, _addr = socket.recv_fds(self.sock, n - len(buf), 4)
            if not data:
                raise SystemExit(0)  # manager closed us while idle
            buf += data
            fds += got
        return buf, fds


class Session:
    def __init__(self, spec: dict, conn: socket.socket, control: Control) -> None:
        self.spec = spec
        self.conn = conn
        self.control = control
        self.device = torch.device(spec["device"])
        self.ex = Executor(self.device, int(spec["gmem_bytes"]))
        self.ex.throttle = make_throttle(spec)
        self.arena: Arena | None = None
        self.frames_done = 0  # frames run, published to a co-located client (Connection.starved)
        self.host_buffers: HostBuffers | None = None  # with the arena (client.hostpool)
        self.pending: SessionError | None = None
        self.unpacker = self._new_unpacker()
        self.payload_left = 0
        # frames awaited awake, from the first short wait on
        self._waiter = waiting.Waiter(conn, SPIN_MAX_S, mean_s=SPIN_MAX_S)
        self.packer = msgpack.Packer(default=codec.encode_default)
        self.end_reason: str | None = None  # set when the stream cannot go on (a stalled transfer)
        self.revoked: str | None = None  # oriond ended the session: its allocation is over
        self.peer: peer.PeerEndpoint | None = None  # copies to/from sibling vGPUs (peer.py)
        # torch.distributed process groups among the workers of a program's ranks
        self.collectives = Collectives(self.ex, self.device, spec["session_id"][:8])
        # CUDA-graph captures and torch.compile graphs the client defined (server/graphs.py)
        self.graphs = GraphStore(self.ex, self.device, self._execute, self._new_unpacker,
                                 spec["session_id"][:8], self._fail)

    def _new_unpacker(self) -> msgpack.Unpacker:
        """A decoder of commands: handles, views and generators resolve in this session."""
        ex = self.ex
        return msgpack.Unpacker(
            ext_hook=codec.make_ext_hook(ex.resolve, self.device, self._generator,
                                         ex.resolve_view, ex.tensors),
            raw=False, strict_map_key=False, max_buffer_size=frames.MAX_BODY)

    # handshake ---------------------------------------------------------------
    def welcome(self) -> None:
        hello = self.spec.get("hello") or {}
        shm_ok = False
        shm = hello.get("shm")
        if shm and self.spec.get("enable_shm", True):
            shm_ok = self._attach_shm(shm)
        props = self._device_props()
        self.peer = peer.open_endpoint(self.spec, self.ex.ledger)
        body = msgpack.packb({"kind": m.WELCOME, "session_id": self.spec["session_id"],
                              "protocol": PROTOCOL_VERSION, "version": __version__,
                              "torch": torch.__version__, "device": props, "shm": shm_ok,
                              "peer": self.peer.address if self.peer else None,
                              "placement": waiting.placement()})
        frames.send_frame(self.conn, body)
        log.info("session %s allocation %s vgpu %s started on %s (%s), quota %d MiB, shm %s",
                 self.spec["session_id"][:8], self.spec["allocation_id"], self.spec["vgpu_index"],
                 self.spec["device_name"], self.spec["device"], self.ex.ledger.limit >> 20,
                 "yes" if shm_ok else "no")

    def _attach_shm(self, shm: dict) -> bool:
        try:
            arena = Arena(str(shm["path"]))
            if len(str(shm["nonce"])) < 16 or arena.read_nonce() != str(shm["nonce"]):
                arena.close()
                log.info("shared memory %s not shared with the client; using the socket",
                         shm["path"])
                return False
        except (ShmError, OSError, KeyError) as exc:
            log.info("shared memory unavailable (%s); using the socket", exc)
            return False
        self.arena = arena
        arena.set_frames_done(0)  # an `orion shm` file may hold the count of an earlier session
        self.ex.client_running = arena.client_running
        self.host_buffers = HostBuffers(str(shm["nonce"]))
        return True

    def _device_props(self) -> dict[str, Any]:
        props = {"name": self.spec["device_name"], "uuid": self.spec["device_uuid"],
                 "total_memory": self.ex.ledger.limit, "emulated": bool(self.spec["emulated"]),
                 "index": self.spec["device_index"], "major": 8, "minor": 0,
                 "multi_processor_count": os.cpu_count() or 1}
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            props.update(major=p.major, minor=p.minor,
                         multi_processor_count=p.multi_processor_count)
        return props

    # main loop ---------------------------------------------------------------
    def serve(self) -> str:
        clock = time.perf_counter
        waiter = self._waiter
        while True:
            try:
                idle_from = clock()
                if not self._shared_gpu():
                    waiter.before(idle_from)
                body, self.payload_left = frames.recv_frame(self.conn)
                waiter.after(idle_from)
            except (frames.PeerClosed, ConnectionResetError):
                return self.closed("client disconnected")
            except frames.FrameError as exc:
                self._reply_error("ProtocolError", str(exc))
                return f"protocol error: {exc}"
            except OSError as exc:
                return f"connection lost: {exc}"
            try:
                done = self._run_frame(body)
                self.frames_done += 1
                if self.arena is not None:
                    self.arena.set_frames_done(self.frames_done)
            except (frames.PeerClosed, ConnectionResetError, BrokenPipeError):
                return self.closed("client disconnected")  # e.g. killed mid-upload
            except (msgpack.UnpackException, ValueError, TypeError) as exc:
                self._reply_error("ProtocolError", f"malformed frame: {exc}")
                return f"protocol error: malformed frame ({exc})"
            if done:
                return self.end_reason or m.REASON_CLIENT_CLOSED
            if self.payload_left:
                frames.discard(self.conn, self.payload_left)

    def _shared_gpu(self) -> bool:
        """Other sessions on this GPU: a worker polling for its frame would take the core
        from the one running on the device (the holder of the device lock, with the compute
        share on; 32 programs, split layout: 5-8 % less aggregate throughput)."""
        throttle = self.ex.throttle  # set between frames (Executor.end_batch)
        return throttle is not None and throttle.neighbours

    def revoke(self, reason: str) -> None:
        """End the session at the next command (called from the control thread): reading
        the client stops here, the main loop tells the client why (see ``closed``)."""
        self.revoked = reason
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RD)

    def closed(self, default: str) -> str:
        """Why the client's stream ended: ``default``, unless oriond revoked the session."""
        if self.revoked is None:
            return default
        self._reply_error(m.ERR_SESSION_ENDED,
                          f"the Orion Controller ended this session: {self.revoked}; "
                          "rerun the program to get a new allocation")
        return f"ended by the controller: {self.revoked}"

    def _run_frame(self, body: bytearray) -> bool:
        if self.peer is not None:
            self.peer.settle()  # snapshots peers took leave the ledger
        self.unpacker.feed(body)
        try:
            if self._run_commands():
                return True
        finally:
            self.ex.end_batch()
        # A command cut off at the end of its frame must not be glued to the next frame: a
        # nil fed after the last command comes back alone only if none was left unfinished.
        self.unpacker.feed(b"\xc0")
        try:
            whole = self.unpacker.unpack() is None
        except msgpack.OutOfData:
            whole = False
        if not whole:
            raise ValueError("frame ends inside a command (truncated)")
        return False

    def _run_commands(self) -> bool:
        """The frame's commands; True if one ended the session. A run of consecutive ops
        takes one turn of the compute share (``Executor.begin_batch``)."""
        ex = self.ex
        run = ex.run
        op, free = m.CMD_OP, m.CMD_FREE
        throttled = ex.throttle is not None  # between frames no batch is open
        for cmd in self.unpacker:
            if type(cmd) is not list or not cmd:
                raise ValueError("command is not a non-empty array")
            kind = cmd[0]
            if kind == op and len(cmd) == 5:  # most commands: straight to the executor
                if throttled and ex.throttle is not None:  # no batch open (begin_batch)
                    ex.begin_batch()
                try:
                    run(cmd[1], cmd[2], cmd[3], cmd[4])
                except SessionError as exc:
                    self._fail(exc)
                except Exception as exc:  # as in _execute: the client's error
                    self._fail(SessionError(type(exc).__name__, str(exc)))
                if throttled and ex.batch_full():
                    ex.end_batch()
                continue
            if kind == free and len(cmd) == 2:
                # Not device work: the ops around it stay one turn (a transformer step
                # frees 85 times between its 170 ops; each cut cost a share-table update).
                self._execute(cmd)
                continue
            if throttled:
                ex.end_batch()
            if kind == m.CMD_BYE:
                return True
            if kind in m.ANSWERED:
                self._answer(cmd)
            else:
                self._execute(cmd)
            if self.end_reason:
                return True
        return False

    def _execute(self, cmd: list) -> None:
        try:
            self._dispatch(cmd)
        except SessionError as exc:
            self._fail(exc)
        except Exception as exc:  # a failing op is the client's error, not the worker's
            self._fail(SessionError(type(exc).__name__, str(exc)))

    def _fail(self, exc: SessionError) -> None:
        if self.pending is None:
            self.pending = exc
            log.info("session %s op failed: %s: %s", self.spec["session_id"][:8], exc.kind,
                     str(exc).splitlines()[0] if str(exc) else "")

    def _dispatch(self, cmd: list) -> None:
        kind = cmd[0]
        ex = self.ex
        if kind == m.CMD_OP:
            ex.run(cmd[1], cmd[2], cmd[3], cmd[4])
        elif kind == m.CMD_FREE:
            ex.free(cmd[1])
        elif kind == m.CMD_DEF:
            ex.define(cmd[1], cmd[2])
        elif kind == m.CMD_UPLOAD:
            self._upload(cmd)
        elif kind == m.CMD_SEED:
            self._seed(int(cmd[1]), cmd[2] if len(cmd) > 2 else 0)
        elif kind == m.CMD_COPY:
            ex.copy(cmd[1], cmd[2])
        elif kind == m.CMD_RNG_SET:
            self._rng_set(int(cmd[1]), cmd[2] if len(cmd) > 2 else 0)
        elif kind == m.CMD_PEER_SEND:
            peer.offer(self.peer, ex, cmd)
        elif kind == m.CMD_PEER_RECV:
            peer.receive(ex, self.device, cmd, self.spec["session_id"][:8], self.peer)
        elif kind == m.CMD_COLLECTIVE:
            self.collectives.run(cmd)
        elif kind == m.CMD_GRAPH_DEF:
            self.graphs.define(cmd)
        elif kind == m.CMD_GRAPH_RUN:
            self.graphs.run(cmd)
        elif kind == m.CMD_SETTINGS:
            settings.apply(cmd[1] if len(cmd) == 2 else None)
        else:
            raise SessionError("ProtocolError", f"unknown command kind {kind!r}")

    def _answer(self, cmd: list) -> None:
        if self.pending is not None:
            exc, self.pending = self.pending, None
            self._reply_error(exc.kind, str(exc))
            return
        try:
            self._answer_ok(cmd)
        except SessionError as exc:
            self._reply_error(exc.kind, str(exc))
        except Exception as exc:
            self._reply_error(type(exc).__name__, str(exc))

    def _answer_ok(self, cmd: list) -> None:
        kind = cmd[0]
        if kind == m.CMD_SYNC:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._reply([m.REPLY_OK])
        elif kind == m.CMD_FETCH:
            self._fetch(cmd)
        elif kind == m.CMD_CALL:
            self._call(cmd)
        elif kind == m.CMD_PROBE:
            self._probe(cmd)
        elif kind == m.CMD_STATS:
            led = self.ex.ledger
            self._reply([m.REPLY_OK, {"allocated": led.used, "peak": led.peak,
                                      "limit": led.limit, "ops": self.ex.n_ops,
                                      "busy_s": self.ex.busy_s}])
        elif kind == m.CMD_RNG_GET:
            state = self._rng_state(cmd[1] if len(cmd) > 1 else 0)
            self._reply([m.REPLY_OK, state.numel()], [memoryview(state.numpy())])
        elif kind == m.CMD_PG_INIT:
            self._reply([m.REPLY_OK, self.collectives.init(cmd)])

    # replies -----------------------------------------------------------------
    def _reply(self, msg: list, payload: list | None = None) -> None:
        frames.send_frame(self.conn, self.packer.pack(msg), payload or ())

    def _reply_error(self, kind: str, message: str) -> None:
        try:
            self._reply([m.REPLY_ERROR, kind, message])
        except OSError:
            pass

    # commands ----------------------------------------------------------------
    def _upload(self, cmd: list) -> None:
        _, handle, dtype_code, shape, nbytes, shm_pos, *more = cmd
        chunk = more[0] if more else None  # set: streamed through the ring in chunks
        host_buffer = more[1] if len(more) > 1 else None  # set: in a host buffer
        dtype = codec.dtype_from_code(dtype_code)
        if not isinstance(shape, list) or type(nbytes) is not int:
            raise SessionError("ProtocolError", "upload needs a shape array and a byte count")
        if shm_pos is not None and (self.arena is None or type(shm_pos) is not int or shm_pos < 0):
            raise SessionError("ProtocolError", "upload names a shared-memory position but this "
                               "session has no shared memory")
        if chunk is not None and (shm_pos is None or type(chunk) is not int
                                  or not 4096 <= chunk <= self.arena.ring_size // 2):
            raise SessionError("ProtocolError", "streamed upload without a valid ring position "
                               "and chunk size")
        numel = 1
        for s in shape:
            if not isinstance(s, int) or s < 0:
                raise SessionError("ValueError", f"invalid upload shape {shape}")
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if numel * itemsize != nbytes:
            raise SessionError("ValueError", "upload size does not match its shape")
        if host_buffer is not None:
            self._upload_from_buffer(handle, dtype, shape, nbytes, host_buffer)
            return
        if shm_pos is None and nbytes > self.payload_left:
            raise SessionError("ProtocolError", "upload larger than the frame's payload")
        self._check_quota_or_drain(nbytes, shm_pos, chunk)
        host = torch.empty(shape, dtype=dtype)
        prefer_huge_pages(host)
        raw = host.reshape(-1).view(torch.uint8) if nbytes else None
        if raw is not None:
            if shm_pos is None:
                frames.recv_exact_into(self.conn, memoryview(raw.numpy()))
                self.payload_left -= nbytes
            elif chunk is not None:
                self._receive_stream(raw, shm_pos, nbytes, chunk)
            else:
                assert self.arena is not None
                copy_bytes(raw, self.arena.ring_region(shm_pos, nbytes))
                self.arena.set_consumed(shm_pos + nbytes)
        t = host if self.device.type == "cpu" else host.to(self.device)
        self.ex.store(handle, t)

    def _upload_from_buffer(self, handle: Any, dtype: torch.dtype, shape: list[int],
                            nbytes: int, dest: object) -> None:
        """An upload in a host buffer: on an emulated GPU the buffer becomes the tensor's
        memory (no copy); on CUDA one DMA copies it and the buffer is free again at once."""
        if self.host_buffers is None:
            raise SessionError("ProtocolError", "upload names a host buffer but this session "
                               "has no shared memory")
        mm = self.host_buffers.get(dest)
        try:
            if nbytes > HostBuffers.capacity(mm):
                raise SessionError("ProtocolError", "upload larger than its host buffer")
            self.ex.check_alloc(nbytes)
            if self.device.type == "cpu":
                self.ex.store(handle, HostBuffers.adopt(mm, nbytes, dtype, shape))
                return
            t = HostBuffers.data(mm, nbytes).view(dtype).view(shape).to(self.device)
        except BaseException:
            release(mm)
            raise
        release(mm)
        self.ex.store(handle, t)

    def _receive_stream(self, raw: torch.Tensor | None, start: int, nbytes: int,
                        chunk: int) -> None:
        """Copy a streamed upload out of the ring as the client publishes it (``raw`` None:
        only drain it, so the client is not left waiting for ring space)."""
        arena = self.arena
        assert arena is not None
        done = 0
        try:
            for pos, c in chunks(start, nbytes, chunk, arena.ring_size):
                arena.wait_published(pos + c, self._client_alive)
                if raw is not None:
                    copy_bytes(raw[done:done + c], arena.ring_region(pos, c))
                arena.set_consumed(pos + c)
                done += c
        except ShmPeerGone:
            raise frames.PeerClosed("client disconnected in the middle of an upload") from None
        except ShmError as exc:
            self.end_reason = f"protocol error: {exc}"
            raise SessionError("ProtocolError", str(exc)) from None

    def _client_alive(self) -> bool:
        return frames.still_connected(self.conn)

    def _check_quota_or_drain(self, nbytes: int, shm_pos: int | None,
                              chunk: int | None = None) -> None:
        try:
            self.ex.check_alloc(nbytes)
        except SessionError:
            if shm_pos is None:
                frames.discard(self.conn, nbytes)
                self.payload_left -= nbytes
            elif chunk is not None:
                self._receive_stream(None, shm_pos, nbytes, chunk)
            elif self.arena is not None:
                self.arena.set_consumed(shm_pos + nbytes)
            raise

    def _fetch(self, cmd: list) -> None:
        if len(cmd) > 4 and cmd[4] is not None and self.host_buffers is not None:
            if self._fetch_into(cmd[1], self.host_buffers.get(cmd[4])):
                return
        host = self.ex.host_copy(cmd[1])
        nbytes = host.numel() * host.element_size()
        raw = host.reshape(-1).view(torch.uint8)
        dtype = codec.DTYPE_EXT[host.dtype]
        arena = self.arena
        streamed = len(cmd) > 3 and cmd[3] is True  # the client reads streamed replies
        if streamed and arena is not None and nbytes >= STREAM_MIN_BYTES \
                and stream_chunk(arena.download_size):
            arena.reset_download()
            chunk = stream_chunk(arena.download_size)
            self._reply([m.REPLY_OK, dtype, list(host.shape), nbytes, arena.download_off, chunk])
            self._send_stream(raw, chunk)
        elif arena is not None and 0 < nbytes <= arena.download_size:
            copy_bytes(arena.region(arena.download_off, nbytes), raw)
            self._reply([m.REPLY_OK, dtype, list(host.shape), nbytes, arena.download_off])
        else:
            self._reply([m.REPLY_OK, dtype, list(host.shape), nbytes, None],
                        [memoryview(raw.numpy())] if nbytes else None)

    def _fetch_into(self, handle: Any, mm: mmap.mmap) -> bool:
        """One copy into the client's host buffer (on CUDA: one DMA into mapped memory);
        False if the tensor does not fit it."""
        t = self.ex.fetchable(handle)
        nbytes = t.numel() * t.element_size()
        if nbytes > HostBuffers.capacity(mm):
            return False
        if nbytes:
            dst = HostBuffers.data(mm, nbytes)
            if t.device.type == "cpu" and t.is_contiguous():
                copy_bytes(dst, t.reshape(-1).view(torch.uint8))
            else:
                dst.view(t.dtype).view(t.shape).copy_(t)
        self._reply([m.REPLY_OK, codec.DTYPE_EXT[t.dtype], list(t.shape), nbytes,
                     m.IN_HOST_BUFFER])
        return True

    def _send_stream(self, raw: torch.Tensor, chunk: int) -> None:
        """After a streamed reply: write the bytes through the download area chunk by chunk
        as the client copies them out. The reply is sent, so a failure ends the session."""
        arena = self.arena
        assert arena is not None
        area, base, done = arena.download_size, arena.download_off, 0
        try:
            for pos, c in chunks(0, raw.numel(), chunk, area):
                arena.wait_dl_consumed(pos + c - area, self._client_alive)
                copy_bytes(arena.region(base + pos % area, c), raw[done:done + c])
                arena.set_dl_published(pos + c)
                done += c
        except ShmPeerGone:
            self.end_reason = "client disconnected"
        except ShmError as exc:
            self.end_reason = f"protocol error: {exc}"

    def _call(self, cmd: list) -> None:
        _, op_id, args, kwargs, outs = cmd
        result = self.ex.run(op_id, args, kwargs, [])
        values: list = []
        metas: list = []
        tensors: list = []
        for r in (result if isinstance(result, (tuple, list)) else [result]):
            if isinstance(r, torch.Tensor):
                tensors.append(r)
                metas.append([list(r.shape), list(r.stride()), r.storage_offset(),
                              codec.DTYPE_EXT[r.dtype]])
            else:
                values.append(r.item() if hasattr(r, "item") else r)
        if len(tensors) > len(outs):
            raise SessionError("RuntimeError", "operator returned more tensors than expected")
        self.ex.keep(outs, tensors)
        self._reply([m.REPLY_OK, values, metas])

    def _probe(self, cmd: list) -> None:
        _, op_id, args, kwargs, first_handle = cmd
        inputs = _tensors_in(args) + _tensors_in(list(kwargs.values()))
        result = self.ex.run(op_id, args, kwargs, [])
        describe = _Describer(self.ex, inputs, int(first_handle))
        if isinstance(result, torch.Tensor):
            kind, items = "tensor", [describe(result)]
        elif isinstance(result, (tuple, list)):
            kind = "tuple" if isinstance(result, tuple) else "list"
            items = [describe(r) for r in result]
        elif result is None:
            kind, items = "none", []
        else:
            kind, items = "value", [describe(result)]
        if self.ex.ledger.over():
            self.ex.free(describe.stored)
            raise SessionError("OutOfMemoryError", oom_message(0, self.ex.ledger))
        self._reply([m.REPLY_OK, kind, items])

    def _generator(self, gid: int) -> Any:
        """A generator named in an op's arguments (decoding must not raise: the error is
        the op's, reported at the next sync point, and the op fails on the placeholder)."""
        try:
            return self.ex.generator(gid)
        except SessionError as exc:
            self._fail(exc)
            return Missing(gid)

    def _gen(self, gid: Any) -> torch.Generator:
        if type(gid) is not int:
            raise SessionError("ProtocolError", f"generator id {gid!r} is not an integer")
        return self.ex.generator(gid)

    def _seed(self, seed: int, gid: Any = 0) -> None:
        self._gen(gid).manual_seed(seed)  # id 0: the device's default generator

    def _rng_state(self, gid: Any = 0) -> torch.Tensor:
        return self._gen(gid).get_state()

    def _rng_set(self, nbytes: int, gid: Any = 0) -> None:
        if not 0 <= nbytes <= min(self.payload_left, 1 << 20):
            raise SessionError("ProtocolError", f"RNG state of {nbytes} bytes does not match "
                               "the frame's payload")
        state = torch.empty(nbytes, dtype=torch.uint8)
        frames.recv_exact_into(self.conn, memoryview(state.numpy()))
        self.payload_left -= nbytes
        self._gen(gid).set_state(state)

    def stats(self) -> dict:
        return {"type": "stats", "mem_used_bytes": self.ex.ledger.used,
                "busy_s": self.ex.busy_s, "ops": self.ex.n_ops}


def _tensors_in(seq: list) -> list:
    out: list = []
    for a in seq:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors_in(list(a)))
    return out


class _Describer:
    """Describes an op's outputs relative to its inputs, binding new ones to handles."""

    def __init__(self, ex: Executor, inputs: list, first_handle: int) -> None:
        self.ex = ex
        self.inputs = inputs
        self.ptrs = [t.untyped_storage().data_ptr() for t in inputs]
        self.next = first_handle
        self.stored: list[int] = []

    def __call__(self, o: Any) -> list:
        if isinstance(o, torch.Tensor):
            for i, t in enumerate(self.inputs):
                if o is t:  # with its metadata: an in-place op may have changed it (t_)
                    return ["alias", i, list(o.shape), list(o.stride()), o.storage_offset()]
            h = self.next
            self.next += 1
            self.ex.store(h, o)  # first: it refuses, with the reason, what a vGPU cannot hold
            self.stored.append(h)
            st = o.untyped_storage()
            ptr = st.data_ptr()
            view_of = self.ptrs.index(ptr) if ptr and ptr in self.ptrs else -1
            item = ["new", list(o.shape), list(o.stride()), o.storage_offset(),
                    codec.DTYPE_EXT[o.dtype], view_of, st.nbytes() if view_of < 0 else 0, h]
            flags = (m.VIEW_CONJ if o.is_conj() else 0) | (m.VIEW_NEG if o.is_neg() else 0)
            if flags:  # a lazy conjugate or negative view (conj(), .mH): its wrapper says so
                item.append(flags)
            return item
        if o is None:
            return ["none"]
        if isinstance(o, (list, tuple)):
            return ["list", [self(x) for x in o]]
        return ["value", o.item() if hasattr(o, "item") else o]


def _cap_process_memory(spec: dict) -> None:
    if spec.get("device", "cpu") != "cpu":
        dev = torch.device(spec["device"])
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["gmem_bytes"] / total), dev)
        return
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[5])  # data + stack
    baseline = pages * resource.getpagesize()
    limit = baseline + int(spec["gmem_bytes"]) * 2 + (512 << 20)
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


# mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
CACHE_ENV = "ORION_EMULATED_MEMORY_CACHE"


def _cache_freed_memory(spec: dict) -> None:
    """An emulated GPU's memory keeps what its tensors freed, as CUDA's caching allocator
    does: glibc would otherwise unmap every large block on free and map it afresh on the
    next allocation, and the kernel zero-fills each new page on first touch (a CNN step
    took 2.5 times the page faults of the same step run locally, 40 % more time). The ledger
    still bounds what the session holds; the process keeps its peak until it ends.
    One arena: each extra arena glibc gives a thread would take the top pad too (64 MiB of
    the process's RLIMIT_DATA per thread; peer-copy threads then failed to start).
    ORION_EMULATED_MEMORY_CACHE=0 turns it off."""
    if spec.get("device", "cpu") != "cpu" or os.environ.get(CACHE_ENV, "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(_M_MMAP_MAX, 0)               # large blocks from the heap too, reused
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never give the heap's top back
    libc.mallopt(_M_TOP_PAD, 64 << 20)          # grow it in large steps
    libc.mallopt(_M_ARENA_MAX, 1)


def _setup_log(path: str | None) -> None:
    log.setLevel(logging.INFO)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s",
                                         "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)


def _watch_manager(control: Control, session: Session) -> None:
    """oriond's messages during the session: ``end`` revokes it. A session must not
    outlive its daemon (no one would report or reap it): EOF ends the worker."""
    try:
        while True:
            body, payload = frames.recv_frame(control.sock, max_body=1 << 16)
            msg = msgpack.unpackb(bytes(body), raw=False) if not payload else None
            if isinstance(msg, dict) and msg.get("type") == "end":
                log.info("oriond ends the session: %s", msg.get("reason"))
                session.revoke(str(msg.get("reason") or "allocation ended"))
    except (OSError, frames.FrameError, ValueError):
        pass
    log.info("oriond went away; ending the session")
    os._exit(3)


def _stats_loop(session: Session, control: Control, stop: threading.Event) -> None:
    while not stop.wait(STATS_INTERVAL_S):
        control.send(session.stats())


def _wait_for_session(control: Control) -> tuple[Control, dict, socket.socket]:
    """Idle until the pool hands us a session. Meanwhile fork siblings when asked: a copy
    of this process shares its imported torch copy-on-write instead of importing its own.
    Returns in the sibling too, with the sibling's own control channel."""
    # torch is imported: prefer this worker for the next client; it can fork siblings.
    control.send({"type": "ready", "fork": True, "pid": os.getpid()})
    while True:
        msg, fds = control.receive()
        if msg.get("type") != "fork":
            for fd in fds[1:]:
                os.close(fd)
            if not fds:
                raise SystemExit("session spec came without a client connection")
            return control, msg, socket.socket(fileno=fds[0])
        sibling = _fork_sibling(fds, msg.get("adopter"))
        if sibling is not None:  # we are the new worker
            control.sock.close()
            control = Control(sibling)
            control.send({"type": "ready", "fork": True, "pid": os.getpid()})


def _fork_sibling(fds: list[int], adopter: object) -> socket.socket | None:
    """Fork a new idle worker, reparented to the pool (``adopter``, a child subreaper) by a
    double fork so that the pool reaps it and sees its exit status as for any worker.
    Returns the new worker's control socket in the new worker, None here."""
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        os.waitpid(pid, 0)  # the intermediate exits at once
        return None
    try:
        if not fds or not isinstance(adopter, int) or os.fork():
            os._exit(0)  # the intermediate: its child is orphaned to the adopter
        # Its own process group, but no setsid: the copy stays in this worker's session (no
        # terminal's signals reach it), which tells the pool that its orphans are ours.
        os.setpgid(0, 0)
        deadline = time.monotonic() + 5.0
        while os.getppid() != adopter:  # wait to be adopted, or the pool cannot reap us
            if time.monotonic() > deadline:
                os._exit(1)
            time.sleep(0.001)
        for fd in fds[1:]:
            os.close(fd)
        return socket.socket(fileno=fds[0])
    except BaseException:
        os._exit(1)


def run(control_fd: int) -> int:
    control, spec, conn = _wait_for_session(Control(socket.socket(fileno=control_fd)))
    _cache_freed_memory(spec)  # before any thread has an arena of its own
    # Start the thread pools only now: an idle worker must have no threads to fork safely.
    torch.set_num_threads(torch.get_num_threads())
    _setup_log(spec.get("log_file"))
    conn.setblocking(True)
    session = Session(spec, conn, control)
    reason = "session ended"
    stop = threading.Event()
    try:
        _cap_process_memory(spec)
        session.welcome()
        threading.Thread(target=_stats_loop, args=(session, control, stop), daemon=True).start()
        threading.Thread(target=_watch_manager, args=(control, session), daemon=True).start()
        reason = session.serve()
    except (frames.PeerClosed, ConnectionResetError, BrokenPipeError):
        reason = session.closed("client disconnected")
    except Exception as exc:  # the worker must always report why the session ended
        reason = f"worker error: {type(exc).__name__}: {exc}"
        log.exception("session %s failed", spec.get("session_id", "?")[:8])
    finally:
        stop.set()
        if session.peer is not None:
            session.peer.close()  # pullers hear why; snapshots are freed
        session.collectives.close()  # peers still in a collective fail now, not at the timeout
        if session.host_buffers is not None:
            session.host_buffers.sweep()  # files of a client that died filling them
        log.info("session %s allocation %s vgpu %s ended: %s (%d ops, peak %d MiB)",
                 spec.get("session_id", "?")[:8], spec.get("allocation_id"),
                 spec.get("vgpu_index"), reason, session.ex.n_ops, session.ex.ledger.peak >> 20)
        control.send(session.stats())
        control.send({"type": "end", "reason": reason})
        if session.ex.throttle is not None:
            session.ex.throttle.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orion-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)
    # Siblings forked from this process share its imports until they write to them; the
    # cycle collector would write to every object it visits, so keep it off them.
    gc.collect()
    gc.freeze()
    try:
        rc = run(args.control_fd)
    except KeyboardInterrupt:
        rc = 0
    # No interpreter teardown: it decrefs every object of the imported modules, which in a
    # forked worker copies each page it shares with its siblings (100 workers ending at
    # once took over 10 GiB that way). The session has reported its end; flush and go.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
