"""What the program sees of CUDA: ``torch.cuda.*``, ``torch.accelerator.*``, factories.

``activate()`` replaces the CUDA-facing functions of a CPU-only (or any) PyTorch with ones
that answer for the granted vGPUs, and wraps the torch functions that create tensors on a
device (``device="cuda"``, ``.to("cuda")``...) so that they create them in the pool
(client/hooks.py; ``VGPUMode`` does the same for every call where a mode is needed).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import threading
from types import FunctionType
from typing import Any

import torch
from torch.nn.parameter import UninitializedTensorMixin
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode
from torch.utils._device import DeviceContext

from orion_vgpu.client import (
    autocast,
    cuda_memory,
    device_monitor,
    distributed,
    frontend,
    generators,
    graphs,
    hooks,
    lazy_params,
    legacy_types,
    pinned,
    settings,
    torch_tools,
)
from orion_vgpu.client.frontend import FactoryMode, RemoteTensor
from orion_vgpu.client.runtime import get_runtime
from orion_vgpu.protocol import messages

_active = False
_mode: VGPUMode | None = None  # the process-wide mode, once there is one (use_process_mode)
_autocast_on = torch.is_autocast_enabled
# Calls a torch function without its torch-function check, so a mode can stay on inside it.
_redispatch = getattr(torch.overrides, "redispatch_function", None)


class _Reentry(threading.local):
    funcs: set | None = None  # Python torch functions this thread is inside with the mode on


_reentry = _Reentry()


def _cuda_index(d: Any) -> int | None:
    """The vGPU index a device spec names, or None if it is not a CUDA device."""
    if isinstance(d, torch.device):
        if d.type != "cuda":
            return None
        return current_device() if d.index is None else _local(d.index)
    if isinstance(d, str):
        if not d.startswith("cuda"):
            return None
        return _cuda_index(torch.device(d))
    if isinstance(d, int) and not isinstance(d, bool):
        return _local(d)
    return None


def _local(idx: int) -> int:
    """Under torchrun, a rank's ``cuda:LOCAL_RANK`` is its own vGPU (client.distributed)."""
    return distributed.local_index(idx, device_count)


class VGPUMode(TorchFunctionMode):
    """Routes device='cuda' creation to the pool; everything else passes straight through.

    On in autocast("cuda") regions, and for the whole process once it compiles (or with
    ``ORION_TORCH_HOOKS=0``); the wrappers of client/hooks.py step aside while it is on."""

    def __enter__(self) -> VGPUMode:
        hooks.depth.n += 1
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        hooks.depth.n -= 1
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        func = hooks.ORIGINALS.get(func, func)
        if _autocast_on("cuda"):
            dtype = autocast.policy_dtype(func)
            if dtype is not None:
                args, kwargs = autocast.cast_args(args, kwargs, dtype)
        special = _TF_SPECIAL.get(func)
        if special is not None:
            return special(func, args, kwargs)
        dev = kwargs.get("device")
        if dev is not None:
            idx = _cuda_index(dev)
            if idx is not None:
                return _create(func, args, kwargs, idx)
        if "generator" in kwargs:
            hooks.host_generator(kwargs["generator"], args, kwargs.get("out"))
        if kwargs.get("pin_memory"):
            return hooks.pinned_host(func, args, kwargs)
        if type(func) is FunctionType and _redispatch is not None:
            return self._inside(func, types, args, kwargs)
        return func(*args, **kwargs)

    def _inside(self, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        """A torch function written in Python (most of torch.nn.functional): the torch calls
        it makes are the program's too and need this mode (multi-head attention's inner
        attention and masks, device="cuda" factories), which is off while a mode handles a
        call. A Tensor method that overrides its C++ one in Python reaches here again from
        ``super()``: that inner call runs without the mode, as before."""
        inside = _reentry.funcs
        if inside is None:
            inside = _reentry.funcs = set()
        if func in inside:
            return func(*args, **kwargs)
        inside.add(func)
        try:
            with self:
                return _redispatch(func, types, args, kwargs)
        finally:
            inside.discard(func)


# Built from Python data below every dispatch mode: build on the host, then upload.
_HOST_BUILT = frozenset({torch.tensor, torch.as_tensor, torch.asarray})


def _create(func: Any, args: tuple, kwargs: dict, idx: int) -> Any:
    if func in _HOST_BUILT:
        return _built_on_host(func, args, kwargs, idx)
    kwargs = dict(kwargs)
    kwargs["device"] = frontend.META_DEV[idx]
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    with FactoryMode(idx):
        return func(*_host_template(func, args, idx), **kwargs)


# Factories that take a tensor as their template (its layout; its dtype by default).
_LIKE = frozenset({torch.empty_like, torch.full_like, torch.ones_like, torch.rand_like,
                   torch.randint_like, torch.randn_like, torch.zeros_like})
_NEW = frozenset(getattr(torch.Tensor, name) for name in hooks.NEW_METHODS)


def _built_on_host(func: Any, args: tuple, kwargs: dict, idx: int) -> Any:
    kwargs = dict(kwargs, device="cpu")
    requires_grad = kwargs.pop("requires_grad", False)
    out = frontend.upload(func(*args, **kwargs), idx)
    return out.requires_grad_(True) if requires_grad else out


def _host_template(func: Any, args: tuple, idx: int) -> tuple:
    """``zeros_like(host_tensor, device="cuda")``, ``host_tensor.new_zeros(..., device=
    "cuda")``: the template becomes a vGPU tensor of its layout (no data is sent), so the
    op runs on the vGPU as it does for a vGPU template (the vGPU's random generator too)."""
    t = args[0] if args else None
    if not isinstance(t, torch.Tensor) or isinstance(t, RemoteTensor):
        return args
    meta = frontend.META_DEV[idx]
    if func in _LIKE:
        t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=meta)
    elif func in _NEW:
        t = torch.empty(0, dtype=t.dtype, device=meta)
    else:
        return args
    return (t, *args[1:])


