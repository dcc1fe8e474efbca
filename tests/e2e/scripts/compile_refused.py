# A compiled graph that uses an operator outside the server's allowlist (a custom op of
# the program's own library) is refused when it is compiled, with one clear line.
import torch


@torch.library.custom_op("orion_test::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.compile
def f(x: torch.Tensor) -> torch.Tensor:
    return scale(x + 1)


device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.ones(4).to(device)
print("RESULT eager-ok", (x * 3).sum().item())  # the session works before
print("RESULT", f(x).sum().item())  # a local run prints 16.0; a vGPU refuses the graph
