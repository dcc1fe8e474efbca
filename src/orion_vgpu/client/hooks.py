"""How a program's torch calls reach the pool without a process-wide torch-function mode.

Most calls need nothing from the client: ops on vGPU tensors reach
``RemoteTensor.__torch_dispatch__`` and ops on host tensors stay on the host. A short list
does: factories given ``device="cuda"``, ``Tensor.to``/``.cuda``/``.pin_memory``,
``.item()``, unique and attention on vGPU tensors, ``with torch.device("cuda")``
(``wrap_device_context``), and the autocast policy. A ``TorchFunctionMode`` would see every torch call of the process instead
(about 2.3 µs each, host-side code included: an MLP training step makes 122, most of them
property reads), so the listed functions are wrapped where PyTorch exposes them, and a
``VGPUMode`` is on only where its rule is "every call": inside ``torch.autocast("cuda")``
and, for the rest of the process, once it compiles (dynamo traces the mode; ``remove()``
takes the wrappers away first). While a ``VGPUMode`` is on in a thread the wrappers step
aside (``depth``), so each call is handled once, by the mode, as before.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch._VF  # noqa: F401  (a module object PyTorch puts in sys.modules)

from orion_vgpu.client import pinned

# Factories of the torch namespace with a ``device`` argument (aten schemas with one, plus
# the Python-data builders); tests/client/test_hooks.py checks the list against the torch
# the client runs.
FACTORIES = (
    "arange", "as_tensor", "asarray", "bartlett_window", "blackman_window", "empty",
    "empty_like", "empty_permuted", "empty_quantized", "empty_strided", "eye", "from_file",
    "full", "full_like", "hamming_window", "hann_window", "kaiser_window", "linspace",
    "logspace", "normal", "ones", "ones_like", "rand", "rand_like", "randint",
    "randint_like", "randn", "randn_like", "randperm", "range", "scalar_tensor",
    "sparse_bsc_tensor", "sparse_bsr_tensor", "sparse_compressed_tensor",
    "sparse_coo_tensor", "sparse_csc_tensor", "sparse_csr_tensor", "tensor", "tril_indices",
    "triu_indices", "zeros", "zeros_like",
)
FFT_FACTORIES = ("fftfreq", "rfftfreq")
# Tensor methods that create a tensor on the device they are given.
NEW_METHODS = ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_zeros")

Handler = Callable[[Any, tuple, dict], Any]
Factory = Callable[[Any, tuple, dict, int], Any]


class _Depth(threading.local):
    n = 0  # VGPUModes on in this thread


class _Regions(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[Any, Any]] = []  # (autocast, its VGPUMode or None), this thread


depth = _Depth()
_regions = _Regions()
# (owner, name, original, whether the owner itself held it, wrapper) for remove()
_saved: list[tuple[Any, str, Any, bool, Any]] = []
# wrapper -> original: a mode is handed the wrapper for a Tensor method (PyTorch looks the
# method up on torch.Tensor by name), and must see the original
ORIGINALS: dict[Any, Any] = {}


def installed() -> bool:
    return bool(_saved)


def install(create: Factory, cuda_index: Callable[[Any], int | None],
            special: dict[Any, Handler], autocast_mode: Callable[[], Any]) -> None:
    """Wrap the functions that need the client. ``create(func, args, kwargs, idx)`` makes a
    tensor on vGPU ``idx``; ``special`` maps original functions to handlers called as
    ``handler(original, args, kwargs)``; ``autocast_mode()`` is the mode for autocast regions."""
    if _saved:
        return

    def factory(orig: Any) -> Any:
        reads_data = orig in (torch.tensor, torch.as_tensor, torch.asarray)

        def hook(*args: Any, **kwargs: Any) -> Any:
            if reads_data and args and type(args[0]) in (list, tuple):
                args = (host_elements(args[0]), *args[1:])
            dev = kwargs.get("device")
            if dev is None or depth.n:
                if not depth.n:
                    if "generator" in kwargs:
                        host_generator(kwargs["generator"], args, kwargs.get("out"))
                    if kwargs.get("pin_memory"):
                        return pinned_host(orig, args, kwargs)
                return orig(*args, **kwargs)
            idx = cuda_index(dev)
            if idx is None:
                host_generator(kwargs.get("generator"), args, kwargs.get("out"))
                if kwargs.get("pin_memory"):
                    return pinned_host(orig, args, kwargs)
                return orig(*args, **kwargs)
            return create(orig, args, kwargs, idx)
        return hook

    for name in FACTORIES:
        _wrap(torch, name, factory)
    for name in FFT_FACTORIES:
        _wrap(torch.fft, name, factory)
    for name in NEW_METHODS:
        _wrap(torch.Tensor, name, factory)
    for orig, handler in special.items():
        for owner, name in _homes(orig):
            _wrap(owner, name, functools.partial(_special, handler=handler))
    _wrap_autocast(autocast_mode)


def host_elements(data: list | tuple) -> list | tuple:
    """``torch.tensor([loss_a, loss_b])`` with vGPU tensors: PyTorch's C++ takes a wrapper
    subclass with a Python __getitem__ for a sequence (len() of a 0-d one raises) and reads
    an element's value below Python (a wrapper has none); it reads a CUDA tensor's value.
    Such elements become host copies."""
    return _to_host(data) if _holds_vgpu(data) else data


def _holds_vgpu(data: list | tuple) -> bool:
    items: Any = data
    while True:  # level by level, at C speed: torch.tensor(a long list of rows of numbers)
        kinds = set(map(type, items))
        for kind in kinds:
            if (issubclass(kind, torch.Tensor)
                    and any(d.is_cuda for d in items if type(d) is kind)):
                return True
        nested = kinds & _SEQUENCES
        if not nested:
            return False
        if len(kinds) > len(nested):
            items = [d for d in items if type(d) in _SEQUENCES]
        items = list(itertools.chain.from_iterable(items))


_SEQUENCES = {list, tuple}


def _to_host(data: Any) -> Any:
    if type(data) in (list, tuple):
        return [_to_host(d) for d in data]
    if isinstance(data, torch.Tensor) and data.is_cuda:
        return data.cpu()
    return data


def pinned_host(orig: Any, args: tuple, kwargs: dict) -> Any:
    """A ``pin_memory=True`` factory: no CUDA here to pin with, so pageable memory marked
    pinned (client.pinned)."""
    out = orig(*args, **{**kwargs, "pin_memory": False})
    return pinned.mark(out) if isinstance(out, torch.Tensor) else out


def host_generator(gen: Any, args: tuple, out: Any = None) -> None:
    """A vGPU's generator given to a factory that makes a host tensor: PyTorch's error (the
    generator object's own C state is a placeholder, not the vGPU's). With a tensor argument
    (``normal(mean, std)``, ``randn_like``) or ``out=`` the tensor decides, and a vGPU op
    checks."""
    from orion_vgpu.client.generators import is_vgpu
    if (gen is not None and is_vgpu(gen) and not isinstance(out, torch.Tensor)
            and not any(isinstance(a, torch.Tensor) for a in args)):
        raise RuntimeError("Expected a 'cpu' device type for generator but found 'cuda'")


def remove() -> None:
    """Put every wrapped function back as PyTorch had it."""
    table = _script_builtins()
    while _saved:
        owner, name, orig, own, hook = _saved.pop()
        ORIGINALS.pop(hook, None)
        _script_forget(hook, table)
        if own:
            setattr(owner, name, orig)
        else:
            delattr(owner, name)


def _special(orig: Any, handler: Handler) -> Any:
    def hook(*args: Any, **kwargs: Any) -> Any:
        if depth.n:
            return orig(*args, **kwargs)
        return handler(orig, args, kwargs)
    return hook


def _wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    orig = getattr(owner, name, None)
    if orig is None:  # another PyTorch without it
        return
    hook = make(orig)
    functools.update_wrapper(hook, orig)
    # Pickled by name (spawned processes, DataLoader arguments): the name must lead here.
    if isinstance(owner, type):
        hook.__module__, hook.__qualname__ = owner.__module__, f"{owner.__qualname__}.{name}"
    else:
        hook.__module__, hook.__qualname__ = owner.__name__, name
    _saved.append((owner, name, orig, name in vars(owner), hook))
    ORIGINALS[hook] = orig
    setattr(owner, name, hook)
    _script_learn(hook, orig)


def _script_learn(hook: Any, orig: Any) -> None:
    """TorchScript resolves torch.zeros & co. by identity (a table built by import torch),
    and torch.unique & co. through their boolean dispatch: the wrapper compiles as what it
    wraps."""
    table = _script_builtins()
    if table is not None and id(orig) in table:
        table[id(hook)] = table[id(orig)]
    dispatched = getattr(torch._jit_internal, "boolean_dispatched", None)
    if dispatched is not None and orig in dispatched:
        dispatched[hook] = dispatched[orig]


def _script_forget(hook: Any, table: dict[int, str] | None) -> None:
    if table is not None:
        table.pop(id(hook), None)
    dispatched = getattr(torch._jit_internal, "boolean_dispatched", None)
    if dispatched is not None:
        dispatched.pop(hook, None)


def _script_builtins() -> dict[int, str] | None:
    try:
        from torch.jit._builtins import _get_builtin_table
    except ImportError:
        return None
    return _get_builtin_table()


def _homes(orig: Any) -> list[tuple[Any, str]]:
    """Where a program finds ``orig``: the torch namespace, Tensor, torch.nn.functional, and
    torch._VF (through which torch.nn calls some of them, e.g. the packed-sequence ops)."""
    name = getattr(orig, "__name__", None)
    if name is None:
        return []
    homes = []
    for owner in (torch, torch.Tensor, torch.nn.functional, torch._VF):
        if getattr(owner, name, None) is orig:
            homes.append((owner, name))
    return homes


def wrap_device_context(create: Factory, cuda_index: Callable[[Any], int | None]) -> None:
    """``with torch.device("cuda")`` / ``torch.set_default_device("cuda")``: PyTorch's own
    mode adds the device to a factory call that has none, and the call goes to the pool.
    For the life of the process (a VGPUMode above PyTorch's mode passes such a call on as
    it came), and before install(): the constructors PyTorch caches are its originals."""
    try:
        from torch.utils._device import DeviceContext, _device_constructors
    except ImportError:
        return
    orig = DeviceContext.__torch_function__
    if getattr(orig, "_orion_vgpu", False):
        return
    constructors = frozenset(_device_constructors())

    def __torch_function__(self: Any, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if (self.device.type == "cuda" and func in constructors
                and (not kwargs or kwargs.get("device") is None)):
            idx = cuda_index(self.device)
            if idx is not None:
                return create(func, args, {**(kwargs or {}), "device": self.device}, idx)
        return orig(self, func, types, args, kwargs)

    __torch_function__._orion_vgpu = True  # type: ignore[attr-defined]
    DeviceContext.__torch_function__ = __torch_function__  # type: ignore[method-assign]


def _wrap_autocast(autocast_mode: Callable[[], Any]) -> None:
    """A VGPUMode for the length of each ``torch.autocast("cuda")`` region (the casting
    policy applies to every call there); None marks an entry that pushed none."""
    cls = torch.amp.autocast_mode.autocast

    def make_enter(orig: Any) -> Any:
        def __enter__(self: Any) -> Any:
            out = orig(self)
            mode = None
            if getattr(self, "device", None) == "cuda" and not depth.n:
                mode = autocast_mode()
                mode.__enter__()
            _regions.stack.append((self, mode))
            return out
        return __enter__

    def make_exit(orig: Any) -> Any:
        def __exit__(self: Any, *exc: Any) -> Any:
            stack = _regions.stack
            if stack and stack[-1][0] is self:
                mode = stack.pop()[1]
                if mode is not None:
                    mode.__exit__(None, None, None)
            return orig(self, *exc)
        return __exit__

    _wrap(cls, "__enter__", make_enter)
    _wrap(cls, "__exit__", make_exit)