def _tensor_to(func: Any, args: tuple, kwargs: dict) -> Any:
    self = args[0]
    if len(args) > 1 and isinstance(args[1], RemoteTensor):
        # .to(other): other's C++ device is meta:N, not what it reports
        idx, dtype, memfmt = args[1]._dev, args[1].dtype, None
    else:
        parse_kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
        device, dtype, _, memfmt = torch._C._nn._parse_to(*args[1:], **parse_kwargs)
        idx = _cuda_index(device) if device is not None else None
        if idx is None:
            return func(*args, **kwargs)
    if isinstance(self, RemoteTensor):
        return _remote_to(self, idx, dtype, memfmt, bool(kwargs.get("copy")))
    if isinstance(self, UninitializedTensorMixin):  # a lazy module's: client.lazy_params
        return func(*args, **kwargs)
    if _plain_upload(self, memfmt):
        # What _to_copy does at the end of the general path below (its nested to() calls and
        # dispatch mode cost 11 of a small upload's 27 us).
        _check_index(idx)
        return frontend.upload(self if dtype in (None, self.dtype) else self.to(dtype), idx)
    new_kwargs: dict[str, Any] = {"device": frontend.META_DEV[idx]}
    if dtype is not None:
        new_kwargs["dtype"] = dtype
    if memfmt is not None:
        new_kwargs["memory_format"] = memfmt
    with FactoryMode(idx):
        return torch.Tensor.to(self, **new_kwargs)


def _plain_upload(t: torch.Tensor, memfmt: Any) -> bool:
    """A dense host tensor that autograd need not see (no grad recorded for its copy)."""
    return (type(t) is torch.Tensor and t.layout is torch.strided and t.device.type == "cpu"
            and memfmt in (None, torch.preserve_format) and t.is_contiguous()
            and not (t.requires_grad and torch.is_grad_enabled()))


def _tensor_type(func: Any, args: tuple, kwargs: dict) -> Any:
    """``host_tensor.type(torch.cuda.FloatTensor)`` (or its name): a copy on the vGPU. A
    vGPU tensor's own type() handles every case."""
    self = args[0]
    spec = args[1] if len(args) > 1 else kwargs.get("dtype")
    dtype = None if isinstance(self, RemoteTensor) else legacy_types.cuda_type_dtype(spec)
    if dtype is None:
        return func(*args, **kwargs)
    return _tensor_to(torch.Tensor.to, (self, torch.device("cuda", current_device()), dtype), {})


def _remote_to(t: RemoteTensor, idx: int, dtype: Any, memfmt: Any, copy: bool) -> Any:
    out = t if t._dev == idx else frontend.CrossDevice.apply(t, idx)
    if dtype not in (None, out.dtype):
        out = out.to(dtype)
    if copy and out is t:
        out = t.clone()
    if memfmt not in (None, torch.preserve_format):
        out = out.contiguous(memory_format=memfmt)
    return out


def _new_tensor(func: Any, args: tuple, kwargs: dict) -> Any:
    """``t.new_tensor(data)`` on a vGPU (or with ``device="cuda"``): built from Python data
    on the host, then uploaded, as torch.tensor (below every dispatch mode, the data would
    not reach the pool)."""
    self, dev = args[0], kwargs.get("device")
    idx = _cuda_index(dev) if dev is not None else \
        (self._dev if isinstance(self, RemoteTensor) else None)
    if idx is None:
        return func(*args, **kwargs)
    if kwargs.get("dtype") is None:
        kwargs = dict(kwargs, dtype=self.dtype)
    return _built_on_host(func, (torch.empty(0, device="cpu"), *args[1:]), kwargs, idx)


def _tensor_cuda(func: Any, args: tuple, kwargs: dict) -> Any:
    self = args[0]
    if isinstance(self, UninitializedTensorMixin):  # a lazy module's: client.lazy_params
        return func(*args, **kwargs)
    device = args[1] if len(args) > 1 else kwargs.get("device")
    idx = current_device() if device is None else _cuda_index(device)
    return _tensor_to(torch.Tensor.to, (self, torch.device("cuda", idx)), {})


def _tensor_pin_memory(func: Any, args: tuple, kwargs: dict) -> Any:
    return pinned.pin(args[0])


def _tensor_is_pinned(func: Any, args: tuple, kwargs: dict) -> Any:
    return pinned.is_pinned(args[0])


