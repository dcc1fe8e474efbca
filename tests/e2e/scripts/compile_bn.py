"""torch.compile of models with normalization layers in eval mode while autograd is on
(an evaluation loop without no_grad, a frozen backbone being fine-tuned through): the
compiled graph's values and gradients must be those of the same model run eagerly."""

import sys

import torch
import torch.nn as nn

mode = sys.argv[1]  # "eager" or "compile"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)


def show(name: str, t: torch.Tensor) -> None:
    print(f"RESULT {name} {tuple(t.shape)} {[round(v, 4) for v in t.detach().cpu().flatten().tolist()[:8]]}")


def run(name: str, model: nn.Module, x: torch.Tensor) -> None:
    model = model.to(DEV)
    model.train()
    for _ in range(2):  # running statistics that are not the defaults
        model(x)
    model.eval()
    fn = torch.compile(model) if mode == "compile" else model
    xi = x.clone().requires_grad_()
    y = fn(xi)
    y.square().sum().backward()
    show(name, y)
    show(name + "-input-grad", xi.grad)
    show(name + "-weight-grad", next(model.parameters()).grad)


g = torch.Generator().manual_seed(1)
run("bn1d", nn.BatchNorm1d(3), torch.randn(4, 3, generator=g).to(DEV))
run("conv-bn", nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
    torch.randn(2, 2, 6, 6, generator=g).to(DEV))
run("instancenorm", nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
    torch.randn(2, 3, 5, generator=g).to(DEV))
