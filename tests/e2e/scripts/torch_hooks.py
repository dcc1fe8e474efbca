# Where a vGPU program's torch calls go: wrapped functions, and a torch-function mode only
# where one is needed (autocast("cuda") regions; the whole process once it compiles, or
# with ORION_TORCH_HOOKS=0). Every check is an assert, "RESULT ok" at the end.
import functools
import os
import pickle
import threading

import torch
import torch._dynamo  # as a library may: dynamo loads while the wrappers are in place
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack

hooks = os.environ.get("ORION_TORCH_HOOKS", "1") != "0"


def modes() -> list[str]:
    return [type(m).__name__ for m in _get_current_function_mode_stack()]


start = modes()
assert start == ([] if hooks else ["VGPUMode"]), start
made = {
    "zeros": torch.zeros(2, device="cuda"),
    "full": torch.full((2,), 3.0, device="cuda:0"),
    "arange": torch.arange(4, device=torch.device("cuda")),
    "tensor": torch.tensor([1.0, 2.0], device="cuda"),
    "zeros_like": torch.zeros_like(torch.ones(3), device="cuda"),
    "new_zeros": torch.ones(1).new_zeros(2, device="cuda"),
    "fftfreq": torch.fft.fftfreq(4, device="cuda"),
    "to": torch.ones(2).to("cuda"),
    "to dtype": torch.ones(2).to("cuda", torch.float64),
    "cuda": torch.ones(2).cuda(),
    "module": torch.nn.Linear(2, 2).cuda().weight,
}
for name, t in made.items():
    assert t.device.type == "cuda" and t.is_cuda, name
assert made["to dtype"].dtype == torch.float64
assert made["fftfreq"].cpu().tolist() == torch.fft.fftfreq(4).tolist()
assert made["full"].cpu().tolist() == [3.0, 3.0]
# Host tensors stay on the host.
assert torch.zeros(2).device.type == "cpu"
assert torch.ones(2).to(torch.float64).device.type == "cpu"
assert torch.ones(1).new_zeros(2).device.type == "cpu"
# Another thread creates vGPU tensors too (a torch-function mode is on in one thread only).
if hooks:
    out: list = []
    th = threading.Thread(target=lambda: out.append(torch.ones(2, device="cuda")))
    th.start()
    th.join()
    assert out and out[0].device.type == "cuda" and out[0].sum().item() == 2.0
# The default device.
torch.set_default_device("cuda")
assert torch.ones(2).device.type == "cuda" and torch.randn(3).device.type == "cuda"
# The runtime's own host buffers stay on the host (a fetch into a vGPU tensor lost the
# session): RNG states, downloads, index lists, packed sequences' batch sizes.
state = torch.cuda.get_rng_state()
assert state.device.type == "cpu" and len(torch.cuda.get_rng_state_all()) == 1
torch.cuda.set_rng_state(state)
assert torch.Generator(device="cuda").get_state().device.type == "cpu"
d = torch.arange(6.0).reshape(2, 3)
assert d.cpu().tolist() == [[0, 1, 2], [3, 4, 5]] and d[[1, 0]][0, 0].item() == 3.0
packed = torch.nn.utils.rnn.pack_padded_sequence(
    d.reshape(2, 3, 1), torch.tensor([3, 1], device="cpu"), batch_first=True)