def _args(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """An op's arguments by name, positional or keyword."""
    a = dict(zip(names, args, strict=False))
    a.update(kwargs)
    return a


def _one_hot(func: Any, args: tuple, kwargs: dict) -> Any:
    """F.one_hot as PyTorch computes it for a CUDA tensor (its C++ version makes the result
    on the wrapper's "meta" device): zeros, then a scatter of ones; the class count read
    from the data only when not given; out-of-range classes fail in the kernel."""
    a = _args(("tensor", "num_classes"), args, kwargs)
    t, num_classes = a.get("tensor"), a.get("num_classes", -1)
    if not isinstance(t, RemoteTensor):
        return func(*args, **kwargs)
    if t.dtype != torch.int64:
        raise RuntimeError("one_hot is only applicable to index tensor of type LongTensor.")
    if num_classes == -1:
        if t.numel() == 0:
            raise RuntimeError("Can not infer total number of classes from empty tensor.")
        num_classes = int(t.max().item()) + 1
    if num_classes < 0:
        raise RuntimeError("num_classes should be positive")
    out = t.new_zeros((*t.shape, num_classes))  # not a device= factory: no mode is on here
    return out.scatter_(-1, t.unsqueeze(-1), 1) if t.numel() else out


def _pack_padded(func: Any, args: tuple, kwargs: dict) -> Any:
    """torch.nn.utils.rnn.pack_padded_sequence's operator, for a vGPU input and host
    lengths (which PyTorch requires and the client's op path refuses): built from slices
    and a cat, which autograd differentiates; batch_sizes stays a host tensor, as with
    CUDA. pad_packed_sequence needs nothing: its C++ makes its output with the data's
    options, on the vGPU (frontend.install_meta_factories)."""
    a = _args(("input", "lengths", "batch_first"), args, kwargs)
    x, lengths = a.get("input"), a.get("lengths")
    if not isinstance(x, RemoteTensor) or not isinstance(lengths, torch.Tensor) \
            or isinstance(lengths, RemoteTensor):
        return func(*args, **kwargs)
    if a.get("batch_first"):
        x = x.transpose(0, 1)
    lens = lengths.tolist()
    if lengths.dim() != 1 or len(lens) != x.size(1):
        raise RuntimeError(f"Expected `len(lengths)` to be equal to batch_size, but got "
                           f"{len(lens)} (batch_size={x.size(1)})")
    if not lens or lens[-1] <= 0:
        raise RuntimeError("Length of all samples has to be greater than 0, but found an "
                           "element in 'lengths' that is <= 0")
    if any(a < b for a, b in zip(lens, lens[1:], strict=False)):
        raise RuntimeError("`lengths` array must be sorted in decreasing order when "
                           "`enforce_sorted` is True. You can pass `enforce_sorted=False` to "
                           "pack_padded_sequence and/or pack_sequence to sidestep this "
                           "requirement if you do not need ONNX exportability.")
    if lens[0] > x.size(0):
        raise RuntimeError(f"Start ({x.size(0)}) + length ({lens[0] - x.size(0)}) exceeds "
                           f"dimension size ({x.size(0)}).")
    batch_sizes = [sum(1 for n in lens if n > t) for t in range(lens[0])]
    data = torch.cat([x[t, :b] for t, b in enumerate(batch_sizes)])
    return data, torch.tensor(batch_sizes, dtype=torch.int64, device="cpu")


def _ints(v: Any) -> list[int]:
    return v.tolist() if isinstance(v, torch.Tensor) else [int(n) for n in v]


def _ctc_loss(func: Any, args: tuple, kwargs: dict) -> Any:
    """torch.ctc_loss (F.ctc_loss) for vGPU log-probs, as PyTorch computes it without
    cuDNN: lengths as host numbers (host or vGPU tensors, or lists), host targets moved to
    the vGPU, then _ctc_loss and the reduction. PyTorch's C++ composite refused host
    lengths here and built its helper tensors on the wrapper's "meta" device."""
    a = _args(("log_probs", "targets", "input_lengths", "target_lengths", "blank",
               "reduction", "zero_infinity"), args, kwargs)
    log_probs, targets = a.get("log_probs"), a.get("targets")
    if not isinstance(log_probs, RemoteTensor):
        return func(*args, **kwargs)
    input_lengths, target_lengths = _ints(a["input_lengths"]), _ints(a["target_lengths"])
    blank, reduction = int(a.get("blank", 0)), int(a.get("reduction", 1))
    zero_infinity = bool(a.get("zero_infinity", False))
    batched = log_probs.dim() == 3
    if not batched:
        log_probs = log_probs.unsqueeze(1)
    if not isinstance(targets, RemoteTensor):
        targets = frontend.upload(targets.long(), log_probs._dev)
    elif targets.dtype != torch.int64:
        targets = targets.long()
    res = torch._ctc_loss(log_probs, targets, input_lengths, target_lengths, blank,
                          zero_infinity)[0]
    if zero_infinity:
        res = torch.where(res == float("inf"), res.new_zeros(()), res)
    if reduction == 1:  # at::Reduction::Mean: per target length, then over the batch
        per = frontend.upload(torch.tensor(target_lengths, dtype=res.dtype, device="cpu")
                              .clamp_min(1),
                              res._dev)
        return (res / per).mean()
    if reduction == 2:
        return res.sum()
    return res if batched else res.squeeze(0)


_sdp_choices: dict[tuple, int] = {}
_FLASH = 1  # torch.nn.attention.SDPBackend.FLASH_ATTENTION


def _sdpa(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run attention with the kernel the server's device would pick, not the meta fallback."""
    q = args[0]
    if not isinstance(q, RemoteTensor):
        return func(*args, **kwargs)
    k, v = args[1], args[2]
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    opts = dict(zip(names, args[3:], strict=False))
    opts.update(kwargs)
    mask, dropout_p = opts.get("attn_mask"), float(opts.get("dropout_p", 0.0))
    is_causal, scale = bool(opts.get("is_causal", False)), opts.get("scale")
    gqa = bool(opts.get("enable_gqa", False))  # grouped-query attention (Llama, Mistral)
    choice = _sdp_choice(q, k, v, mask, dropout_p, is_causal, scale, gqa)
    aten = torch.ops.aten
    if mask is not None and mask.dtype == torch.bool:
        # As PyTorch's own attention does before any kernel: False means -inf, True 0 (the
        # kernels would add a bool mask as 0/1). Built from tensors, not device= factories:
        # this runs with the mode off.
        mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask.logical_not(),
                                                                   float("-inf"))
    if choice == _FLASH:
        return aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale)[0]
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        mask = q.new_full((L, S), float("-inf")).triu_(1)  # the math kernel's causal mask
    return aten._scaled_dot_product_attention_math(
        q, k, v, mask, dropout_p, False, scale=scale, enable_gqa=gqa)[0]


