"""``torch.Generator(device="cuda")`` on a vGPU, and ``torch.cuda.default_generators``.

A CPU build of PyTorch refuses CUDA generators. Here ``torch.Generator`` becomes a subclass
whose CUDA instances live in the vGPU's session (the server holds a generator of its own
device under the object's id, codec.EXT_GENERATOR): ``torch.randn(..., generator=g,
device="cuda")``, ``x.normal_(generator=g)``, ``randperm``, dropout-style ``bernoulli_``
draw from it there, and ``manual_seed``/``seed``/``get_state``/``set_state`` act on it.
Host generators are PyTorch's own objects, untouched; ``isinstance(g, torch.Generator)``
holds for both.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import torch

from orion_vgpu.protocol import codec

# The seed a new generator starts from (c10::default_rng_seed_val, CPU and CUDA alike).
DEFAULT_SEED = 67280421310721
_Base = torch._C.Generator
_cuda_index: Callable[[Any], int | None] = lambda d: None  # noqa: E731  (set by install)
_original: Any = None
_tags: dict[int, tuple[int, int]] = {}  # C seed of a vGPU generator -> (vGPU, generator id)
_free: Callable[[int, int], None] | None = None  # frontend._free (no import in __del__)


def _bind_free(free: Callable[[int, int], None]) -> None:
    global _free
    _free = free


class _GeneratorType(type(_Base)):  # type: ignore[misc]
    """Every generator, PyTorch's included, is an instance of the replaced torch.Generator."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _Base)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _Base)


class Generator(_Base, metaclass=_GeneratorType):
    """``torch.Generator`` while a program runs on vGPUs (see the module's docstring)."""

    _vdev: int
    _gid: int
    _seed: int

    def __new__(cls, device: Any = None) -> Any:
        idx = _cuda_index(device) if device is not None else None
        if idx is None:
            return _Base() if device is None else _Base(device)
        from orion_vgpu.client import frontend
        _bind_free(frontend._free)
        return _new(cls, idx, frontend._next_handle())

    @property  # type: ignore[override]
    def device(self) -> torch.device:
        return torch.device("cuda", self._vdev)

    def manual_seed(self, seed: Any) -> Generator:  # type: ignore[override]
        seed = int(seed)
        if not -(1 << 63) <= seed < 1 << 64:
            raise RuntimeError("Overflow when unpacking long long")
        seed %= 1 << 64  # as PyTorch stores a negative seed
        self._seed = seed
        _conn(self).seed(seed, self._gid)
        return self

    def seed(self) -> int:  # type: ignore[override]
        s = secrets.randbits(63)
        self.manual_seed(s)
        return s

    def initial_seed(self) -> int:  # type: ignore[override]
        return self._seed

    def get_state(self) -> torch.Tensor:  # type: ignore[override]
        return _conn(self).rng_state(self._gid)

    def set_state(self, state: torch.Tensor) -> Generator:  # type: ignore[override]
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            got = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
            raise TypeError(f"expected a torch.ByteTensor, but got {got}")
        _conn(self).set_rng_state(state.cpu(), self._gid)
        return self

    def clone_state(self) -> Generator:  # type: ignore[override]
        new = Generator(self.device)
        new.set_state(self.get_state())
        new._seed = self._seed
        return new

    def graphsafe_get_state(self) -> Generator:  # type: ignore[override]
        return self.clone_state()

    def graphsafe_set_state(self, state: Any) -> Generator:  # type: ignore[override]
        self.set_state(state.get_state())
        return self

    def __reduce__(self) -> Any:
        return (_restore, (self._vdev, self._seed, self.get_state()))

    def __deepcopy__(self, memo: dict) -> Generator:
        return self.clone_state()

    def __repr__(self) -> str:
        return f"<torch.Generator (vGPU cuda:{self._vdev}) object at {id(self):#x}>"

    def __del__(self) -> None:
        gid = self.__dict__.get("_gid")
        if gid and _free is not None:  # the session drops it with the next frees
            _tags.pop(self._tag, None)
            _free(self._vdev, gid)


class DefaultGenerator(Generator):
    """``torch.cuda.default_generators[i]``: the vGPU's own default generator (id 0), the
    one ``torch.cuda.manual_seed`` seeds and vGPU ops without a generator draw from."""

    def __new__(cls, idx: int) -> Any:
        return _new(cls, idx, 0)

    def manual_seed(self, seed: Any) -> Generator:  # type: ignore[override]
        from orion_vgpu.client.runtime import get_runtime
        seed = int(seed) % (1 << 64)
        self._seed = seed
        get_runtime().seed(self._vdev, seed)
        return self

    def initial_seed(self) -> int:  # type: ignore[override]
        from orion_vgpu.client.runtime import get_runtime
        return get_runtime().seeds.get(self._vdev, self._seed)


def _new(cls: type, idx: int, gid: int) -> Any:
    g = _Base.__new__(cls, "cpu")
    g._vdev, g._gid, g._seed = idx, gid, DEFAULT_SEED
    # PyTorch hands an op a new Python object for the same C generator: its C seed,
    # unused otherwise, is how the op's generator argument is known to be this one.
    g._tag = secrets.randbits(64)
    _Base.manual_seed(g, g._tag)
    _tags[g._tag] = (idx, gid)
    return g


def _restore(idx: int, seed: int, state: torch.Tensor) -> Generator:
    g = Generator(torch.device("cuda", idx))
    g.set_state(state)
    g._seed = seed
    return g


def _conn(g: Generator) -> Any:
    from orion_vgpu.client.runtime import get_runtime
    return get_runtime().conn(g._vdev)


def _entry(g: Any) -> tuple[int, int] | None:
    if not isinstance(g, _Base):
        return None
    return _tags.get(_Base.initial_seed(g))


def is_vgpu(g: Any) -> bool:
    """A vGPU's generator, whichever Python object PyTorch wrapped it in."""
    return _entry(g) is not None


def encode(g: Any) -> tuple[int, Any]:
    """(vGPU, wire value) of an op's generator argument; PyTorch's error for a host one."""
    entry = _entry(g)
    if entry is None:
        raise RuntimeError(f"Expected a 'cuda' device type for generator but found "
                           f"'{g.device.type}'")
    return entry[0], codec.generator_ext(entry[1])


def check_device(gen_dev: int, dev: int | None) -> None:
    if dev is not None and gen_dev != dev:
        raise RuntimeError(f"Expected a generator of cuda:{dev} (the op's vGPU) but found one "
                           f"of cuda:{gen_dev}; create it with torch.Generator(device="
                           f"'cuda:{dev}')")


def install(cuda_index: Callable[[Any], int | None], device_count: int) -> None:
    global _cuda_index, _original
    _cuda_index = cuda_index
    if _original is None:
        _original = torch.Generator
        torch.Generator = Generator  # type: ignore[misc]
    torch.cuda.default_generators = tuple(DefaultGenerator(i) for i in range(device_count))


def remove() -> None:
    global _original
    if _original is not None:
        torch.Generator = _original  # type: ignore[misc]
        _original = None