assert packed.batch_sizes.device.type == "cpu" and packed.batch_sizes.tolist() == [2, 1, 1]
torch.set_default_device(None)
assert torch.ones(2).device.type == "cpu"
# vGPU tensors: item, unique, attention, pinning.
v = torch.tensor([3, 1, 3, 2], device="cuda")
assert v[0].item() == 3
assert torch.unique(v).tolist() == [1, 2, 3] and v.unique().tolist() == [1, 2, 3]
assert torch.unique_consecutive(v).tolist() == [3, 1, 3, 2]
w = torch.tensor([1, 1, 2, 2, 2, 1], device="cuda")
vals, counts = torch.unique_consecutive(w, return_counts=True)
assert vals.tolist() == [1, 2, 1] and counts.tolist() == [2, 3, 1]
torch.manual_seed(0)
q = torch.randn(1, 2, 4, 8)
ref = F.scaled_dot_product_attention(q, q, q)
got = F.scaled_dot_product_attention(q.cuda(), q.cuda(), q.cuda()).cpu()
assert torch.allclose(ref, got, atol=1e-5)
assert torch.ones(2).pin_memory().device.type == "cpu" and not torch.ones(2).is_pinned()
# new_tensor builds from its data; .to(other) and copy=True as PyTorch defines them.
assert torch.ones(1).new_tensor([1.0, 2.0], device="cuda").cpu().tolist() == [1.0, 2.0]
nt = made["zeros"].new_tensor([5.0, 6.0])
assert nt.device.type == "cuda" and nt.cpu().tolist() == [5.0, 6.0]
to_other = torch.tensor([7.0]).to(made["zeros"])
assert to_other.device.type == "cuda" and to_other.cpu().tolist() == [7.0]
same = made["zeros"]
assert same.to("cuda") is same and same.to("cuda", copy=True) is not same
# Wrapped functions pickle by name, as PyTorch's own (spawned processes, DataLoader args).
assert pickle.loads(pickle.dumps(functools.partial(torch.ones, 2)))().tolist() == [1.0, 1.0]
assert pickle.loads(pickle.dumps(torch.Tensor.new_zeros)) is torch.Tensor.new_zeros
# TorchScript compiles the wrapped functions as the operators they wrap.
@torch.jit.script
def plus_zeros(x: torch.Tensor) -> torch.Tensor:
    return x + torch.zeros(2, dtype=x.dtype)


@torch.jit.script
def uniques(x: torch.Tensor) -> torch.Tensor:
    return torch.unique(x)


assert plus_zeros(torch.ones(2)).tolist() == [1.0, 1.0]
assert uniques(torch.tensor([2, 1, 2])).tolist() == [1, 2]
# Autocast: a mode for the region, and gone after it.
lin = torch.nn.Linear(4, 4).cuda()
with torch.autocast("cuda", dtype=torch.float16):
    assert modes().count("VGPUMode") == 1, modes()
    y = lin(torch.randn(2, 4, device="cuda"))
    assert y.dtype == torch.float16
    with torch.autocast("cuda", enabled=False):
        assert lin(torch.randn(2, 4, device="cuda")).dtype == torch.float32
    # Tensor methods reach the mode as PyTorch looks them up: by name, on torch.Tensor.
    assert torch.ones(2).to("cuda").device.type == "cuda"
    assert torch.ones(2).cuda().device.type == "cuda"
    assert v.unique().tolist() == [1, 2, 3] and v[0].item() == 3
assert modes() == start, modes()


@torch.autocast("cuda", dtype=torch.float16)
def half(x: torch.Tensor) -> torch.Tensor:
    return lin(x)


assert half(torch.randn(2, 4, device="cuda")).dtype == torch.float16
assert modes() == start, modes()
# Compiling: the wrappers are taken away, one mode sees every call.
assert (torch.zeros is not torch._C._VariableFunctions.zeros) == hooks
f = torch.compile(lambda x: x * 2 + torch.ones(2, device=x.device))
assert f(torch.ones(2, device="cuda")).cpu().tolist() == [3.0, 3.0]
assert torch.zeros is torch._C._VariableFunctions.zeros
assert "to" not in vars(torch.Tensor)
assert modes() == ["_CompilingMode"], modes()
g = torch.compile(lambda x: x - torch.ones(2, device=x.device))  # a second compile
assert g(torch.ones(2, device="cuda")).cpu().tolist() == [0.0, 0.0]
assert modes() == ["_CompilingMode"], modes()
assert torch.zeros(2, device="cuda").device.type == "cuda"
print("RESULT ok")
