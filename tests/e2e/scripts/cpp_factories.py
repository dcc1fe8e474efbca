"""Ops whose C++ builds helper tensors with an input's options (so, on a vGPU, with the
wrapper's meta:N device): linspace in affine_grid's backward, eye and arange in others.
Values and gradients must be those of the same program run locally."""

import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(11)


def show(name: str, t: torch.Tensor) -> None:
    print(f"RESULT {name} {tuple(t.shape)} {[round(v, 5) for v in t.detach().cpu().flatten().tolist()[:12]]}")


theta = (torch.randn(2, 2, 3, generator=g) * 0.3).to(DEV).requires_grad_()
img = torch.randn(2, 3, 5, 5, generator=g).to(DEV)
grid = F.affine_grid(theta, (2, 3, 4, 4), align_corners=False)
out = F.grid_sample(img, grid, align_corners=False)
out.square().sum().backward()
show("affine-grid", grid)
show("grid-sample", out)
show("theta-grad", theta.grad)

theta3 = (torch.randn(1, 3, 4, generator=g) * 0.3).to(DEV).requires_grad_()
F.affine_grid(theta3, (1, 1, 2, 3, 3), align_corners=True).sum().backward()
show("theta3-grad", theta3.grad)

a = (torch.randn(4, 4, generator=g) + 4 * torch.eye(4)).to(DEV).requires_grad_()
torch.linalg.inv(a).sum().backward()
show("inv-grad", a.grad)
d = torch.randn(3, 4, generator=g).to(DEV).requires_grad_()
torch.diag_embed(d).sum(dim=(-1, -2)).pow(2).sum().backward()
show("diag-embed-grad", d.grad)
show("eye-like", torch.eye(3, 2, device=DEV) * 2)
show("arange-like", torch.arange(2, 9, 3, device=DEV).float())
