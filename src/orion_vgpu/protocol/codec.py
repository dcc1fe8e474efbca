"""msgpack encoding of ATen arguments: tensor handles, dtypes, devices and friends.

Tensors travel as handles (ext 1), a program's ``torch.Generator(device="cuda")`` objects as
generator ids (ext 7); the server resolves both in its own session tables, so a client can
only ever name its own. A view the client made without asking the server (a transpose, a
reshape, a slice: metadata only) travels as ext 8: the handle of a tensor whose storage it
shares, and its own sizes, strides and storage offset; the server takes it with
``as_strided``, which checks it against that storage. Nothing here can carry Python code.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import torch

EXT_HANDLE = 1
EXT_DTYPE = 2
EXT_DEVICE = 3
EXT_MEMFMT = 4
EXT_LAYOUT = 5
EXT_COMPLEX = 6
EXT_GENERATOR = 7
EXT_VIEW = 8
MAX_VIEW_DIMS = 64

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
)
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
MEMFMTS = (torch.contiguous_format, torch.channels_last, torch.preserve_format,
           torch.channels_last_3d)
MEMFMT_CODE = {m: i for i, m in enumerate(MEMFMTS)}
LAYOUTS = (torch.strided, torch.sparse_coo)
LAYOUT_CODE = {m: i for i, m in enumerate(LAYOUTS)}

DTYPE_EXT = {d: msgpack.ExtType(EXT_DTYPE, bytes([c])) for d, c in DTYPE_CODE.items()}
MEMFMT_EXT = {m: msgpack.ExtType(EXT_MEMFMT, bytes([c])) for m, c in MEMFMT_CODE.items()}
LAYOUT_EXT = {m: msgpack.ExtType(EXT_LAYOUT, bytes([c])) for m, c in LAYOUT_CODE.items()}
# The device of the session (the vGPU) and the client's host memory.
DEVICE_REMOTE = msgpack.ExtType(EXT_DEVICE, b"\x00")
DEVICE_HOST = msgpack.ExtType(EXT_DEVICE, b"\x01")
_Q = struct.Struct("<q")
_DD = struct.Struct("<dd")


class CodecError(ValueError):
    """An argument that the protocol cannot carry, or a malformed encoded value."""


def handle_ext(handle: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_HANDLE, _Q.pack(handle))


def view_tail(size: Any, stride: Any, offset: int) -> bytes:
    """The part of a view's ext value after its handle (fixed for a cached op's output)."""
    n = len(size)
    return struct.pack(f"<q{2 * n}q", offset, *size, *stride)


def view_ext(handle: int, size: Any, stride: Any, offset: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_VIEW, _Q.pack(handle) + view_tail(size, stride, offset))


# A view's ext value by its length: handle, offset, then n sizes and n strides.
_VIEW_STRUCTS = {16 + 16 * n: struct.Struct(f"<{2 + 2 * n}q") for n in range(MAX_VIEW_DIMS + 1)}


def generator_ext(gid: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_GENERATOR, _Q.pack(gid))


def dtype_from_code(code: int) -> torch.dtype:
    if not 0 <= code < len(DTYPES):
        raise CodecError(f"unknown dtype code {code}")
    return DTYPES[code]


def encode_default(obj: Any) -> Any:
    """msgpack ``default`` for the client: the few torch values ATen signatures take."""
    if isinstance(obj, torch.dtype):
        try:
            return DTYPE_EXT[obj]
        except KeyError:
            raise CodecError(f"dtype {obj} is not supported on a vGPU") from None
    if isinstance(obj, torch.memory_format):
        return MEMFMT_EXT[obj]
    if isinstance(obj, torch.layout):
        if obj not in LAYOUT_EXT:
            raise CodecError(f"layout {obj} is not supported on a vGPU")
        return LAYOUT_EXT[obj]
    if isinstance(obj, torch.device):
        return DEVICE_HOST if obj.type == "cpu" else DEVICE_REMOTE
    if isinstance(obj, complex):
        return msgpack.ExtType(EXT_COMPLEX, _DD.pack(obj.real, obj.imag))
    if isinstance(obj, torch.Size):
        return list(obj)
    raise CodecError(f"cannot send a {type(obj).__name__} to a vGPU: an op on vGPU tensors "
                     "takes tensors, numbers and their lists")


def _no_generators(gid: int) -> Any:
    raise CodecError("a torch.Generator cannot be used here")


def _no_views(handle: int, size: tuple, stride: tuple, offset: int) -> Any:
    raise CodecError("a view without a handle of its own cannot be used here")


def make_ext_hook(resolve_handle: Callable[[int], Any], remote_device: torch.device,
                  resolve_generator: Callable[[int], Any] = _no_generators,
                  resolve_view: Callable[[int, tuple, tuple, int], Any] = _no_views,
                  held: dict[int, Any] | None = None) -> Callable[[int, bytes], Any]:
    """Server-side ``ext_hook``: turn ext values back into torch objects.
    ``resolve_view(handle, size, stride, offset)``: an ext 8 view. ``held``: the tensors by
    handle that ``resolve_handle`` reads, looked up here first (a worker decodes ~500
    handles a transformer step; the call saved is most of a lookup's cost)."""
    host = torch.device("cpu")
    known = (held if held is not None else {}).get
    unpack_q = _Q.unpack
    view_struct = _VIEW_STRUCTS.get

    def hook(code: int, data: bytes) -> Any:
        if code == EXT_HANDLE and len(data) == 8:
            handle = unpack_q(data)[0]
            t = known(handle)
            return t if t is not None else resolve_handle(handle)
        if code == EXT_VIEW:
            st = view_struct(len(data))
            if st is not None:
                vals = st.unpack(data)
                n = (len(vals) - 2) >> 1
                return resolve_view(vals[0], vals[2:2 + n], vals[2 + n:], vals[1])
        return _rare_ext(code, data, host, remote_device, resolve_generator)

    return hook


def _rare_ext(code: int, data: bytes, host: torch.device, remote_device: torch.device,
              resolve_generator: Callable[[int], Any]) -> Any:
    """The ext values other than handles and views (a few per op at most)."""
    if code == EXT_GENERATOR and len(data) == 8:
        return resolve_generator(_Q.unpack(data)[0])
    if len(data) == 1:
        idx = data[0]
        if code == EXT_DTYPE:
            return dtype_from_code(idx)
        if code == EXT_MEMFMT and idx < len(MEMFMTS):
            return MEMFMTS[idx]
        if code == EXT_LAYOUT and idx < len(LAYOUTS):
            return LAYOUTS[idx]
        if code == EXT_DEVICE and idx < 2:  # anything else is malformed, not "host"
            return remote_device if idx == 0 else host
    if code == EXT_COMPLEX and len(data) == 16:
        re, im = _DD.unpack(data)
        return complex(re, im)
    raise CodecError(f"malformed ext value (code {code}, {len(data)} bytes)")


def client_ext_hook(code: int, data: bytes) -> Any:
    """Client-side decoding of replies (dtypes only need decoding there)."""
    if code == EXT_DTYPE and len(data) == 1:
        return dtype_from_code(data[0])
    if code == EXT_COMPLEX and len(data) == 16:
        re, im = _DD.unpack(data)
        return complex(re, im)
    return msgpack.ExtType(code, data)