def _sdp_choice(q: Any, k: Any, v: Any, mask: Any, dropout_p: float, is_causal: bool,
                scale: Any, gqa: bool = False) -> int:
    key = (q._key, k._key, v._key, None if mask is None else mask._key, dropout_p > 0,
           is_causal, scale, gqa, get_runtime().conn(q._dev).welcome["device"].get("emulated"))
    choice = _sdp_choices.get(key)
    if choice is None:
        # The choice depends only on metadata; an emulated GPU answers as its CPU would.
        def host(t: Any) -> Any:
            return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                              device="cpu")
        choice = int(torch._fused_sdp_choice(host(q), host(k), host(v), host(mask), dropout_p,
                                             is_causal, scale=scale, enable_gqa=gqa))
        _sdp_choices[key] = choice
    return choice


def _direct_aten(op: Any) -> Any:
    """Ops whose meta check fails above the Python key (no meta kernel): go to ATen directly.

    These are not differentiable, so skipping autograd loses nothing."""
    def handler(func: Any, args: tuple, kwargs: dict) -> Any:
        if not any(isinstance(a, RemoteTensor) for a in args):
            return func(*args, **kwargs)
        return frontend.dispatch(op, args, kwargs, None)
    return handler


def _unique(func: Any, args: tuple, kwargs: dict) -> Any:
    """torch.unique on a vGPU tensor: run ATen's kernel on the server (shape is data-dependent)."""
    if not args or not isinstance(args[0], RemoteTensor):
        return func(*args, **kwargs)
    names = ("sorted", "return_inverse", "return_counts", "dim")
    opts = {"sorted": True, "return_inverse": False, "return_counts": False, "dim": None}
    opts.update(dict(zip(names, args[1:], strict=False)))
    opts.update(kwargs)
    x, inv, cnt = opts["return_inverse"], opts["return_counts"], opts["dim"]
    aten = torch.ops.aten
    if cnt is not None and opts["dim"] is not None:
        out = frontend.dispatch(aten.unique_dim.default,
                                (args[0], opts["dim"], opts["sorted"], x, inv), {}, None)
    else:
        out = frontend.dispatch(aten._unique2.default, (args[0], opts["sorted"], x, inv), {},
                                None)
    result = [out[0]] + ([out[1]] if x else []) + ([out[2]] if inv else [])
    return result[0] if len(result) == 1 else tuple(result)


def _unique_consecutive(func: Any, args: tuple, kwargs: dict) -> Any:
    if not args or not isinstance(args[0], RemoteTensor):
        return func(*args, **kwargs)
    opts = {"return_inverse": False, "return_counts": False, "dim": None}
    opts.update(dict(zip(opts, args[1:], strict=False)))
    opts.update(kwargs)
    inv, cnt = bool(opts["return_inverse"]), bool(opts["return_counts"])
    out = frontend.dispatch(torch.ops.aten.unique_consecutive.default,
                            (args[0], inv, cnt, opts["dim"]), {}, None)
    result = [out[0]] + ([out[1]] if inv else []) + ([out[2]] if cnt else [])
    return result[0] if len(result) == 1 else tuple(result)


def _item(func: Any, args: tuple, kwargs: dict) -> Any:
    # Straight to the host copy: PyTorch's own path for item() on a Python tensor subclass
    # imports torch.distributed.tensor (seconds of start-up) to look for DTensors.
    t = args[0]
    if isinstance(t, RemoteTensor) and not kwargs:
        if t.numel() != 1:
            raise RuntimeError(f"a Tensor with {t.numel()} elements cannot be converted to "
                               "Scalar")
        return frontend.fetch(t).item()
    return func(*args, **kwargs)


_TF_SPECIAL: dict[Any, Any] = {
    torch.Tensor.item: _item,
    torch.unique: _unique,
    torch.Tensor.unique: _unique,
    torch._unique2: _direct_aten(torch.ops.aten._unique2.default),
    torch._unique: _direct_aten(torch.ops.aten._unique.default),
    torch.unique_consecutive: _unique_consecutive,
    torch.nn.functional.scaled_dot_product_attention: _sdpa,
    torch.nn.functional.one_hot: _one_hot,
    torch._pack_padded_sequence: _pack_padded,
    torch.ctc_loss: _ctc_loss,
    torch.Tensor.to: _tensor_to,
    torch.Tensor.new_tensor: _new_tensor,
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.pin_memory: _tensor_pin_memory,
    torch.Tensor.is_pinned: _tensor_is_pinned,
    torch.Tensor.type: _tensor_type,
}


# --------------------------------------------------------------------------- torch.cuda
class _Current(threading.local):
    index = 0  # each thread has its own current device, as with CUDA


_cur = _Current()


def is_available() -> bool:
    return True


def device_count() -> int:
    return get_runtime().device_count


def current_device() -> int:
    return _cur.index


def set_device(device: Any) -> None:
    idx = _cuda_index(device)
    if idx is not None and idx >= 0:
        _check_index(idx)
        _cur.index = idx


def _check_index(idx: int) -> None:
    if not 0 <= idx < device_count():
        raise RuntimeError(f"CUDA error: invalid device ordinal (cuda:{idx}; ORION_VGPU="
                           f"{device_count()})")


def _exchange_device(idx: int) -> int:
    prev = _cur.index
    if idx >= 0:
        idx = _local(idx)
        _check_index(idx)
        _cur.index = idx
    return prev


