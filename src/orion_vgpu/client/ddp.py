"""``DistributedDataParallel`` for modules on vGPUs, its gradients averaged on the servers.

PyTorch's DDP hands gradients to a C++ Reducer that allocates its buckets with
``at::empty(param.options())``: plain meta tensors here, with no data anywhere. So
``DistributedDataParallel(module, ...)`` of a module whose parameters are on a vGPU, by
whatever name the program imported the class, makes this subclass of it (``install``
gives PyTorch's class a ``__new__`` that picks it; ``isinstance`` checks still pass),
which does the Reducer's work in Python: it checks that every rank wraps the same parameters, broadcasts parameters and
buffers from rank 0 at construction, broadcasts buffers before each forward that follows
a synced one (``broadcast_buffers``), and after each synced backward sends one coalesced
allreduce (AVG) of all gradients, which the workers run between themselves in buckets of
``bucket_cap_mb``; with a group of another backend (gloo) the gradients are summed
through this host, one flat buffer per dtype (client/host_collectives.py). ``no_sync()``
accumulates locally; ``find_unused_parameters`` agrees on globally unused parameters
(one small round trip per backward, as PyTorch's own does) and leaves their ``.grad``
untouched. Any other module (CPU parameters) gets PyTorch's own DDP.

Supported: ``device_ids`` (one device), ``output_device``, ``dim``, ``broadcast_buffers``
/ ``forward_sync_buffers``, ``init_sync``, ``process_group``, ``bucket_cap_mb``,
``find_unused_parameters``; accepted with no effect: ``check_reduction``,
``gradient_as_bucket_view``, ``static_graph``, ``skip_all_reduce_unused_params``,
``batched_grad_copy``. Refused: ``mixed_precision``, ``device_mesh``,
``delay_all_reduce_named_params`` / ``param_to_hook_all_reduce``, ``bucket_cap_mb_list``,
communication hooks and ``join()``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.algorithms.join import Joinable
from torch.utils._pytree import tree_map

from orion_vgpu.client import frontend
from orion_vgpu.client.distributed import OrionProcessGroup
from orion_vgpu.client.errors import OrionError
from orion_vgpu.client.frontend import RemoteTensor

_RealDDP = torch.nn.parallel.DistributedDataParallel
_SIG = inspect.signature(_RealDDP.__init__)
_REFUSED = ("mixed_precision", "device_mesh", "delay_all_reduce_named_params",
            "param_to_hook_all_reduce", "bucket_cap_mb_list")
_UNUSED_ERROR = (
    "Expected to have finished reduction in the prior iteration before starting a new one. "
    "This error indicates that your module has parameters that were not used in producing "
    "loss. You can enable unused parameter detection by passing the keyword argument "
    "`find_unused_parameters=True` to `torch.nn.parallel.DistributedDataParallel`. "
    "Parameters that did not receive a gradient: {names}")


class DistributedDataParallel(_RealDDP):
    """What ``torch.nn.parallel.DistributedDataParallel(module)`` makes of a module on a
    vGPU (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        a = _SIG.bind(self, module, *args, **kwargs)
        a.apply_defaults()
        opts = dict(a.arguments)
        torch.nn.Module.__init__(self)
        Joinable.__init__(self)
        _refuse(opts)
        pg = opts.get("process_group") or c10d._get_default_group()
        self.process_group = pg
        # Another backend (gloo) runs its collectives on host copies (host_collectives.py).
        self._on_servers = isinstance(pg, OrionProcessGroup)
        self.module = module
        self._setup(opts)
        if opts.get("init_sync", True):
            self._verify_same_model()
            self._broadcast(self._params_and_buffers(self._init_sync_buffers))
        self._register_hooks()

    # construction ----------------------------------------------------------------------
    def _setup(self, opts: dict) -> None:
        module = self.module
        self.parameters_to_ignore = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
        named = [(n, p) for n, p in module.named_parameters()
                 if n not in self.parameters_to_ignore]
        self._module_parameters = [p for _, p in named]
        self._named = [(n, p) for n, p in named if p.requires_grad]
        self._params = [p for _, p in self._named]
        if not self._params:
            raise RuntimeError("DistributedDataParallel is not needed when a module doesn't "
                               "have any parameter that requires a gradient.")
        _check_params(module, self._params)
        self.device = self._params[0].device
        self.device_type = "cuda"
        ids = opts.get("device_ids")
        if ids is not None and len(ids) > 1:
            raise ValueError("device_ids can only be None or contain a single element.")
        self.device_ids = [self.device.index] if ids else None
        self.output_device = self.device.index if ids else None
        self.dim = opts.get("dim", 0)
        fsb, bb = opts.get("forward_sync_buffers"), opts.get("broadcast_buffers")
        sync_bufs = fsb if fsb is not None else (bb if bb is not None else True)
        self._init_sync_buffers = True if fsb is not None else sync_bufs
        self.forward_sync_buffers = bool(sync_bufs)
        if not isinstance(getattr(_RealDDP, "broadcast_buffers", None), property):
            self.broadcast_buffers = bool(sync_bufs)  # older PyTorch: a plain attribute
        self.find_unused_parameters = bool(opts.get("find_unused_parameters", False))
        self.gradient_as_bucket_view = bool(opts.get("gradient_as_bucket_view", False))
        self.require_backward_grad_sync = True
        self.require_forward_param_sync = True
        self.static_graph = False
        self.mixed_precision = None
        self.logger = None
        cap = opts.get("bucket_cap_mb")
        self.bucket_bytes_cap = int((25 if cap is None else cap) * 1024 * 1024)
        self.broadcast_bucket_size = 250 * 1024 * 1024
        self._used = [False] * len(self._params)
        self._queued = False
        self._expect_sync = False
        self._unused_names: list[str] = []

    def _assign_modules_buffers(self) -> None:
        """The module's buffers now (a forward may have replaced some)."""
        self.modules_buffers = [b for n, b in self.module.named_buffers()
                                if n not in self.parameters_to_ignore]

    def _params_and_buffers(self, buffers: bool) -> list[torch.Tensor]:
        self._assign_modules_buffers()
        return list(self._module_parameters) + (self.modules_buffers if buffers else [])

    def _verify_same_model(self) -> None:
        """Every rank must wrap the same parameters, or the collectives would not match."""
        desc = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in self._named)
        h = int.from_bytes(hashlib.sha256(desc.encode()).digest()[:7], "little")
        t = torch.tensor([h, -h], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        hi, neg_lo = t.tolist()
        if hi != h or -neg_lo != h:
            raise RuntimeError("DistributedDataParallel: the ranks wrap different models (the "
                               "names, shapes or dtypes of their parameters differ)")

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        if self._on_servers:
            self.process_group.broadcast(tensors, opts)
            return
        for t in tensors:  # gloo broadcasts one tensor a call
            self.process_group.broadcast([t], opts).wait()

    def _register_hooks(self) -> None:
        ref = weakref.ref(self)
        self._hook_handles = [p.register_post_accumulate_grad_hook(
            functools.partial(_grad_ready, ref, i)) for i, p in enumerate(self._params)]

    # forward ---------------------------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self._unused_names:
            names, self._unused_names = ", ".join(self._unused_names), []
            raise RuntimeError(_UNUSED_ERROR.format(names=names))
        if self.require_forward_param_sync and self.forward_sync_buffers:
            self._assign_modules_buffers()
            self._broadcast(self.modules_buffers)
        if self.device_ids:
            inputs, kwargs = _to_device((inputs, kwargs), self.device)
        out = self.module(*inputs, **kwargs)
        if torch.is_grad_enabled() and self.require_backward_grad_sync:
            self.require_forward_param_sync = True
            self._expect_sync = True
        else:
            self.require_forward_param_sync = False
        return out

    def train(self, mode: bool = True) -> DistributedDataParallel:
        torch.nn.Module.train(self, mode)
        return self

    # backward --------------------------------------------------------------------------
    def _after_backward(self) -> None:
        """Runs once at the end of each backward pass (queued by the first gradient)."""
        self._queued = False
        if not self._expect_sync:
            return  # inside no_sync(): gradients accumulate here until a synced backward
        self._expect_sync = False
        used, self._used = self._used, [False] * len(self._params)
        keep = self._globally_used(used) if self.find_unused_parameters else [True] * len(used)
        if not self.find_unused_parameters and not all(used):
            self._unused_names = [n for (n, _), u in zip(self._named, used, strict=True) if not u]
        grads = []
        for p, k in zip(self._params, keep, strict=True):
            if k:
                if p.grad is None:  # unused here, used elsewhere: this rank adds zeros
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if grads and self._on_servers:
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.AVG
            self.process_group.allreduce(grads, opts, bucket_bytes=self.bucket_bytes_cap)
        elif grads:
            self._average_through_host(grads)

    def _average_through_host(self, grads: list[torch.Tensor]) -> None:
        """Another backend's average (gloo has no AVG): one flat sum per dtype, through
        this host once each way, divided by the group's size on the vGPU."""
        world = self.process_group.size()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        with torch.no_grad():
            for same in by_dtype.values():
                flat = torch.cat([g.reshape(-1) for g in same])
                dist.all_reduce(flat, group=self.process_group)
                flat.div_(world)
                offset = 0
                for g in same:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _globally_used(self, used: list[bool]) -> list[bool]:
        """Parameters used on any rank (one small allreduce and fetch, as PyTorch's own)."""
        # An autograd thread: the torch-function mode that sends device="cuda" to the
        # pool is per thread, so upload explicitly.
        flags = frontend.upload(torch.tensor(used, dtype=torch.int32, device="cpu"),
                                self.device.index)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.process_group.allreduce([flags], opts)
        return [bool(f) for f in flags.tolist()]

    # what PyTorch's DDP also offers ----------------------------------------------------
    def register_comm_hook(self, state: object, hook: Any) -> None:
        raise OrionError("DDP communication hooks are not supported on vGPUs (gradients are "
                         "averaged by the Orion servers); remove register_comm_hook")

    def _register_builtin_comm_hook(self, comm_hook_type: Any) -> None:
        self.register_comm_hook(None, comm_hook_type)

    @contextmanager
    def join(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        raise OrionError("DDP join() (uneven inputs) is not supported on vGPUs; give every "
                         "rank the same number of batches")

    def _set_static_graph(self) -> None:
        pass  # a static graph changes nothing here

    def _get_ddp_logging_data(self) -> dict:
        return {"backend_name": "nccl", "world_size": self.process_group.size(),
                "find_unused_parameters": self.find_unused_parameters,
                "bucket_cap_bytes": self.bucket_bytes_cap, "orion": 1}


def _grad_ready(ref: Any, i: int, param: torch.Tensor) -> None:
    ddp = ref()
    if ddp is None:
        return
    ddp._used[i] = True
    if not ddp._queued:
        ddp._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(ddp._after_backward)


def _on_vgpu(module: torch.nn.Module) -> bool:
    return any(isinstance(p, RemoteTensor) for p in module.parameters())


def _refuse(opts: dict) -> None:
    for name in _REFUSED:
        if opts.get(name) is not None:
            raise OrionError(f"DistributedDataParallel option {name} is not supported on vGPUs "
                             "(supported: device_ids, output_device, dim, broadcast_buffers, "
                             "init_sync, process_group, bucket_cap_mb, find_unused_parameters)")


def _check_params(module: torch.nn.Module, params: list[torch.Tensor]) -> None:
    devs = {p._dev if isinstance(p, RemoteTensor) else str(p.device) for p in params}
    if len(devs) != 1 or not all(isinstance(p, RemoteTensor) for p in params):
        raise OrionError("DistributedDataParallel on vGPUs needs all parameters on one vGPU; "
                         f"found {sorted(map(str, devs))}")
    for m in module.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse:
            raise OrionError("sparse gradients (Embedding(sparse=True)) are not supported by "
                             "DistributedDataParallel on vGPUs")


def _to_device(tree: Any, device: torch.device) -> Any:
    """Host tensors of the inputs go to the module's vGPU, as PyTorch's DDP moves them."""
    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not (isinstance(x, RemoteTensor)
                                                and x._dev == device.index):
            return x.to(device)
        return x
    return tree_map(move, tree)


def _new(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``DistributedDataParallel(module, ...)``, whatever name the program imported it by,
    is this class when the module is on a vGPU (Python then runs this class's
    ``__init__``), and PyTorch's own otherwise."""
    module = args[0] if args else kwargs.get("module")
    if cls is _RealDDP and isinstance(module, torch.nn.Module) and _on_vgpu(module):
        cls = DistributedDataParallel
    return object.__new__(cls)


def install() -> None:
    _RealDDP.__new__ = _new  # type: ignore[method-assign]