def _props(device: Any = None) -> dict:
    return get_runtime().conn(_index(device)).welcome["device"]


class VGPUProperties:
    """Mirrors torch.cuda's device properties for a vGPU."""

    def __init__(self, d: dict) -> None:
        self.name = d["name"]
        self.total_memory = int(d["total_memory"])
        self.major = int(d.get("major", 8))
        self.minor = int(d.get("minor", 0))
        self.multi_processor_count = int(d.get("multi_processor_count", 1))
        self.uuid = d.get("uuid", "")
        self.is_integrated = False
        self.is_multi_gpu_board = False
        self.L2_cache_size = 0
        self.warp_size = 32
        self.gcnArchName = ""

    def __repr__(self) -> str:
        return (f"_CudaDeviceProperties(name='{self.name}', major={self.major}, "
                f"minor={self.minor}, total_memory={self.total_memory >> 20}MB, "
                f"multi_processor_count={self.multi_processor_count}, uuid={self.uuid})")


def get_device_properties(device: Any = None) -> VGPUProperties:
    return VGPUProperties(_props(device))


def get_device_name(device: Any = None) -> str:
    return str(_props(device)["name"])


def get_device_capability(device: Any = None) -> tuple[int, int]:
    d = _props(device)
    return int(d.get("major", 8)), int(d.get("minor", 0))


def synchronize(device: Any = None) -> None:
    idx = None if device is None else _cuda_index(device)
    if idx is not None:
        _check_index(idx)
    get_runtime().synchronize(idx)


def _stats(device: Any = None) -> dict:
    stats = device_monitor.session_stats(_index(device))
    return {"allocated": 0, "peak": 0, "limit": 0} if stats is None else stats


def _index(device: Any) -> int:
    """The vGPU a memory or monitoring call names: the current one for None; an ordinal
    the program does not have is CUDA's invalid device ordinal error, not vGPU 0's figures."""
    if device is None:
        return current_device()
    idx = _cuda_index(device)
    if idx is None:
        raise ValueError(f"Expected a cuda device, but got: {device}")
    _check_index(idx)
    return idx


def memory_allocated(device: Any = None) -> int:
    return frontend.used_bytes.get(_index(device), 0)


def max_memory_allocated(device: Any = None) -> int:
    return frontend.peak_bytes.get(_index(device), 0)


memory_reserved = memory_allocated
max_memory_reserved = max_memory_allocated


def mem_get_info(device: Any = None) -> tuple[int, int]:
    total = int(_props(device)["total_memory"])
    return total - memory_allocated(device), total


def memory_stats(device: Any = None) -> dict[str, int]:
    return cuda_memory.memory_stats(_index(device))


def memory_stats_as_nested_dict(device: Any = None) -> dict[str, Any]:
    return cuda_memory.memory_stats_as_nested_dict(_index(device))


def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
    cuda_memory.set_per_process_memory_fraction(fraction, _index(device))


def get_per_process_memory_fraction(device: Any = None) -> float:
    return cuda_memory.get_per_process_memory_fraction(_index(device))


def utilization(device: Any = None) -> int:
    return device_monitor.utilization(_index(device))


def device_memory_used(device: Any = None) -> int:
    return device_monitor.device_memory_used(_index(device))


def list_gpu_processes(device: Any = None) -> str:
    return device_monitor.list_gpu_processes(_index(device))


def can_device_access_peer(device: Any, peer_device: Any) -> bool:
    """vGPUs of a program copy to each other (server to server where they can)."""
    for d in (device, peer_device):
        idx = _cuda_index(d)
        if idx is None or not 0 <= idx < device_count():
            raise AssertionError(f"Invalid device id: {d!r} (this program has "
                                 f"{device_count()} vGPU)")
    return True


class _SyncDebug:
    mode = 0


def set_sync_debug_mode(debug_mode: Any) -> None:
    _SyncDebug.mode = {"default": 0, "warn": 1, "error": 2}.get(debug_mode, debug_mode)


def get_sync_debug_mode() -> int:
    return int(_SyncDebug.mode)


def set_stream(s: Any) -> None:
    """Make ``s`` its device's current stream and its device the current one, as CUDA's
    set_stream does. A vGPU session runs its work in order whatever the stream: streams
    here are what a program sees of them (identity, device), not concurrency."""
    if s is None:
        return
    _exchange_device(int(s.device_index))
    _current_streams[s.device_index] = s


def server_memory_stats(device: Any = None) -> dict[str, int]:
    """The server's own ledger for this session (a round trip): allocated, peak, limit."""
    return {k: int(v) for k, v in _stats(device).items()}


def empty_cache() -> None:
    frontend._drain_frees()


def reset_peak_memory_stats(device: Any = None) -> None:
    idx = _index(device)
    frontend.peak_bytes[idx] = frontend.used_bytes.get(idx, 0)


def manual_seed(seed: int) -> None:
    get_runtime().seed(current_device(), int(seed))


def manual_seed_all(seed: int) -> None:
    rt = get_runtime()
    for i in range(rt.device_count):
        rt.seed(i, int(seed))


def get_rng_state(device: Any = "cuda") -> torch.Tensor:
    idx = _cuda_index(device) or 0
    return get_runtime().conn(idx).rng_state()


def set_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
    idx = _cuda_index(device) or 0
    conn = get_runtime().conn(idx)
    conn.set_rng_state(state)
    # A state the vGPU's generator cannot take (one saved on another kind of device) is
    # refused here, at the call, not by whatever op comes next.
    conn.request([messages.CMD_SYNC])


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state(i) for i in range(device_count())]


def set_rng_state_all(states: list[torch.Tensor]) -> None:
    for i, s in enumerate(states):
        set_rng_state(s, i)


class Stream:
    """Streams order work on a real GPU; a vGPU session is already in order. Each stream
    is its own (equal only to itself, as CUDA streams are), on the device it was made for."""

    _ids = itertools.count(1)

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        idx = _index(device)
        self.device = torch.device("cuda", idx)
        self.priority = priority
        # What code that hands a stream to torch.cuda or to a library reads of it.
        self.device_index = idx
        self.device_type = 1  # c10::DeviceType::CUDA
        # The default stream (current_stream before any set_stream) is 0, as CUDA's.
        self.stream_id = 0 if kwargs.get("_default") else next(Stream._ids)
        self.cuda_stream = self.stream_id
        self._prev: list[tuple[int, Stream]] = []

    def synchronize(self) -> None:
        synchronize(self.device)

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Event:
        event = event or Event()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return graphs.is_current_stream_capturing()

    def __enter__(self) -> Stream:
        self._prev.append((current_device(), current_stream(self.device_index)))
        set_stream(self)
        return self

    def __exit__(self, *exc: object) -> None:
        device, prev = self._prev.pop()
        _current_streams[self.device_index] = prev
        _exchange_device(device)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and (other.device, other.stream_id) == (
            self.device, self.stream_id)

    def __hash__(self) -> int:
        return hash((self.device, self.stream_id))

    def __repr__(self) -> str:
        return f"<torch.cuda.Stream device={self.device} cuda_stream={self.cuda_stream:#x}>"


class Event:
    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False) -> None:
        self._t: float | None = None
        self._device: torch.device | None = None

    @property
    def device(self) -> torch.device | None:
        """The device of the stream it was recorded on; None before its first record."""
        return self._device

    def record(self, stream: Any = None) -> None:
        import time
        stream = stream if stream is not None else current_stream()
        synchronize(stream.device)
        self._device = stream.device
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        synchronize()

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: Event) -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end._t - self._t) * 1000.0


_default_streams: dict[int, Stream] = {}
_current_streams: dict[int, Stream] = {}  # set_stream's, per vGPU


def default_stream(device: Any = None) -> Stream:
    idx = _index(device)
    s = _default_streams.get(idx)
    if s is None:
        s = _default_streams[idx] = Stream(idx, _default=True)
    return s


def current_stream(device: Any = None) -> Stream:
    idx = _index(device)
    return _current_streams.get(idx) or default_stream(idx)


@contextlib.contextmanager
def stream(s: Any) -> Any:
    """CUDA's StreamContext: ``s`` current, and its device, until the block ends."""
    if s is None:
        yield s
        return
    with s:
        yield s


def is_bf16_supported(including_emulation: bool = True) -> bool:
    return True


# --------------------------------------------------------------------------- activation
def _remote_data_ptr(self: RemoteTensor) -> int:
    """A vGPU tensor has no local memory (its meta data_ptr is 0 for all of them), but code
    such as make_graphed_callables compares pointers to tell tensors' memory apart: a
    stand-in equal exactly for views of the same storage at the same offset. A method of
    the class, not of the mode: backward code runs on autograd's threads, outside it."""
    return _storage_ptr(self) + self.storage_offset() * self.element_size()


def _storage_ptr(self: RemoteTensor) -> int:
    """The stand-in address of the vGPU memory under ``self``: one per client Storage."""
    st = getattr(self, "_st", None)
    return (id(st) if st is not None else self._h) << 40  # offsets < 1 TiB


_TENSOR_STORAGE = torch._C.TensorBase.untyped_storage


def _remote_untyped_storage(self: RemoteTensor) -> torch.UntypedStorage:
    """The wrapper's (meta) storage, whose ``data_ptr()`` is the stand-in of the vGPU memory
    under it (``_storage_ptr``: ``data_ptr()`` at offset 0), equal for a tensor and its
    views, distinct for two tensors. Code that tells shared storages apart by it (safetensors'
    ``storage_ptr``, transformers' ``id_tensor_storage`` before ``save_pretrained``) saw 0
    for every vGPU tensor: all tensors of one size looked like one shared storage."""
    storage = _TENSOR_STORAGE(self)
    # Set at each call: ``x.data = y`` or ``set_`` may have given the tensor another storage.
    storage.data_ptr = functools.partial(int, _storage_ptr(self))  # type: ignore[method-assign]
    return storage


def _alias(fn: Any) -> Any:
    """The same function as another object: torch._dynamo keys its handlers by function and
    refuses one object under two names (torch.cuda.synchronize, torch.accelerator.synchronize)."""
    def alias(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)
    alias.__name__ = alias.__qualname__ = fn.__name__
    alias.__doc__ = fn.__doc__
    return alias


_CUDA_FUNCS = {
    "is_available": is_available, "device_count": device_count,
    "current_device": current_device, "set_device": set_device,
    "_exchange_device": _exchange_device, "_maybe_exchange_device": _alias(_exchange_device),
    "get_device_properties": get_device_properties, "get_device_name": get_device_name,
    "get_device_capability": get_device_capability, "synchronize": synchronize,
    "memory_allocated": memory_allocated, "max_memory_allocated": max_memory_allocated,
    "memory_reserved": memory_reserved, "max_memory_reserved": max_memory_reserved,
    "mem_get_info": mem_get_info, "memory_stats": memory_stats, "empty_cache": empty_cache,
    "memory_stats_as_nested_dict": memory_stats_as_nested_dict,
    "reset_peak_memory_stats": reset_peak_memory_stats, "manual_seed": manual_seed,
    "manual_seed_all": manual_seed_all, "get_rng_state": get_rng_state,
    "set_rng_state": set_rng_state, "get_rng_state_all": get_rng_state_all,
    "set_rng_state_all": set_rng_state_all, "Stream": Stream, "Event": Event,
    "current_stream": current_stream, "default_stream": default_stream, "stream": stream,
    "is_bf16_supported": is_bf16_supported, "is_initialized": lambda: True,
    "init": lambda: None, "_lazy_init": lambda: None,
    "is_current_stream_capturing": graphs.is_current_stream_capturing,
    "CUDAGraph": graphs.CUDAGraph, "graph": graphs.graph,
    "graph_pool_handle": graphs.graph_pool_handle,
    "make_graphed_callables": graphs.make_graphed_callables,
    "set_per_process_memory_fraction": set_per_process_memory_fraction,
    "get_per_process_memory_fraction": get_per_process_memory_fraction,
    "memory_snapshot": cuda_memory.memory_snapshot,
    "_record_memory_history": cuda_memory.no_op,
    "reset_accumulated_memory_stats": cuda_memory.no_op,
    "reset_max_memory_allocated": reset_peak_memory_stats,
    "get_allocator_backend": lambda: "native", "ipc_collect": cuda_memory.no_op,
    "set_stream": set_stream, "can_device_access_peer": can_device_access_peer,
    "set_sync_debug_mode": set_sync_debug_mode, "get_sync_debug_mode": get_sync_debug_mode,
    "utilization": utilization, "device_memory_used": device_memory_used,
    "list_gpu_processes": list_gpu_processes,
    "memory_usage": device_monitor.hardware_only(
        "memory_usage", "torch.cuda.utilization() or torch.cuda.memory_allocated()"),
    "temperature": device_monitor.hardware_only("temperature", "the server's nvidia-smi"),
    "power_draw": device_monitor.hardware_only("power_draw", "the server's nvidia-smi"),
    "clock_rate": device_monitor.hardware_only("clock_rate", "the server's nvidia-smi"),
}


def activate() -> None:
    """Make this process's torch talk to the pool (idempotent)."""
    global _active
    if _active:
        return
    _active = True
    import torch.cuda
    import torch.cuda.graphs
    import torch.cuda.memory
    import torch.cuda.random

    for name, fn in _CUDA_FUNCS.items():
        setattr(torch.cuda, name, fn)
        for mod in (torch.cuda.memory, torch.cuda.random, torch.cuda.graphs):
            if hasattr(mod, name):
                setattr(mod, name, fn)
    _patch_accelerator()
    _patch_parse_to()
    # Read as "CUDA is initialized" by PyTorch's own code: torch.utils.checkpoint saves and
    # restores the CUDA generators' state only then (a recomputed dropout drew a new mask).
    torch.cuda._initialized = True
    torch.__future__.set_swap_module_params_on_conversion(True)
    RemoteTensor.data_ptr = _remote_data_ptr  # type: ignore[method-assign]
    RemoteTensor.untyped_storage = _remote_untyped_storage  # type: ignore[method-assign]
    from orion_vgpu.client import checkpoint, parallel
    checkpoint.install()
    parallel.install()
    distributed.install()  # backend "nccl" and DDP run their collectives on the servers
    from orion_vgpu.client.errors import install_excepthook
    install_excepthook()
    _skip_dtensor_check()
    _enable_foreach()
    _patch_compile()
    hooks.wrap_device_context(_create, _cuda_index)
    frontend.install_meta_factories()
    lazy_params.install(_cuda_index)
    torch_tools.install()
    generators.install(_cuda_index, device_count())
    legacy_types.install()
    cuda_memory.install_nvtx()
    _last_dtype[0] = torch.get_default_dtype()
    settings.install(_settings_changed)  # after legacy_types: wraps its set_default_tensor_type
    if not _hooks_wanted():
        use_process_mode(VGPUMode)
    else:
        hooks.install(_create, _cuda_index, _TF_SPECIAL, VGPUMode)


_last_dtype = [torch.float32]


def _settings_changed() -> None:
    """A torch setting changed (client/settings.py): the sessions follow, e.g. with
    set_default_dtype(torch.float64) factories and int/float promotions give float64."""
    dtype = torch.get_default_dtype()
    if dtype is not _last_dtype[0]:
        # Cached output descriptions of ops without a dtype were made with the old default.
        frontend._meta_cache.clear()
        _last_dtype[0] = dtype
    get_runtime().sync_settings()


def _hooks_wanted() -> bool:
    raw = os.environ.get("ORION_TORCH_HOOKS", "").strip()
    if raw not in ("", "0", "1"):
        print(f"orion-vgpu: ORION_TORCH_HOOKS={raw!r} is not 0 or 1; using 1 (wrapped torch "
              "functions). Set 0 for a torch-function mode on every call.", file=sys.stderr)
    return raw != "0"


def use_process_mode(cls: type[VGPUMode]) -> None:
    """A mode of class ``cls`` sees every torch call of this thread from now on, in place
    of the wrappers (client/compile.py: dynamo traces a mode, not wrapped functions). An
    existing process mode only changes class, so the stack dynamo guards on stays the same."""
    global _mode
    if _mode is not None:
        if issubclass(cls, type(_mode)):  # never back from _CompilingMode to VGPUMode
            _mode.__class__ = cls
        return
    hooks.remove()
    _forget_wrapped_in_dynamo()
    _mode = cls()
    hooks.depth.n += 1
    # At the bottom of the stack, as at start-up, above only PyTorch's default-device mode
    # (which requires the bottom): a region's mode above it may still pop its own.
    stack = [_pop_mode() for _ in range(torch._C._len_torch_function_stack())][::-1]
    keep = 1 if stack and isinstance(stack[0], DeviceContext) else 0
    for m in (*stack[:keep], _mode, *stack[keep:]):
        _push_mode(m)


def _forget_wrapped_in_dynamo() -> None:
    """Dynamo loaded before the wrappers went (a library imported it): its cached tables
    of torch functions are rebuilt from PyTorch's own."""
    rules = sys.modules.get("torch._dynamo.trace_rules")
    clear = getattr(rules, "clear_lru_cache", None)
    if clear is not None:
        clear()


def _patch_parse_to() -> None:
    """``x.to(1)``, ``module.to(local_rank)``: an int device is a CUDA index, which a CPU
    build's argument parser refuses ("Cannot access accelerator device"). Tensor.to (here)
    and Module.to both parse through this function."""
    original = torch._C._nn._parse_to
    if getattr(original, "_orion_vgpu", False):
        return

    def _parse_to(*args: Any, **kwargs: Any) -> Any:
        if args and type(args[0]) is int:
            args = (torch.device("cuda", args[0]), *args[1:])
        if type(kwargs.get("device")) is int:
            kwargs["device"] = torch.device("cuda", kwargs["device"])
        return original(*args, **kwargs)

    _parse_to._orion_vgpu = True  # type: ignore[attr-defined]
    torch._C._nn._parse_to = _parse_to


def _patch_compile() -> None:
    """``torch.compile`` compiles for the servers (client/compile.py). Wrapped, not replaced
    at activation: torch._dynamo (seconds of import) loads only if the program compiles."""
    original = torch.compile
    if getattr(original, "_orion_vgpu", False):
        return

    def compile(model: Any = None, **kwargs: Any) -> Any:  # noqa: A001  (torch's name)
        # Before torch._dynamo loads: its tables must see PyTorch's own functions, not the
        # wrappers of client/hooks.py (compile.install() then changes the mode's class).
        use_process_mode(VGPUMode)
        from orion_vgpu.client import compile as vgpu_compile
        return vgpu_compile.compile(original, model, **kwargs)

    compile.__doc__ = original.__doc__
    compile._orion_vgpu = True  # type: ignore[attr-defined]
    torch.compile = compile  # type: ignore[assignment]


def _enable_foreach() -> None:
    """vGPU tensors take PyTorch's multi-tensor (``foreach``) paths, as CUDA tensors do:
    optimizers and ``clip_grad_norm_`` test the tensor's exact type against these lists,
    and without it an Adam step on a vGPU is one command per parameter and op (67 for a
    4-layer MLP) instead of about a dozen. Both modules are loaded by ``import torch``."""
    import importlib

    for name in ("torch.optim.optimizer", "torch.utils._foreach_utils"):
        types = getattr(importlib.import_module(name), "_foreach_supported_types", None)
        if isinstance(types, list) and RemoteTensor not in types:
            types.append(RemoteTensor)


def _skip_dtensor_check() -> None:
    """Keep the first vGPU op from importing ``torch.distributed.tensor`` (0.6-2.5 s).

    Before it calls a tensor subclass's ``__torch_dispatch__``, PyTorch's C++ dispatcher
    (``dispatch_on_subclass``) asks ``torch._library.simple_registry.find_torch_dispatch_rule``
    for a rule registered for (op, class) with ``torch.library.register_torch_dispatch``;
    only when there is none does it test whether the tensor is a DTensor, and that test
    imports ``torch.distributed.tensor`` (sympy, all DTensor sharding rules) the first
    time. Answering the lookup for RemoteTensor with its own ``__torch_dispatch__``, for
    every op, is what registering it op by op would do, and skips that test; every other
    class gets the registry's answer. The C++ side looks the function up once, at the
    first subclass dispatch of the process, which is why this runs here, before any.
    """
    try:
        from torch._library import simple_registry
    except ImportError:  # another PyTorch: the DTensor test, if any, stays (only slower)
        return
    find = simple_registry.find_torch_dispatch_rule
    # The classmethod's function has a rule's signature: (cls, func, types, args, kwargs).
    rule = getattr(RemoteTensor.__dict__.get("__torch_dispatch__"), "__func__", None)
    if rule is None or getattr(find, "_orion_vgpu", False):
        return

    def find_torch_dispatch_rule(op: Any, torch_dispatch_class: type) -> Any:
        if torch_dispatch_class is RemoteTensor:
            return rule
        return find(op, torch_dispatch_class)

    find_torch_dispatch_rule._orion_vgpu = True  # type: ignore[attr-defined]
    simple_registry.find_torch_dispatch_rule = find_torch_dispatch_rule


def _patch_accelerator() -> None:
    acc = getattr(torch, "accelerator", None)
    if acc is None:
        return
    funcs = {"is_available": is_available, "device_count": device_count,
             "current_accelerator": lambda check_available=False: torch.device("cuda"),
             "current_device_index": current_device, "current_device_idx": current_device,
             "set_device_index": set_device, "set_device_idx": set_device,
             "synchronize": _alias(synchronize), "current_stream": _alias(current_stream)}
    for name, fn in funcs.items():
        if hasattr(acc, name):
            setattr(acc, name, fn)
    # torch.accelerator's context managers call these directly.
    c_funcs = {"_accelerator_exchangeDevice": _exchange_device,
               "_accelerator_maybeExchangeDevice": _exchange_device,
               "_accelerator_getDeviceIndex": current_device,
               "_accelerator_setDeviceIndex": set_device,
               "_accelerator_getStream": current_stream,
               "_accelerator_synchronizeDevice": synchronize}
    for name, fn in c_funcs.items():
        if hasattr(torch._C, name):
            setattr(torch._C, name, fn)
